"""Flower's central DP around the aggregation strategy (``central-dp`` config key).

Central DP protects a whole device's contribution to a round (all its data at once),
against anyone who sees the global model: each update ``w_i - w_global`` is clipped to
``central-dp-clip-norm`` and the server adds Gaussian noise of std ``noise x clip / m``
(m = ``central-dp-clients``) to the average. Both wrappers are Flower's own Message-API
strategies (``flwr.serverapp.strategy``):

- ``server-fixed``: ``DifferentialPrivacyServerSideFixedClipping`` clips on the server,
  so the server sees every raw update (it must be trusted; the released model is DP).
- ``client-fixed``: ``DifferentialPrivacyClientSideFixedClipping`` sends the norm in the
  round config and each device clips before replying (:mod:`client.central_dp`); the
  server still sees each clipped update.

Flower's wrappers skip aggregation for a round in which any reply is an error (a device
that declines for its own budget included), keeping the global model: averaging fewer
updates than m under noise calibrated to m would under-noise the average. fedq reports
no central epsilon: Flower's central accountant (``flwr.supercore.privacy_accounting``)
needs Google's ``dp-accounting`` package, which is not installed.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.config import FedqConfig


def with_central_dp(strategy: Strategy, config: FedqConfig) -> Strategy:
    """``strategy`` wrapped in the configured central DP, or itself with ``none``."""
    if config.central_dp == "none":
        return strategy
    wrapper = (DifferentialPrivacyServerSideFixedClipping if config.central_dp == "server-fixed"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, noise_multiplier=config.central_dp_noise_multiplier,
                   clipping_norm=config.central_dp_clip_norm,
                   num_sampled_clients=config.central_dp_clients)
