"""The central-DP modes a run can choose (``central-dp`` config key), one registration each.

A :class:`CentralDpMode` wraps the server's strategy in one of Flower's central-DP
wrappers (``flwr.serverapp.strategy``), which clip each device's update ``w_i - w_global``
and add Gaussian noise to the average. Config validation accepts exactly the registered names, the
``central-dp`` row of the configuration reference lists them, and
:func:`server.central_dp.with_central_dp` wraps the strategy in whichever the config
names. Adding a mode (e.g. Flower's adaptive clipping) is one :func:`register_central_dp`
call. ``none`` and ``distributed`` are the registered modes without a wrapper: the latter's
noise is added by the devices under SecAgg+ (:mod:`common.secure_aggregation`). The
central epsilon fedq reports (:func:`server.central_dp.central_dp_report`) is the
fixed-clipping Gaussian mechanism's:
a mode whose noise is calibrated otherwise must bring its own accounting.

On the device nothing is mode-specific: a wrapper that wants devices to clip puts the
clipping norm in the round config, and :mod:`client.central_dp` clips whenever it is there.

Like the strategy registry this lives in ``common`` because devices validate configs too;
a mode's wrapper class is imported only when the server wraps a strategy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedq.common.config import FedqConfig

Wrap = Callable[["Strategy", "FedqConfig"], "Strategy"]

NO_CENTRAL_DP = "none"


@dataclass(frozen=True)
class CentralDpMode:
    """One central-DP mode: ``wrap(strategy, config)`` returns the strategy wrapped in
    the mode's Flower class (importing it then: server side only); None for no central
    DP."""

    name: str
    doc: str
    wrap: Wrap | None


CENTRAL_DP_REGISTRY: dict[str, CentralDpMode] = {}


def register_central_dp(mode: CentralDpMode) -> CentralDpMode:
    """Add ``mode`` to the registry; a name can be registered once."""
    if mode.name in CENTRAL_DP_REGISTRY:
        raise ValueError(f"central-dp mode {mode.name!r} is already registered")
    CENTRAL_DP_REGISTRY[mode.name] = mode
    return mode


def central_dp_names() -> tuple[str, ...]:
    """The registered mode names, in registration order."""
    return tuple(CENTRAL_DP_REGISTRY)


def central_dp_mode(name: str) -> CentralDpMode:
    """The registered mode ``name`` (config validation has refused other names)."""
    try:
        return CENTRAL_DP_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown central-dp mode {name!r}; registered: "
                         f"{', '.join(central_dp_names())}") from None


def _fixed_clipping(class_name: str) -> Wrap:
    """Wrap in Flower's fixed-clipping class ``class_name`` with the central-dp-* keys."""

    def wrap(strategy: Strategy, config: FedqConfig) -> Strategy:
        wrapper = getattr(importlib.import_module("flwr.serverapp.strategy"), class_name)
        return wrapper(strategy, noise_multiplier=config.central_dp_noise_multiplier,
                       clipping_norm=config.central_dp_clip_norm,
                       num_sampled_clients=config.central_dp_clients)

    return wrap


register_central_dp(CentralDpMode(NO_CENTRAL_DP, "no central DP", None))
register_central_dp(CentralDpMode(
    "server-fixed", "the server clips each update (it sees them raw)",
    _fixed_clipping("DifferentialPrivacyServerSideFixedClipping")))
register_central_dp(CentralDpMode(
    "client-fixed", "devices clip their update before replying",
    _fixed_clipping("DifferentialPrivacyClientSideFixedClipping")))
register_central_dp(CentralDpMode(
    "distributed", "with secure-aggregation: each device clips its update and adds its share "
    "of the noise before SecAgg+ masks it; the server only sees the noised sum", None))
