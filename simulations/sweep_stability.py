"""Which remedy keeps what DQN learns? Variants x seeds x envs, each seed trained for the
whole budget and evaluated greedily as it goes (issue 20).

One cell is one device (the ``LocalTrainer`` a Flower client runs, numpy backend) on one
env with one variant's settings and one seed, for the task's whole budget
(:mod:`simulations.learning_tasks`: CartPole-v1 150k, Acrobot-v1 150k, LunarLander-v3
500k). Every ``eval_every`` env steps it is evaluated greedily (``--eval-episodes`` >= 10
episodes on fresh seeds), and the same moment records the divergence evidence: the
largest |Q| of the online network over up to 2,048 replay-buffer states (beside the
bound every true Q-value of the env lies in, :mod:`common.return_bounds`) and the share
of terminal transitions in the buffer. A cell reports when it was solved (the third
evaluation in a row at the goal, :func:`simulations.results_io.solved_at`), its final and
its best greedy return, and its peak max |Q|; the table gives median [min, max] over
seeds and how many seeds end at the goal.

Cells run in ``--workers`` processes, one BLAS thread each; each finished cell is cached
as JSON under ``--cache`` (named by a digest of its settings), so an interrupted sweep
continues and a changed variant never reuses stale cells. Only numpy and gymnasium
(+ box2d for LunarLander) are needed at run time; torch and flwr are never imported.
The full sweep on a 16-core machine (installed with ``pip install -e ".[box2d]"``: no torch
extra needed; 10 variants x 5 seeds x 3 envs, 150 cells; "defaults" are fedq's current
ones, td-target-clip "auto" and the learning rate decaying to 0 over 150k env steps,
"old-defaults" those before issue 20's remedies):

    python -m fedq.simulations.sweep_stability --workers 16

and a quick check (3 seeds, CartPole only, a fifth of the budget):

    python -m fedq.simulations.sweep_stability --workers 2 --seeds 3 --envs CartPole-v1 \\
        --budget-scale 0.2 --results-name stability_sweep_quick

Variants (``--variants``, names joined by ``+`` combine): see :data:`VARIANTS`. A variant
an env cannot run (``td-clip`` on LunarLander, whose per-step rewards have no known
bound) is left out for that env and said so.
"""

from __future__ import annotations

import os

# one BLAS thread per worker process, set before numpy loads (16 workers x 16 threads
# would only contend); an explicit setting in the environment wins
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fedq.common.atomic import atomic_write_text  # noqa: E402
from fedq.common.config import ConfigError, ConfigScalar, FedqConfig  # noqa: E402
from fedq.common.envs import env_spec  # noqa: E402
from fedq.common.return_bounds import return_bounds  # noqa: E402
from fedq.common.trainer import LocalTrainer  # noqa: E402
from fedq.simulations.learning_tasks import TASKS, Task  # noqa: E402
from fedq.simulations.results_io import (  # noqa: E402
    curve_summary,
    markdown_table,
    results_name,
    spread,
    write_results,
)

DEFAULT_ENVS = ("CartPole-v1", "Acrobot-v1", "LunarLander-v3")
Q_SAMPLE = 2048  # replay-buffer states the max |Q| is taken over

Settings = dict[str, ConfigScalar]
# a variant: the overrides it adds to a task's settings, given the task and its settings
VariantFn = Callable[[Task, Settings], Settings]
VARIANTS: dict[str, VariantFn] = {
    "defaults": lambda task, base: {},
    # fedq's learner defaults before issue 20's remedies (3a539bd): the committed quick
    # sweeps ran these as "defaults"; later variants in "old-defaults+x" override them
    "old-defaults": lambda task, base: {"td-target-clip": False, "learning-rate-final": 0.0,
                                        "learning-rate-decay-steps": 0},
    # TD targets clamped to the env's return bounds (CartPole: [1, 100])
    "td-clip": lambda task, base: {"td-target-clip": True},
    # TD targets never clamped (the default before issue 20's remedies; "auto" clips
    # wherever the env's reward range is known)
    "no-td-clip": lambda task, base: {"td-target-clip": False},
    # the learning rate held constant (the default before issue 20's remedies)
    "lr-const": lambda task, base: {"learning-rate-decay-steps": 0},
    # greedy acting once epsilon has decayed
    "eps0": lambda task, base: {"exploration-final-eps": 0.0},
    # Polyak-averaged target network every env step (SB3/CleanRL-style soft update)
    "polyak": lambda task, base: {"tau": 0.005, "target-update-interval": 1},
    # learning rate linearly to 0 over the whole budget
    "lr-decay": lambda task, base: {"learning-rate-final": 0.0,
                                    "learning-rate-decay-steps": task.max_steps},
    # learning rate linearly to a tenth over half the budget, then held: the unstable
    # stretch after the first solve (40k-100k on CartPole) already runs at a lower rate
    "lr-decay-fast": lambda task, base: {
        "learning-rate-final": float(base.get("learning-rate", 5e-4)) / 10,
        "learning-rate-decay-steps": task.max_steps // 2},
    # half the task's learning rate
    "lr-half": lambda task, base: {"learning-rate": float(base.get("learning-rate", 5e-4))
                                   / 2},
    # twice the task's batch
    "batch-2x": lambda task, base: {"batch-size": 2 * int(base.get("batch-size", 64))},
    # a buffer that never forgets the early failures
    "buffer-all": lambda task, base: {"buffer-size": task.max_steps},
}
DEFAULT_VARIANTS = ("defaults", "old-defaults", "no-td-clip", "lr-const", "lr-decay-fast",
                    "eps0", "polyak", "lr-half", "batch-2x", "buffer-all")


@dataclass(frozen=True)
class Cell:
    """One (env, variant, seed) run and everything that decides its outcome."""

    env_id: str
    variant: str
    seed: int
    max_steps: int
    eval_every: int
    eval_episodes: int
    settings: tuple[tuple[str, ConfigScalar], ...]  # the full config mapping, sorted

    def digest(self) -> str:
        blob = json.dumps([self.max_steps, self.eval_every, self.eval_episodes,
                           list(self.settings)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def path(self, cache: Path) -> Path:
        return cache / self.env_id / self.variant / f"seed{self.seed}-{self.digest()}.json"


def variant_settings(task: Task, variant: str) -> Settings:
    """The task's settings with the variant's overrides (``a+b``: a's, then b's)."""
    settings: Settings = {"env-id": task.env_id, "backend": "numpy", **task.overrides}
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise ConfigError("--variants", f"unknown variant {part!r}; choose from "
                                            f"{', '.join(VARIANTS)}")
        settings.update(VARIANTS[part](task, settings))
    return settings


def max_abs_q(trainer: LocalTrainer, rng: np.random.Generator) -> float:
    """The largest |Q(s, a)| of the online network over a sample of buffer states."""
    n = len(trainer.buffer)
    if n == 0:
        return 0.0
    states = trainer.buffer.obs[rng.choice(n, size=min(n, Q_SAMPLE), replace=False)]
    h = states
    layers = trainer.learner.online.layers()
    for i, (weight, bias) in enumerate(layers):
        h = h @ weight.T + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return float(np.abs(h).max())


def run_cell(cell: Cell) -> dict[str, Any]:
    """Train one cell for its whole budget, evaluating as it goes; cached by the caller."""
    config = FedqConfig.from_mapping(dict(cell.settings))
    trainer = LocalTrainer(config, seed=cell.seed)
    rng = np.random.default_rng(cell.seed)
    curve: list[tuple[int, float]] = []
    q_curve: list[tuple[int, float]] = []
    terminal_share: list[tuple[int, float]] = []
    started = time.perf_counter()
    while trainer.counters.env_steps < cell.max_steps:
        trainer.train(min(cell.eval_every, cell.max_steps - trainer.counters.env_steps))
        steps = trainer.counters.env_steps
        returns = trainer.evaluate(cell.eval_episodes, seed=10**6 + steps)
        curve.append((steps, float(statistics.fmean(returns))))
        q_curve.append((steps, max_abs_q(trainer, rng)))
        n = len(trainer.buffer)
        terminal_share.append((steps, float(trainer.buffer.terminated[:n].mean())))
    trainer.close()
    goal = TASKS[cell.env_id].goal
    bounds = return_bounds(config.env_id, config.env_kwargs, config.gamma)
    return {"env": cell.env_id, "variant": cell.variant, "seed": cell.seed,
            **curve_summary(curve, goal),
            "peak-max-q": max(q for _, q in q_curve), "final-max-q": q_curve[-1][1],
            "q-bound": max(abs(b) for b in bounds) if bounds else None,
            "seconds": time.perf_counter() - started, "settings": dict(cell.settings),
            "curve": curve, "max-q": q_curve, "terminal-share": terminal_share}


def run_and_cache(job: tuple[Cell, str]) -> dict[str, Any]:
    """Run a cell in a worker process and write its JSON as soon as it finishes.

    A failure comes back as ``{"error": ...}`` rather than raised: an exception that does
    not unpickle in the parent (ConfigError's two-argument constructor) hangs a Pool."""
    cell, cache = job
    try:
        result = run_cell(cell)
    except Exception as err:  # any failure of one cell: reported, the sweep goes on
        return {"env": cell.env_id, "variant": cell.variant, "seed": cell.seed,
                "error": f"{type(err).__name__}: {err}"}
    path = cell.path(Path(cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
    return result


def plan(envs: list[str], variants: list[str], seeds: int, budget_scale: float,
         eval_every: int | None, eval_episodes: int) -> tuple[list[Cell], list[str]]:
    """Every cell of the sweep, and a note for each (env, variant) left out."""
    cells, skipped = [], []
    for env_id in envs:
        task = TASKS[env_id]
        try:
            env_spec(env_id)
        except ConfigError as err:  # e.g. LunarLander without the box2d extra
            skipped.append(f"{env_id}: {err}")
            continue
        max_steps = max(1, int(task.max_steps * budget_scale))
        for variant in variants:
            settings = variant_settings(task, variant)
            try:
                full = FedqConfig.from_mapping(settings).to_mapping()
            except ConfigError as err:
                skipped.append(f"{env_id} / {variant}: {err}")
                continue
            cells += [Cell(env_id, variant, seed, max_steps, eval_every or task.eval_every,
                           eval_episodes, tuple(sorted(full.items())))
                      for seed in range(seeds)]
    return cells, skipped


def summarise(env_id: str, variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    goal = TASKS[env_id].goal
    solved = [r["solved-at"] for r in runs if r["solved-at"] is not None]
    finals = [r["final-return"] for r in runs]
    return {"env": env_id, "variant": variant, "seeds": len(runs),
            "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
            "median solved-at": statistics.median(solved) if solved else None,
            "final at goal": f"{sum(f >= goal for f in finals)}/{len(runs)}",
            "final return": spread(finals),
            "best return": spread([r["best-return"] for r in runs]),
            "peak max |Q|": spread([r["peak-max-q"] for r in runs]),
            "Q bound": runs[0]["q-bound"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default=",".join(DEFAULT_ENVS),
                        help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated; '+' combines: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (one cell each at a time)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="fraction of each task's env-step budget (quick checks only)")
    parser.add_argument("--eval-every", type=int,
                        help="env steps between evaluations (default: the task's)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path("runs/sweep_stability"))
    parser.add_argument("--results-name", type=results_name, default="stability_sweep")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the results of the cells already cached "
                             "and list the others as not run (an interrupted sweep)")
    args = parser.parse_args()
    if args.eval_episodes < 10:
        parser.error("--eval-episodes must be >= 10: fewer make a greedy return too noisy "
                     "to call a task solved")
    envs = [e for e in args.envs.split(",") if e]
    unknown = [e for e in envs if e not in TASKS]
    if unknown:
        parser.error(f"--envs: unknown {unknown}; choose from {', '.join(TASKS)}")
    try:
        cells, skipped = plan(envs, [v for v in args.variants.split(",") if v], args.seeds,
                              args.budget_scale, args.eval_every, args.eval_episodes)
    except ConfigError as err:
        parser.error(str(err))
    cached = {c: json.loads(c.path(args.cache).read_text()) for c in cells
              if c.path(args.cache).exists()}
    pending = sorted((c for c in cells if c not in cached), key=lambda c: -c.max_steps)
    print(f"{len(cells)} cells: {len(cached)} cached, {len(pending)} to run on "
          f"{args.workers} workers", flush=True)
    for note in skipped:
        print(f"left out: {note}", flush=True)
    results, failed = list(cached.values()), []
    not_run = [f"{c.env_id} / {c.variant} seed {c.seed}" for c in pending] if args.report else []
    if pending and not args.report:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            jobs = [(c, str(args.cache)) for c in pending]
            for result in pool.imap_unordered(run_and_cache, jobs):
                if "error" in result:
                    failed.append(f"{result['env']} / {result['variant']} seed "
                                  f"{result['seed']}: {result['error']}")
                    print(f"FAILED: {failed[-1]}", flush=True)
                    continue
                results.append(result)
                print(f"[{len(results)}/{len(cells)}] {result['env']} {result['variant']} "
                      f"seed {result['seed']}: solved at {result['solved-at']}, final "
                      f"{result['final-return']:.1f}, best {result['best-return']:.1f}, "
                      f"peak max|Q| {result['peak-max-q']:.1f} ({result['seconds']:.0f}s)",
                      flush=True)
    order = {(c.env_id, c.variant): i for i, c in enumerate(cells)}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (order[(r["env"], r["variant"])], r["seed"])):
        groups.setdefault((r["env"], r["variant"]), []).append(r)
    summaries = [summarise(env, variant, runs) for (env, variant), runs in groups.items()]
    columns = ["env", "variant", "seeds", "solved (3 in a row)", "median solved-at",
               "final at goal", "final return", "best return", "peak max |Q|", "Q bound"]
    table = markdown_table(summaries, columns)
    print(table)
    budgets = {env: max(1, int(TASKS[env].max_steps * args.budget_scale)) for env in envs}
    per_seed_columns = ["env", "variant", "seed", "solved-at", "final-return", "best-return",
                        "peak-max-q"]
    per_seed = markdown_table([{k: r[k] for k in per_seed_columns}
                               for runs in groups.values() for r in runs], per_seed_columns)
    notes = "".join(f"\nLeft out: {n}" for n in skipped) + "".join(
        f"\nFailed: {n}" for n in failed) + "".join(f"\nNot run (--report): {n}"
                                                   for n in not_run)
    write_results(args.results_name, {
        "summary": summaries, "budgets": budgets, "eval-episodes": args.eval_episodes,
        "skipped": skipped, "failed": failed, "not-run": not_run,
        "runs": [r for runs in groups.values() for r in runs]},
        f"{table}\n\nPer seed:\n\n{per_seed}\n\nSolved = the third greedy evaluation in a "
        f"row (mean of {args.eval_episodes} episodes) at or above the goal; final = the "
        "last evaluation of the budget; median [min, max] over seeds. Peak max |Q| = the "
        "largest |Q| of the online network over up to 2,048 replay states at any "
        "evaluation; Q bound = the largest |return| the env allows "
        f"(common/return_bounds.py). Budgets: {budgets}.{notes}\n")
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed (listed above); the others are "
                         "cached and in the results")


if __name__ == "__main__":
    main()
