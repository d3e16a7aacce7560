"""The learning-curve plot of a run, drawn from its ``metrics.jsonl`` rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium
import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt


def plot_learning_curve(rows: list[dict[str, Any]], path: Path, title: str,
                        goal: tuple[float, str] | None = None) -> None:
    """Federated greedy return (mean, worst and best device) and training return
    against env steps per client; ``goal`` (value, label) draws the return to beat."""
    steps = [r["env-steps-per-client-total"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    evals = [(s, r["eval"]) for s, r in zip(steps, rows, strict=True)
             if "eval-return-mean" in r["eval"]]
    if evals:
        xs = [s for s, _ in evals]
        ax.plot(xs, [e["eval-return-mean"] for _, e in evals], marker="o",
                label="global model, greedy (mean over devices)")
        ax.fill_between(xs, [e["eval-return-worst-client"] for _, e in evals],
                        [e["eval-return-best-client"] for _, e in evals], alpha=0.2,
                        label="worst to best device")
    trains = [(s, r["train"]) for s, r in zip(steps, rows, strict=True)
              if r["train"].get("episodes")]
    if trains:
        ax.plot([s for s, _ in trains], [t["mean-episode-return"] for _, t in trains],
                linestyle="--", label="local training episodes (epsilon-greedy)")
    if goal is not None:
        ax.axhline(goal[0], color="green", linestyle=":", linewidth=1.2, label=goal[1])
    ax.set_xlabel("env steps per device")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def client_series(client_rows: list[dict[str, Any]]
                  ) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per device: (own env steps, value) points of its greedy eval return, personalised
    return and training-episode return. An eval reply is placed at the device's env steps
    as of its latest train reply (a device sampled for evaluation only has not moved)."""
    steps: dict[str, float] = {}
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in client_rows:
        if "error" in row:
            continue
        client = row["client"]
        track = series.setdefault(client, {"eval": [], "personalized": [], "train": []})
        if row["phase"] == "train":
            steps[client] = float(row.get("env-steps-total", steps.get(client, 0.0)))
            if row.get("episodes"):
                track["train"].append((steps[client], float(row["mean-episode-return"])))
        else:
            x = steps.get(client, 0.0)
            track["eval"].append((x, float(row["eval-return-mean"])))
            if "personalized-return-mean" in row:
                track["personalized"].append((x, float(row["personalized-return-mean"])))
    return series


def plot_client_curves(rows: list[dict[str, Any]], client_rows: list[dict[str, Any]],
                       path: Path, title: str) -> None:
    """Left: the global model's greedy return on each device's own env (thin lines) and
    the federation's mean (thick); right: each device's local training returns. Both
    against env steps per device, so heterogeneous devices' curves can be compared."""
    series = client_series(client_rows)
    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    few = len(series) <= 10  # a legend entry per device only while it stays readable
    for client, track in sorted(series.items()):
        if track["eval"]:
            line, = ax_eval.plot(*zip(*track["eval"], strict=True), linewidth=1, alpha=0.6,
                                 label=client if few else None)
            if track["personalized"]:
                ax_eval.plot(*zip(*track["personalized"], strict=True), linestyle=":",
                             color=line.get_color(), linewidth=1, alpha=0.8)
        if track["train"]:
            ax_train.plot(*zip(*track["train"], strict=True), linewidth=1, alpha=0.6,
                          label=client if few else None)
    evals = [(r["env-steps-per-client-total"], r["eval"]) for r in rows
             if "eval-return-mean" in r["eval"]]
    if evals:
        ax_eval.plot([s for s, _ in evals], [e["eval-return-mean"] for _, e in evals],
                     color="black", linewidth=2.5, label="mean over devices")
        personal = [(s, e["personalized-return-mean"]) for s, e in evals
                    if "personalized-return-mean" in e]
        if personal:
            ax_eval.plot(*zip(*personal, strict=True), color="black", linewidth=2,
                         linestyle=":", label="personalised (dotted), mean")
    ax_eval.set_title(f"{title}: global model, greedy, on each device's env")
    ax_train.set_title("local training episodes (epsilon-greedy)")
    for ax in (ax_eval, ax_train):
        ax.set_xlabel("env steps of the device")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)
    ax_eval.set_ylabel("episode return")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def return_goal(target_return: float, env_id: str) -> tuple[float, str] | None:
    """The return a run's plot marks: its ``target-return`` when set, else the env's own
    "solved" threshold (gymnasium's ``reward_threshold``, e.g. 475 for CartPole-v1)."""
    if math.isfinite(target_return):
        return target_return, f"target-return {target_return:g}"
    threshold = gymnasium.spec(env_id).reward_threshold
    return None if threshold is None else (float(threshold), f"solved ({threshold:g}, "
                                                              "gymnasium's threshold)")
