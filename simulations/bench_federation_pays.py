"""Does federation pay on heterogeneous devices? Federated vs independent vs centralised.

For each scenario (``simulations/scenarios/``: homogeneous CartPole, heterogeneous
CartPole, heterogeneous Acrobot), each federation size N and each seed, the same N
clients (same physics draws, same device seeds ``seed + 1000 * k``) learn in three ways,
each with the same env steps per client (``--rounds`` x ``--local-steps``):

- **federated**: a real run in Flower's simulation engine (``simulations.run``): FedAvg
  every ``--local-steps``; the final global model is evaluated greedily on every
  client's own env. **personalised** is the same run's final evaluation after each
  client fine-tunes the global model ``--personalize-steps`` on its own env
  (``client/personalize.py``; these steps come on top of the budget).
- **independent**: each client trains its own :class:`common.trainer.LocalTrainer`, in
  this process, no averaging, and is evaluated on its own env. Clients 0..3 of N = 8 are
  exactly the N = 4 clients, so one set of 8 serves both sizes. **independent-longer**
  is the same agents evaluated again after ``--personalize-steps`` more steps: the
  personalised policy's total steps per client, so that comparison is at equal steps too.
- **centralised**: one LocalTrainer stepping all N clients' envs, taking them in turn
  one *episode* each (per-step switching would cut episodes apart), for N x budget
  steps in total; it is evaluated on every client's env. Short-pole clients have
  shorter episodes, so their share of the steps is smaller: the split is recorded.

Every evaluation runs ``--eval-episodes`` greedy episodes with the seeds the federated
run's last round used, so the methods are compared on the same episodes. Reported per
cell: mean over clients and worst client of the mean greedy return; the table gives
their mean over seeds. The federated runs' learning curves (federated evaluation every
round) also give when each was solved (3 rounds in a row at the env's goal,
:func:`simulations.results_io.solved_at`), its final and its best return.

    python -m fedq.simulations.bench_federation_pays --seeds 2

Finished cells are cached in ``runs/bench_federation_pays/`` (JSON per cell), so an
interrupted run continues and two processes can split the work (``--only``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fedq.client.device import SEED_STRIDE
from fedq.common.config import FedqConfig
from fedq.common.envs import make_env
from fedq.common.trainer import LocalTrainer
from fedq.simulations.federated_cell import curve
from fedq.simulations.results_io import (
    RESULTS_ROOT,
    curve_summary,
    markdown_table,
    spread,
    write_results,
)
from fedq.simulations.run import app_defaults, resolve_run_config, simulate
from fedq.simulations.scenario import SCENARIOS_DIR, Scenario, load_scenario

CACHE = Path("runs/bench_federation_pays")
SCENARIOS = ("homo_cartpole", "hetero_cartpole", "hetero_acrobot")
METHODS = ("federated", "personalised", "independent", "independent-longer", "centralised")
torch.set_num_threads(1)


class EnvCycle(gym.Env):
    """Several envs behind one: each ``reset`` moves on to the next env (one episode
    each, in turn), so a single agent collects experience from all of them."""

    def __init__(self, envs: list[gym.Env]) -> None:
        self.envs, self.current = envs, -1
        self.observation_space = envs[0].observation_space
        self.action_space = envs[0].action_space
        self.steps = [0] * len(envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.current = (self.current + 1) % len(self.envs)
        return self.envs[self.current].reset(seed=seed, options=options)

    def step(self, action):
        self.steps[self.current] += 1
        return self.envs[self.current].step(action)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _scenario(name: str, clients: int, overrides: dict[str, Any]) -> tuple[Scenario, FedqConfig]:
    scenario = load_scenario(SCENARIOS_DIR / f"{name}.toml", clients, app_defaults(), overrides)
    base = FedqConfig.from_mapping({**app_defaults(), **scenario.run, **overrides})
    return scenario, base


def _eval_seed(config: FedqConfig, device_seed: int) -> int:
    """The seed of the federated run's final evaluation on that device."""
    return device_seed + 10**6 + 1000 * config.num_server_rounds


def _evaluate_on_clients(state: dict[str, torch.Tensor], scenario: Scenario,
                         base: FedqConfig) -> list[float]:
    returns = []
    for k in range(scenario.num_clients):
        config = scenario.client_config(base, k)
        seed = base.seed + SEED_STRIDE * k
        trainer = LocalTrainer(config, seed=seed)
        trainer.learner.load_online(state, sync_target=False)
        returns.append(float(np.mean(trainer.evaluate(config.eval_episodes,
                                                      seed=_eval_seed(base, seed)))))
        trainer.close()
    return returns


def run_federated(name: str, clients: int, overrides: dict[str, Any],
                  personalize_steps: int, run_dir: Path) -> dict[str, Any]:
    scenario, base = _scenario(name, clients, overrides)
    if run_dir.exists():  # an interrupted cell: start it again
        for path in sorted(run_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    run = {**scenario.run_config(), **overrides, "min-available-clients": clients,
           "personalize-steps": personalize_steps, "run-dir": str(run_dir)}
    _, run_config = resolve_run_config(run, clients)
    result = simulate(run_config, clients, stream=False, timeout=3 * 3600)
    if not result.ok:
        raise RuntimeError(f"{name} N={clients}: run ended {result.status}: "
                           f"{result.status_details}; see {run_dir / 'flower.log'}")
    rows = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows)
    final = sorted((r for r in rows if r["round"] == last and r["phase"] == "evaluate"),
                   key=lambda r: r["partition-id"])
    return {"federated": [r["eval-return-mean"] for r in final],
            "personalised": [r["personalized-return-mean"] for r in final],
            "rounds": last, "curve": federated_curve(run_dir, base.env_id)}


def federated_curve(run_dir: Path, env_id: str) -> dict[str, Any]:
    """Solved-at (3 rounds in a row at the env's goal), final and best of a federated
    run's per-round federated evaluation, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(s, r) for s, r in zip(*curve(rows), strict=True) if r == r]
    goal = gym.spec(env_id).reward_threshold
    return {"goal": goal, **curve_summary(points, goal if goal is not None else math.inf)}


def run_independent(name: str, clients: int, overrides: dict[str, Any],
                    budget: int, extra_steps: int) -> dict[str, Any]:
    """Each client alone: greedy returns after ``budget`` steps and, the same agents,
    after ``extra_steps`` more (what personalisation adds on top of the budget)."""
    scenario, base = _scenario(name, clients, overrides)
    returns, longer = [], []
    for k in range(clients):
        config = scenario.client_config(base, k)
        seed = base.seed + SEED_STRIDE * k
        trainer = LocalTrainer(config, seed=seed)
        trainer.train(budget)
        returns.append(float(np.mean(trainer.evaluate(config.eval_episodes,
                                                      seed=_eval_seed(base, seed)))))
        trainer.train(extra_steps)
        longer.append(float(np.mean(trainer.evaluate(config.eval_episodes,
                                                     seed=_eval_seed(base, seed)))))
        trainer.close()
    return {"independent": returns, "independent-longer": longer}


def run_centralised(name: str, clients: int, overrides: dict[str, Any],
                    budget: int) -> dict[str, Any]:
    scenario, base = _scenario(name, clients, overrides)
    configs = [scenario.client_config(base, k) for k in range(clients)]
    trainer = LocalTrainer(configs[0], seed=base.seed)
    trainer.env.close()
    cycle = EnvCycle([make_env(c.env_id, c.env_kwargs, c.env_physics) for c in configs])
    trainer.env = cycle
    trainer.train(budget * clients)
    trainer.close()
    state = {k: v.clone() for k, v in trainer.learner.online.state_dict().items()}
    return {"centralised": _evaluate_on_clients(state, scenario, base),
            "centralised-steps-per-client": cycle.steps}


def cell(kind: str, name: str, clients: int, seed: int, args: argparse.Namespace,
         cached_only: bool = False) -> dict[str, Any] | None:
    """One cached unit of work (None when it has not run and ``--report`` or
    ``cached_only`` says not to run it)."""
    key = f"{kind}-{name}-n{clients}-seed{seed}-r{args.rounds}x{args.local_steps}"
    path = (CACHE / f"{key}.json").resolve()
    if path.exists():
        return json.loads(path.read_text())
    if args.report or cached_only:
        return None
    overrides = {"seed": seed, "num-server-rounds": args.rounds,
                 "local-steps": args.local_steps, "eval-episodes": args.eval_episodes}
    budget = args.rounds * args.local_steps
    started = time.perf_counter()
    if kind == "federated":
        out = run_federated(name, clients, overrides, args.personalize_steps,
                            (CACHE / f"{key}-run").resolve())
    elif kind == "independent":
        out = run_independent(name, clients, overrides, budget, args.personalize_steps)
    else:
        out = run_centralised(name, clients, overrides, budget)
    out["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"[bench] {key}: {json.dumps(out)}", flush=True)
    return out


def collect(name: str, clients: int, seed: int, args: argparse.Namespace,
            kinds: set[str]) -> dict[str, list[float]]:
    """Per-client returns of every method for one (scenario, N, seed)."""
    out: dict[str, list[float]] = {}
    if "federated" in kinds and (done := cell("federated", name, clients, seed, args)):
        out.update({k: v for k, v in done.items() if k in METHODS})
        if "curve" in done:  # cells from before the curve summary lack it
            out["federated-curve"] = done["curve"]
    if "independent" in kinds:  # the N = 4 clients are the first 4 of N = 8
        sizes = sorted({n for n in [*args.clients, clients] if n >= clients}, reverse=True)
        done = next((d for n in sizes
                     if (d := cell("independent", name, n, seed, args, cached_only=True))),
                    None) or cell("independent", name, max(args.clients), seed, args)
        if done:  # cells from before independent-longer existed lack it
            out.update({k: done[k][:clients] for k in ("independent", "independent-longer")
                        if k in done})
    if "centralised" in kinds and (done := cell("centralised", name, clients, seed, args)):
        out["centralised"] = done["centralised"]
    return out


def summarise(results: dict[tuple[str, int, int], dict[str, list[float]]],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    table = []
    for name in args.scenarios:
        for n in args.clients:
            for method in METHODS:
                per_seed = [results[(name, n, s)][method] for s in args.seed_list
                            if method in results.get((name, n, s), {})]
                if not per_seed:
                    continue
                table.append({
                    "scenario": name, "N": n, "method": method, "seeds": len(per_seed),
                    "mean return": statistics.mean(float(np.mean(r)) for r in per_seed),
                    "worst-client return": statistics.mean(float(np.min(r))
                                                           for r in per_seed),
                    "worst-client, per seed": ", ".join(f"{min(r):.0f}" for r in per_seed),
                })
    return table


def curve_table(results: dict[tuple[str, int, int], dict[str, Any]],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per scenario and N: the federated runs' solved (3 rounds in a row), final and best
    federated return over seeds."""
    rows = []
    for name in args.scenarios:
        for n in args.clients:
            runs = [results[(name, n, s)]["federated-curve"] for s in args.seed_list
                    if "federated-curve" in results.get((name, n, s), {})]
            if not runs:
                continue
            solved = [r["solved-at"] for r in runs if r["solved-at"] is not None]
            rows.append({"scenario": name, "N": n, "seeds": len(runs),
                         "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
                         "median steps/client to solved": statistics.median(solved)
                         if solved else None,
                         "final": spread([r["final-return"] for r in runs]),
                         "best": spread([r["best-return"] for r in runs])})
    return rows


def verdicts(table: list[dict[str, Any]]) -> list[str]:
    """The issue's target, per N: on heterogeneous CartPole, does the federated or the
    personalised worst-client return beat the independent agents' worst client at the
    same steps per client? (personalised is held against independent-longer, which has
    taken its fine-tuning steps too)."""
    lines = []
    for n in sorted({r["N"] for r in table if r["scenario"] == "hetero_cartpole"}):
        worst = {r["method"]: r["worst-client return"] for r in table
                 if r["scenario"] == "hetero_cartpole" and r["N"] == n}
        pairs = [("federated", "independent"), ("personalised", "independent-longer")]
        for method, baseline in pairs:
            if method not in worst or baseline not in worst:
                continue
            met = worst[method] > worst[baseline]
            lines.append(f"- hetero_cartpole, N = {n}: {method} worst client "
                         f"{worst[method]:.1f} vs {baseline} {worst[baseline]:.1f}: target "
                         f"{'met' if met else 'NOT met'}")
    return lines


def plot(table: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    fig, axes = plt.subplots(1, len(args.scenarios), figsize=(5 * len(args.scenarios), 4),
                             squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, name in zip(axes[0], args.scenarios, strict=True):
        for m, method in enumerate(METHODS):
            rows = [r for r in table if r["scenario"] == name and r["method"] == method]
            if not rows:
                continue
            xs = (np.array([args.clients.index(r["N"]) for r in rows])
                  + (m - (len(METHODS) - 1) / 2) * width)
            colour = f"C{m}"  # one colour per method in every panel
            ax.bar(xs, [r["mean return"] for r in rows], width, alpha=0.45, color=colour,
                   label=f"{method} (mean)")
            ax.scatter(xs, [r["worst-client return"] for r in rows], marker="v", s=40,
                       color=colour, edgecolor="black", zorder=3,
                       label=f"{method} (worst client)")
        ax.set_xticks(range(len(args.clients)), [f"N = {n}" for n in args.clients])
        ax.set_title(name)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"greedy return after {args.rounds * args.local_steps:,} "
                          "env steps per client")
    axes[0][1 if len(args.scenarios) > 1 else 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--clients", default="4,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed-list", help="comma-separated seeds to run instead of "
                                            "0..seeds-1 (to split the work over processes)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--personalize-steps", type=int, default=1000)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the cells already in the cache")
    parser.add_argument("--only", default="federated,independent,centralised",
                        help="which kinds of cells to run (the others are read from the "
                             "cache if there)")
    args = parser.parse_args()
    args.scenarios = args.scenarios.split(",")
    args.clients = [int(x) for x in args.clients.split(",")]
    args.seed_list = ([int(x) for x in args.seed_list.split(",")] if args.seed_list
                      else list(range(args.seeds)))
    kinds = set(args.only.split(","))
    results = {}
    for name in args.scenarios:
        for n in args.clients:
            for seed in args.seed_list:
                results[(name, n, seed)] = collect(name, n, seed, args, kinds)
    table = summarise(results, args)
    columns = ["scenario", "N", "method", "seeds", "mean return", "worst-client return",
               "worst-client, per seed"]
    curves = curve_table(results, args)
    markdown = markdown_table(table, columns) + "\n\n" + "\n".join(verdicts(table))
    if curves:
        markdown += "\n\nFederated runs, per-round federated evaluation:\n\n" + \
            markdown_table(curves, ["scenario", "N", "seeds", "solved (3 in a row)",
                                    "median steps/client to solved", "final", "best"])
    print(markdown)
    if kinds != {"federated", "independent", "centralised"} or not table:
        return  # a partial pass only fills the cache
    folder = RESULTS_ROOT / "federation_pays"
    folder.mkdir(parents=True, exist_ok=True)
    plot(table, args, folder / "federation_pays.png")
    per_client = {f"{name}/N={n}/seed={s}": v for (name, n, s), v in results.items() if v}
    write_results("federation_pays", {
        "summary": table, "federated-curves": curves, "per-client-returns": per_client,
        "budget-steps-per-client": args.rounds * args.local_steps,
        "rounds": args.rounds, "local-steps": args.local_steps,
        "eval-episodes": args.eval_episodes, "personalize-steps": args.personalize_steps,
    }, f"{markdown}\n\nEqual budget: {args.rounds} x {args.local_steps} = "
       f"{args.rounds * args.local_steps:,} env steps per client for every method "
       f"(personalised adds {args.personalize_steps} fine-tuning steps per client on top, and "
       f"is compared with independent-longer, the independent agents after as many more). "
       "Returns are greedy, on each client's own env, "
       f"{args.eval_episodes} episodes with the same seeds for every method; mean over "
       "clients and worst client, then averaged over seeds. Plot: federation_pays.png.\n")


if __name__ == "__main__":
    main()
