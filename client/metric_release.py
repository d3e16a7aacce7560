"""Which of a reply's metrics a device releases, under its ``privacy-release-metrics``.

DP-SGD protects the weights a device sends; the scalars beside them are another matter.
They fall into three kinds:

- **accounting**: functions of the run's schedule and the device's ledger only (env steps,
  update and round counters, the exploration epsilon, the ``dp-*`` ledger entries, the
  partition id and device key). They read no transition and are always released.
- **training data**: computed from the transitions collected this round (``mean-loss``,
  ``episodes``, ``mean-episode-return``) or timed while reading them (``train-seconds``,
  ``handler-seconds``: the time of a round depends on its episodes). No DP noise covers
  them.
- **evaluation**: greedy returns of the global model on fresh episodes of the device's env
  (``eval-return-*``; ``personalized-return-mean`` on devices without DP). They read no
  stored transition, so they do not weaken a transition-level (epsilon, delta), but they
  describe the device's environment.

Levels (each also the stricter of node and run config, :mod:`common.privacy_policy`):
``all`` releases everything; ``covered`` (the default) withholds the training-data
metrics of a private device (one that trains with DP, must, or ever did) and releases
everything of a device without DP (which claims epsilon = inf anyway); ``minimal``
withholds training-data and evaluation metrics of every device.

A withheld metric is sent as NaN rather than left out: Flower's strategies refuse to
aggregate replies whose metric keys differ, and federations mix devices of different
policies. The server's aggregation (:mod:`server.metrics`) skips NaN values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

TRAINING_DATA_METRICS = frozenset(
    {"mean-loss", "episodes", "mean-episode-return", "train-seconds", "handler-seconds"})
EVALUATION_METRICS = frozenset(
    {"eval-return-mean", "eval-return-min", "eval-return-max", "personalized-return-mean"})

MetricValue = int | float | list[int] | list[float]


def withheld(level: str, private: bool) -> frozenset[str]:
    """The metric names a device withholds at release ``level``; ``private``: it trains
    with DP, must, or ever did."""
    if level == "all":
        return frozenset()
    if level == "minimal":
        return TRAINING_DATA_METRICS | EVALUATION_METRICS
    return TRAINING_DATA_METRICS if private else frozenset()


def release(metrics: Mapping[str, MetricValue], level: str, private: bool
            ) -> dict[str, MetricValue]:
    """``metrics`` with every withheld value replaced by NaN (keys kept)."""
    hidden = withheld(level, private)
    return {k: (math.nan if k in hidden else v) for k, v in metrics.items()}
