"""The aggregation strategies a run can choose (``strategy`` config key), one registration
each.

A :class:`StrategySpec` is everything fedq knows about a strategy: its name (the config
value), a doc line, the config keys it uses, how to build its Flower strategy object and
how a round's training is driven. Everything else derives from the registry: config
validation accepts exactly the registered names (and checks each spec's ``switch`` key),
central DP accepts the strategies that average, ``python -m fedq.common.config_docs`` writes
the table in ``docs/strategies.md`` and the ``strategy`` row of the configuration
reference, and the ServerApp builds and drives whatever spec the config names
(:mod:`server.strategies`, :mod:`server.server_app`). Adding a strategy is one
:func:`register_strategy` call, here for fedq's own (a plugin may call it from its own
module, imported before configs are validated).

The registry lives in ``common`` because devices validate configs too; a spec's ``recipe``
imports Flower's server-side strategy classes only when the server calls it, so a device
never loads them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedq.common.config import FedqConfig

# How a round's training is driven (server/server_app.py maps each to its function):
PARALLEL = "parallel"  # configure_train to the sampled devices, aggregate_train the replies
SEQUENTIAL = "sequential"  # the model visits the round's devices in turn (server/sequential.py)
TRAIN_PHASES = (PARALLEL, SEQUENTIAL)

Recipe = tuple["type[Strategy]", dict[str, Any]]


@dataclass(frozen=True)
class StrategySpec:
    """One aggregation strategy.

    ``recipe(config)`` gives the Flower strategy class and its strategy-specific keyword
    arguments; the server adds the sampling and metric-aggregation arguments every
    strategy shares (and, under central DP, equal training weights). ``switch``: a config
    key that must be > 0 with this strategy and 0 with any other (it turns the strategy's
    algorithm on; other strategies would silently ignore it). ``averages``: it aggregates
    by a (weighted) mean, which central DP's noise calibration assumes. ``fused_rounds``:
    round r's global model may be evaluated by the devices that receive it as round r+1's
    train message (``round-protocol = "fused"``, server/round_protocol.py); False where
    a train message does not carry the global model (``sequential``: each visit carries
    the previous device's result), so evaluation needs its own message.
    """

    name: str
    doc: str
    recipe: Callable[[FedqConfig], Recipe]
    keys: tuple[str, ...] = ()
    switch: str | None = None
    averages: bool = False
    train_phase: str = PARALLEL
    fused_rounds: bool = True


STRATEGY_REGISTRY: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Add ``spec`` to the registry; a name can be registered once."""
    if spec.name in STRATEGY_REGISTRY:
        raise ValueError(f"strategy {spec.name!r} is already registered")
    if spec.train_phase not in TRAIN_PHASES:
        raise ValueError(f"strategy {spec.name!r}: train phase {spec.train_phase!r} is not "
                         f"one of {TRAIN_PHASES}")
    if spec.switch is not None and spec.switch not in spec.keys:
        raise ValueError(f"strategy {spec.name!r}: switch {spec.switch!r} must be one of "
                         "its keys")
    STRATEGY_REGISTRY[spec.name] = spec
    return spec


def strategy_names() -> tuple[str, ...]:
    """The registered strategy names, in registration order."""
    return tuple(STRATEGY_REGISTRY)


def strategy_spec(name: str) -> StrategySpec:
    """The registered spec of ``name`` (config validation has refused other names)."""
    try:
        return STRATEGY_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: "
                         f"{', '.join(strategy_names())}") from None


def _flower(class_name: str) -> type[Strategy]:
    """A class of ``flwr.serverapp.strategy``, imported when a server builds a strategy."""
    return getattr(importlib.import_module("flwr.serverapp.strategy"), class_name)


def _adaptive(config: FedqConfig) -> dict[str, Any]:
    return {"eta": config.server_learning_rate, "eta_l": config.learning_rate,
            "beta_1": config.server_beta1, "beta_2": config.server_beta2,
            "tau": config.server_tau}


_ADAPTIVE_KEYS = ("server-learning-rate", "server-beta1", "server-beta2", "server-tau")

register_strategy(StrategySpec(
    "fedavg", "mean of the devices' online weights, weighted by the env steps each collected",
    lambda config: (_flower("FedAvg"), {}), averages=True))
register_strategy(StrategySpec(
    "fedprox", "FedAvg on the server; each device adds mu/2 ||w - w_global||^2 to its loss "
    "(Li et al., 2020)",
    lambda config: (_flower("FedProx"), {"proximal_mu": config.proximal_mu}),
    keys=("proximal-mu",), switch="proximal-mu", averages=True))
register_strategy(StrategySpec(
    "fedavgm", "FedAvg's mean update feeds a server momentum v = beta v + (mean - w_global); "
    "the global model moves by v (Hsu et al., 2019)",
    lambda config: (_flower("FedAvgM"), {"server_learning_rate": 1.0,
                                         "server_momentum": config.server_momentum}),
    keys=("server-momentum",), switch="server-momentum"))
register_strategy(StrategySpec(
    "fedadam", "a server-side Adam step on the pseudo-gradient mean - w_global (Reddi et al., "
    "2021)", lambda config: (_flower("FedAdam"), _adaptive(config)), keys=_ADAPTIVE_KEYS))
register_strategy(StrategySpec(
    "fedyogi", "as fedadam with Yogi's additive second-moment update (Reddi et al., 2021)",
    lambda config: (_flower("FedYogi"), _adaptive(config)), keys=_ADAPTIVE_KEYS))
register_strategy(StrategySpec(
    "fedmedian", "coordinate-wise median of the updates, unweighted (Yin et al., 2018)",
    lambda config: (_flower("FedMedian"), {})))
register_strategy(StrategySpec(
    "fedtrimmedavg", "coordinate-wise mean after cutting trim-beta of the updates at each end, "
    "unweighted (Yin et al., 2018)",
    lambda config: (_flower("FedTrimmedAvg"), {"beta": config.trim_beta}),
    keys=("trim-beta",)))
register_strategy(StrategySpec(
    "krum", "the single update closest to its n - f - 2 nearest neighbours, f = "
    "krum-byzantine (Blanchard et al., 2017)",
    lambda config: (_flower("Krum"), {"num_malicious_nodes": config.krum_byzantine}),
    keys=("krum-byzantine",)))
register_strategy(StrategySpec(
    "sequential", "no aggregation: the global model visits the round's devices one after "
    "another, each training the previous one's result (server/sequential.py)",
    lambda config: (_flower("FedAvg"), {}), train_phase=SEQUENTIAL, fused_rounds=False))
