"""Cached federated runs for the benchmarks, and a greedy score of their final models.

A cell is one complete ``fedq-simulate`` run (Flower's simulation engine, real
SuperLink) with some config overrides. A finished cell is marked ``DONE`` in its run
directory and reused, so an interrupted benchmark continues where it stopped and two
benchmarks that need the same run (the clean FedAvg baseline) share it.

The score of a run is the greedy return of the *global model itself*, read back from
the last checkpoints and played on fresh CartPole episodes here, rather than the
devices' federated evaluation: a run whose global model turned to NaN has no device
willing to evaluate it, yet the model still has a (poor) return to report.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigScalar, FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.attacks import Attack
from fedq.simulations.run import resolve_run_config, simulate

SCORE_SEED = 424_242  # evaluation episodes: the same for every cell
# Keys of the attack settings that were product config keys before attacks moved to
# simulations/attacks.py; cells cached then still carry them in their config.json.
LEGACY_ATTACK_KEYS = frozenset({"attack", "attack-partitions", "attack-scale"})


@dataclass
class Cell:
    """What one finished run left behind."""

    name: str
    ok: bool
    status: str
    rows: list[dict[str, Any]]
    score: float  # mean greedy return of the last checkpoints
    seconds: float


def run_cell(cache: Path, name: str, overrides: dict[str, ConfigScalar], clients: int,
             timeout: float = 3600.0, attack: Attack | None = None) -> Cell:
    """Run (or reuse) the cell ``cache/name``, with simulated attackers if ``attack``
    is given (the cell's name must say so); a run that ends badly still yields a cell."""
    run_dir = (cache / name).resolve()
    done = run_dir / "DONE"
    if not done.exists():
        if run_dir.exists():  # an interrupted cell: start it again from scratch
            shutil.rmtree(run_dir)
        _, run_config = resolve_run_config(
            {**overrides, "min-available-clients": clients, "run-dir": str(run_dir)}, clients)
        result = simulate(run_config, clients, stream=False, timeout=timeout, attack=attack)
        done.write_text(json.dumps({"ok": result.ok, "status": str(result.status),
                                    "details": result.status_details}) + "\n")
    outcome = json.loads(done.read_text())
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    details = outcome["details"] if outcome["details"] not in (None, "", "N/A") else None
    status = outcome["status"] + (f" ({details})" if details else "")
    return Cell(name=name, ok=outcome["ok"], status=status, rows=rows,
                score=checkpoint_score(run_dir), seconds=sum(r["round-seconds"] for r in rows))


def checkpoint_score(run_dir: Path, episodes: int = 10) -> float:
    """Mean greedy return of the run's retained checkpoints (the last 3 rounds), each
    played for ``episodes`` episodes; NaN if the run left no checkpoint."""
    paths = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    if not paths:
        return float("nan")
    import torch

    saved = json.loads((run_dir / "config.json").read_text())
    config = FedqConfig.from_mapping({k: v for k, v in saved.items()
                                      if k not in LEGACY_ATTACK_KEYS})
    returns = []
    for path in paths:
        trainer = LocalTrainer(config, seed=SCORE_SEED)
        trainer.learner.load_online(torch.load(path, weights_only=True)["state_dict"])
        returns += trainer.evaluate(episodes, seed=SCORE_SEED)
        trainer.close()
    return statistics.fmean(returns)


def mean_over_rounds(cell: Cell) -> float:
    """The federated greedy return averaged over every round that had one: how well the
    run learned throughout, less at the mercy of DQN's round-to-round swings than the
    final score. NaN if no round was evaluated."""
    returns = [r for r in curve(cell.rows)[1] if r == r]
    return statistics.fmean(returns) if returns else float("nan")


def curve(rows: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(env steps per client, federated greedy return) per round; NaN where no device
    could evaluate the global model."""
    steps = [r["env-steps-per-client-total"] for r in rows]
    returns = [r["eval"].get("eval-return-mean", float("nan")) for r in rows]
    return steps, returns
