"""The learning-curve plot of a run, drawn from its ``metrics.jsonl`` rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt


def plot_learning_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Federated greedy return (mean, worst and best device) and training return
    against env steps per client."""
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
    ax.set_xlabel("env steps per device")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
