"""Personalisation: how well the global model does on a device after a short local fine-tune.

One global model has to serve devices whose envs differ (a short pole and a long one).
The fair question for such a device is not only "how good is the global model here" but
"how good does it get after ``personalize-steps`` steps of my own training from it". The
fine-tune starts from the device's persisted state (its replay buffer, optimizer and
step counters) with the global weights loaded, so it reuses the device's own experience.

It runs on a throwaway copy in memory: nothing is saved, so the device's persistent
training state (what the next federated round loads) is exactly what it was. A device
that has not trained yet fine-tunes from an empty buffer, and makes no updates until its
step count passes ``learning-starts``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from fedq.client.device import Device
from fedq.common.trainer import LocalTrainer


def personalized_returns(device: Device, global_state: dict[str, np.ndarray], steps: int,
                         episodes: int, seed: int) -> list[float]:
    """Greedy returns on the device's env after ``steps`` fine-tuning steps from the
    global model; the device's state on disk is read, never written."""
    with _torch_rng_kept(device.config.backend):
        trainer = LocalTrainer(device.config, seed=device.seed)
        try:
            trainer.load(device.state_dir)
            trainer.learner.load_online(global_state, sync_target=True)
            trainer.train(steps)
            return trainer.evaluate(episodes, seed=seed)
        finally:
            trainer.close()


@contextlib.contextmanager
def _torch_rng_kept(backend: str) -> Iterator[None]:
    """The torch learner seeds and restores torch's global RNG; put it back afterwards.
    The numpy learner touches no global RNG (and torch is not imported for it)."""
    if backend != "torch":
        yield
        return
    import torch

    rng_state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng_state)
