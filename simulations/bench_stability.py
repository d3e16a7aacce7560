"""Which remedy keeps what DQN learns? Variants x seeds x envs, each seed trained for the
whole budget and evaluated greedily as it goes (issue 20).

One cell is one device (the ``LocalTrainer`` a Flower client runs, numpy backend) on one
env with one variant's settings and one seed, for the task's budget
(:mod:`simulations.learning_tasks`: CartPole-v1 150k, Acrobot-v1 150k, LunarLander-v3
500k; ``budget-scale`` takes a fraction). It is the learning benchmark's cell
(:mod:`simulations.learning_cell`), so it resumes from its last evaluation when killed:
every ``eval-every`` env steps a greedy evaluation (``eval-episodes`` >= 10 episodes on
fresh seeds) and the divergence evidence, the largest |Q| of the online network over up
to 2,048 replay states, beside the bound every true Q-value of the env lies in
(:mod:`common.return_bounds`). The table gives, per (env, variant), when seeds were
solved (the third evaluation in a row at the goal), the final and best greedy return and
the peak max |Q|: median [min, max] over seeds, and how many seeds end at the goal.

Variants (``variants``, names joined by ``+`` combine, left to right): :data:`VARIANTS`.
A variant an env cannot run (``td-clip`` on LunarLander, whose per-step rewards have no
known bound) or an env not installed (LunarLander without the box2d extra) is left out
and said so under the table. Two variants with the same settings share their cells.

The committed sweeps (``python -m fedq.simulations.bench list``) are four:
``stability_sweep_quick`` and ``stability_sweep_quick5`` compare remedies on fedq's
learner defaults before issue 20 (``old-defaults``), ``stability_sweep_cartpole5`` the
remedies fedq adopted, ``stability_sweep_acrobot_quick`` the defaults against the old
ones on Acrobot at 0.3 of its budget. The whole sweep (10 variants x 5 seeds x 3 envs,
150 cells, hours on 16 cores; LunarLander needs ``pip install -e ".[box2d]"``) is one of
them with every parameter set, written outside the committed results::

    python -m fedq.simulations.bench stability_sweep_cartpole5 --workers 16 \\
        --set envs=CartPole-v1,Acrobot-v1,LunarLander-v3 --set "variants=defaults,\\
    old-defaults,no-td-clip,lr-const,lr-decay-fast,eps0,polyak,lr-half,batch-2x,buffer-all" \\
        --results-root runs/stability_full
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigError, ConfigScalar, FedqConfig
from fedq.common.envs import env_spec
from fedq.common.return_bounds import return_bounds
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    HarnessError,
    Summary,
    cell_key,
    name_list,
    register_benchmark,
    results_by_cell,
)
from fedq.simulations.learning_cell import LEARNING_RUN
from fedq.simulations.learning_tasks import TASKS, Task, check_eval_episodes
from fedq.simulations.results_io import markdown_table, spread

Settings = dict[str, ConfigScalar]
VariantFn = Callable[[Task, Settings], Settings]
"""A variant: the overrides it adds, given the task and the settings so far."""

VARIANTS: dict[str, VariantFn] = {
    "defaults": lambda task, base: {},
    # fedq's learner defaults before issue 20's remedies (3a539bd); later variants in
    # "old-defaults+x" override them
    "old-defaults": lambda task, base: {"td-target-clip": False, "learning-rate-final": 0.0,
                                        "learning-rate-decay-steps": 0},
    # TD targets clamped to the env's return bounds (CartPole: [1, 100])
    "td-clip": lambda task, base: {"td-target-clip": True},
    # TD targets never clamped ("auto", the default, clips where the reward range is known)
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
    # learning rate linearly to 0 over two thirds of the budget, then 0 (learning stops):
    # what kept sequential federated rounds at the goal (bench federation_n4_decay100k)
    "lr-decay-two-thirds": lambda task, base: {"learning-rate-final": 0.0,
                                               "learning-rate-decay-steps":
                                                   task.max_steps * 2 // 3},
    # half the task's learning rate
    "lr-half": lambda task, base: {"learning-rate": float(base.get("learning-rate", 5e-4))
                                   / 2},
    # twice the task's batch
    "batch-2x": lambda task, base: {"batch-size": 2 * int(base.get("batch-size", 64))},
    # a buffer that never forgets the early failures
    "buffer-all": lambda task, base: {"buffer-size": task.max_steps},
}


def variant_settings(task: Task, variant: str) -> Settings:
    """The task's settings (numpy backend) with the variant's overrides (``a+b``: a's,
    then b's); an unknown part fails naming ``variants``."""
    settings: Settings = {"backend": "numpy", **task.overrides}
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise HarnessError(f"variants: unknown {part!r} in {variant!r}; known (join "
                               f"with '+'): {', '.join(VARIANTS)}")
        settings.update(VARIANTS[part](task, settings))
    return settings


def plan(params: Mapping[str, Any]) -> tuple[list[tuple[str, str, Cell]], list[str]]:
    """(env, variant, cell) for every seed of every runnable (env, variant), and a note
    for each one left out. Bad parameters fail here, naming the parameter."""
    check_eval_episodes(params)
    if params["seeds"] < 1:
        raise HarnessError(f"seeds: must be >= 1, got {params['seeds']}")
    if not 0 < params["budget-scale"] <= 1:
        raise HarnessError(f"budget-scale: must be in (0, 1], got {params['budget-scale']}")
    variants = [v.strip() for v in str(params["variants"]).split(",") if v.strip()]
    if not variants:
        raise HarnessError(f"variants: none given ({params['variants']!r})")
    planned, skipped = [], []
    for env in name_list(params, "envs", list(TASKS)):
        task = TASKS[env]
        max_steps = max(1, int(task.max_steps * params["budget-scale"]))
        eval_every = params["eval-every"] or task.eval_every
        if max_steps % eval_every:
            raise HarnessError(f"eval-every: {env}'s budget of {max_steps:,} env steps "
                               f"(budget-scale {params['budget-scale']}) is not a multiple "
                               f"of {eval_every:,}")
        try:
            env_spec(env)
        except ConfigError as err:  # e.g. LunarLander without the box2d extra
            skipped.append(f"{env}: {err}")
            continue
        for variant in variants:
            settings = variant_settings(task, variant)
            try:
                FedqConfig.from_mapping({"env-id": env, **settings})
            except ConfigError as err:
                skipped.append(f"{env} / {variant}: {err}")
                continue
            planned += [(env, variant, Cell(LEARNING_RUN, {
                "env": env, "seed": seed, "goal": task.goal, "settings": settings,
                "max-steps": max_steps, "eval-every": eval_every,
                "eval-episodes": params["eval-episodes"]})) for seed in range(params["seeds"])]
    return planned, skipped


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """One cell per (env, variant, seed), in that order."""
    return [cell for _, _, cell in plan(params)[0]]


def q_bound(env: str, settings: Settings) -> float | None:
    """The largest |return| the env allows under these settings (None: no known bound)."""
    config = FedqConfig.from_mapping({"env-id": env, **settings})
    bounds = return_bounds(config.env_id, config.env_kwargs, config.gamma)
    return max(abs(b) for b in bounds) if bounds else None


def plot(groups: Mapping[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    """Median greedy return over seeds per evaluation, one panel per env, one line per
    variant, the goal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(env for env, _ in groups))
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        for (group_env, variant), runs in groups.items():
            if group_env != env:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            medians = [statistics.median(r["curve"][i][1] for r in runs)
                       for i in range(len(steps))]
            ax.plot(steps, medians, lw=1.2, label=variant)
        ax.axhline(TASKS[env].goal, color="k", ls="--", lw=1, label="goal")
        ax.set_title(f"{env}: median greedy return over seeds", fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    planned, skipped = plan(params)
    results = results_by_cell(done)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    not_run = []
    for env, variant, cell in planned:
        result = results.get(cell_key(cell))
        if result is None:
            not_run.append(f"{env} / {variant} seed {cell.params['seed']}")
            continue
        groups.setdefault((env, variant), []).append({
            "env": env, "variant": variant, "seed": cell.params["seed"],
            "settings": cell.params["settings"], "budget": cell.params["max-steps"],
            "peak-max-q": max(q for _, q in result["max-q"]), **result})
    rows = []
    for (env, variant), runs in groups.items():
        goal = TASKS[env].goal
        solved = [r["solved-at"] for r in runs if r["solved-at"] is not None]
        finals = [r["final-return"] for r in runs]
        rows.append({
            "env": env, "variant": variant, "seeds": len(runs),
            "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
            "median solved-at": statistics.median(solved) if solved else None,
            "final at goal": f"{sum(f >= goal for f in finals)}/{len(runs)}",
            "final return": spread(finals),
            "best return": spread([r["best-return"] for r in runs]),
            "peak max |Q|": spread([r["peak-max-q"] for r in runs]),
            "Q bound": q_bound(env, runs[0]["settings"]), "budget": runs[0]["budget"]})
    seed_columns = ["env", "variant", "seed", "solved-at", "final-return", "best-return",
                    "peak-max-q"]
    runs = [r for group in groups.values() for r in group]
    per_seed = markdown_table([{k: r[k] for k in seed_columns} for r in runs], seed_columns)
    notes = "".join(f"\n\nLeft out: {n}" for n in skipped) + "".join(
        f"\n\nNot run yet: {n}" for n in not_run)
    legend = "\n".join(f"- `{v}`" for v in dict.fromkeys(v for _, v, _ in planned))
    text = (f"Per seed:\n\n{per_seed}\n\nOne device (`LocalTrainer`, numpy backend) per "
            "(env, variant, seed). Solved = the third greedy evaluation in a row (mean of "
            f"{params['eval-episodes']} episodes on fresh seeds) at or above the goal; final "
            "= the last evaluation of the budget; median [min, max] over seeds. Peak max |Q| "
            "= the largest |Q| of the online network over up to 2,048 replay states at any "
            "evaluation; Q bound = the largest |return| the env allows "
            "(common/return_bounds.py). Variants (simulations/bench_stability.py "
            f"`VARIANTS`; `a+b` applies a's overrides, then b's):\n\n{legend}{notes}")
    columns = ["env", "variant", "seeds", "solved (3 in a row)", "median solved-at",
               "final at goal", "final return", "best return", "peak max |Q|", "Q bound",
               "budget"]
    return Summary(rows, columns, text,
                   payload={"runs": runs, "skipped": skipped, "not-run": not_run},
                   plot=lambda path: plot(groups, path))


_BASE = {"envs": "CartPole-v1", "variants": "defaults", "seeds": 5, "budget-scale": 1.0,
         "eval-every": 0, "eval-episodes": 10}
"""eval-every 0: the task's own (learning_tasks.TASKS)."""
_QUICK = {"variants": "td-clip", "envs": "CartPole-v1", "seeds": 1, "budget-scale": 0.004,
          "eval-every": 300}


def _register(name: str, doc: str, **params: Any) -> Benchmark:
    return register_benchmark(Benchmark(name, doc, defaults={**_BASE, **params},
                                        quick=_QUICK, cells=cells, summarise=summarise,
                                        plot_name="curves.png"))


_register("stability_sweep_quick", "which remedy keeps what CartPole's DQN learns, on the "
          "learner defaults before issue 20: six variants, 3 seeds",
          variants="old-defaults,old-defaults+td-clip,old-defaults+eps0,"
                   "old-defaults+td-clip+eps0,old-defaults+lr-decay,"
                   "old-defaults+td-clip+lr-decay", seeds=3, **{"eval-every": 5000})
_register("stability_sweep_quick5", "stability_sweep_quick's four leading variants over 5 "
          "seeds", variants="old-defaults,old-defaults+eps0,old-defaults+lr-decay,"
                            "old-defaults+td-clip+lr-decay", **{"eval-every": 5000})
_register("stability_sweep_cartpole5", "the remedies fedq adopted (TD-target clip + "
          "learning-rate decay) and two alternatives, CartPole, 5 seeds",
          variants="td-clip+lr-decay,td-clip+lr-decay-fast,td-clip+polyak+lr-const")
_register("stability_sweep_decay_two_thirds", "a lone CartPole device with the learning rate "
          "reaching 0 at 100k of its 150k steps (the schedule federation_n4_decay100k "
          "tried) against fedq's defaults, 5 seeds",
          variants="defaults,lr-decay-two-thirds")
_register("stability_sweep_batch128", "a lone CartPole device with batches of 128 instead "
          "of 64 (FedAvg's N=4 lever under test: 13/15 seeds at the goal against 10/15) "
          "against fedq's defaults, 5 seeds", variants="defaults,batch-2x")
_register("stability_sweep_acrobot_quick", "fedq's defaults vs the defaults before issue 20 on "
          "Acrobot, 3 seeds, 0.3 of the budget",
          envs="Acrobot-v1", variants="defaults,old-defaults", seeds=3,
          **{"budget-scale": 0.3})
