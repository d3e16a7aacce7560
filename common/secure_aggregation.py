"""What secure aggregation (SecAgg+) and distributed DP require of a run, and their math.

Shared by the server (:mod:`server.secure_aggregation`), the devices
(:mod:`client.secure_aggregation`) and config validation (:mod:`common.config`), which
raises the :class:`SecAggProblem` found here as a ``ConfigError`` naming the field.

With ``secure-aggregation`` the server learns only the sum of the devices' (quantised,
masked) updates, so anything that needs one device's update is refused: strategies that
do not average (median, trimmed mean, Krum, server optimisers, sequential visits),
``validate-updates`` (its per-update checks), ``update-compression`` (a per-device
encoding of the update) and the central-DP modes that clip or noise on the server
(``server-fixed``, and ``client-fixed``, whose server sees the sum before it noises it).
Central DP with SecAgg+ is ``central-dp = "distributed"``: each of the n =
``central-dp-clients`` expected devices clips its update to C and adds Gaussian noise of
std ``sigma x C / sqrt(n)`` before masking, so the sum of n contributions carries noise
of std ``sigma x C`` and the server never sees an un-noised sum. When only k < n devices'
vectors reach the sum, its noise has std ``sigma x C x sqrt(k / n)``: the round is
accounted with that smaller multiplier (:func:`effective_noise_multiplier`), never with
sigma.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedq.common.strategy_registry import PARALLEL, STRATEGY_REGISTRY, strategy_spec

if TYPE_CHECKING:
    from fedq.common.config import FedqConfig

DISTRIBUTED_DP = "distributed"
"""The ``central-dp`` mode of distributed DP (registered in common.central_dp_registry)."""
MODULUS_RANGE = 2**32
"""Flower's SecAgg+ mask modulus (the default of ``SecAggPlusWorkflow``)."""
TAIL_STDS = 8.0
"""With distributed DP, ``secagg-clipping-range`` must cover a clipped update plus this
many noise-share stds: the quantiser clips at the range, and a noised coordinate beyond
it would change the Gaussian mechanism (probability < 1.3e-15 per coordinate)."""

SecAggProblem = tuple[str, str]  # (config key, problem)


def noise_share_std(noise_multiplier: float, clip_norm: float, expected_devices: int) -> float:
    """The std of the Gaussian noise one device adds to each coordinate of its clipped
    update: n such shares sum to noise of std ``noise_multiplier x clip_norm``."""
    return noise_multiplier * clip_norm / math.sqrt(expected_devices)


def effective_noise_multiplier(noise_multiplier: float, contributed: int,
                               expected_devices: int) -> float:
    """The noise multiplier (std / clip norm) of a sum that holds ``contributed`` noise
    shares of a run calibrated to ``expected_devices``: sigma x sqrt(k / n)."""
    return noise_multiplier * math.sqrt(contributed / expected_devices)


def min_clipping_range(config: FedqConfig) -> float:
    """The smallest ``secagg-clipping-range`` distributed DP accepts: a coordinate of a
    clipped update is at most the clip norm, plus :data:`TAIL_STDS` noise-share stds."""
    return config.central_dp_clip_norm + TAIL_STDS * noise_share_std(
        config.central_dp_noise_multiplier, config.central_dp_clip_norm,
        max(config.central_dp_clients, 1))


def secure_aggregation_problem(config: FedqConfig) -> SecAggProblem | None:
    """The first setting that cannot run as configured with(out) SecAgg+, or None."""
    if not config.secure_aggregation:
        if config.central_dp == DISTRIBUTED_DP:
            return ("central-dp", "'distributed' adds the noise on the devices and relies "
                    "on SecAgg+ to hide each noised update; set secure-aggregation = true")
        return None
    if config.secagg_num_shares < 3:
        return ("secagg-num-shares", f"must be >= 3 (Flower's SecAgg+), got "
                f"{config.secagg_num_shares}")
    if not 2 <= config.secagg_reconstruction_threshold < config.secagg_num_shares:
        return ("secagg-reconstruction-threshold", f"must be >= 2 and < secagg-num-shares "
                f"({config.secagg_num_shares}), got {config.secagg_reconstruction_threshold}")
    if not 0 < config.secagg_quantization_range < MODULUS_RANGE:
        return ("secagg-quantization-range", f"must be in [1, 2**32), got "
                f"{config.secagg_quantization_range}")
    spec = strategy_spec(config.strategy)
    if not spec.averages or spec.train_phase != PARALLEL:
        averaging = [s.name for s in STRATEGY_REGISTRY.values()
                     if s.averages and s.train_phase == PARALLEL]
        return ("strategy", f"{config.strategy!r} needs the individual updates, which "
                f"secure aggregation hides from the server; use {' or '.join(averaging)}")
    if config.validate_updates:
        return ("validate-updates", "inspects each device's update, which secure "
                "aggregation hides from the server; set it to false with "
                "secure-aggregation (each device checks its own update is finite)")
    if config.update_compression != "none":
        return ("update-compression", "SecAgg+ quantises the update itself; use none "
                "with secure-aggregation")
    if config.central_dp not in ("none", DISTRIBUTED_DP):
        return ("central-dp", f"{config.central_dp!r} clips or noises on the server, which "
                "would see individual updates or the un-noised sum; use 'distributed' with "
                "secure-aggregation")
    if config.central_dp == DISTRIBUTED_DP and \
            config.secagg_clipping_range < min_clipping_range(config):
        return ("secagg-clipping-range", f"{config.secagg_clipping_range:g} would clip noised "
                f"updates (distributed DP needs >= central-dp-clip-norm + {TAIL_STDS:g} "
                f"noise-share stds = {min_clipping_range(config):.4g})")
    return None
