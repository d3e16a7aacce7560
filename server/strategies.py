"""Build the aggregation strategy a run uses, chosen by the ``strategy`` config key.

What each strategy is lives in its registration (:mod:`common.strategy_registry`, which
``docs/strategies.md``'s table is generated from); here it becomes one of Flower's own
``flwr.serverapp.strategy`` objects, built with the same sampling settings and fedq's
metric aggregation, so ``run_rounds`` drives them all through the same
``configure_train`` / ``aggregate_train`` calls (and, for the ``sequential`` train phase,
``configure_evaluate`` / ``aggregate_evaluate`` only). Under central DP every accepted
update weighs the same (:func:`equal_train_weights`).

The server optimisers' accumulated state (FedAvgM's momentum, FedAdam/FedYogi's moment
estimates) goes into every checkpoint (:func:`optimizer_state`) and back into the
strategy on resume (:func:`restore_optimizer_state`), so a restarted server continues
with the momentum it had rather than from zero.

Robust aggregation bounds what a bad update can do; :mod:`server.update_validation`
keeps the updates that are plainly broken (NaN, wrong layout, outlying norm) from
reaching any of these in the first place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi, Strategy

from fedq.common.config import FedqConfig
from fedq.common.strategy_registry import strategy_spec
from fedq.server.metrics import aggregate_eval_metrics, aggregate_train_metrics
from fedq.server.update_validation import CENTRAL_DP_WEIGHT_KEY


def choose_strategy(config: FedqConfig) -> Strategy:
    """The configured strategy, sampling ``fraction-train`` of the connected devices for
    training and ``fraction-evaluate`` for evaluation (at least one each), once
    ``min-available-clients`` are connected."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        # Sampling waits for min-available-clients to connect, then takes the fractions;
        # a floor of min-available-clients here would override fraction-train (100
        # clients, fraction 0.1 must train 10, not 100).
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": config.min_available_clients,
        "train_metrics_aggr_fn": aggregate_train_metrics,
        "evaluate_metrics_aggr_fn": aggregate_eval_metrics,
    }
    cls, kwargs = strategy_spec(config.strategy).recipe(config)
    if config.central_dp != "none":  # equal weights: the noise assumes 1/m each
        cls = equal_train_weights(cls)
    return cls(**common, **kwargs)


class _EqualTrainWeights:
    """Central DP's FedAvg: every accepted update weighs the same (the screening's
    ``central-dp-weight`` = 1), whatever ``num-examples`` its device reported; federated
    evaluation still weights by ``num-examples`` (episodes)."""

    weighted_by_key: str

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregation with the equal weights."""
        saved, self.weighted_by_key = self.weighted_by_key, CENTRAL_DP_WEIGHT_KEY
        try:
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        finally:
            self.weighted_by_key = saved


@functools.cache
def equal_train_weights(cls: type[Strategy]) -> type[Strategy]:
    """``cls`` with equal training weights (central DP), e.g. ``EqualWeightFedAvg``."""
    return type(f"EqualWeight{cls.__name__}", (_EqualTrainWeights, cls),
                {"__doc__": f"{cls.__name__} with equal training weights (central DP)."})


OptimizerState = dict[str, dict[str, np.ndarray]]


def _optimizer_fields(strategy: Strategy) -> tuple[str, ...]:
    """The attributes in which ``strategy``'s server optimiser accumulates state."""
    if isinstance(strategy, FedAvgM):
        return ("momentum_vector",)  # a list of arrays, in the model's array order
    if isinstance(strategy, FedAdam | FedYogi):
        return ("m_t", "v_t")  # dicts of arrays by name
    return ()


def optimizer_state(strategy: Strategy) -> OptimizerState:
    """What ``strategy``'s server optimiser has accumulated over the rounds so far (empty
    for strategies without one, or before their first aggregation): FedAvgM's momentum,
    FedAdam/FedYogi's first and second moments, each as named arrays."""
    state: OptimizerState = {}
    for name in _optimizer_fields(strategy):
        value = getattr(strategy, name)
        if value is not None:
            items = enumerate(value) if isinstance(value, list) else value.items()
            state[name] = {str(k): np.asarray(a) for k, a in items}
    return state


def restore_optimizer_state(strategy: Strategy, state: OptimizerState) -> None:
    """Put state :func:`optimizer_state` took back into a fresh ``strategy`` of the same
    kind (a resumed server); refuses state that belongs to another kind of strategy."""
    fields = _optimizer_fields(strategy)
    if not set(state) <= set(fields):
        raise ValueError(f"checkpoint holds server optimiser state {sorted(state)} that "
                         f"strategy {type(strategy).__name__} does not keep")
    for name, arrays in state.items():
        setattr(strategy, name, [arrays[str(i)] for i in range(len(arrays))]
                if name == "momentum_vector" else dict(arrays))
