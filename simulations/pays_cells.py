"""The cells of the federation-pays benchmark: one scenario's N clients learning federated,
independently, or as one centralised agent, at equal env steps per client.

Its own module (as :mod:`simulations.learning_cell`) so that a cell's fingerprint hashes
these loops, not the benchmark's tables. Each cell's parameters carry the scenario file's
sha256, so editing ``simulations/scenarios/<name>.toml`` runs its cells again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from fedq.client.device import SEED_STRIDE
from fedq.common.config import FedqConfig
from fedq.common.envs import make_env
from fedq.common.trainer import LocalTrainer
from fedq.simulations.federated_cell import curve
from fedq.simulations.harness import PRODUCT_CODE, Cell, CellKind
from fedq.simulations.results_io import curve_summary
from fedq.simulations.run import app_defaults, resolve_run_config, simulate
from fedq.simulations.scenario import SCENARIOS_DIR, Scenario, load_scenario


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
    """A real federated run in the simulation engine: each client's final greedy return
    of the global model, and after personalising it, plus the run's learning curve."""
    scenario, base = _scenario(name, clients, overrides)
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


def scenario_sha(name: str) -> str:
    """The scenario file's sha256 (12 hex digits): part of every cell's parameters."""
    return hashlib.sha256((SCENARIOS_DIR / f"{name}.toml").read_bytes()).hexdigest()[:12]


def _overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seed"], "num-server-rounds": params["rounds"],
            "local-steps": params["local-steps"], "eval-episodes": params["eval-episodes"]}


def _budget(params: Mapping[str, Any]) -> int:
    return params["rounds"] * params["local-steps"]


def _run(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one cell of ``params["method"]`` (one torch thread: cells may run side by side)."""
    torch.set_num_threads(1)
    name, clients = params["scenario"], params["clients"]
    if params["method"] == "federated":
        return run_federated(name, clients, _overrides(params), params["personalize-steps"],
                             workdir)
    if params["method"] == "independent":
        return run_independent(name, clients, _overrides(params), _budget(params),
                               params["personalize-steps"])
    return run_centralised(name, clients, _overrides(params), _budget(params))


PAYS_RUN = CellKind("pays-run", _run, (
    *PRODUCT_CODE, "fedq.simulations.pays_cells", "fedq.simulations.federated_cell",
    "fedq.simulations.run", "fedq.simulations.scenario", "fedq.simulations.flower_runtime"))


def pays_cell(method: str, scenario: str, clients: int, seed: int,
              params: Mapping[str, Any]) -> Cell:
    """The cell of one method on one scenario's ``clients`` clients and ``seed``."""
    return Cell(PAYS_RUN, {
        "method": method, "scenario": scenario, "scenario-sha": scenario_sha(scenario),
        "clients": clients, "seed": seed, "rounds": params["rounds"],
        "local-steps": params["local-steps"], "eval-episodes": params["eval-episodes"],
        "personalize-steps": params["personalize-steps"]})
