"""A Docker engine, a base image and fedq's image, made with package registries only.

What ``simulations/compose_check.py`` needs before it can run ``docker compose up``, on a
machine that may have no engine and cannot pull from a container registry:

* :func:`docker_engine`: use the engine that answers ``docker info``; where none does,
  install Debian's ``docker.io``/``docker-compose``/``debootstrap`` (apt) and start
  ``dockerd`` with its data under the work directory, and stop that dockerd (by its PID)
  on exit.
* :func:`ensure_base_image`: ``python:3.11-slim`` if the engine has it, else a Debian
  bookworm image made with ``debootstrap`` and ``docker import`` (Debian's Python is 3.11).
* :func:`download_wheels`: every wheel the image installs, with ``pip download``.
* :func:`build_image`: ``docker build --network none`` with the Dockerfile's build arguments
  pointing at those wheels, from a build context of the checkout's files plus the wheels.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APT_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
DEBIAN_BASE = "fedq-base:bookworm"
UPSTREAM_BASE = "python:3.11-slim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: What the image needs beyond pyproject's dependencies: the build backend of `pip install .`
BUILD_REQUIREMENTS = ("setuptools>=68",)


class EngineError(RuntimeError):
    """The engine, an image or a download could not be provided; says which and why."""


def log(message: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: Sequence[str], *, timeout: float, check: bool = True,
        env: dict[str, str] | None = None, cwd: Path | None = None,
        quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise :class:`EngineError` with its output's tail."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd, check=False)
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise EngineError(f"`{' '.join(args)}` exited {done.returncode}:\n{tail}")
    if not quiet and done.returncode != 0:
        log(f"`{' '.join(args)}` exited {done.returncode}")
    return done


def engine_answers() -> bool:
    """Whether ``docker info`` reaches a running engine."""
    if not shutil.which("docker"):
        return False
    try:
        return run(["docker", "info"], timeout=60, check=False, quiet=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    """The engine in use, the Compose command that drives it, and the dockerd this
    check started (and will stop), if any."""

    compose: list[str]
    started_here: bool
    dockerd_pid: int | None = None


def compose_command() -> list[str]:
    """``docker compose`` (v2) where the plugin exists, else ``docker-compose`` (v1.29)."""
    if run(["docker", "compose", "version"], timeout=60, check=False,
           quiet=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise EngineError("neither `docker compose` nor `docker-compose` is installed "
                      f"(apt-get install {' '.join(APT_PACKAGES)})")


def install_packages() -> None:
    """Debian's engine, Compose v1 and debootstrap, where any of them is missing."""
    if all(shutil.which(tool) for tool in ("dockerd", "docker-compose", "debootstrap")):
        return
    if os.geteuid() != 0:
        raise EngineError("no Docker engine runs and installing one needs root: "
                          f"apt-get install {' '.join(APT_PACKAGES)}")
    log(f"apt-get install {' '.join(APT_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], timeout=900, env=env)
    run(["apt-get", "install", "-y", *APT_PACKAGES], timeout=1800, env=env)


@contextlib.contextmanager
def docker_engine(work: Path) -> Iterator[Engine]:
    """The running engine, or one started here for the duration (stopped by PID)."""
    if engine_answers():
        log("using the Docker engine that is already running")
        yield Engine(compose=compose_command(), started_here=False)
        return
    install_packages()
    data_root = work / "docker-data"
    data_root.mkdir(parents=True, exist_ok=True)
    with open(work / "dockerd.log", "ab") as out:
        dockerd = subprocess.Popen(["dockerd", "--data-root", str(data_root)], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    log(f"started dockerd (pid {dockerd.pid}, data root {data_root})")
    try:
        deadline = time.monotonic() + 120
        while not engine_answers():
            if dockerd.poll() is not None:
                raise EngineError(f"dockerd exited {dockerd.returncode}; see "
                                  f"{work / 'dockerd.log'}")
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not answer within 120 s; see "
                                  f"{work / 'dockerd.log'}")
            time.sleep(1)
        yield Engine(compose=compose_command(), started_here=True, dockerd_pid=dockerd.pid)
    finally:
        dockerd.terminate()  # dockerd stops its containers and its containerd
        try:
            dockerd.wait(timeout=120)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait(timeout=30)
        log(f"stopped dockerd (pid {dockerd.pid})")


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], timeout=60, check=False,
               quiet=True).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 ``URIs:`` or a ``deb`` line), so
    debootstrap downloads from where apt already may."""
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"),
               *Path("/etc/apt/sources.list.d").glob("*.list"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return DEFAULT_MIRROR


def ensure_base_image(work: Path, requested: str | None) -> str:
    """The base image to build on: ``requested``, else python:3.11-slim if the engine has
    it, else a debootstrapped Debian bookworm with Python 3.11 (made once)."""
    if requested:
        if not image_exists(requested):
            raise EngineError(f"--base-image {requested}: the engine has no such image")
        return requested
    if image_exists(UPSTREAM_BASE):
        return UPSTREAM_BASE
    if image_exists(DEBIAN_BASE):
        return DEBIAN_BASE
    rootfs = work / "rootfs"
    done_stamp = work / "rootfs.done"
    if not done_stamp.exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        mirror = debian_mirror()
        log(f"debootstrap bookworm from {mirror} (takes ~10 min on a loaded machine)")
        run(["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,ca-certificates",
             "bookworm", str(rootfs), mirror], timeout=3600)
        done_stamp.touch()
    log(f"docker import {rootfs} as {DEBIAN_BASE}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", DEBIAN_BASE], stdin=tar.stdout,
                              capture_output=True, text=True, timeout=1800, check=False)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise EngineError(f"docker import of {rootfs} failed: {imported.stderr[-2000:]}")
    return DEBIAN_BASE


def image_requirements() -> list[str]:
    """What the Dockerfile installs: pyproject's dependencies plus the [torch] and [server]
    extras (not [sim]: Ray), plus the build backend (the same selection as the Dockerfile)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = project["dependencies"] + extras["torch"] + extras["server"]
    return [d for d in deps if not d.startswith("fedq[")] + list(BUILD_REQUIREMENTS)


def download_wheels(work: Path, extra_pip_args: Sequence[str] = ()) -> Path:
    """``pip download`` every wheel the image needs (once per requirement set) into
    ``work/wheels``; pip's own configuration decides where from."""
    wheels = work / "wheels"
    requirements = "\n".join(image_requirements()) + "\n"
    stamp = work / "wheels.done"
    key = hashlib.sha256((requirements + " ".join(extra_pip_args)).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return wheels
    (work / "requirements.txt").write_text(requirements)
    log(f"pip download into {wheels}")
    run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
         "-r", str(work / "requirements.txt"), *extra_pip_args], timeout=3600)
    stamp.write_text(key)
    return wheels


def stage_context(work: Path, wheels: Path) -> Path:
    """A build context of the checkout's files (tracked and untracked-not-ignored, as git
    lists them) plus ``wheelhouse/``, hard-linked where possible."""
    context = work / "context"
    shutil.rmtree(context, ignore_errors=True)
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 timeout=120, cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            _link(source, context / name)
    for wheel in wheels.iterdir():
        _link(wheel, context / "wheelhouse" / wheel.name)
    return context


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_image(work: Path, tag: str, base_image: str, wheels: Path) -> float:
    """``docker build --network none`` of the project's Dockerfile from the wheels;
    returns the build's seconds (layers cached from an earlier build make it short)."""
    context = stage_context(work, wheels)
    log(f"docker build --network none -t {tag} (base {base_image})")
    started = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no frontend to pull
    done = run(["docker", "build", "--network", "none", "-t", tag,
                "--build-arg", f"BASE_IMAGE={base_image}",
                "--build-arg", "PIP_SOURCE=--no-index --find-links /wheels",
                str(context)], timeout=3600, env=env)
    (work / "build.log").write_text(done.stdout + done.stderr)
    return time.monotonic() - started
