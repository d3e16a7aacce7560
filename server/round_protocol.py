"""How a round's messages reach the devices (``round-protocol``).

``train-then-evaluate`` sends every device two messages per round: a train message with
the global model, then an evaluate message with the new global model. In a deployment
each message costs the device a ClientApp process (Python, Flower and the learner's
imports, loading the device's state) and the SuperLink round trips, so a round's second
message costs about as much as its first.

``fused`` (the default) sends one. Round r's global model is what round r+1's train
message carries anyway, so that message also asks the device (round config
``evaluate-round`` = r) to evaluate the model it receives before training on it; the
reply holds the evaluation's metrics (record ``evaluation``) next to the update. The
server splits each reply into the train reply of round r+1 and the evaluate reply of
round r that a ``train-then-evaluate`` run would have received, so aggregation,
metrics.jsonl, clients.jsonl and privacy.jsonl see the same replies in the same order:
round r's row is written, with its evaluation, before round r+1's. The last round's
model, which no train message carries, gets an evaluate message of its own.

What differs from ``train-then-evaluate``:

* a device whose fused reply carries no evaluation (it replied with an error: its
  privacy policy refused the run config, its budget is spent, its state cannot be
  loaded) is sent the evaluate message it would have received, so its evaluation is
  kept; a device that does not reply at all counts as missing in both phases, without a
  second ``round-timeout`` wait;
* with a finite ``target-return``, the round after the one that reaches it has already
  trained when its evaluation arrives: that update is discarded (the devices' own state,
  e.g. replay buffer and privacy ledger, keeps that extra round) and the run stops as
  before;
* timings: round r's ``train-phase-seconds`` is its fused message (which includes
  evaluating round r-1's model on the devices), ``eval-phase-seconds`` only the evaluate
  messages it needed of its own (the last round's, fallbacks).

Two messages stay where one cannot replace them: strategies whose train message does
not carry the global model (the registry's ``fused_rounds``, e.g. ``sequential``) and
sampled rounds (``fraction-train`` or ``fraction-evaluate`` < 1), where the devices that
evaluate round r need not be those that train round r+1.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedq.common.config import EVALUATE_ROUND_KEY, EVALUATION_RECORD, FedqConfig
from fedq.common.strategy_registry import strategy_spec
from fedq.server.outcome import sent_to
from fedq.server.sequential import TrainPhase

FUSED = "fused"
TRAIN_THEN_EVALUATE = "train-then-evaluate"


def two_messages_reason(config: FedqConfig) -> str | None:
    """Why this run's rounds need a separate evaluate message, or None if the fused
    protocol can serve them."""
    if not strategy_spec(config.strategy).fused_rounds:
        return f"strategy {config.strategy!r} does not send the global model to train"
    if config.secure_aggregation:
        return ("secure-aggregation runs the train phase as Flower's SecAgg+ workflow, whose "
                "messages carry no evaluation")
    if config.fraction_train < 1.0 or config.fraction_evaluate < 1.0:
        return ("fraction-train / fraction-evaluate < 1 sample different devices to train "
                "and to evaluate")
    return None


def uses_fused_rounds(config: FedqConfig) -> bool:
    """Whether the run sends one message per device and round (logs why not when the
    config asks for it but the run cannot)."""
    if config.round_protocol != FUSED:
        return False
    reason = two_messages_reason(config)
    if reason is not None:
        log(logging.INFO, "[fedq] round-protocol 'fused': %s; this run sends a train and an "
            "evaluate message per round", reason)
        return False
    return True


@dataclass
class Evaluation:
    """A round's federated evaluation: the replies, as evaluate messages would have
    brought them, and where it was sent (message id -> node id)."""

    replies: list[Message]
    sent_to: dict[str, int]
    sent: int  # devices asked (once each, in a fused train message or an evaluate message)
    seconds: float  # spent on it outside a fused train phase


@dataclass
class AheadPhase:
    """Round r+1's train phase, run while evaluating round r (fused rounds)."""

    phase: TrainPhase
    seconds: float


NextTrainPhase = Callable[[Grid, dict[str, Any]], TrainPhase]
Order = Callable[[Iterable[Message]], list[Message]]


class RoundProtocol:
    """The run's round protocol: how each round is evaluated (see the module docstring).

    ``run_rounds`` calls :meth:`take_ahead` for a round's train phase (None: run it) and
    :meth:`evaluate` for its evaluation, which in fused rounds also runs the next round's
    train phase and keeps it for the next :meth:`take_ahead`.
    """

    def __init__(self, config: FedqConfig, order: Order) -> None:
        self.config = config
        self.fused = uses_fused_rounds(config)
        self._order = order
        self._ahead: AheadPhase | None = None

    def take_ahead(self) -> AheadPhase | None:
        """The round's train phase if it already ran (with the previous evaluation)."""
        ahead, self._ahead = self._ahead, None
        return ahead

    def discard_ahead(self) -> None:
        """Forget a train phase run ahead (the run stops before its round)."""
        self._ahead = None

    def round_seconds(self, started: float, ahead: AheadPhase | None) -> float:
        """A round's wall time since ``started`` (perf_counter), counting its own train
        phase (run ahead or not) and not the next round's, run ahead while evaluating."""
        run_ahead = self._ahead.seconds if self._ahead else 0.0
        return time.perf_counter() - started - run_ahead + (ahead.seconds if ahead else 0.0)

    def evaluate(self, grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord,
                 eval_config: ConfigRecord, next_train: NextTrainPhase) -> Evaluation:
        """Round ``server_round``'s evaluation of ``arrays``: its own evaluate messages, or
        in fused rounds (not the last round) the next round's train phase, whose train
        config asks each device to evaluate the model first (``next_train(grid,
        extra_train_config)``)."""
        started = time.perf_counter()
        if not self.fused or server_round >= self.config.num_server_rounds:
            replies, destinations, sent = self._evaluate_messages(
                grid, strategy, server_round, arrays, eval_config)
            return Evaluation(replies, destinations, sent, time.perf_counter() - started)
        splitter = EvaluationSplitter(grid)
        phase = next_train(splitter, {EVALUATE_ROUND_KEY: server_round})
        ahead_seconds = time.perf_counter() - started
        self._ahead = AheadPhase(phase, ahead_seconds)
        evaluated = splitter.evaluations
        answered = {reply.metadata.reply_to_message_id for reply in phase.replies}
        # no reply at all: missing from both phases (no second round-timeout wait)
        destinations = {mid: node for mid, node in phase.sent_to.items()
                        if mid in evaluated or mid not in answered}
        again = {node for mid, node in phase.sent_to.items()
                 if mid in answered and mid not in evaluated}
        replies = list(evaluated.values())
        if again:  # error replies carry no evaluation: ask as train-then-evaluate would
            more, more_to, _ = self._evaluate_messages(grid, strategy, server_round, arrays,
                                                       eval_config, only=again)
            replies += more
            destinations.update(more_to)
        return Evaluation(self._order(replies), destinations, phase.sent,
                          time.perf_counter() - started - ahead_seconds)

    def _evaluate_messages(self, grid: Grid, strategy: Strategy, server_round: int,
                           arrays: ArrayRecord, eval_config: ConfigRecord,
                           only: set[int] | None = None
                           ) -> tuple[list[Message], dict[str, int], int]:
        messages = [msg for msg in strategy.configure_evaluate(server_round, arrays,
                                                               eval_config, grid)
                    if only is None or msg.metadata.dst_node_id in only]
        if not messages:
            return [], {}, 0
        replies = grid.send_and_receive(messages, timeout=self.config.round_timeout)
        return self._order(replies), sent_to(messages), len(messages)


class EvaluationSplitter:
    """A :class:`Grid` that takes the evaluation out of each fused train reply: the
    train phase gets the reply a train message alone would have had (one MetricRecord,
    as Flower's strategies require), :attr:`evaluations` the evaluate replies (by the
    id of the train message they answer)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.evaluations: dict[str, Message] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """The wrapped grid's replies, each without its evaluation record."""
        replies = []
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            train_reply, evaluation = split_reply(reply)
            if evaluation is not None:
                self.evaluations[reply.metadata.reply_to_message_id] = evaluation
            replies.append(train_reply)
        return replies


def split_reply(reply: Message) -> tuple[Message, Message | None]:
    """A fused reply as (train reply, evaluate reply); (reply, None) if it carries no
    evaluation (an error reply, or a device that was not asked)."""
    if reply.has_error() or not reply.has_content() or \
            EVALUATION_RECORD not in reply.content:
        return reply, None
    content = reply.content
    train = make_message(metadata=reply.metadata, content=RecordDict(
        {key: record for key, record in content.items() if key != EVALUATION_RECORD}))
    metadata = copy.copy(reply.metadata)
    metadata.message_type = MessageType.EVALUATE
    evaluation = make_message(metadata=metadata, content=RecordDict(
        {"metrics": content[EVALUATION_RECORD]}))
    return train, evaluation
