"""Ctrl-C in ``fedq-simulate`` stops the run cleanly: every Flower and Ray process it
started ends, the rounds already done stay saved, and it prints the command that resumes
the run (not a KeyboardInterrupt traceback). Runs the real command in its own process
group and sends SIGINT to the group, as a terminal does; ``kill PID`` (SIGTERM to the
command alone) must end it the same way, with exit code 143.

A terminal's shell starts a foreground job with SIGINT at its default action; the test does
the same, whatever the test runner's own disposition. Without that, the command inherits
it, and a runner started as a background job of a non-interactive shell (``cmd &`` in a
script, ``nohup``) ignores SIGINT: the kernel drops the signal, the run goes on past round
12 and ``communicate`` times out, the signature of the one CI failure (reproduced with
SIGINT in the command's ``SigIgn`` in ``/proc/<pid>/status``)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# more rounds than the test waits for: a fused round of this size takes ~0.5 s, so 50 of
# them could end before the SIGINT lands
ROUNDS = 1000
TINY = ["--set", "local-steps=300", "--set", "learning-starts=100", "--set", "eval-episodes=2",
        "--set", "hidden-sizes=16,16", "--set", "buffer-size=2000"]


def _sigint_as_in_a_foreground_job() -> None:
    """In the child before exec: SIGINT back to its default action, as a shell sets it for
    a foreground job (an ignored SIGINT would survive exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions ``text`` (our private temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def _ctrl_c(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGINT)  # a terminal signals the whole foreground group


def _kill_pid(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)  # `kill PID`: only fedq-simulate itself


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "code"), [(_ctrl_c, 130), (_kill_pid, 143)],
                         ids=["ctrl-c", "kill-pid"])
def test_ctrl_c_stops_every_process_keeps_the_rounds_and_prints_the_resume_command(
        tmp_path, stop, code):
    # every temp dir of the run (SuperLink home, Ray) goes here; short, since Ray's socket
    # paths under it must stay within 107 bytes
    scratch = Path(tempfile.mkdtemp(prefix="fq-int-", dir="/tmp"))
    run_dir = tmp_path / "run"
    env = {**os.environ, "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "fedq.simulations.run", "--clients", "2",
               "--rounds", str(ROUNDS), "--run-dir", str(run_dir), *TINY]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=_sigint_as_in_a_foreground_job)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(f"[fedq] round 2/{ROUNDS}"):
                break
        assert any(line.startswith(f"[fedq] round 2/{ROUNDS}") for line in lines), "".join(lines)
        stop(process)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert process.returncode == code, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert re.search(rf"fedq-simulate --run-dir {re.escape(str(run_dir))} --resume", output)
    # the rounds done are kept (rotation may have dropped round 1's file by now)
    assert sorted((run_dir / "checkpoints").glob("round-*.pt"))
    deadline = time.monotonic() + 30  # the watchdog sweeps within seconds
    while _processes_mentioning(str(scratch)) and time.monotonic() < deadline:
        time.sleep(1)
    assert _processes_mentioning(str(scratch)) == []
    shutil.rmtree(scratch, ignore_errors=True)


def _catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a handler for SIGTERM (``SigCgt`` in its /proc status): Python
    catches SIGINT from its start, SIGTERM only once fedq installs a handler."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "kill-pid"])
def test_a_signal_while_the_driver_still_imports_ends_it_with_one_line(tmp_path, signum,
                                                                       code):
    """The console script answers Ctrl-C / ``kill PID`` from its first instant: in the
    second or so that importing Flower takes, before any run is submitted, a signal ends
    it with one line and exit code 130 / 143, not a KeyboardInterrupt traceback (Ctrl-C) or
    a silent death (kill). Without the entry point's handler, SIGTERM is not caught until
    the run is about to start, so this test would signal a starting run instead."""
    script = Path(sys.executable).with_name("fedq-simulate")
    process = subprocess.Popen([str(script), "--run-dir", str(tmp_path / "run"), *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True,
                               preexec_fn=_sigint_as_in_a_foreground_job)
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(process.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, output[-3000:]
    assert output.strip() == ("fedq-simulate: interrupted before the run was submitted; "
                              "nothing ran, nothing to resume.")
