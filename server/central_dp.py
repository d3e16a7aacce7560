"""Flower's central DP around the aggregation strategy (``central-dp`` config key).

Central DP protects a whole device's contribution to a round (all its data at once),
against anyone who sees the global model: each update ``w_i - w_global`` is clipped to
``central-dp-clip-norm`` and the server adds Gaussian noise of std ``noise x clip / m``
(m = ``central-dp-clients``) to the average. Each mode is one registration in
:mod:`common.central_dp_registry`; both registered wrappers are Flower's own Message-API
strategies (``flwr.serverapp.strategy``):

- ``server-fixed``: ``DifferentialPrivacyServerSideFixedClipping`` clips on the server,
  so the server sees every raw update (it must be trusted; the released model is DP).
- ``client-fixed``: ``DifferentialPrivacyClientSideFixedClipping`` sends the norm in the
  round config and each device clips before replying (:mod:`client.central_dp`); the
  server still sees each clipped update.

Flower's wrappers skip aggregation for a round in which any reply is an error (a device
that declines for its own budget included), keeping the global model: averaging fewer
updates than m under noise calibrated to m would under-noise the average.

The central epsilon each round reports (:func:`central_dp_report`) comes from Opacus's
RDP accountant, as device-side DP's does by default (Flower's own central accountant
wraps Google's ``dp-accounting`` package, which is not installed): every round that
released a new global model is one Gaussian mechanism with multiplier
``central-dp-noise-multiplier`` on a sum whose sensitivity to adding or removing one
device is the clip norm. No amplification by sampling devices is claimed (sample rate
1), so the figure is an upper bound whatever ``fraction-train`` is.

``distributed`` (with ``secure-aggregation``) has no server-side wrapper: the devices clip
and add the noise in shares (:mod:`client.secure_aggregation`), the server unmasks only
the noised sum, and each released round is accounted with the noise its sum actually
holds (:func:`common.secure_aggregation.effective_noise_multiplier`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedq.common.central_dp_registry import central_dp_mode
from fedq.common.config import FedqConfig
from fedq.common.privacy import epsilon_of


def with_central_dp(strategy: Strategy, config: FedqConfig) -> Strategy:
    """``strategy`` wrapped in the configured central-DP mode's Flower wrapper
    (:mod:`common.central_dp_registry`), or itself with ``none``."""
    mode = central_dp_mode(config.central_dp)
    return strategy if mode.wrap is None else mode.wrap(strategy, config)


def central_dp_report(config: FedqConfig, released_rounds: int,
                      noise_multipliers: Sequence[float] | None = None) -> dict[str, Any]:
    """The run's central (epsilon, delta) after ``released_rounds`` noised aggregates; the
    unit is one device's whole contribution (all its rounds). Distributed DP
    (:mod:`server.secure_aggregation`) passes each released round's own
    ``noise_multipliers`` (a round with dropouts carries less noise)."""
    noise = config.central_dp_noise_multiplier
    if noise_multipliers is None:
        history = ((noise, 1.0, released_rounds),) if released_rounds else ()
    else:
        history = tuple((m, 1.0, 1) for m in noise_multipliers)
    # RDP whatever dp-accountant says: Opacus's PRV divides by zero at sample rate 1
    report: dict[str, Any] = {"epsilon": epsilon_of("rdp", config.dp_delta, history),
                              "delta": config.dp_delta, "noise-multiplier": noise,
                              "released-rounds": released_rounds}
    if noise_multipliers is not None:
        report["released-noise-multipliers"] = list(noise_multipliers)
    return report
