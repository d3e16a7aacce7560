"""Device state survives a lost or damaged pointer or file (docs/durability.md): the
newest complete generation is found again, nothing outside the state directory is
followed, damage is named, and a privacy ledger never silently starts over."""

import json
import logging
import stat

import numpy as np
import pytest

from fedq.client.experience_log import append_transitions
from fedq.common.config import FedqConfig
from fedq.common.state_store import DeviceStateError
from fedq.common.trainer import LocalTrainer

SMALL = {"hidden-sizes": "8,8", "buffer-size": 500, "batch-size": 16, "learning-starts": 50,
         "train-frequency": 4, "target-update-interval": 50, "exploration-steps": 300}
DP = {"dp-enabled": True, "dp-noise-multiplier": 1.0}


def _trainer(**overrides):
    return LocalTrainer(FedqConfig.from_mapping({**SMALL, **overrides}), seed=5)


def _saved(state_dir, rounds, **overrides):
    """A device that trained and saved ``rounds`` times; its counters after each save."""
    trainer, seen = _trainer(**overrides), []
    for _ in range(rounds):
        trainer.train(100)
        trainer.save(state_dir)
        seen.append(trainer.counters.env_steps)
    trainer.close()
    return seen


def _loaded(state_dir, **overrides):
    trainer = _trainer(**overrides)
    assert trainer.load(state_dir)
    trainer.close()
    return trainer


def _transitions(n=3):
    obs = np.ones((n, 4), np.float32)
    return obs, np.zeros(n, np.int64), np.ones(n, np.float32), obs, np.zeros(n, np.float32)


def test_missing_pointer_loads_the_newest_complete_generation_not_a_fresh_start(tmp_path,
                                                                                caplog):
    steps = _saved(tmp_path, 2)
    (tmp_path / "CURRENT").unlink()
    with caplog.at_level(logging.WARNING):
        trainer = _loaded(tmp_path)
    assert trainer.counters.env_steps == steps[-1] == 200
    assert len(trainer.buffer) == 200
    assert "CURRENT is missing" in caplog.text and "gen-000002" in caplog.text
    trainer.train(100)
    trainer.save(tmp_path)  # the next save continues the lineage instead of wiping it
    assert _loaded(tmp_path).counters.env_steps == 300


def test_a_dp_device_with_a_damaged_newest_generation_refuses_to_train(tmp_path):
    _saved(tmp_path, 2, **DP)
    ledger = tmp_path / "gen-000002" / "privacy.json"
    ledger.write_text(ledger.read_text()[:20])  # torn by a bad disk after the save
    with pytest.raises(DeviceStateError, match=r"gen-000002 is damaged.*privacy.json.*"
                                               r"refuses to train"):
        _trainer(**DP).load(tmp_path)
    (tmp_path / "CURRENT").unlink()  # still refused with the pointer gone as well
    with pytest.raises(DeviceStateError, match="refuses to train"):
        _trainer(**DP).load(tmp_path)


def test_a_device_whose_only_generation_is_damaged_refuses_instead_of_starting_over(
        tmp_path):
    _saved(tmp_path, 1)
    buffer = tmp_path / "gen-000001" / "replay_buffer.npz"
    buffer.write_bytes(buffer.read_bytes()[:1000])  # truncated
    with pytest.raises(DeviceStateError, match=r"gen-000001: replay_buffer.npz has 1000 "
                                               r"bytes.*refusing to start afresh"):
        _trainer().load(tmp_path)


def test_a_damaged_newest_generation_falls_back_with_a_warning_and_is_kept(tmp_path,
                                                                         caplog):
    steps = _saved(tmp_path, 2)
    (tmp_path / "gen-000002" / "counters.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        trainer = _loaded(tmp_path)
    assert trainer.counters.env_steps == steps[0]
    assert "skipped gen-000002 (counters.json has 2 bytes" in caplog.text
    trainer.save(tmp_path)
    # the damaged folder is evidence for the operator, not something to delete on a guess
    assert (tmp_path / "gen-000002").is_dir()
    assert (tmp_path / "CURRENT").read_text() == "gen-000003"


@pytest.mark.parametrize("pointer", [b"gen-0\x00\x01\xff", b"", b"../victim/gen-000001"])
def test_a_garbage_or_escaping_pointer_is_never_followed(tmp_path, pointer, caplog):
    victim = tmp_path / "victim"
    _saved(victim, 1)
    state = tmp_path / "device"
    steps = _saved(state, 1)
    (state / "CURRENT").write_bytes(pointer)
    with caplog.at_level(logging.WARNING):
        assert _loaded(state).counters.env_steps == steps[0]
    assert "not a generation name" in caplog.text
    (state / "CURRENT").write_bytes(pointer)
    append_transitions(state, *_transitions())
    assert (victim / "gen-000001" / "replay_buffer.npz").is_file()  # not deleted
    assert _loaded(state).counters.env_steps == steps[0]
    assert len(_loaded(state).buffer) == steps[0] + 3  # appended to its own buffer


def test_state_files_are_private_to_the_device_user(tmp_path):
    _saved(tmp_path, 1, **DP)
    append_transitions(tmp_path, *_transitions())
    paths = [tmp_path / "CURRENT", *tmp_path.glob("gen-*/*")]
    assert len(paths) >= 6
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in tmp_path.glob("gen-*"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_pre_manifest_generation_still_loads_and_unreadable_files_are_named(tmp_path):
    steps = _saved(tmp_path, 1)
    (tmp_path / "gen-000001" / "MANIFEST.json").unlink()  # as saved before manifests
    assert _loaded(tmp_path).counters.env_steps == steps[0]
    buffer = tmp_path / "gen-000001" / "replay_buffer.npz"
    buffer.write_bytes(buffer.read_bytes()[:1000])
    with pytest.raises(DeviceStateError, match=r"gen-000001/replay_buffer.npz: cannot load"):
        _trainer().load(tmp_path)


def test_a_save_that_died_before_its_manifest_is_skipped_and_cleaned_up(tmp_path):
    steps = _saved(tmp_path, 1)
    torn = tmp_path / "gen-000002"
    torn.mkdir()
    (torn / "counters.json").write_text(json.dumps({"env_steps": 999}))
    trainer = _loaded(tmp_path)
    assert trainer.counters.env_steps == steps[0]
    trainer.save(tmp_path)  # gen-000003; the unfinished gen-000002 held nothing complete
    assert sorted(p.name for p in tmp_path.glob("gen-*")) == ["gen-000001", "gen-000003"]


def test_a_device_with_a_ledger_refuses_a_fallback_even_when_dp_is_off_now(tmp_path):
    """Issue 16: a device's privacy ledger never silently goes back. A device that trained
    with DP and is now loaded without it (it keeps its ledger, ``_kept_ledger``) must not
    fall back past a damaged newest generation either: the spare's ledger is older, and
    its next save would write that older epsilon as the device's lifetime spend."""
    _saved(tmp_path, 2, **DP)
    ledger = tmp_path / "gen-000002" / "privacy.json"
    ledger.write_bytes(b"\x00garbage")
    with pytest.raises(DeviceStateError, match=r"gen-000002 is damaged.*refuses to train"):
        _trainer().load(tmp_path)
