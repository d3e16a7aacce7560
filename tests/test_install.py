"""What users install takes PyTorch's CPU build by design, not by this machine's luck.

PyPI's Linux torch 2.13.0 wheels (x86_64 and aarch64) are CUDA builds that pull GBs of
nvidia-* wheels. fedq pins ``torch==2.13.0+cpu`` on Linux, which only PyTorch's CPU index
serves, and the README installs it from there first. These tests resolve the install
with pip against the public index in dry-run mode (nothing is installed): from PyPI alone
it must fail at torch rather than pick CUDA, and with the CPU wheel available it must
resolve with no CUDA package at all. They need PyPI and skip, saying so, without it.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/simple"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PACKAGE = re.compile(r"^(nvidia-|cuda-|triton\b)", re.IGNORECASE)
ARCHES = ("aarch64", "x86_64")  # a 64-bit Raspberry Pi OS; a gateway


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (OSError, ValueError):
        return False


def _cpu_wheel_source() -> list[str] | None:
    """pip arguments that offer torch's CPU wheel: PyTorch's CPU index where it can be
    reached, else a local folder holding that index's wheel (``FEDQ_TORCH_WHEELS``, or
    the wheel folder of this workplace's machines); None where there is neither."""
    if _reachable(f"{CPU_INDEX}/torch/"):
        return ["--extra-index-url", CPU_INDEX]
    for folder in (os.environ.get("FEDQ_TORCH_WHEELS"), "/opt/wheels"):
        if folder and list(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
            return ["--find-links", folder]
    return None


def _command(requirement: str, *extra: str, report: Path) -> list[str]:
    """``pip install --dry-run`` against PyPI only, ignoring this machine's pip config."""
    return [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run",
            "--ignore-installed", "--disable-pip-version-check", "--index-url", PYPI,
            "--report", str(report), *extra, requirement]


def _base_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.fixture(scope="module")
def resolves(tmp_path_factory):
    """The four resolves, started together: each spends ~45 s waiting on PyPI and a few
    seconds of CPU, so side by side they take the time of the slowest, not the sum.
    Maps each name to (its pip process, its report path); None where it cannot run."""
    if not _reachable(f"{PYPI}/pip/"):
        pytest.skip(f"{PYPI} is not reachable from here")
    base = tmp_path_factory.mktemp("resolves")
    first, *rest = _base_dependencies()
    wheels = _cpu_wheel_source()
    commands = {"pypi-alone": [".[dev]"],
                "readme": None if wheels is None else [".[dev]", *wheels]}
    for arch in ARCHES:
        platforms = [arg for tag in ("manylinux_2_36", "manylinux_2_28", "manylinux_2_17",
                                     "manylinux2014") for arg in ("--platform", f"{tag}_{arch}")]
        commands[f"device-{arch}"] = [first, *rest, *platforms, "--python-version", "3.11",
                                      "--only-binary=:all:", "--target", str(base / arch)]
    started = {}
    for name, args in commands.items():
        if args is None:
            started[name] = None
            continue
        report = base / f"{name}.json"
        command = _command(args[0], *args[1:], report=report)
        started[name] = (subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), report)
    yield started
    for entry in started.values():
        if entry is not None and entry[0].poll() is None:
            entry[0].kill()
            entry[0].communicate()


def _finished(resolves, name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The named resolve once it has ended (15 minutes at most)."""
    process, report = resolves[name]
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), report


def _resolved(report: Path) -> dict[str, str]:
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}


@pytest.mark.slow
def test_pypi_alone_fails_at_torch_instead_of_downloading_cuda(resolves):
    done, report = _finished(resolves, "pypi-alone")
    assert done.returncode != 0
    assert "torch==2.13.0+cpu" in done.stdout + done.stderr
    assert not report.exists()  # nothing was resolved to install


@pytest.mark.slow
def test_the_readme_install_resolves_the_cpu_torch_and_no_cuda_package(resolves):
    if resolves["readme"] is None:
        pytest.skip("neither PyTorch's CPU index nor a folder with its torch 2.13.0+cpu "
                    "wheel is reachable from here")
    done, report = _finished(resolves, "readme")
    assert done.returncode == 0, done.stderr[-3000:]
    packages = _resolved(report)
    assert packages["torch"] == "2.13.0+cpu"
    assert "opacus" in packages and "flwr" in packages
    assert not [name for name in packages if CUDA_PACKAGE.match(name)], packages


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_a_device_install_resolves_without_torch_or_cuda(resolves, arch):
    """``pip install fedq`` on a device (a 64-bit Raspberry Pi OS Bookworm, glibc 2.36; a
    gateway) takes what the numpy backend needs and nothing of torch: resolved for the
    wheels that platform accepts."""
    done, report = _finished(resolves, f"device-{arch}")
    assert done.returncode == 0, done.stderr[-3000:]
    packages = _resolved(report)
    assert {"flwr", "gymnasium", "numpy"} <= set(packages)
    assert "torch" not in packages and "opacus" not in packages
    assert not [name for name in packages if CUDA_PACKAGE.match(name)], packages
