"""The fedq ServerApp: federated averaging of the online Q-network, round by round.

Each round: send the global weights and the round config to the sampled devices, let
each train ``local-steps`` env steps, FedAvg their online weights (weighted by env
steps collected), ask every device for greedy returns of the new global model on its
own env, then append the round to ``metrics.jsonl`` and checkpoint the global model.
The loop is ours (not ``Strategy.start``) so a restarted server resumes at the round
after its last checkpoint instead of at round 1.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from common.config import FedqConfig
from common.envs import env_spec
from common.networks import QNetwork
from server.metrics import aggregate_eval_metrics, aggregate_train_metrics
from server.plots import plot_learning_curve
from server.run_directory import RunDirectory

app = ServerApp()


def build_strategy(config: FedqConfig) -> Strategy:
    """FedAvg over online weights, weighted by each device's env steps this round."""
    return FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=config.min_available_clients,
        min_evaluate_nodes=config.min_available_clients,
        min_available_nodes=config.min_available_clients,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=aggregate_eval_metrics,
    )


def initial_model(config: FedqConfig, run_dir: RunDirectory, last_round: int) -> QNetwork:
    """A seeded fresh Q-network, or the one from the last checkpoint when resuming."""
    spec = env_spec(config.env_id, config.env_kwargs)
    torch.manual_seed(config.seed)
    net = QNetwork(spec.obs_dim, spec.n_actions, config.hidden_sizes)
    if last_round:
        net.load_state_dict(run_dir.load_checkpoint(last_round)["state_dict"])
    return net


def run_rounds(grid: Grid, strategy: Strategy, config: FedqConfig, run_dir: RunDirectory,
               arrays: ArrayRecord, first_round: int) -> ArrayRecord:
    """Rounds ``first_round..num-server-rounds``: train, aggregate, evaluate, record."""
    previous = run_dir.read_metrics()
    steps_per_client = previous[-1]["env-steps-per-client-total"] if previous else 0.0
    for server_round in range(first_round, config.num_server_rounds + 1):
        started = time.perf_counter()
        train_config = ConfigRecord({"local-steps": config.local_steps})
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=config.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        train_phase = time.perf_counter() - started
        if new_arrays is None:
            log(logging.WARNING, "round %d: no device returned an update; the global model "
                "is unchanged", server_round)
        else:
            arrays = new_arrays
        eval_started = time.perf_counter()
        eval_replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=config.round_timeout)
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        train = dict(train_metrics or MetricRecord({"clients": 0}))
        steps_per_client += float(train.get("env-steps-per-client", 0.0))
        row = {
            "round": server_round,
            "env-steps-per-client-total": steps_per_client,
            "train-phase-seconds": train_phase,
            "eval-phase-seconds": time.perf_counter() - eval_started,
            "round-seconds": time.perf_counter() - started,
            "train": train,
            "eval": dict(eval_metrics or MetricRecord({"clients": 0})),
        }
        run_dir.append_metrics(row)
        run_dir.save_checkpoint(server_round, arrays.to_torch_state_dict(),
                                {"env-steps-per-client-total": steps_per_client})
        log(logging.INFO, "%s", progress_line(row, config.num_server_rounds))
        if row["eval"].get("eval-return-mean", -math.inf) >= config.target_return:
            log(logging.INFO, "[fedq] target return %g reached in round %d; stopping",
                config.target_return, server_round)
            break
    return arrays


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
    parts.append(f"{row['round-seconds']:.1f}s")
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, prepare or resume the run directory, run the rounds."""
    config = FedqConfig.from_mapping(context.run_config)
    run_dir = RunDirectory(Path(config.run_dir))
    last_round = run_dir.start(config)
    net = initial_model(config, run_dir, last_round)
    if last_round:
        log(logging.INFO, "[fedq] resuming %s after round %d", run_dir.root, last_round)
    run_rounds(grid, build_strategy(config), config, run_dir, ArrayRecord(net.state_dict()),
               first_round=last_round + 1)
    plot_learning_curve(run_dir.read_metrics(), run_dir.plot_path, title=config.env_id)
    log(logging.INFO, "[fedq] results in %s", run_dir.root.resolve())
