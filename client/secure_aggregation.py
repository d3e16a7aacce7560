"""The device's half of secure aggregation: Flower's SecAgg+ around fedq's train handler.

With ``secure-aggregation`` the server runs Flower's ``SecAggPlusWorkflow``
(:mod:`server.secure_aggregation`): four train messages per round (setup, share keys,
collect masked vectors, unmask). Flower's ``secaggplus_mod`` answers all four; in the
third it calls the handler inside it, which here is :func:`secure_aggregation_mod`'s
adapter: it turns the workflow's legacy ``FitIns`` content back into fedq's train message,
lets fedq train, and hands ``secaggplus_mod`` the update ``w_i - w_global`` (and the
aggregation weight) to quantise and mask. Only the masked vector leaves the device; the
reply's scalar metrics travel as before (under the device's metric-release policy).

With ``central-dp = "distributed"`` the adapter first clips the update to
``central-dp-clip-norm`` C and adds Gaussian noise of std ``sigma x C / sqrt(n)``
(:func:`common.secure_aggregation.noise_share_std`, n = ``central-dp-clients``) from the
operating system's entropy, so the server can only ever unmask a noised sum; every
device's weight is then 1 (the sum's sensitivity to one device is C).

A train message that does not come through SecAgg+ goes on to fedq's handler, unless the
device's privacy policy has ``privacy-require-secagg``: then it is refused with
``PRIVACY_POLICY_ERROR_CODE``, the device's state untouched. A device that declines or
refuses inside the protocol (its budget, its policy) answers the masked-vector stage with
its own error reply, which the server counts as a dropout.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore import log

from fedq.client.device import device_from_context
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE
from fedq.common.secure_aggregation import DISTRIBUTED_DP, noise_share_std

ARRAY_NAMES_KEY = "secagg-array-names"
"""Round-config key: the comma-separated tensor names of the legacy ``Parameters`` (which
carry tensors by position only)."""
METRICS_RECORD = "metrics"
"""The masked reply's record of fedq's scalar metrics (the legacy ``FitRes`` metrics
allow no lists, so they travel in their own record)."""


class _Declined(Exception):
    """fedq's train handler answered with an error inside the protocol."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def is_secure_aggregation(msg: Message) -> bool:
    """Whether ``msg`` is a stage of Flower's SecAgg+ protocol."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_mod(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    """Answer SecAgg+ train messages through Flower's ``secaggplus_mod`` (the update is
    masked before it leaves); refuse plain ones if the policy requires SecAgg+."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if not is_secure_aggregation(msg):
        device = device_from_context(context)
        if device.policy.require_secagg:
            reason = ("privacy policy: this device's privacy policy has "
                      "privacy-require-secagg = true and the train message does not come "
                      "through SecAgg+ (set secure-aggregation = true)")
            log(logging.WARNING, "[fedq] %s refuses a train message: %s", device.name, reason)
            return Message(Error(code=PRIVACY_POLICY_ERROR_CODE, reason=reason), reply_to=msg)
        return call_next(msg, context)
    try:
        return secaggplus_mod(msg, context,
                              lambda inner, ctx: _masked_update(inner, ctx, call_next))
    except _Declined as declined:
        return Message(declined.error, reply_to=msg)


def _masked_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The collect stage: run fedq's training on the legacy ``FitIns`` and return the
    update as a legacy ``FitRes`` for ``secaggplus_mod`` to quantise and mask."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = str(fitins.config[ARRAY_NAMES_KEY]).split(",")
    global_arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    round_config = {k: v for k, v in fitins.config.items() if k != ARRAY_NAMES_KEY}
    msg.content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in global_arrays.items()}),
        "config": ConfigRecord(round_config)})
    reply = call_next(msg, context)
    if reply.has_error():
        raise _Declined(reply.error)
    trained = reply.content["arrays"]
    update = [trained[name].numpy().astype(np.float64) - global_arrays[name] for name in names]
    if not all(np.isfinite(u).all() for u in update):
        raise ValueError("the local update has NaN or Inf; it is not sent")
    metrics = reply.content[METRICS_RECORD]
    config = device_from_context(context).config
    if config.central_dp == DISTRIBUTED_DP:
        update, weight = noised_update(update, config.central_dp_noise_multiplier,
                                       config.central_dp_clip_norm,
                                       config.central_dp_clients), 1
    else:
        weight = int(metrics.get("num-examples", 1))
    _warn_if_clipped(update, config.secagg_clipping_range)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, {})
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    content[METRICS_RECORD] = metrics
    return Message(content, reply_to=msg)


def noised_update(update: list[np.ndarray], noise_multiplier: float, clip_norm: float,
                  expected_devices: int, rng: np.random.Generator | None = None
                  ) -> list[np.ndarray]:
    """``update`` scaled to norm <= ``clip_norm``, plus this device's share of the
    distributed Gaussian noise (std ``noise_share_std``, fresh OS entropy unless an
    ``rng`` is given: the server must not be able to reproduce it)."""
    rng = rng or np.random.default_rng()
    norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_share_std(noise_multiplier, clip_norm, expected_devices)
    return [u * scale + rng.normal(0.0, std, size=u.shape) for u in update]


def _warn_if_clipped(update: list[np.ndarray], clipping_range: float) -> None:
    """SecAgg+ clips each coordinate to +-secagg-clipping-range: say so if it will."""
    clipped = sum(int(np.sum(np.abs(u) > clipping_range)) for u in update)
    if clipped:
        log(logging.WARNING, "[fedq] SecAgg+: %d coordinate(s) of this device's update exceed "
            "secagg-clipping-range %g and are clipped; raise it", clipped, clipping_range)
