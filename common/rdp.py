"""RDP accounting of the sampled Gaussian mechanism in plain Python, with no torch.

The numpy backend's devices (``backend = "numpy"``) install neither torch nor Opacus, yet
keep the same privacy ledger as torch devices. This module is the arithmetic of Opacus's
``RDPAccountant`` (itself TF Privacy's ``rdp_accountant``, Apache-2.0; Mironov, Talwar and
Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3)
on the same orders and with the same RDP-to-(epsilon, delta) conversion (Balle et al.
2020, Theorem 21), rewritten on :mod:`math` alone: Opacus's version needs SciPy for a
binomial coefficient and ``log_ndtr``. ``tests/test_numpy_backend.py`` checks that both
give the same epsilon (to 1e-6 relative) on the same histories.

:class:`RdpLedger` keeps the history exactly as Opacus's ``RDPAccountant.step`` does (one
``(noise multiplier, sample rate, steps)`` entry per run of equal steps), so the device's
``privacy.json`` is the same file whichever backend wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                  + [float(a) for a in range(12, 64)])
"""Opacus's ``RDPAccountant.DEFAULT_ALPHAS``."""

_ERFC_ASYMPTOTIC_FROM = 20.0  # math.erfc keeps full relative precision below this


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ValueError("the result of a log-space subtraction must be non-negative")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc underflows (x > ~26): there the asymptotic
    series erfc(x) ~ exp(-x^2) / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6)),
    whose next term is below 1e-9 relative at x = 20."""
    if x < _ERFC_ASYMPTOTIC_FROM:
        return math.log(math.erfc(x))
    inv = 1.0 / (2.0 * x * x)
    series = 1.0 - inv + 3.0 * inv**2 - 15.0 * inv**3
    return -x * x - math.log(x * math.sqrt(math.pi)) + math.log(series)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = (math.log(math.comb(alpha, i)) + i * math.log(q)
                    + (alpha - i) * math.log(1 - q))
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    coef, i = 1.0, 0  # binom(alpha, i), kept by its recurrence
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        coef *= (alpha - i) / (i + 1)
        i += 1
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)


def rdp_of_step(q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one step of the Gaussian mechanism (noise ``sigma``,
    sensitivity 1) on a Poisson sample at rate ``q``."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    log_a = (_log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer()
             else _log_a_frac(q, sigma, alpha))
    return log_a / (alpha - 1)


def epsilon(history: Sequence[tuple[float, float, int]], delta: float,
            orders: Sequence[float] = ORDERS) -> float:
    """Epsilon at ``delta`` of a history of ``(noise multiplier, sample rate, steps)``."""
    if not history:
        return 0.0
    best = math.inf
    for alpha in orders:
        rdp = sum(steps * rdp_of_step(rate, noise, alpha) for noise, rate, steps in history)
        eps = (rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1)
               + math.log((alpha - 1) / alpha))
        if not math.isnan(eps):
            best = min(best, eps)
    return best


class RdpLedger:
    """The history half of Opacus's ``RDPAccountant``: same ``step``, same ``history``."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """One more update; merged into the last entry when its parameters repeat."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))
