"""How clients' scalar metrics combine into one row per round.

Flower's default averages every metric weighted by ``num-examples``. That is right for
a loss, wrong for counters (they add up), for episode returns (weighted by episodes,
not env steps) and for the spread across devices that evaluation must show (the worst
device matters as much as the mean).

A device withholds metrics its privacy policy does not release by sending NaN
(:mod:`client.metric_release`); every aggregate here is over the devices that released
the metric, and NaN if none did.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict


def _metric_rows(records: list[RecordDict]) -> list[MetricRecord]:
    return [next(iter(r.metric_records.values())) for r in records]


def _released(rows: list[MetricRecord], key: str, weights: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``key`` that devices released (not NaN), with their ``weights``
    (ones if None)."""
    values = np.array([float(m[key]) for m in rows])
    weights = np.ones(len(rows)) if weights is None else weights
    keep = ~np.isnan(values)
    return values[keep], weights[keep]


def _mean(rows: list[MetricRecord], key: str, weights: np.ndarray | None = None) -> float:
    values, kept = _released(rows, key, weights)
    return float(np.average(values, weights=kept)) if kept.sum() > 0 else float("nan")


def _extreme(rows: list[MetricRecord], key: str, pick: str) -> float:
    values, _ = _released(rows, key)
    if not len(values):
        return float("nan")
    return float(values.min() if pick == "min" else values.max())


def _episode_mean(returns: np.ndarray, episodes: np.ndarray) -> float:
    """Episode-weighted mean return: NaN if no device released it, 0 if the devices that
    did finished no episode."""
    if not len(returns):
        return float("nan")
    return float(np.average(returns, weights=episodes)) if episodes.sum() > 0 else 0.0


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sums for counts, step-weighted mean loss, episode-weighted mean return (over the
    devices that released them). Env steps are always ``num-examples``, whatever key the
    strategy weights by (central DP weights every device equally)."""
    del weight_key  # Flower passes its weighting key; fedq's step count is num-examples
    rows = _metric_rows(records)
    steps = np.array([float(m["num-examples"]) for m in rows])
    episodes, _ = _released(rows, "episodes")
    returns, episode_weights = _released(rows, "mean-episode-return",
                                         np.array([float(m["episodes"]) for m in rows]))
    seconds, _ = _released(rows, "train-seconds")
    out = {
        "clients": len(rows),
        "env-steps": int(steps.sum()),
        "env-steps-per-client": float(steps.mean()),
        "updates": int(sum(int(m["updates"]) for m in rows)),
        "mean-loss": _mean(rows, "mean-loss", steps),
        "episodes": int(episodes.sum()) if len(episodes) else float("nan"),
        "mean-episode-return": _episode_mean(returns, episode_weights),
        "epsilon": float(np.mean([float(m["epsilon"]) for m in rows])),
        "train-seconds-sum": float(seconds.sum()) if len(seconds) else float("nan"),
        "train-seconds-max": _extreme(rows, "train-seconds", "max"),
        "handler-seconds-max": _extreme(rows, "handler-seconds", "max"),
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
    episodes = np.array([float(m[weight_key]) for m in rows])
    out = {
        "clients": len(rows),
        "episodes": int(episodes.sum()),
        "eval-return-mean": _mean(rows, "eval-return-mean", episodes),
        "eval-return-worst-client": _extreme(rows, "eval-return-mean", "min"),
        "eval-return-best-client": _extreme(rows, "eval-return-mean", "max"),
        "eval-return-min": _extreme(rows, "eval-return-min", "min"),
    }
    if "personalized-return-mean" in rows[0]:  # personalize-steps > 0 (client/personalize.py)
        out["personalized-return-mean"] = _mean(rows, "personalized-return-mean", episodes)
        out["personalized-return-worst-client"] = _extreme(rows, "personalized-return-mean",
                                                           "min")
    return MetricRecord(out)
