"""A run directory survives a lost or damaged pointer or checkpoint (docs/durability.md):
resume finds the newest complete checkpoint, metrics rows are never rewritten away, and
checkpoint rotation never deletes the checkpoint it just wrote."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.server.run_directory import RunDirectory, RunDirectoryError


def _config(root, resume):
    return FedqConfig.from_mapping({"run-dir": str(root), "resume": resume})


def _run(root, rounds):
    """A run directory after ``rounds`` rounds, written as the ServerApp writes them."""
    run_dir = RunDirectory(root)
    assert run_dir.start(_config(root, resume=False)) == 0
    for r in range(1, rounds + 1):
        _round(run_dir, r)
    return run_dir


def _round(run_dir, r):
    run_dir.append_client_metrics([{"round": r, "phase": "train", "node-id": n}
                                   for n in range(6)])
    run_dir.append_metrics({"round": r})
    run_dir.save_checkpoint(r, {"w": torch.full((2,), float(r))}, {})


def _rounds(run_dir):
    return [row["round"] for row in run_dir.read_metrics()]


def test_resume_without_latest_keeps_every_row_and_continues_after_the_last_round(
        tmp_path, caplog):
    run_dir = _run(tmp_path, 8)
    (run_dir.checkpoints / "LATEST").unlink()
    with caplog.at_level(logging.WARNING):
        assert run_dir.start(_config(tmp_path, resume=True)) == 8
    assert "checkpoints/LATEST is missing" in caplog.text
    assert _rounds(run_dir) == list(range(1, 9))
    assert len(run_dir.read_client_metrics()) == 48
    _round(run_dir, 9)
    assert run_dir.load_checkpoint()["round"] == 9
    assert (run_dir.checkpoints / "LATEST").read_text() == "round-0009.pt"


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run_dir = _run(tmp_path, 8)
    latest = run_dir.checkpoints / "round-0008.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert run_dir.start(_config(tmp_path, resume=True)) == 7
    assert "skipped round-0008.pt (does not match its digest)" in caplog.text
    assert run_dir.load_checkpoint(7)["state_dict"]["w"][0] == 7.0
    # round 8 is repeated: its rows leave the logs but are kept beside them
    assert _rounds(run_dir) == list(range(1, 8))
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in superseded] == [8]
    assert len((tmp_path / "clients.superseded.jsonl").read_text().splitlines()) == 6
    # the damaged file is renamed aside, not deleted
    assert len(list(run_dir.checkpoints.glob("round-0008.pt.damaged-*"))) == 1


def test_rotation_after_a_resume_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    run_dir = _run(tmp_path, 8)
    (run_dir.checkpoints / "LATEST").unlink()
    last = run_dir.start(_config(tmp_path, resume=True))
    for r in range(last + 1, last + 4):
        _round(run_dir, r)
        assert run_dir.load_checkpoint()["round"] == r
    names = sorted(p.name for p in run_dir.checkpoints.glob("round-*.pt"))
    assert names == ["round-0009.pt", "round-0010.pt", "round-0011.pt"]
    assert run_dir.start(_config(tmp_path, resume=True)) == 11


def test_rows_without_any_complete_checkpoint_refuse_the_resume_and_stay(tmp_path):
    run_dir = _run(tmp_path, 3)
    for path in run_dir.checkpoints.glob("round-*.pt"):
        path.write_bytes(b"garbage")
    with pytest.raises(RunDirectoryError, match=r"records rounds up to 3 but .* holds no "
                                                r"complete checkpoint"):
        run_dir.start(_config(tmp_path, resume=True))
    assert _rounds(run_dir) == [1, 2, 3]


@pytest.mark.parametrize("pointer", [b"../../config.json", b"\x00\xff", b"round-0002.pt"])
def test_a_foreign_or_stale_latest_is_not_followed(tmp_path, pointer, caplog):
    run_dir = _run(tmp_path, 4)
    (run_dir.checkpoints / "LATEST").write_bytes(pointer)
    with caplog.at_level(logging.WARNING):
        assert run_dir.start(_config(tmp_path, resume=True)) == 4
    assert "checkpoints/LATEST" in caplog.text
    assert _rounds(run_dir) == [1, 2, 3, 4]


def test_an_unloadable_checkpoint_is_named(tmp_path):
    run_dir = _run(tmp_path, 1)
    path = run_dir.checkpoints / "round-0001.pt"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RunDirectoryError, match=r"round-0001\.pt' cannot be loaded"):
        run_dir.load_checkpoint(1)


def test_a_checkpoint_whose_digest_was_lost_is_used_with_a_warning(tmp_path, caplog):
    run_dir = _run(tmp_path, 3)
    (run_dir.checkpoints / "round-0003.pt.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        assert run_dir.start(_config(tmp_path, resume=True)) == 3
    assert "round-0003.pt, which has no digest file" in caplog.text


def _snapshot(root):
    """Every file under ``root`` (but the lock) with its bytes and mtime: what a refused
    start must leave exactly as it was."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("damage", ["config-changed", "no-complete-checkpoint",
                                    "metrics-missing", "metrics-emptied"])
def test_a_refused_resume_changes_nothing_in_the_run_directory(tmp_path, damage):
    run_dir = _run(tmp_path, 4)
    run_dir.close()
    newest = run_dir.checkpoints / "round-0004.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # damaged: a resume would set it aside
    config = _config(tmp_path, resume=True)
    if damage == "config-changed":
        config = FedqConfig.from_mapping({"run-dir": str(tmp_path), "resume": True,
                                          "learning-rate": 0.5})
    elif damage == "no-complete-checkpoint":
        for path in run_dir.checkpoints.glob("round-*.pt"):
            path.write_bytes(b"garbage")
    elif damage == "metrics-missing":
        run_dir.metrics_path.unlink()
    else:
        run_dir.metrics_path.write_text("")
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirectoryError, match="cannot resume"):
        RunDirectory(tmp_path).start(config)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["missing", "emptied"])
def test_lost_metrics_with_checkpoints_refuse_instead_of_restarting_at_round_0(tmp_path,
                                                                             how):
    run_dir = _run(tmp_path, 5)
    run_dir.close()
    if how == "missing":
        run_dir.metrics_path.unlink()
    else:
        run_dir.metrics_path.write_text("")
    with pytest.raises(RunDirectoryError, match=r"metrics\.jsonl (is missing|holds no "
                                                r"readable row) but .* holds round-0005\.pt"):
        RunDirectory(tmp_path).start(_config(tmp_path, resume=True))
    assert sorted(p.name for p in run_dir.checkpoints.glob("round-*.pt")) == [
        "round-0003.pt", "round-0004.pt", "round-0005.pt"]


def test_a_second_server_app_cannot_write_a_run_directory_in_use(tmp_path):
    """The lock is held across processes: a second ServerApp process on the same run-dir
    is refused, naming the directory and the holder, and writes nothing."""
    run_dir = _run(tmp_path, 2)
    before = _snapshot(tmp_path)
    second = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from fedq.common.config import FedqConfig; "
         "from fedq.server.run_directory import RunDirectory; "
         "RunDirectory(Path(sys.argv[1])).start(FedqConfig.from_mapping("
         "{'run-dir': sys.argv[1], 'resume': True}))", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert (f"run-dir '{tmp_path}' is in use by another ServerApp (pid {os.getpid()}"
            in second.stderr)
    assert _snapshot(tmp_path) == before
    run_dir.close()  # released: the next ServerApp may resume it
    assert RunDirectory(tmp_path).start(_config(tmp_path, resume=True)) == 2


def test_the_simulate_driver_starts_without_importing_torch():
    """``fedq-simulate``'s own process only reads the run directory's files; importing
    torch there (via the checkpoint code) cost ~3 s before the first progress line and
    widened the window in which Ctrl-C printed a traceback."""
    probe = ("import sys, fedq.simulations.run; "
             "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
