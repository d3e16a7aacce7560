"""A device's lifetime privacy ledger: Opacus accounting, the epsilon budget, persistence.

What is protected: the DP-SGD updates of the online Q-network (:class:`common.dqn.
PrivateDQNLearner`, gradients from :mod:`common.dp_sgd`) are an (epsilon, delta)-DP
function of each single transition in the device's replay buffer, with Opacus's
neighbouring relation: buffers that differ by adding or removing one transition, the
buffer's length (a function of the reported env-step count) being public. Every update
Poisson-samples the buffer at rate ``q`` and is stepped into an Opacus accountant
(``RDPAccountant`` by default, ``PRVAccountant`` selectable) with ``(noise multiplier,
q)``; the history of those steps lives on the device's disk with the rest of its state,
so epsilon accumulates over the device's whole lifetime, across rounds and restarts. A
transition only takes part in the updates made while it is in the buffer, so charging
it every update since the device's first is an upper bound, however the buffer changes.

What is not: an episode (its transitions are correlated records; k of them get only a
group-privacy bound, roughly k * epsilon), a device's whole dataset (device-level
privacy needs DP at the federation level), information that other records repeat (a
transition's next observation is the next transition's observation), and everything that
leaves the device besides the weights: the scalar training metrics (loss, episode
returns and counts) are computed from raw transitions without noise. Updates made
without DP void the guarantee for good: a device whose counters show more updates than
its ledger reports epsilon = inf. Noise and batch sampling draw from the OS's entropy
(never from the run's seed, which the server knows and could replay them from) through
torch's and numpy's ordinary generators, as Opacus does without ``secure_mode``: not a
cryptographic source, and no defence against floating-point attacks on the noise.

Which parts are Opacus: on the torch backend, the accountants (every epsilon here,
including the budget check and the derived noise multiplier) and nothing else;
per-sample clipping is fedq's own closed form (see :mod:`common.dp_sgd` for why and how
it is checked). The numpy backend, which must not need torch, keeps the same history in
:class:`common.rdp.RdpLedger` and computes its epsilon with :mod:`common.rdp` (Opacus's
RDP arithmetic without SciPy; a test holds the two equal); the ledger file is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fedq.common import rdp
from fedq.common.config import FedqConfig
from fedq.common.privacy_policy import PolicyRefusal

Segment = tuple[float, float, int]
"""One entry of an Opacus accountant's history: (noise multiplier, sample rate, steps)."""

PRIVACY_BUDGET_ERROR_CODE = 1001
"""Error code of a train reply declined for the budget (Flower's own codes are 0-8)."""

PRV_EPS_ERROR = 0.1
"""``eps_error`` of every PRV epsilon. The result is an upper bound either way; on a
150k-update lifetime history (24 entries, ``simulations/bench_dp_cost.py``) Opacus's
default 0.01 took 105 s per epsilon and gave 16.45, 0.1 took 8.3 s and gave 16.54."""

_STATE_VERSION = 1
_MAX_NOISE_MULTIPLIER = 1e6  # as opacus.accountants.utils.get_noise_multiplier
_DERIVATION_TOLERANCE = 0.01  # epsilon units, as get_noise_multiplier's default


def sample_rate(batch_size: int, buffer_length: int) -> float:
    """Poisson sampling rate of a DP update: ``batch / length``, with the length rounded
    down to its three leading binary digits (so at most 25 % above ``batch / length``).

    While the buffer fills, ``batch / length`` would change every env step, and every
    distinct rate is one more entry in the accountant's history, which costs ~20 ms (RDP)
    to seconds (PRV) per epsilon computation. On this grid a buffer growing from 1k to
    50k transitions passes through 24 rates, and a full buffer keeps one.
    """
    shift = max(buffer_length.bit_length() - 3, 0)
    return min(1.0, batch_size / (buffer_length >> shift << shift))


def poisson_indices(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson sample of ``range(n)``: each kept independently with ``rate``.

    Drawn as a Binomial(n, rate) size and then a uniform subset of that size, which is
    the same distribution in ~10 µs instead of ``n`` coin flips. Poisson sampling is
    what the accountants' subsampled-Gaussian analysis assumes.
    """
    return rng.choice(n, size=rng.binomial(n, rate), replace=False)


@lru_cache(maxsize=64)
def epsilon_of(mechanism: str, delta: float, history: tuple[Segment, ...],
               backend: str = "torch") -> float:
    """Epsilon of a history with Opacus's accountant, or with :mod:`common.rdp` on the
    numpy backend (cached: a round's budget check and its report usually ask for the
    same history)."""
    if not history:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in history):
        return math.inf  # no noise, no finite epsilon (Opacus's PRV would overflow)
    if backend == "numpy":
        if mechanism != "rdp":
            raise ValueError(f"the numpy backend accounts with rdp, not {mechanism!r}")
        return rdp.epsilon(history, delta)
    from opacus.accountants import create_accountant  # lazy: see DevicePrivacy.__init__

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    options = {"eps_error": PRV_EPS_ERROR} if mechanism == "prv" else {}
    return float(accountant.get_epsilon(delta=delta, **options))


def extend(history: list[Segment], noise_multiplier: float,
           rates: list[float]) -> list[Segment]:
    """``history`` after one step per rate, merged exactly as Opacus's ``step`` merges."""
    out = list(history)
    for rate, steps in _run_lengths(rates):
        if out and out[-1][:2] == (noise_multiplier, rate):
            out[-1] = (noise_multiplier, rate, out[-1][2] + steps)
        else:
            out.append((noise_multiplier, rate, steps))
    return out


def _run_lengths(rates: list[float]) -> list[tuple[float, int]]:
    if not rates:
        return []
    values = np.asarray(rates)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    counts = np.diff(np.r_[starts, len(values)])
    return [(float(values[s]), int(c)) for s, c in zip(starts, counts, strict=True)]


@dataclass(frozen=True)
class PrivacyReport:
    """A device's privacy position after a round (what its train reply carries)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float  # of the device's latest update (0 before its first)
    steps_total: int
    round_history: list[Segment]  # the segments this round added, to re-derive epsilon


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would take the device past its ``dp-target-epsilon``; the message
    says by how much (it is what the declined train reply carries)."""


class DevicePrivacy:
    """The accountant of one device, its noise multiplier and its budget policy.

    The Opacus accountant is stepped by :class:`common.dqn.PrivateDQNLearner` on every
    update; :meth:`begin_round` fixes the noise multiplier and refuses a round that would
    overspend before any data is touched, so declining reveals nothing about the data
    (it depends only on the planned sample rates and the noise multiplier).
    """

    def __init__(self, config: FedqConfig, min_noise_multiplier: float = 0.0) -> None:
        """``min_noise_multiplier``: the device policy's floor
        (``privacy-min-noise-multiplier``), checked by :meth:`begin_round` on the
        multiplier it fixes, derived ones included."""
        self.config = config
        self.min_noise_multiplier = min_noise_multiplier
        if config.backend == "numpy":
            self.accountant: Any = rdp.RdpLedger()
        else:
            # Imported here, not at module level: opacus costs ~115 MiB and ~2 s per
            # process, which every non-private device would otherwise pay.
            from opacus.accountants import create_accountant

            self.accountant = create_accountant(mechanism=config.dp_accountant)
        self.derived: dict[str, float] | None = None  # noise multiplier from the plan
        self.untracked_updates = 0  # updates this device made without DP
        self._round_start: list[Segment] = []

    @property
    def history(self) -> list[Segment]:
        return self.accountant.history

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    @property
    def noise_multiplier(self) -> float:
        """``dp-noise-multiplier``, or the one derived from ``dp-planned-updates``."""
        if not self.config.dp_planned_updates:
            return self.config.dp_noise_multiplier
        if self.derived is None:
            raise RuntimeError("the noise multiplier is derived by begin_round()")
        return self.derived["noise-multiplier"]

    def epsilon(self, history: list[Segment] | None = None) -> float:
        """Lifetime epsilon at ``dp-delta`` of the ledger (or of a planned history)."""
        if self.untracked_updates > 0:
            return math.inf
        planned = self.history if history is None else history
        return epsilon_of(self.config.dp_accountant, self.config.dp_delta,
                          tuple(tuple(s) for s in planned), self.config.backend)

    def begin_round(self, round_lengths: np.ndarray,
                    lifetime_lengths: Callable[[int], np.ndarray]) -> float:
        """Fix this round's noise multiplier and check the budget; returns the multiplier.

        ``round_lengths`` are the buffer lengths at the round's planned updates;
        ``lifetime_lengths(n)`` those of the device's next ``n`` updates (for deriving
        the multiplier from ``dp-planned-updates``). Raises
        :class:`PrivacyBudgetExhausted` if the round would end above
        ``dp-target-epsilon``, and :class:`PolicyRefusal` if the multiplier is below the
        device policy's ``privacy-min-noise-multiplier``.
        """
        c = self.config
        if c.dp_planned_updates and self._derivation_outdated():
            self._derive(lifetime_lengths(c.dp_planned_updates - self.steps))
        noise = self.noise_multiplier
        if noise < self.min_noise_multiplier:
            raise PolicyRefusal(
                f"the noise multiplier {noise:.4g} (derived from dp-planned-updates "
                f"{c.dp_planned_updates} and dp-target-epsilon {c.dp_target_epsilon:g}) is "
                f"below this device's privacy-min-noise-multiplier "
                f"{self.min_noise_multiplier:g}")
        if c.dp_target_epsilon < math.inf:
            rates = self.sample_rates(round_lengths)
            after = self.epsilon(extend(self.history, noise, rates))
            if after > c.dp_target_epsilon:
                now = self.epsilon()
                untracked = (f" ({self.untracked_updates} earlier updates were made without "
                             f"DP)" if self.untracked_updates > 0 else "")
                raise PrivacyBudgetExhausted(
                    f"privacy budget: epsilon {now:.4g} (delta {c.dp_delta:g}) after "
                    f"{self.steps} private updates{untracked}; this round's {len(rates)} "
                    f"updates would reach {after:.4g} > dp-target-epsilon "
                    f"{c.dp_target_epsilon:g}, so the device declines to train")
        self._round_start = list(self.history)
        return noise

    def report(self) -> PrivacyReport:
        """Epsilon now, and the history segments added since :meth:`begin_round`."""
        history = self.history
        return PrivacyReport(
            epsilon=self.epsilon(), delta=self.config.dp_delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=history[-1][1] if history else 0.0, steps_total=self.steps,
            round_history=_added_since(self._round_start, history))

    def state_dict(self) -> dict:
        """JSON-ready state: the accountant's history and the derived multiplier."""
        return {"version": _STATE_VERSION, "history": [list(s) for s in self.history],
                "derived": self.derived}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ledger; the history carries over to the other accountant kind too
        (both bound the same mechanism)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported privacy state version {state.get('version')}")
        self.accountant.history = [(float(n), float(q), int(k)) for n, q, k in state["history"]]
        self.derived = state["derived"]

    def sample_rates(self, lengths: np.ndarray) -> list[float]:
        """:func:`sample_rate` of each buffer length (e.g. of a round's planned updates)."""
        batch = self.config.batch_size
        unique, inverse = np.unique(lengths, return_inverse=True)
        rates = np.array([sample_rate(batch, int(n)) for n in unique])
        return rates[inverse].tolist()

    def _derivation_outdated(self) -> bool:
        c = self.config
        return self.derived is None or (
            self.derived["target-epsilon"], self.derived["planned-updates"]
        ) != (c.dp_target_epsilon, c.dp_planned_updates)

    def _derive(self, lengths: np.ndarray) -> None:
        """Smallest noise multiplier (to 0.01 epsilon, by bisection as in Opacus's
        ``get_noise_multiplier``) whose planned updates end at or below the target.

        Opacus's ``get_noise_multiplier`` takes one sample rate; the rates of a filling
        buffer change, so the search runs the accountant on the real planned schedule.
        """
        c = self.config
        rates = self.sample_rates(lengths)
        target = c.dp_target_epsilon
        if not rates or self.epsilon() >= target:
            raise PrivacyBudgetExhausted(
                f"privacy budget: {self.steps} private updates already made, epsilon "
                f"{self.epsilon():.4g}: no noise multiplier fits dp-planned-updates "
                f"{c.dp_planned_updates} under dp-target-epsilon {target:g}")

        def planned_epsilon(noise: float) -> float:
            return self.epsilon(extend(self.history, noise, rates))

        low, high = 0.0, 10.0
        eps_high = planned_epsilon(high)
        while eps_high > target:
            low, high = high, 2 * high
            if high > _MAX_NOISE_MULTIPLIER:
                raise PrivacyBudgetExhausted(
                    f"privacy budget: dp-target-epsilon {target:g} is out of reach for "
                    f"dp-planned-updates {c.dp_planned_updates}")
            eps_high = planned_epsilon(high)
        while target - eps_high > _DERIVATION_TOLERANCE and high - low > 1e-9 * high:
            mid = (low + high) / 2
            eps_mid = planned_epsilon(mid)
            if eps_mid <= target:
                high, eps_high = mid, eps_mid
            else:
                low = mid
        self.derived = {"noise-multiplier": high, "target-epsilon": target,
                        "planned-updates": c.dp_planned_updates}


def _added_since(before: list[Segment], after: list[Segment]) -> list[Segment]:
    """Segments appended (or grown at the seam) since ``before``; Opacus only appends to
    its history or grows its last entry."""
    if not before:
        return list(after)
    seam = len(before) - 1
    grown = after[seam][2] - before[seam][2]
    head = [(after[seam][0], after[seam][1], grown)] if grown else []
    return head + list(after[seam + 1:])
