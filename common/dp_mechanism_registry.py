"""The device-side DP mechanisms a run can choose (``dp-mechanism`` config key), one
registration each.

A :class:`DpMechanism` is a private training step for the device's Q-network, with
the learner backends it serves: for each backend, the accountants that can account it
(``dp-accountant``) and a builder of the backend's private learner. ``dp-sgd``
(:mod:`common.dp_sgd` on torch, the same closed form in :mod:`common.numpy_learner`) is
fedq's own; Opacus's accountants account it on torch (rdp, prv), :mod:`common.rdp` on
numpy (rdp only: PRV is Opacus's). Everything else derives from the registry: config
validation accepts exactly the registered names and, with ``dp-enabled``, only a
backend and accountant the chosen mechanism serves; ``python -m fedq.common.config_docs``
writes the table in ``docs/privacy.md`` and the ``dp-mechanism`` row of the configuration
reference; :func:`common.learners.make_learner` builds the registered learner. Adding a
mechanism is one :func:`register_dp_mechanism` call (a plugin may call it from its own
module, imported before configs are validated).

A mechanism's learner must step ``privacy.accountant`` once per update with the noise
multiplier and sample rate the update used: the ledger and every epsilon fedq reports
are the subsampled Gaussian mechanism's, so a mechanism with another noise calibration
must bring its own accounting.

The registry lives in ``common`` because devices validate configs; a builder imports
its backend's modules only when called, so a numpy device never loads torch or Opacus.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gymnasium as gym

    from fedq.common.config import FedqConfig
    from fedq.common.learners import Learner
    from fedq.common.privacy import DevicePrivacy

Builder = Callable[["gym.spaces.Box | int", int, "FedqConfig", "DevicePrivacy", int], "Learner"]
"""``build(observation_space, n_actions, config, privacy, seed)``: the backend's private learner
(on torch, :func:`common.learners.make_learner` has seeded torch's global generator)."""

DEFAULT_DP_MECHANISM = "dp-sgd"


@dataclass(frozen=True)
class DpBackend:
    """What a mechanism is on one learner backend: the accountants (``dp-accountant``
    values) that can account it there, and its learner builder."""

    accountants: tuple[str, ...]
    build: Builder


@dataclass(frozen=True)
class DpMechanism:
    """One device-side DP mechanism; ``backends`` maps each backend it serves
    (``backend`` config values) to its accountants and builder."""

    name: str
    doc: str
    backends: Mapping[str, DpBackend]


DP_MECHANISM_REGISTRY: dict[str, DpMechanism] = {}


def register_dp_mechanism(mechanism: DpMechanism) -> DpMechanism:
    """Add ``mechanism`` to the registry; a name can be registered once, and it must
    serve at least one backend with at least one accountant."""
    if mechanism.name in DP_MECHANISM_REGISTRY:
        raise ValueError(f"dp mechanism {mechanism.name!r} is already registered")
    if not mechanism.backends or not all(b.accountants for b in mechanism.backends.values()):
        raise ValueError(f"dp mechanism {mechanism.name!r}: every mechanism serves a backend "
                         "with at least one accountant")
    DP_MECHANISM_REGISTRY[mechanism.name] = mechanism
    return mechanism


def dp_mechanism_names() -> tuple[str, ...]:
    """The registered mechanism names, in registration order."""
    return tuple(DP_MECHANISM_REGISTRY)


def dp_accountant_names() -> tuple[str, ...]:
    """Every accountant some registered mechanism can be accounted with, first-seen order
    (the values ``dp-accountant`` accepts)."""
    names = (a for m in DP_MECHANISM_REGISTRY.values() for b in m.backends.values()
             for a in b.accountants)
    return tuple(dict.fromkeys(names))


def unregistered(value: str) -> str | None:
    """The config problem of a ``dp-mechanism`` value (None when registered), with the
    closest registered name as a hint."""
    if value in DP_MECHANISM_REGISTRY:
        return None
    hint = difflib.get_close_matches(value, dp_mechanism_names(), n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"one of {dp_mechanism_names()}{suggestion}"


def dp_backend(name: str, backend: str) -> DpBackend:
    """What mechanism ``name`` is on ``backend`` (config validation has refused pairs
    that are not registered)."""
    try:
        return DP_MECHANISM_REGISTRY[name].backends[backend]
    except KeyError:
        raise ValueError(f"dp mechanism {name!r} is not registered for backend "
                         f"{backend!r}") from None


def _torch_dp_sgd(observation_space: gym.spaces.Box | int, n_actions: int, config: FedqConfig,
                  privacy: DevicePrivacy, seed: int) -> Learner:
    from fedq.common.dqn import PrivateDQNLearner

    return PrivateDQNLearner(observation_space, n_actions, config, privacy)


def _numpy_dp_sgd(observation_space: gym.spaces.Box | int, n_actions: int, config: FedqConfig,
                  privacy: DevicePrivacy, seed: int) -> Learner:
    from fedq.common.numpy_learner import PrivateNumpyDQNLearner

    return PrivateNumpyDQNLearner(observation_space, n_actions, config, privacy, seed)


register_dp_mechanism(DpMechanism(
    DEFAULT_DP_MECHANISM, "each transition's gradient clipped to dp-clip-norm (closed-form "
    "per-sample norms, common/dp_sgd.py), Gaussian noise of std dp-noise-multiplier x "
    "dp-clip-norm, Poisson-sampled batches",
    {"torch": DpBackend(("rdp", "prv"), _torch_dp_sgd),
     "numpy": DpBackend(("rdp",), _numpy_dp_sgd)}))
