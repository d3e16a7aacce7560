"""One device learning CarRacing-v3 (discrete) from pixels on this CPU: a greedy learning
curve against the random policy, checkpointed so a killed run loses nothing.

The loop is :class:`common.trainer.LocalTrainer` itself. Every ``--eval-every`` decisions
it plays ``--eval-episodes`` greedy episodes on fixed tracks (the same tracks at every
evaluation, and the same ones the random policy is scored on), saves the device's whole
state (networks, optimizer, replay buffer, counters, RNGs) under ``--run-dir`` and
rewrites the results, so the committed curve is current after every point. Run the same
command again and it resumes from the last saved point; ``--decisions`` may grow between
runs to extend a curve.

Steps are counted two ways: decisions (what ``local-steps``, ``exploration-steps`` and
the other step keys count) and env frames (decisions x ``action-repeat``, what
CarRacing's 1000-frame episodes and the literature count).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 19 \\
        python -m fedq.simulations.carracing_learning --decisions 60000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.common.atomic import atomic_write_text
from fedq.common.config import FedqConfig, parse_assignment
from fedq.common.envs import ImageObs, run_env_spec
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.simulations.results_io import markdown_table, results_name, write_results

EVAL_SEED = 10**6  # the greedy and the random policy drive the same tracks
TARGET = 300.0  # issue 19's single-device target
RUN = {
    "env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}', "network": "edge-cnn",
    "obs-grayscale": True, "obs-resize": 64, "obs-frame-stack": 4, "action-repeat": 4,
    "buffer-size": 50_000, "batch-size": 64, "learning-rate": 2.5e-4,
    "learning-starts": 2_000, "train-frequency": 2, "target-update-interval": 1_000,
    "exploration-steps": 20_000, "exploration-final-eps": 0.05, "gamma": 0.99,
}
"""The run's config: 64 x 64 grayscale frames, 4 stacked, each decision held for 4 frames
(CarRacing's 1000-frame episode is 250 decisions), an update of 64 transitions every 2
decisions, epsilon from 1 to 0.05 over the first 20,000 decisions."""


def build_config(overrides: dict[str, Any]) -> FedqConfig:
    """The run's config with ``--set`` overrides, checked like any fedq run (env, network
    and replay-buffer memory) before training starts."""
    config = FedqConfig.from_mapping({**RUN, **overrides})
    run_env_spec(config)
    return config


def random_returns(config: FedqConfig, episodes: int) -> list[float]:
    """The uniformly random policy on the evaluation tracks, through the same wrappers."""
    rng = np.random.default_rng(0)
    n_actions = run_env_spec(config).n_actions
    return play_episodes(lambda _obs: int(rng.integers(n_actions)), config.env_id, episodes,
                         seed=EVAL_SEED, env_kwargs=config.env_kwargs,
                         image=ImageObs.of(config), action_repeat=config.action_repeat)


def plot_curve(points: list[dict[str, Any]], random_mean: float, path: Path) -> None:
    """Greedy return (mean and each episode) against env frames, with the random policy
    and the target as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    frames = [p["env_frames"] for p in points]
    ax.plot(frames, [p["greedy_mean"] for p in points], "o-", label="greedy mean")
    for p in points:
        ax.scatter([p["env_frames"]] * len(p["greedy_returns"]), p["greedy_returns"],
                   s=8, color="grey", alpha=0.6)
    ax.axhline(random_mean, color="red", linestyle="--", label=f"random {random_mean:.0f}")
    ax.axhline(TARGET, color="green", linestyle=":", label=f"target {TARGET:.0f}")
    ax.set_xlabel("env frames (decisions x action-repeat)")
    ax.set_ylabel("return")
    ax.set_title("CarRacing-v3 discrete, one device, edge-cnn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(state: dict[str, Any], asked: int) -> tuple[dict[str, Any], str]:
    """The results payload and markdown of the curve so far (``asked``: the decisions
    the command asks for; fewer mean the run was stopped or is still going)."""
    points, random = state["points"], state["random_returns"]
    random_mean = statistics.fmean(random)
    greedy = [p["greedy_mean"] for p in points]
    train_seconds = sum(p["train_seconds"] for p in points)
    decisions = points[-1]["decisions"] if points else 0
    summary = {
        "random_mean": random_mean, "random_returns": random,
        "best_greedy_mean": max(greedy) if greedy else None,
        "final_greedy_mean": greedy[-1] if greedy else None,
        "decisions": decisions, "decisions_asked": asked,
        "env_frames": decisions * state["action_repeat"],
        "train_seconds": train_seconds,
        "decisions_per_s": decisions / train_seconds if train_seconds else None,
        "env_frames_per_s": (decisions * state["action_repeat"] / train_seconds
                             if train_seconds else None),
        "reached_target": any(g >= TARGET for g in greedy),
    }
    rows = [{"decisions": p["decisions"], "env_frames": p["env_frames"],
             "epsilon": round(p["epsilon"], 3), "greedy_mean": round(p["greedy_mean"], 1),
             "greedy_min": round(min(p["greedy_returns"]), 1),
             "greedy_max": round(max(p["greedy_returns"]), 1),
             "train_return_mean": (round(statistics.fmean(p["train_returns"]), 1)
                                   if p["train_returns"] else None),
             "decisions_per_s": round(p["decisions_per_s"], 1)} for p in points]
    text = (f"Random policy on the same {len(random)} evaluation tracks: "
            f"{random_mean:.1f} (episodes {', '.join(f'{r:.1f}' for r in random)}).\n\n"
            + markdown_table(rows, list(rows[0]) if rows else ["decisions"])
            + f"\n\nBest greedy mean {max(greedy, default=float('nan')):.1f}, final "
            f"{greedy[-1] if greedy else float('nan'):.1f} (target {TARGET:.0f}), after "
            f"{decisions} of the {asked} decisions asked = "
            f"{summary['env_frames']} env frames in {train_seconds / 60:.1f} min of training "
            f"({summary['env_frames_per_s'] or 0:.1f} env frames/s, evaluation excluded).")
    return {"summary": summary, **state}, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=60_000,
                        help="decisions to train in all (a resumed run goes on to this)")
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/carracing"))
    parser.add_argument("--results-name", type=results_name, default="carracing")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a config key over the run's RUN config")
    args = parser.parse_args(argv)
    if args.eval_episodes < 3:
        parser.error("--eval-episodes must be >= 3")
    torch.set_num_threads(1)
    overrides = dict(parse_assignment(item) for item in args.overrides)
    config = build_config(overrides)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    state_file = args.run_dir / "curve.json"
    state: dict[str, Any]
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["config"] != {**RUN, **overrides} or state["seed"] != args.seed:
            parser.error(f"{args.run_dir} holds a run with another config or seed; "
                         "choose another --run-dir")
    else:
        started = time.perf_counter()
        state = {"config": {**RUN, **overrides}, "seed": args.seed,
                 "action_repeat": config.action_repeat, "eval_seed": EVAL_SEED,
                 "random_returns": random_returns(config, args.eval_episodes),
                 "points": []}
        state["random_seconds"] = time.perf_counter() - started
        atomic_write_text(state_file, json.dumps(state, indent=1))
    device = LocalTrainer(config, seed=args.seed)
    if device.load(args.run_dir / "device"):
        print(f"resumed at {device.counters.env_steps} decisions", flush=True)
    try:
        while device.counters.env_steps < args.decisions:
            chunk = min(args.eval_every - device.counters.env_steps % args.eval_every,
                        args.decisions - device.counters.env_steps)
            stats = device.train(chunk)
            started = time.perf_counter()
            greedy = device.evaluate(args.eval_episodes, seed=EVAL_SEED)
            decisions = device.counters.env_steps
            state["points"].append({
                "decisions": decisions, "env_frames": decisions * config.action_repeat,
                "updates": device.counters.updates, "epsilon": stats.epsilon,
                "greedy_mean": statistics.fmean(greedy), "greedy_returns": greedy,
                "train_returns": stats.episode_returns, "mean_loss": stats.mean_loss,
                "train_seconds": stats.seconds, "decisions_per_s": stats.env_steps / stats.seconds,
                "eval_seconds": time.perf_counter() - started,
                "load_average": os.getloadavg()[0], "time": time.strftime("%H:%M:%S")})
            device.save(args.run_dir / "device")
            atomic_write_text(state_file, json.dumps(state, indent=1))
            payload, text = summarise(state, args.decisions)
            folder = write_results(args.results_name, payload, text)
            plot_curve(state["points"], payload["summary"]["random_mean"], folder / "curve.png")
            p = state["points"][-1]
            print(f"{p['time']} decisions {decisions} eps {p['epsilon']:.2f} greedy "
                  f"{p['greedy_mean']:.1f} {[round(g) for g in greedy]} train "
                  f"{[round(r) for r in stats.episode_returns]} {p['decisions_per_s']:.1f} "
                  f"dec/s load {p['load_average']:.1f}", flush=True)
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
