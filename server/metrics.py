"""How clients' scalar metrics combine into one row per round.

Flower's default averages every metric weighted by ``num-examples``. That is right for
a loss, wrong for counters (they add up), for episode returns (weighted by episodes,
not env steps) and for the spread across devices that evaluation must show (the worst
device matters as much as the mean).
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict


def _metric_rows(records: list[RecordDict]) -> list[MetricRecord]:
    return [next(iter(r.metric_records.values())) for r in records]


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sums for counts, step-weighted mean loss, episode-weighted mean return."""
    rows = _metric_rows(records)
    steps = np.array([float(m[weight_key]) for m in rows])
    episodes = np.array([float(m["episodes"]) for m in rows])
    returns = np.array([float(m["mean-episode-return"]) for m in rows])
    out = {
        "clients": len(rows),
        "env-steps": int(steps.sum()),
        "env-steps-per-client": float(steps.mean()),
        "updates": int(sum(int(m["updates"]) for m in rows)),
        "mean-loss": float(np.average([float(m["mean-loss"]) for m in rows], weights=steps)),
        "episodes": int(episodes.sum()),
        "mean-episode-return": float(np.average(returns, weights=episodes))
        if episodes.sum() else 0.0,
        "epsilon": float(np.mean([float(m["epsilon"]) for m in rows])),
        "train-seconds-sum": float(sum(float(m["train-seconds"]) for m in rows)),
        "train-seconds-max": float(max(float(m["train-seconds"]) for m in rows)),
        "handler-seconds-max": float(max(float(m["handler-seconds"]) for m in rows)),
    }
    private = [m for m in rows if m.get("dp-enabled")]
    if private:  # the federation's worst-off device (common/privacy.py)
        out["dp-clients"] = len(private)
        out["dp-epsilon-max"] = float(max(float(m["dp-epsilon"]) for m in private))
        out["dp-delta-max"] = float(max(float(m["dp-delta"]) for m in private))
    return MetricRecord(out)


def aggregate_eval_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Episode-weighted mean return, plus the worst and best device's mean."""
    rows = _metric_rows(records)
    means = np.array([float(m["eval-return-mean"]) for m in rows])
    episodes = np.array([float(m[weight_key]) for m in rows])
    out = {
        "clients": len(rows),
        "episodes": int(episodes.sum()),
        "eval-return-mean": float(np.average(means, weights=episodes)),
        "eval-return-worst-client": float(means.min()),
        "eval-return-best-client": float(means.max()),
        "eval-return-min": float(min(float(m["eval-return-min"]) for m in rows)),
    }
    if "personalized-return-mean" in rows[0]:  # personalize-steps > 0 (client/personalize.py)
        personal = np.array([float(m["personalized-return-mean"]) for m in rows])
        out["personalized-return-mean"] = float(np.average(personal, weights=episodes))
        out["personalized-return-worst-client"] = float(personal.min())
    return MetricRecord(out)
