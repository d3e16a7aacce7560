"""Feed experience a deployed policy collected into the device's replay buffer, torch-free.

"Deploy and keep learning": a device runs its exported policy with ``fedq-policy run
--epsilon 0.05 --record-to STATE_DIR`` between federated rounds; the transitions it sees
join the replay buffer in its state directory, and the next round's
:meth:`common.trainer.LocalTrainer.load` (called by the ClientApp at the start of every
round) trains on them with everything else in the buffer. Raw transitions never leave
the device, as in training.

The write follows :meth:`LocalTrainer.save`'s crash-safety protocol
(:mod:`common.state_store`): a complete new generation folder (the current one's other
files copied unchanged, the buffer rewritten with the new transitions appended in ring
order), its manifest, and only then an atomic flip of the ``CURRENT`` pointer, so a
crash leaves the old state or the new one, never a mix. The pointer is never followed
outside the state directory, and a damaged generation stops the recorder with
:class:`DeviceStateError` rather than a fallback that would drop a privacy ledger. The
buffer file is :class:`common.replay_buffer.ReplayBuffer`'s ``.npz`` format, read and
written here with numpy alone because the device may act without torch installed; a
test holds the two formats together. Learner counters are left alone: recorded steps
are not the learner's own env steps and must not advance its exploration schedule.

Every read and write of the state directory here holds the device's state lock
(:func:`common.state_store.state_lock`), the one a training round holds from its load to
its save: a recorder never writes in the middle of a round (which would drop its batch
or the round's work), it waits for the round, at most ``lock_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import shutil
import zipfile
from pathlib import Path

import numpy as np

from fedq.common.atomic import PRIVATE, atomic_open
from fedq.common.state_store import (
    MANIFEST_FILE,
    DeviceStateError,
    new_generation,
    resolve,
    state_lock,
)

# The name LocalTrainer.save uses (common/trainer.py); tests/test_policy_runner.py
# checks that LocalTrainer.load sees what this module writes.
BUFFER_FILE = "replay_buffer.npz"
_BUFFER_VERSION = 1


class ExperienceRecorder:
    """Collects transitions in memory (a ``play_episodes`` callback) until :meth:`flush`.

    Checks the state directory when created, so a wrong path fails before the device
    spends an episode collecting experience it could not store. ``lock_timeout``: how
    long to wait for the state lock (a round training on the device), None: for ever.
    """

    def __init__(self, state_dir: Path, obs_dim: int, lock_timeout: float | None = None
                 ) -> None:
        with _locked(state_dir, lock_timeout):
            stored_dim = _read_buffer(_current_generation(state_dir))["obs"].shape[1:]
        if stored_dim != (obs_dim,):
            raise DeviceStateError(f"the policy observes {obs_dim} values, but the replay "
                                   f"buffer in '{state_dir}' stores observations of shape "
                                   f"{stored_dim}")
        self.state_dir = state_dir
        self.lock_timeout = lock_timeout
        self._rows: list[tuple[np.ndarray, int, float, np.ndarray, bool]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray,
                 terminated: bool) -> None:
        self._rows.append((np.array(obs, dtype=np.float32).reshape(-1), action, reward,
                           np.array(next_obs, dtype=np.float32).reshape(-1), terminated))

    def flush(self) -> int:
        """Append everything recorded to the device's buffer; returns how many rows."""
        if not self._rows:
            return 0
        obs, actions, rewards, next_obs, terminated = zip(*self._rows, strict=True)
        append_transitions(self.state_dir, np.stack(obs), np.asarray(actions, np.int64),
                           np.asarray(rewards, np.float32), np.stack(next_obs),
                           np.asarray(terminated, np.float32), self.lock_timeout)
        n = len(self._rows)
        self._rows.clear()
        return n


def append_transitions(state_dir: Path, obs: np.ndarray, actions: np.ndarray,
                       rewards: np.ndarray, next_obs: np.ndarray,
                       terminated: np.ndarray, lock_timeout: float | None = None) -> int:
    """Append transitions to the buffer of ``state_dir``'s current generation as a new
    generation, holding the state lock; returns the buffer's size afterwards."""
    with _locked(state_dir, lock_timeout):
        return _append(state_dir, obs, actions, rewards, next_obs, terminated)


def _locked(state_dir: Path, lock_timeout: float | None) -> contextlib.AbstractContextManager:
    """The device's state lock; a directory that does not exist is not created."""
    if not state_dir.is_dir():
        raise DeviceStateError(f"device state dir '{state_dir}' does not exist: the device "
                               "must complete one federated round, which creates its replay "
                               "buffer, before recorded experience can join it")
    return state_lock(state_dir, lock_timeout)


def _append(state_dir: Path, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            next_obs: np.ndarray, terminated: np.ndarray) -> int:
    current = _current_generation(state_dir)
    stored = _read_buffer(current)
    if int(stored["version"]) != _BUFFER_VERSION:
        raise DeviceStateError(f"{current / BUFFER_FILE}: replay buffer format "
                               f"{stored['version']} is not {_BUFFER_VERSION}")
    if obs.shape[1:] != stored["obs"].shape[1:]:
        raise DeviceStateError(f"recorded observations have shape {obs.shape[1:]}, the "
                               f"device's buffer stores {stored['obs'].shape[1:]}")
    _append_ring(stored, {"obs": obs, "next_obs": next_obs, "actions": actions,
                          "rewards": rewards, "terminated": terminated})
    with new_generation(state_dir) as target:
        for item in current.iterdir():
            if item.is_file() and not item.is_symlink() and item.name not in (
                    BUFFER_FILE, MANIFEST_FILE) and not item.name.endswith(".tmp"):
                shutil.copy2(item, target / item.name)
        with atomic_open(target / BUFFER_FILE, permissions=PRIVATE) as fh:
            np.savez(fh, **stored)
    return len(stored["actions"])


def _current_generation(state_dir: Path) -> Path:
    """The generation to append to (:func:`common.state_store.resolve`, refusing any
    fallback past a damaged one); never a path outside ``state_dir``."""
    current = resolve(state_dir, keep_history=True, legacy_files=(BUFFER_FILE,))
    if current is None:
        raise DeviceStateError(
            f"device state dir '{state_dir}' has no saved state: the device must complete "
            "one federated round, which creates its replay buffer, before recorded "
            "experience can join it")
    if not (current / BUFFER_FILE).is_file():
        raise DeviceStateError(f"device state dir '{state_dir}': {current.name} has no "
                               f"{BUFFER_FILE}")
    return current


def _read_buffer(generation: Path) -> dict[str, np.ndarray]:
    path = generation / BUFFER_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DeviceStateError(f"{path}: cannot load the replay buffer: {err}") from None
    missing = {"version", "capacity", "pos", "obs", "next_obs", "actions", "rewards",
               "terminated"} - set(stored)
    if missing:
        raise DeviceStateError(f"{path}: not a replay buffer (no {sorted(missing)})")
    return stored


def _append_ring(stored: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> None:
    """Write ``new`` rows at the buffer's write position, wrapping (and overwriting the
    oldest rows) at its capacity exactly as ``ReplayBuffer.add`` would."""
    capacity, pos = int(stored["capacity"]), int(stored["pos"])
    n_old, n_new = len(stored["actions"]), len(new["actions"])
    if n_new > capacity:  # only the newest `capacity` rows can survive
        new = {k: v[-capacity:] for k, v in new.items()}
        pos = (pos + n_new - capacity) % capacity
        n_new = capacity
    size = min(capacity, n_old + n_new)
    index = (pos + np.arange(n_new)) % capacity
    for name, rows in new.items():
        old = stored[name]
        grown = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
        grown[:n_old] = old
        grown[index] = rows
        stored[name] = grown
    stored["pos"] = np.asarray((pos + n_new) % capacity)
