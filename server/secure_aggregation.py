"""A round's training through Flower's SecAgg+ (``secure-aggregation = true``).

Flower 1.42 runs SecAgg+ only as a legacy workflow (``SecAggPlusWorkflow`` on a
``LegacyContext`` with a legacy ``Strategy``), so this module runs it for the train phase
alone and keeps fedq's round loop (sampling, evaluation, metrics, checkpoints) for
everything else:

1. the run's Message-API strategy samples the round's devices and builds their train
   config (``configure_train``), which :class:`_RoundInstructions` hands the workflow as
   legacy ``FitIns`` (with the tensor names the legacy ``Parameters`` lack);
2. the workflow's four stages go through :class:`RecordingGrid`, which keeps each stage's
   messages and replies; each device's update ``w_i - w_global`` (clipped and noised on
   the device under distributed DP: :mod:`client.secure_aggregation`) arrives quantised
   and masked, and the server unmasks only the (weighted) sum;
3. the new global model is ``w_global`` plus the unmasked weighted mean of the updates;
   the devices' scalar metrics come from their masked-stage replies, which hold no arrays.

A device that errs or does not answer in any stage is a dropout; the workflow recovers
the sum of the others while every device keeps ``secagg-reconstruction-threshold`` live
neighbours (one that dropped before sharing its keys is simply left out:
:class:`_SecAggPlus`) and otherwise halts, and the round then releases nothing (the global model is
kept). Under distributed DP (``central-dp = "distributed"``) a released round holding k of
the n = ``central-dp-clients`` expected noise shares is accounted with noise multiplier
``sigma x sqrt(k / n)`` (:attr:`TrainPhase.noise_multiplier`), and a round with fewer than
``secagg-reconstruction-threshold`` shares releases nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedq.client.secure_aggregation import ARRAY_NAMES_KEY, METRICS_RECORD
from fedq.common.config import FedqConfig
from fedq.common.secure_aggregation import (
    DISTRIBUTED_DP,
    MODULUS_RANGE,
    effective_noise_multiplier,
)
from fedq.server.metrics import aggregate_train_metrics
from fedq.server.outcome import sent_to
from fedq.server.sequential import DeviceOrder, TrainPhase
from fedq.server.update_validation import WEIGHT_KEY, Screening


@dataclass
class Exchange:
    """One ``send_and_receive`` of the protocol: its stage, messages and replies."""

    stage: str
    sent: list[Message]
    replies: list[Message]


class RecordingGrid:
    """A grid that keeps every exchange of the protocol (the server's view of a round:
    what a test checks holds no individual update); everything else is the grid's."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.exchanges: list[Exchange] = []

    def __getattr__(self, name: str) -> Any:  # the wrapped grid's attributes
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        stage = str(sent[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) \
            if sent else ""
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        self.exchanges.append(Exchange(stage, sent, replies))
        return replies

    def stage(self, name: str) -> Exchange | None:
        """The exchange of stage ``name`` (None: the protocol halted before it)."""
        return next((e for e in self.exchanges if e.stage == name), None)


class _RoundInstructions(LegacyStrategy):
    """The legacy strategy the workflow drives: it hands out the Message-API strategy's
    instructions as ``FitIns`` and keeps the unmasked aggregate (the workflow's
    ``aggregate_fit`` call), leaving aggregation into the model to :func:`train_securely`."""

    def __init__(self, messages: list[Message], grid: Grid) -> None:
        self._instructions = [(GridClientProxy(m.metadata.dst_node_id, grid, 0),
                               _fitins(m)) for m in messages]
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self._instructions

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        if results:  # every result carries the same unmasked aggregate
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _fitins(message: Message) -> FitIns:
    """A Message-API train instruction as legacy ``FitIns`` (tensor names in the config)."""
    arrays = message.content["arrays"]
    config = dict(message.content["config"])
    config[ARRAY_NAMES_KEY] = ",".join(arrays.keys())
    return FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, except that a device which never shared its keys is left out
    instead of halting the round.

    Flower 1.42 asks, in the unmask stage, for shares of *every* sampled device's keys,
    so a device that did not answer the setup or share-keys stage (a SuperNode that died
    before the round, still listed by the SuperLink) halts every round: its keys were
    never shared, "Not enough shares to recover secret". Such a device put no mask into
    anyone's vector (a device masks only with the neighbours whose shares it received),
    so before the masked vectors are collected this drops it from the sampled devices and
    from every neighbourhood; the protocol and its threshold checks then run on the
    devices that did share keys (the original SecAgg+'s U2). Dropouts from the masked-vector
    stage on are recovered as Flower does."""

    _before_masking = True

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        self._before_masking = False
        return super().collect_masked_vectors_stage(grid, context, state)

    def _check_threshold(self, state: WorkflowState) -> bool:
        if self._before_masking:
            live = set(state.active_node_ids)
            state.sampled_node_ids = live
            state.nid_to_neighbours = {nid: neighbours & live for nid, neighbours
                                       in state.nid_to_neighbours.items() if nid in live}
        return super()._check_threshold(state)


def workflow(config: FedqConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the run's settings. The weight a device reports is
    at most the largest ``local-steps`` (env steps collected), 1 under distributed DP."""
    steps = [config.local_steps] + [int(o.get("local-steps", config.local_steps))
                                    for o in config.client_overrides.values()]
    max_weight = 1.0 if config.central_dp == DISTRIBUTED_DP else float(max(steps))
    return _SecAggPlus(
        config.secagg_num_shares, config.secagg_reconstruction_threshold,
        max_weight=max_weight, clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range, modulus_range=MODULUS_RANGE,
        timeout=config.round_timeout)


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server: the unmasked mean update (None: the
    protocol halted) and every exchange it saw."""

    mean_update: list[np.ndarray] | None
    exchanges: list[Exchange] = field(default_factory=list)


def run_protocol(grid: Grid, config: FedqConfig, messages: list[Message],
                 server_round: int) -> SecureRound:
    """Run SecAgg+ over the train ``messages`` (one per sampled device)."""
    recording = RecordingGrid(grid)
    instructions = _RoundInstructions(messages, recording)  # type: ignore[arg-type]
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND:
                                                           server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state,
                                    run_config={}), strategy=instructions)
    workflow(config)(recording, context)  # type: ignore[arg-type]
    return SecureRound(instructions.aggregate, recording.exchanges)


def train_securely(grid: Grid, strategy: Strategy, config: FedqConfig, _order: DeviceOrder,
                   arrays: ArrayRecord, train_config: ConfigRecord,
                   server_round: int) -> TrainPhase:
    """The round's devices train from the global model; SecAgg+ gives the server the
    weighted mean of their updates only (see the module docstring)."""
    messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
    secure = run_protocol(grid, config, messages, server_round) if messages else \
        SecureRound(None)
    replies, destinations = device_replies(secure.exchanges)
    screening = Screening(replies=list(replies))
    for exchange in secure.exchanges:
        if exchange.stage == Stage.COLLECT_MASKED_VECTORS:
            screening.upload_bytes = {r.metadata.src_node_id: masked_bytes(r)
                                      for r in exchange.replies if not r.has_error()}
    masked = len(screening.accepted)
    noise = None
    if config.central_dp == DISTRIBUTED_DP:
        noise = effective_noise_multiplier(config.central_dp_noise_multiplier, masked,
                                           config.central_dp_clients)
    released = secure.mean_update is not None and masked >= config.min_train_replies and (
        config.central_dp != DISTRIBUTED_DP
        or masked >= config.secagg_reconstruction_threshold)
    if not released:
        log(logging.WARNING, "[fedq] round %d: secure aggregation released nothing (%d of %d "
            "device(s) sent a masked update); the global model is unchanged", server_round,
            masked, len(messages))
        return TrainPhase(len(messages), replies, screening, None, None, destinations)
    assert secure.mean_update is not None
    new_arrays = ArrayRecord({
        name: Array((arrays[name].numpy().astype(np.float64) + update).astype(np.float32))
        for name, update in zip(arrays.keys(), secure.mean_update, strict=True)})
    metrics = aggregate_train_metrics([m.content for m in screening.accepted], WEIGHT_KEY)
    metrics["secagg-masked-devices"] = masked
    return TrainPhase(len(messages), replies, screening, new_arrays, metrics, destinations,
                      noise_multiplier=noise)


def device_replies(exchanges: list[Exchange]) -> tuple[list[Message], dict[str, int]]:
    """Each sampled device's train reply as fedq's round loop reads it (its metrics from
    the masked-vector stage, no arrays; or the error it answered a stage with), in device
    order, and message id -> node of the messages they answer."""
    from fedq.server.server_app import in_device_order  # the loop's own order

    destinations: dict[str, int] = {}
    replies: list[Message] = []
    answered: set[int] = set()
    for exchange in exchanges:
        if exchange.stage != Stage.UNMASK:  # a device's update is in once it is masked
            nodes = {m.metadata.dst_node_id for m in exchange.sent}
            destinations = {k: v for k, v in destinations.items() if v not in nodes}
            destinations.update(sent_to(exchange.sent))
        for reply in exchange.replies:
            node = reply.metadata.src_node_id
            if reply.has_error() and node not in answered:
                answered.add(node)
                replies.append(reply)
            elif exchange.stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
                answered.add(node)
                replies.append(Message(RecordDict({"metrics": MetricRecord(
                    dict(reply.content[METRICS_RECORD]))}), metadata=reply.metadata))
    return in_device_order(replies), destinations


def masked_bytes(reply: Message) -> int:
    """Bytes of the masked vector a device sent."""
    return sum(len(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS]
               [Key.MASKED_PARAMETERS])

