"""The fedq ServerApp: federated averaging of the online Q-network, round by round.

Each round: send the global weights and the round config to the sampled devices, let
each train ``local-steps`` env steps, screen their replies (decode compressed updates,
reject bad ones: server/update_validation.py), aggregate the rest with the configured
strategy (server/strategies.py; FedAvg weights by env steps collected) or, with the
``sequential`` strategy, let the devices train one after another instead
(server/sequential.py), ask every device for greedy returns of the new global model on
its own env, then append the round to ``metrics.jsonl`` and checkpoint the global model.
With ``round-protocol = "fused"`` (server/round_protocol.py) that evaluation rides on the
next round's train message, one message per device and round.
The loop is ours (not ``Strategy.start``) so a restarted server resumes at the round
after its last checkpoint instead of at round 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedq.common.config import FEDERATION_STEPS_KEY, FedqConfig
from fedq.common.envs import run_env_spec
from fedq.common.network_registry import build_network
from fedq.common.privacy_policy import PrivacyPolicy
from fedq.common.secure_aggregation import DISTRIBUTED_DP
from fedq.common.strategy_registry import PARALLEL, SEQUENTIAL, strategy_spec
from fedq.server.best_model import BestModel, round_score
from fedq.server.central_dp import central_dp_report, with_central_dp
from fedq.server.initial_weights import load_initial_weights
from fedq.server.observability import RoundRecorder
from fedq.server.outcome import (
    REJECTED_CODE,
    RunFailedError,
    phase_failures,
    round_failed,
    run_outcome,
    sent_to,
    write_status,
)
from fedq.server.plots import plot_client_curves, plot_learning_curve, return_goal
from fedq.server.privacy_log import PrivacyLog
from fedq.server.prompt_grid import PromptGrid
from fedq.server.round_protocol import NextTrainPhase, RoundProtocol
from fedq.server.run_directory import RunDirectory
from fedq.server.secure_aggregation import train_securely
from fedq.server.sequential import (
    DeviceOrder,
    TrainPhase,
    reply_device_key,
    reply_partition,
    train_in_sequence,
)
from fedq.server.strategies import (
    OptimizerState,
    choose_strategy,
    optimizer_state,
    restore_optimizer_state,
)
from fedq.server.update_validation import Screening, screen_replies

app = ServerApp()


def build_strategy(config: FedqConfig) -> Strategy:
    """The configured aggregation strategy (server/strategies.py), wrapped in Flower's
    central DP if ``central-dp`` asks for it (server/central_dp.py)."""
    return with_central_dp(choose_strategy(config), config)


def initial_model(config: FedqConfig, checkpoint: dict[str, Any] | None) -> torch.nn.Module:
    """The one in ``checkpoint`` when resuming, else the ``initial-weights`` file's, else
    a seeded fresh Q-network."""
    spec = run_env_spec(config)
    torch.manual_seed(config.seed)
    net = build_network(config, spec.observation_space, spec.n_actions, "torch")
    if checkpoint is not None:
        net.load_state_dict(checkpoint["state_dict"])
    elif config.initial_weights:
        load_initial_weights(config.initial_weights, net)
    return net


def resume_strategy(strategy: Strategy, config: FedqConfig, checkpoint: dict[str, Any]
                    ) -> None:
    """Give a resumed run's strategy the server optimiser state its last checkpoint holds
    (FedAvgM momentum, FedAdam/FedYogi moments), unless the run changed strategy."""
    saved = checkpoint.get("server-optimizer") or {}
    if not saved:
        return
    if checkpoint.get("strategy") != config.strategy:
        log(logging.WARNING, "[fedq] the checkpoint's server optimiser state is for strategy "
            "%r, this run uses %r: starting its state afresh", checkpoint.get("strategy"),
            config.strategy)
        return
    restore_optimizer_state(strategy, {name: {k: t.numpy() for k, t in arrays.items()}
                                       for name, arrays in saved.items()})


def _as_tensors(state: OptimizerState) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}  # copies
            for name, arrays in state.items()}


def run_rounds(grid: Grid, strategy: Strategy, config: FedqConfig, run_dir: RunDirectory,
               arrays: ArrayRecord, first_round: int,
               recorder: RoundRecorder | None = None) -> ArrayRecord:
    """Rounds ``first_round..num-server-rounds``: train, aggregate, evaluate, record
    (per-client rows and TensorBoard scalars too, given a ``recorder``)."""
    previous = run_dir.read_metrics()
    steps_per_client = previous[-1]["env-steps-per-client-total"] if previous else 0.0
    privacy_log = PrivacyLog(run_dir.root, first_round)
    central_dp = config.central_dp != "none"
    released = int(previous[-1].get("central-dp", {}).get("released-rounds", 0)) \
        if previous else 0
    released_noise = list(previous[-1].get("central-dp", {}).get(
        "released-noise-multipliers", [])) if previous else []  # distributed DP's rounds
    # env steps of every device that went into the global model (exploration-clock)
    federation_steps = sum(int(r["train"].get("env-steps", 0)) for r in previous)
    order = DeviceOrder()
    best = BestModel(run_dir)
    best.resume(previous)
    protocol = RoundProtocol(config, in_device_order)
    train_phase_of = train_securely if config.secure_aggregation else \
        TRAIN_PHASES[strategy_spec(config.strategy).train_phase]
    for server_round in range(first_round, config.num_server_rounds + 1):
        started = time.perf_counter()
        # fused rounds: the round trained while the previous one was evaluated
        ahead = protocol.take_ahead()
        phase = ahead.phase if ahead else train_phase_of(
            grid, strategy, config, order, arrays,
            ConfigRecord(train_config(config, federation_steps)), server_round)
        privacy = privacy_log.record(server_round, phase.replies)  # declines go on record
        train_phase = ahead.seconds if ahead else time.perf_counter() - started
        if central_dp and phase.arrays is not None:  # a noised aggregate was released
            released += 1
            if phase.noise_multiplier is not None:
                released_noise.append(phase.noise_multiplier)
        if phase.arrays is None:
            log(logging.WARNING, "round %d: %d valid update(s) (min-train-replies %d); the "
                "global model is unchanged", server_round, len(phase.screening.accepted),
                config.min_train_replies)
        else:
            arrays = phase.arrays
        train = dict(phase.metrics or MetricRecord({"clients": 0}))
        eval_config = ConfigRecord({"personalize-steps": config.personalize_steps
                                    if server_round == config.num_server_rounds else 0})
        # as aggregated this round: a fused evaluation aggregates the next round first
        server_optimizer = _as_tensors(optimizer_state(strategy))
        evaluation = protocol.evaluate(grid, strategy, server_round, arrays, eval_config,
                                       next_round(train_phase_of, strategy, config, order, arrays,
                                                  federation_steps + int(train.get("env-steps", 0)),
                                                  server_round + 1))
        eval_replies, eval_sent_to = evaluation.replies, evaluation.sent_to
        order.learn(phase.replies)
        order.learn(eval_replies)
        privacy.update(privacy_log.record(server_round, eval_replies, phase="evaluate"))
        failures = round_failures(phase, eval_sent_to, eval_replies, order.partitions)
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        # per device of the federation, not per device that trained: with fraction-train
        # < 1 a device trains in only some rounds
        devices = max(len(list(grid.get_node_ids())), phase.sent, 1)
        steps_per_client += int(train.get("env-steps", 0)) / devices
        federation_steps += int(train.get("env-steps", 0))
        row = {
            "round": server_round,
            "env-steps-per-client-total": steps_per_client,
            "env-steps-federation-total": federation_steps,
            "train-phase-seconds": train_phase,
            "eval-phase-seconds": evaluation.seconds,
            "round-seconds": protocol.round_seconds(started, ahead),
            "train": train,
            "eval": dict(eval_metrics or MetricRecord({"clients": 0})),
            "updates": phase.screening.row(),
            "privacy": privacy,
            **({"central-dp": central_dp_report(
                config, released, released_noise if config.central_dp == DISTRIBUTED_DP
                else None)} if central_dp else {}),
            "participation": {"train": participation(phase.sent, phase.replies),
                              "evaluate": participation(evaluation.sent, eval_replies)},
            "device-failures": failures,
            "round-failed": round_failed(failures, phase.sent, len(phase.screening.accepted)),
        }
        improved = best.consider(server_round, round_score(row))
        row["best"] = best.row()
        if recorder is not None:
            recorder.record(row, phase.replies, eval_replies,
                            {**phase.sent_to, **eval_sent_to}, order.partitions)
        run_dir.append_metrics(row)
        state_dict = arrays.to_torch_state_dict()
        checkpoint_extra = {"env-steps-per-client-total": steps_per_client,
                            "strategy": config.strategy,
                            "server-optimizer": server_optimizer}
        run_dir.save_checkpoint(server_round, state_dict, checkpoint_extra)
        if improved:
            best.save(state_dict, checkpoint_extra)
        log(logging.INFO, "%s", progress_line(row, config.num_server_rounds))
        if row["eval"].get("eval-return-mean", -math.inf) >= config.target_return:
            log(logging.INFO, "[fedq] target return %g reached in round %d; stopping",
                config.target_return, server_round)
            protocol.discard_ahead()
            break
    return arrays


def train_config(config: FedqConfig, federation_steps: int) -> dict[str, Any]:
    """A round's train config: local steps, compression and the env steps already in
    the global model it sends (exploration-clock)."""
    return {"local-steps": config.local_steps, "update-compression": config.update_compression,
            FEDERATION_STEPS_KEY: federation_steps}


def next_round(train_phase_of: TrainPhaseFn, strategy: Strategy, config: FedqConfig,
               order: DeviceOrder, arrays: ArrayRecord, federation_steps: int,
               server_round: int) -> NextTrainPhase:
    """Round ``server_round``'s train phase from ``arrays``, for a fused evaluation to
    run ahead (server/round_protocol.py) with the extra train config it adds."""
    return lambda grid, extra: train_phase_of(
        grid, strategy, config, order, arrays,
        ConfigRecord({**train_config(config, federation_steps), **extra}), server_round)


def train_in_parallel(grid: Grid, strategy: Strategy, config: FedqConfig,
                      arrays: ArrayRecord, train_config: ConfigRecord,
                      server_round: int) -> TrainPhase:
    """The round's devices all train from the same global model at once; the strategy
    aggregates the replies that pass screening (if at least min-train-replies do)."""
    messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
    replies = in_device_order(grid.send_and_receive(messages, timeout=config.round_timeout))
    screening = screen_replies(list(replies), arrays, config, server_round)
    new_arrays, metrics = None, None
    if len(screening.accepted) >= config.min_train_replies and \
            central_dp_count_ok(config, screening, server_round):
        new_arrays, metrics = strategy.aggregate_train(server_round, screening.replies)
    return TrainPhase(len(messages), replies, screening, new_arrays, metrics,
                      sent_to(messages))


def round_failures(phase: TrainPhase, eval_sent_to: dict[str, int],
                   eval_replies: list[Message], partitions: dict[int, int]
                   ) -> list[dict[str, Any]]:
    """Every device of the round that failed, by node and partition: error replies and
    missing replies of both phases, and train updates that screening rejected."""
    failures = (phase_failures("train", phase.sent_to, phase.replies, partitions)
                + phase_failures("evaluate", eval_sent_to, eval_replies, partitions))
    failures += [{"phase": "train", "node-id": node, "partition-id": partitions.get(node, -1),
                  "code": REJECTED_CODE, "error": f"update rejected: {reason}"}
                 for node, reason in sorted(phase.screening.rejected.items())]
    return failures


TrainPhaseFn = Callable[[Grid, Strategy, FedqConfig, DeviceOrder, ArrayRecord, ConfigRecord, int],
                        TrainPhase]
# How each registered train phase (common/strategy_registry.py) runs a round's training.
TRAIN_PHASES: dict[str, TrainPhaseFn] = {
    PARALLEL: lambda grid, strategy, config, _order, arrays, train_config, server_round:
        train_in_parallel(grid, strategy, config, arrays, train_config, server_round),
    SEQUENTIAL: lambda grid, _strategy, config, order, arrays, train_config, server_round:
        train_in_sequence(grid, config, order, arrays, train_config, server_round),
}


def central_dp_count_ok(config: FedqConfig, screening: Screening, server_round: int) -> bool:
    """Under central DP, whether the round may release a noised average: exactly
    ``central-dp-clients`` accepted updates. Flower's wrapper only warns about a different
    count, but an average of fewer updates is under-noised (each weighs more than the
    1 / central-dp-clients the noise is calibrated to)."""
    accepted = len(screening.accepted)
    if config.central_dp == "none" or accepted == config.central_dp_clients:
        return True
    log(logging.WARNING, "[fedq] round %d: central DP: %d usable update(s), not "
        "central-dp-clients = %d; the round releases nothing (the global model is kept)",
        server_round, accepted, config.central_dp_clients)
    return False


def in_device_order(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by the device that sent them (partition id, then device key,
    then node id; failed replies last), not in the order they arrived. Aggregation sums
    float32 arrays reply by reply, and float addition is not associative: arrival order
    would change the global model's last bits from run to run, and DQN amplifies such
    differences into different learning curves, so the same seed would not give the same
    run. Deployed devices have no partition id and the SuperLink draws node ids at
    random, so their key (a hash of the node config, common/device_key.py) orders them."""
    def device(msg: Message) -> tuple[int, int, int, int]:
        failed = msg.has_error() or not msg.has_content()
        return (int(failed), reply_partition(msg), reply_device_key(msg),
                msg.metadata.src_node_id)

    return sorted(replies, key=device)


def participation(sent: int, replies: list[Message]) -> dict[str, int]:
    """How many sampled devices answered a phase: a device that died or missed
    ``round-timeout`` sends nothing (``missing``), and the SuperLink answers for a node it
    has marked offline with an error (``errors``, with other failed replies). The round
    goes on with the replies it has."""
    errors = sum(msg.has_error() for msg in replies)
    return {"sampled": sent, "replied": len(replies) - errors, "errors": errors,
            "missing": sent - len(replies)}


def progress_line(row: dict, num_rounds: int) -> str:
    """One human-readable line per round for the terminal."""
    train, ev = row["train"], row["eval"]
    parts = [f"[fedq] round {row['round']}/{num_rounds}",
             f"steps/client {row['env-steps-per-client-total']:.0f}",
             f"clients {train.get('clients', 0)}"]
    if "mean-episode-return" in train:
        parts += [f"train return {train['mean-episode-return']:.1f}",
                  f"loss {train['mean-loss']:.4f}", f"eps {train['epsilon']:.3f}"]
    if "eval-return-mean" in ev:
        parts.append(f"eval return {ev['eval-return-mean']:.1f} "
                     f"(worst client {ev['eval-return-worst-client']:.1f})")
    if "personalized-return-mean" in ev:
        parts.append(f"personalised {ev['personalized-return-mean']:.1f} "
                     f"(worst {ev['personalized-return-worst-client']:.1f})")
    if "dp-epsilon-max" in train:
        parts.append(f"dp epsilon max {train['dp-epsilon-max']:.3g}")
    answered = row.get("participation", {}).get("train", {})
    if answered.get("replied", 0) < answered.get("sampled", 0):
        parts.append(f"answered {answered['replied']}/{answered['sampled']}")
    if row.get("privacy", {}).get("declined"):
        parts.append(f"declined (privacy budget) {row['privacy']['declined']}")
    refused = row.get("privacy", {}).get("refused", 0) + \
        row.get("privacy", {}).get("evaluate-refused", 0)
    if refused:
        parts.append(f"refused (privacy policy) {refused}")
    parts.append(f"{row['round-seconds']:.1f}s")
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, prepare or resume the run directory, run the rounds."""
    config = FedqConfig.from_mapping(context.run_config)
    PrivacyPolicy.from_mapping(context.run_config)  # a run's privacy-* keys, checked early
    run_dir = RunDirectory(Path(config.run_dir))
    try:
        run_in(run_dir, grid, config)
    finally:
        run_dir.close()  # the run-dir's lock, taken by start()


def warn_if_learning_stops(config: FedqConfig) -> None:
    """Say when the learning-rate schedule ends before the run does.

    The default schedule decays to 0 over a device's first 150k env steps (CartPole's
    budget, where full steps late in training lose what was learnt). A longer run with
    that default trains the rest of its rounds with learning rate 0, which looks like a
    plateau, not like a setting; the warning names the round where learning ends."""
    decay, final = config.learning_rate_decay_steps, config.learning_rate_final
    planned = config.num_server_rounds * config.local_steps
    if not decay or final > 0 or planned <= decay:
        return
    log(logging.WARNING, "[fedq] learning-rate decays to 0 over a device's first %d env "
        "steps (learning-rate-decay-steps) and this run plans up to %d per device "
        "(num-server-rounds x local-steps): a device that trains every round learns "
        "nothing after round %d. Raise learning-rate-decay-steps or set "
        "learning-rate-final > 0 to keep learning.", decay, planned,
        math.ceil(decay / config.local_steps))


def run_in(run_dir: RunDirectory, grid: Grid, config: FedqConfig) -> None:
    """The run, in its run directory (locked by ``start`` so no other ServerApp writes it)."""
    # a fresh run's first model (initial-weights checked) before the run directory is written
    net = None if config.resume else initial_model(config, None)
    last_round = run_dir.start(config)
    checkpoint = run_dir.load_checkpoint(last_round) if last_round else None
    if net is None or checkpoint is not None:
        net = initial_model(config, checkpoint)
    strategy = build_strategy(config)
    if strategy_spec(config.strategy).train_phase == SEQUENTIAL and \
            config.exploration_clock == "device":
        log(logging.WARNING, "[fedq] strategy %r with exploration-clock 'device': "
            "every device decays epsilon over its own %d env steps although the model it "
            "trains has learnt from all devices' steps; exploration-clock 'federation' "
            "decays it with the model's experience", config.strategy, config.exploration_steps)
    warn_if_learning_stops(config)
    if checkpoint is not None:
        log(logging.INFO, "[fedq] resuming %s after round %d", run_dir.root, last_round)
        resume_strategy(strategy, config, checkpoint)
    recorder = RoundRecorder(run_dir)
    try:
        run_rounds(PromptGrid(grid, flat_wire=config.flat_wire), strategy, config, run_dir,
                   ArrayRecord(net.state_dict()), first_round=last_round + 1,
                   recorder=recorder)
    finally:
        recorder.close()
    plot_learning_curve(run_dir.read_metrics(), run_dir.plot_path, title=config.env_id,
                        goal=return_goal(config.target_return, config.env_id))
    plot_client_curves(run_dir.read_metrics(), run_dir.read_client_metrics(),
                       run_dir.client_plot_path, title=config.env_id)
    log(logging.INFO, "[fedq] results in %s", run_dir.root.resolve())
    outcome = run_outcome(run_dir.read_metrics(), config.failed_rounds_threshold)
    write_status(run_dir.root, outcome)
    log(logging.INFO if outcome.status == "ok" else logging.WARNING, "%s", outcome.line())
    if outcome.status == "failed":
        raise RunFailedError(outcome.line())
