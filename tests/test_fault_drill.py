"""The fault drill's own parts (simulations/fault_drill.py), fast: a real full disk, the
verdicts it gives, how a drill's sessions are checked and reported. The drill itself runs
for tens of minutes (docs/durability.md has its command and results)."""

import errno
import json
import os
import random
import shutil

import pytest

from fedq.simulations import fault_drill
from fedq.simulations.fault_drill import Fault, fill_disk, judge, loop_disks, table


def _can_mount():
    return os.geteuid() == 0 and shutil.which("mkfs.ext4") and shutil.which("mount")


@pytest.mark.skipif(not _can_mount(), reason="loop mounts need root and mkfs.ext4")
def test_a_full_loop_disk_fails_writes_with_enospc_and_is_freed_after(tmp_path):
    target = tmp_path / "state"
    with loop_disks(tmp_path, {"supernode-1": target}) as disks:
        with fill_disk(disks["supernode-1"]) as filled:
            assert filled > 20 << 20  # most of the 32 MiB image
            with pytest.raises(OSError) as err, open(target / "x", "wb") as fh:
                fh.write(os.urandom(1 << 16))
                fh.flush()
                os.fsync(fh.fileno())
            assert err.value.errno == errno.ENOSPC
        (target / "x").write_bytes(os.urandom(1 << 16))  # space again
    assert not any(target.iterdir())  # unmounted: the data lives in the image


class _Drill:
    """What :func:`judge` reads of a drill."""

    def __init__(self, tmp_path, submissions):
        self.submissions = submissions
        self._tmp = tmp_path

    def _submit_log(self, index):
        return self._tmp / f"submit-{index}.log"


def test_a_fault_is_named_only_by_its_own_node_or_file(tmp_path):
    rows = [{"round": 3, "device-failures": [
        {"node-id": 7, "error": "device node-7: cannot save its state in '/s' (No space "
                                "left on device); this round's training is not kept"}]}]
    drill = _Drill(tmp_path, [1])
    stopped = Fault("clientapp-sigstop", "supernode-1", "pids [5] 50.0s", 0.0, 2)
    judge(stopped, rows, 4, {"supernode-1": [7], "supernode-2": [8]}, drill)
    assert stopped.named == "named" and stopped.progressed and not stopped.lost
    other = Fault("node-kill9", "supernode-2", "", 0.0, 2)
    judge(other, rows, 4, {"supernode-1": [7], "supernode-2": [8]}, drill)
    assert other.named == "no effect"
    full = Fault("disk-full", "supernode-1", "", 0.0, 2, needles=list(fault_drill.NO_SPACE))
    judge(full, rows, 4, {"supernode-1": [7]}, drill)
    assert full.named == "named"
    stalled = Fault("superlink-kill9", "superlink", "restarted", 0.0, 4, submission=0)
    judge(stalled, rows, 4, {}, drill)
    assert stalled.named == "named"  # its submission exited 1
    assert stalled.lost == ["no round completed after it before the drill ended"]


@pytest.mark.parametrize(("sessions", "message"), [
    ([], r"sessions: a non-empty list"),
    ([{"faults": 3, "minutes": 1}], r"sessions\[0\]: needs exactly faults, minutes, kinds"),
    ([{"faults": 3, "minutes": 1, "kinds": "node-kil9"}], r"sessions\[0\].kinds: unknown "
                                                          r"\['node-kil9'\]"),
    ([{"faults": 30, "minutes": 5, "kinds": "all"}, {"faults": 20, "minutes": 5,
                                                     "kinds": "all"}],
     r"sessions\[1\]: faults \(20\) must exceed the earlier sessions' \(30\)"),
])
def test_a_bad_drill_is_refused_naming_its_session_before_any_process_starts(
        sessions, message):
    from fedq.simulations import bench_fault_drill
    from fedq.simulations.harness import BENCHMARKS, HarnessError, resolve_params

    params = resolve_params(BENCHMARKS["fault_drill"], {"sessions": sessions}, quick=False)
    with pytest.raises(HarnessError, match=message):
        bench_fault_drill.cells(params)


def test_the_drill_table_counts_every_session_and_lists_what_was_lost_or_unnamed():
    """The results page of a drill of two sessions: kinds never injected are left out of
    the table, the total counts both sessions, and a lost or unnamed fault is listed with
    its details rather than hidden in the JSON."""
    from fedq.simulations import bench_fault_drill
    from fedq.simulations.harness import BENCHMARKS, Cell, resolve_params

    faults = [Fault("node-kill9", "supernode-1", "", 1.0, 2, named="named", session=0),
              Fault("device-file", "supernode-2", "truncate learner.pt", 2.0, 3,
                    named="unnamed", session=0),
              Fault("status-file", "server", "garbage status.json", 3.0, 5,
                    lost=["metrics.jsonl lost round 4"], named="named", session=1)]
    session = {"faults": 2, "kinds": ["node-kill9"], "seconds": 60, "rounds-at-end": 4,
               "submissions": [1, None], "full-disk": "RLIMIT_FSIZE",
               "private": "no DP, no compression", "orphans": []}
    drill = {"sessions": [session, {**session, "faults": 1}], "rounds": 6, "orphans": 0,
             "table": table(faults), "faults": [vars(f) for f in faults]}
    params = resolve_params(BENCHMARKS["fault_drill"], {}, quick=False)
    summary = bench_fault_drill.summarise(params, [(Cell(fault_drill.FAULT_DRILL, params),
                                                    drill)])
    assert [row["kind"] for row in summary.rows] == [
        "node-kill9", "device-file", "status-file", "total"]
    assert summary.rows[-1] == {"kind": "total", "injected": 3, "survived": 2, "lost": 1,
                                "named": 2, "no effect": 0, "unnamed": 1}
    assert "LOST status-file on server (garbage status.json): metrics.jsonl lost round 4" in (
        summary.text)
    assert "UNNAMED device-file on supernode-2 (truncate learner.pt)" in summary.text
    assert "session 1: 1 faults" in summary.text


@pytest.mark.parametrize("how", fault_drill.DAMAGE)
def test_damage_changes_the_file_as_named(tmp_path, how):
    path = tmp_path / "counters.json"
    path.write_text('{"env_steps": 100}')
    fault_drill._damage(path, how, random.Random(0))
    if how == "remove":
        assert not path.exists()
    elif how == "truncate":
        assert len(path.read_bytes()) < 18
    else:
        assert path.read_bytes() != b'{"env_steps": 100}' and path.stat().st_size == 18


def test_a_full_disk_is_not_blamed_for_other_faults_failures(tmp_path):
    """A device's failures in the rounds after a full disk that other faults cause (no
    reply, a node Flower gave up on, a refused state) leave the full disk "no effect";
    a failure of another kind would make it "unnamed"."""
    others = [{"node-id": 7, "code": -1, "error": "no reply within round-timeout"},
              {"node-id": 7, "code": 5, "error": "Error: Node Unavailable — ..."},
              {"node-id": 7, "code": 1003, "error": "device node-7: cannot load its state"}]
    drill = _Drill(tmp_path, [0])
    full = Fault("disk-full", "supernode-1", "", 0.0, 2, needles=list(fault_drill.NO_SPACE))
    judge(full, [{"round": 3, "device-failures": others}], 4, {"supernode-1": [7]}, drill)
    assert full.named == "no effect"
    crashed = Fault("disk-full", "supernode-1", "", 0.0, 2, needles=list(fault_drill.NO_SPACE))
    judge(crashed, [{"round": 3, "device-failures": [
        {"node-id": 7, "code": 0, "error": "ClientApp raised an exception"}]}], 4,
          {"supernode-1": [7]}, drill)
    assert crashed.named == "unnamed"


def _state_with_generations(state, steps, files):
    """A device state dir with one complete generation per entry of ``steps``."""
    from fedq.common.state_store import new_generation

    for n in steps:
        with new_generation(state) as gen:
            (gen / "counters.json").write_text(json.dumps({"env_steps": n}))
            for name in files:
                (gen / name).write_bytes(os.urandom(64))


@pytest.mark.parametrize("which", [fault_drill.LEDGER_FILE, fault_drill.RESIDUAL_FILE])
def test_damaging_a_generation_file_breaks_that_generation_and_lowers_the_floor(tmp_path,
                                                                                which):
    """ledger-file / residual-file damage the current generation's file so that it no
    longer verifies (the device must notice), keep its bytes for the restore, and count
    only the spare's steps as saved from then on."""
    from fedq.common.state_store import generations

    state = tmp_path / "node-1"
    _state_with_generations(state, [100, 200], [which])
    drill = fault_drill.Drill.__new__(fault_drill.Drill)
    drill.topo = type("T", (), {"state_dirs": {"supernode-1": state},
                                "nodes": {"supernode-1": type("N", (), {
                                    "log_path": tmp_path / "node.log"})()}})()
    drill.rng, drill.device_floor = random.Random(1), {"supernode-1": 200}
    fault = Fault("ledger-file", "supernode-1", "", 0.0, 3)
    path, data = drill._damage_generation_file(fault, "supernode-1", which)
    found = generations(state)
    assert path == found[0].path / which and found[0].problem is not None
    assert found[1].problem is None and drill.device_floor["supernode-1"] == 100
    assert which in fault.needles and found[0].path.name in fault.needles
    path.write_bytes(data)  # the drill's restore makes it complete again
    assert generations(state)[0].problem is None
    missing = Fault("residual-file", "supernode-1", "", 0.0, 3)
    empty = tmp_path / "node-2"
    _state_with_generations(empty, [50], [])
    drill.topo.state_dirs["supernode-1"] = empty
    assert drill._damage_generation_file(missing, "supernode-1", which) is None
    assert missing.detail.startswith("not injected")


def test_a_ledger_is_restored_only_after_its_own_refusal(tmp_path):
    """An earlier ledger fault's refusal, still in the recent rows, is not this fault's:
    the drill once restored a damaged ledger at once on it, then reported "refused by
    name" for a device that never read the damage."""
    state = tmp_path / "node-1"
    _state_with_generations(state, [100, 200], [fault_drill.LEDGER_FILE])
    log = tmp_path / "node.log"
    log.write_text("")
    old = ("device state '/s': gen-000001 is damaged (privacy.json has 3 bytes); falling back"
           " to gen-000000 would forget the privacy budget spent since, so this device "
           "refuses to train")
    rows = [{"round": r, "device-failures": [{"node-id": 7, "error": old}]} for r in (4, 5)]
    drill = fault_drill.Drill.__new__(fault_drill.Drill)
    drill.topo = type("T", (), {"state_dirs": {"supernode-1": state},
                                "nodes": {"supernode-1": type("N", (), {"log_path": log})()}})()
    drill.rng, drill.device_floor, drill.settle = random.Random(1), {}, 1.0
    drill.rows = lambda: rows
    fault = Fault("ledger-file", "supernode-1", "", 0.0, 5)
    path, data = drill._damage_generation_file(fault, "supernode-1", fault_drill.LEDGER_FILE)
    drill._restore_after_device_refusal(fault, path, data)
    assert fault.detail.endswith("no refusal within 1s, restored")
    assert path.read_bytes() == data

    again = Fault("ledger-file", "supernode-1", "", 0.0, 5)
    path, data = drill._damage_generation_file(again, "supernode-1", fault_drill.LEDGER_FILE)
    with log.open("a") as fh:
        fh.write(old.replace("gen-000001", path.parent.name) + "\n")
    drill._restore_after_device_refusal(again, path, data)
    assert again.detail.endswith("refused by name, privacy.json restored")
    assert path.read_bytes() == data


def test_privacy_rows_moved_aside_are_kept_and_a_falling_epsilon_is_lost(tmp_path):
    """The drill's privacy checks: a privacy.jsonl row is lost only if it is in neither
    privacy.jsonl nor privacy.superseded.jsonl; the DP device's epsilon may not fall from
    one row to the next (issue 16: a ledger never silently goes back to zero)."""
    drill = fault_drill.Drill.__new__(fault_drill.Drill)
    drill.run_dir, drill.private = tmp_path, True
    drill._all_node_ids = lambda name: [7]
    rows = [{"round": r, "node-id": 7, "status": "trained", "dp-epsilon": e}
            for r, e in ((1, 0.5), (2, 0.9))]
    log, aside = tmp_path / "privacy.jsonl", tmp_path / "privacy.superseded.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drill.privacy_seen = set()
    assert drill._privacy_lost() == []
    log.write_text(json.dumps(rows[0]) + "\n")
    aside.write_text(json.dumps({**rows[1], "superseded-at": 1.0}) + "\n")
    assert drill._privacy_lost() == []  # moved aside, not lost
    aside.unlink()
    assert drill._privacy_lost()[0].startswith("privacy.jsonl rows gone")
    log.write_text("".join(json.dumps(r) + "\n" for r in
                           [*rows, {**rows[0], "round": 3, "dp-epsilon": 0.0}]))
    drill.privacy_seen = set()
    assert drill._privacy_lost() == [
        "supernode-1: epsilon fell from 0.9 to 0.0 in privacy.jsonl"]


def test_new_server_file_kinds_are_judged_by_their_file(tmp_path):
    """privacy-log is named by privacy.jsonl in the resumed server's log; a damaged
    status.json (read by nobody while the run goes on) is at most 'no effect'."""
    (tmp_path / "submit-1.log").write_text("... privacy.jsonl: 1 unreadable line(s) ...")
    drill = _Drill(tmp_path, [-9, None])
    ids = {"supernode-1": [7]}
    named = Fault("privacy-log", "server", "garbage privacy.jsonl", 0.0, 2, submission=0,
                  needles=[fault_drill.PRIVACY_LOG])
    judge(named, [], 4, ids, drill)
    assert named.named == "named"
    status = Fault("status-file", "server", "garbage status.json", 0.0, 2, submission=1,
                   needles=["status.json"])
    judge(status, [], 4, ids, drill)
    assert status.named == "no effect"
    mid = Fault("checkpoint-mid-save", "serverapp", "killed while round-0003.pt.tmp was "
                "being written serverapp pids [9]", 0.0, 2, submission=0)
    judge(mid, [], 4, ids, drill)
    assert mid.named == "named"  # its submission exited non-zero
