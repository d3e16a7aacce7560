"""The one cell kind of every benchmark that runs a federation: a complete run in Flower's
simulation engine, and a greedy score of its final models.

A ``federated-run`` cell (:data:`FEDERATED_RUN`, run and cached by
:mod:`simulations.harness`) is one complete ``fedq-simulate`` run (real SuperLink) with
some config overrides and, optionally, simulated attackers. Its result keeps what the
benchmarks read: the run's ending, its ``metrics.jsonl`` rows, the score of its final
models, each device's privacy ledger and the cores it had, so a table or plot can be
redrawn from the cache alone. ``robustness``, ``communication``, the privacy sweeps and
``federation`` all build their runs here, so two of them asking for the same run share
one cache entry. Its own module (as :mod:`simulations.learning_cell`) so that a cell's
fingerprint hashes this loop, not any benchmark's tables.

The score of a run is the greedy return of the *global model itself*, read back from
the last checkpoints and played on fresh CartPole episodes here, rather than the
devices' federated evaluation: a run whose global model turned to NaN has no device
willing to evaluate it, yet the model still has a (poor) return to report.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.attacks import Attack
from fedq.simulations.harness import PRODUCT_CODE, Cell, CellKind
from fedq.simulations.run import resolve_run_config, simulate

SCORE_SEED = 424_242  # evaluation episodes: the same for every cell
# Keys of the attack settings that were product config keys before attacks moved to
# simulations/attacks.py; runs saved then still carry them in their config.json.
LEGACY_ATTACK_KEYS = frozenset({"attack", "attack-partitions", "attack-scale"})


def run_federated(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one federated cell in ``workdir``: ``params`` are ``overrides`` (config keys),
    ``clients`` and ``attack`` (None or ``{"kind", "partitions", "scale"}``). A run that
    ends badly still yields a result (``ok`` false, its status)."""
    clients = int(params["clients"])
    attack = params.get("attack")
    _, run_config = resolve_run_config(
        {**params["overrides"], "min-available-clients": clients, "run-dir": str(workdir)},
        clients)
    outcome = simulate(run_config, clients, stream=False,
                       timeout=float(params.get("timeout", 3600.0)),
                       attack=None if attack is None else Attack(
                           attack["kind"], tuple(attack["partitions"]),
                           float(attack.get("scale", 10.0))))
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    details = outcome.status_details if outcome.status_details not in (None, "", "N/A") \
        else None
    return {"ok": outcome.ok, "status": str(outcome.status) + (f" ({details})" if details
                                                               else ""),
            "rows": rows, "score": checkpoint_score(workdir),
            "best-score": best_model_score(workdir),
            "seconds": sum(r["round-seconds"] for r in rows),
            "ledgers": device_ledgers(workdir),
            # what "local training's wall time" means depends on how many cores the
            # clients shared (bench_federation's overhead shares)
            "cores": len(os.sched_getaffinity(0))}


FEDERATED_RUN = CellKind("federated-run", run_federated, (
    *PRODUCT_CODE, "fedq.simulations.federated_cell", "fedq.simulations.run",
    "fedq.simulations.attacks", "fedq.simulations.flower_runtime",
    "fedq.simulations.scenario"))


def federated_cell(overrides: Mapping[str, Any], clients: int,
                   attack: Attack | None = None) -> Cell:
    """The cell of one federated run (its cache entry is shared by every benchmark that
    asks for the same overrides, clients and attack)."""
    return Cell(FEDERATED_RUN, {
        "overrides": dict(overrides), "clients": clients,
        "attack": None if attack is None else {"kind": attack.kind,
                                               "partitions": list(attack.partitions),
                                               "scale": attack.scale}})


def device_ledgers(run_dir: Path) -> list[list[list[float]]]:
    """Each device's privacy ledger history as its disk holds it (empty without DP)."""
    ledgers = []
    devices = run_dir / "devices"
    for device in sorted(devices.iterdir()) if devices.is_dir() else []:
        pointer = device / "CURRENT"
        if not pointer.exists():
            continue
        ledger = device / pointer.read_text().strip() / "privacy.json"
        if ledger.exists():
            ledgers.append(json.loads(ledger.read_text())["history"])
    return ledgers


def checkpoint_score(run_dir: Path, episodes: int = 10) -> float:
    """Mean greedy return of the run's retained checkpoints (the last 3 rounds), each
    played for ``episodes`` episodes; NaN if the run left no checkpoint."""
    return _play(run_dir, sorted((run_dir / "checkpoints").glob("round-*.pt")), episodes)


def best_model_score(run_dir: Path, episodes: int = 30) -> float:
    """Mean greedy return of the best model by federated evaluation (``best.pt``, what
    ``fedq-export`` exports) on ``episodes`` fresh episodes: its federated return picked
    it, so only episodes it was not picked on say what it is worth. NaN without one."""
    best = run_dir / "checkpoints" / "best.pt"
    return _play(run_dir, [best] if best.is_file() else [], episodes)


def _play(run_dir: Path, paths: list[Path], episodes: int) -> float:
    """Mean greedy return of the checkpoints ``paths``, ``episodes`` each (NaN: none)."""
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


def mean_over_rounds(rows: list[dict[str, Any]]) -> float:
    """The federated greedy return averaged over every round that had one: how well the
    run learned throughout, less at the mercy of DQN's round-to-round swings than the
    final score. NaN if no round was evaluated."""
    returns = [r for r in curve(rows)[1] if r == r]
    return statistics.fmean(returns) if returns else float("nan")


def curve(rows: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(env steps per client, federated greedy return) per round; NaN where no device
    could evaluate the global model."""
    steps = [r["env-steps-per-client-total"] for r in rows]
    returns = [r["eval"].get("eval-return-mean", float("nan")) for r in rows]
    return steps, returns
