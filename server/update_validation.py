"""Screen the devices' train replies before any of them reaches aggregation.

A device can send something that is not an update of this model: NaN or Inf from a
diverged learner, a different architecture, a payload corrupted on the way, or (a
faulty or malicious device) weights far from anything the others trained. FedAvg would
average any of these straight into the global model, and one NaN makes every weight NaN.
So between receiving and aggregating, each reply is

1. decoded: a compressed delta (``update-compression``, :mod:`common.compression`) is
   turned back into full weights ``w_global + delta``; a payload that does not decode
   is rejected whatever ``validate-updates`` says, since there is nothing to aggregate;
2. checked (with ``validate-updates``): the same tensor names as the global model, the
   same shapes, float32, all finite, and a finite positive aggregation weight
   (``num-examples``);
3. compared (with ``validate-updates``, among >= 3 replies that passed 2): an update
   whose norm ``||w_i - w_global||`` exceeds ``update-norm-factor`` times the round's
   median norm is rejected. The median, because an outlier cannot move it while most
   devices are honest; and devices that run the same local steps of the same learner
   move the model by similar amounts.

A rejected reply is logged at WARNING with the node and the reason, counted in the
round's metrics row, and left out of the replies handed to the strategy. Error replies
(e.g. a device declining a round for its privacy budget) pass through untouched: the
strategy logs and skips them itself.

With central DP (``central-dp``) screening may not depend on other devices' data: the
noise is calibrated to one device's clipped update, and a rule like 3. lets the others
decide whose update counts (with clip norm 1, updates of norm 0.05 x 4 and 1.0 x 4 all
pass, and one more device of norm 0.05 gets the four 1.0 updates rejected: the released
sum moves by ~4 clip norms under noise calibrated to one). So under central DP the norm
rule is off, and an update that fails the per-device checks of 2. is replaced by a zero
update (the global model) instead of being dropped: each device's term of the sum is
then a function of its own data with norm <= the clip norm, and the round keeps its
count of ``central-dp-clients`` (a reply whose aggregation weight or payload is unusable
is still rejected, and the round then releases nothing: see
:func:`server.server_app.train_in_parallel`). Every accepted reply also gets the
metric :data:`CENTRAL_DP_WEIGHT_KEY` = 1, which the strategy weights by under central DP:
a device reporting a tiny ``num-examples`` must not raise the others' share of the
average above 1 / ``central-dp-clients``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fedq.common.compression import CompressionError, as_record, decode_update, payload_bytes
from fedq.common.config import FedqConfig

WEIGHT_KEY = "num-examples"
CENTRAL_DP_WEIGHT_KEY = "central-dp-weight"
"""The key the strategy weights by under central DP: 1 for every device."""
_MIN_REPLIES_FOR_NORM_CHECK = 3


@dataclass
class Screening:
    """The outcome of screening one round's train replies."""

    replies: list[Message] = field(default_factory=list)  # to aggregate, plus error replies
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    upload_bytes: dict[int, int] = field(default_factory=dict)  # node id -> payload bytes
    update_norms: dict[int, float] = field(default_factory=dict)  # node id -> ||w_i - w||
    zeroed: dict[int, str] = field(default_factory=dict)  # central DP: node id -> reason

    @property
    def accepted(self) -> list[Message]:
        """The replies that passed screening: ``replies`` less the error replies."""
        return [msg for msg in self.replies if not msg.has_error()]

    def row(self) -> dict[str, Any]:
        """The round's ``updates`` entry in ``metrics.jsonl``."""
        sizes = list(self.upload_bytes.values())
        return {
            "rejected": len(self.rejected),
            "rejected-nodes": sorted(self.rejected),
            "rejected-reasons": {str(n): r for n, r in sorted(self.rejected.items())},
            "upload-bytes-per-client": {str(n): b for n, b in sorted(self.upload_bytes.items())},
            "upload-bytes-mean": float(np.mean(sizes)) if sizes else 0.0,
            "update-norms": {str(n): v for n, v in sorted(self.update_norms.items())},
            "zeroed": len(self.zeroed),
            "zeroed-reasons": {str(n): r for n, r in sorted(self.zeroed.items())},
        }


def screen_replies(replies: list[Message], global_arrays: ArrayRecord, config: FedqConfig,
                   server_round: int, screening: Screening | None = None) -> Screening:
    """Decode, check and compare the round's train replies (see the module docstring).

    Given an earlier ``screening`` of the same round (the sequential strategy screens
    one visit at a time, each against the model it was sent), the outcome adds to it and
    the norms it already accepted join the median the new updates are compared with.
    """
    global_weights = {k: global_arrays[k].numpy() for k in global_arrays}
    screening = Screening() if screening is None else screening
    accepted_norms = list(screening.update_norms.values())
    candidates: list[tuple[Message, dict[str, np.ndarray], float]] = []
    for msg in replies:
        if msg.has_error():
            screening.replies.append(msg)
            continue
        node = msg.metadata.src_node_id
        reason, weights = _decode(msg, global_weights, config, screening)
        if reason is None and config.validate_updates:
            reason = check_update(weights, msg.content, global_weights)
        central_dp = config.central_dp != "none"
        if central_dp and reason is not None and weights and \
                check_weight(msg.content) is None:
            weights = _zero_update(msg, global_arrays, screening, reason, server_round)
            reason = None
        if reason is not None:
            _reject(screening, node, reason, server_round)
            continue
        if central_dp:
            next(iter(msg.content.metric_records.values()))[CENTRAL_DP_WEIGHT_KEY] = 1
        norm = math.nan
        if config.validate_updates:
            norm = screening.update_norms[node] = update_norm(weights, global_weights)
        candidates.append((msg, weights, norm))
    limit = _norm_limit(accepted_norms + [norm for _, _, norm in candidates], config)
    for msg, weights, norm in candidates:
        if norm > limit:
            _reject(screening, msg.metadata.src_node_id,
                    f"update norm {norm:.4g} exceeds {config.update_norm_factor:g} x the "
                    f"round's median update norm ({limit / config.update_norm_factor:.4g})",
                    server_round)
            continue
        if config.update_compression != "none":  # the strategy aggregates full weights
            msg.content["arrays"] = as_record(weights)
        screening.replies.append(msg)
    return screening


def check_update(weights: dict[str, np.ndarray], content: RecordDict,
                 global_weights: dict[str, np.ndarray]) -> str | None:
    """Why these weights cannot be aggregated into the global model, or None if they can."""
    missing = sorted(set(global_weights) - set(weights))
    unexpected = sorted(set(weights) - set(global_weights))
    if missing or unexpected:
        return f"tensor names differ from the global model: missing {missing}, " \
               f"unexpected {unexpected}"
    for name, reference in global_weights.items():
        array = weights[name]
        if array.shape != reference.shape:
            return f"tensor '{name}' has shape {list(array.shape)}, expected " \
                   f"{list(reference.shape)}"
        if array.dtype != np.float32:  # what every device's Q-network holds
            return f"tensor '{name}' has dtype {array.dtype}, expected float32"
        if not np.isfinite(array).all():
            return f"tensor '{name}' contains NaN or Inf"
    return check_weight(content)


def check_weight(content: RecordDict) -> str | None:
    """Why the reply's one MetricRecord has no usable aggregation weight, or None."""
    metrics = [r for r in content.values() if isinstance(r, MetricRecord)]
    weight = metrics[0].get(WEIGHT_KEY) if len(metrics) == 1 else None
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"aggregation weight '{WEIGHT_KEY}' is {weight!r}, expected a finite number > 0"
    return None


def _zero_update(msg: Message, global_arrays: ArrayRecord, screening: Screening,
                 reason: str, server_round: int) -> dict[str, np.ndarray]:
    """Central DP: the reply's update becomes zero (its arrays the global model's)."""
    node = msg.metadata.src_node_id
    screening.zeroed[node] = reason
    msg.content["arrays"] = ArrayRecord({k: global_arrays[k] for k in global_arrays})
    log(logging.WARNING, "[fedq] round %d: central DP: the update of node %d counts as "
        "zero: %s", server_round, node, reason)
    return {k: global_arrays[k].numpy() for k in global_arrays}


def update_norm(weights: dict[str, np.ndarray], global_weights: dict[str, np.ndarray]) -> float:
    """``||w_i - w_global||`` over all tensors as one vector."""
    return math.sqrt(sum(float(np.square(weights[k] - g, dtype=np.float64).sum())
                         for k, g in global_weights.items()))


def _decode(msg: Message, global_weights: dict[str, np.ndarray], config: FedqConfig,
            screening: Screening) -> tuple[str | None, dict[str, np.ndarray]]:
    content = msg.content
    payload = content.get("arrays")
    if not isinstance(payload, ArrayRecord):
        return "the reply has no 'arrays' record", {}
    screening.upload_bytes[msg.metadata.src_node_id] = payload_bytes(payload)
    try:
        return None, decode_update(payload, global_weights, config.update_compression)
    except CompressionError as err:
        return f"{config.update_compression} payload does not decode: {err}", {}


def _norm_limit(norms: list[float], config: FedqConfig) -> float:
    """The round's norm limit; none under central DP (it depends on others' updates)."""
    if (not config.validate_updates or config.central_dp != "none"
            or len(norms) < _MIN_REPLIES_FOR_NORM_CHECK):
        return math.inf
    return config.update_norm_factor * float(np.median(norms))


def _reject(screening: Screening, node: int, reason: str, server_round: int) -> None:
    screening.rejected[node] = reason
    screening.update_norms.pop(node, None)
    log(logging.WARNING, "[fedq] round %d: rejected the update of node %d: %s",
        server_round, node, reason)
