"""How sure is a "private return as a share of non-private" from a handful of seeds?

The privacy benchmarks (``privacy_pretrain``, ``privacy_pretrain_device``) report each
setting's final return as a share of the non-private baseline's, from 5 seeds. A DQN run's
final return is nearly bimodal (at the goal, or collapsed far below it), so that share
moves by tens of points between two runs of the same cells. This reads a committed
``results.json`` (its summary rows' ``per-seed final``) and puts an interval on each share:
a paired bootstrap over seeds (seed i of a setting shares seed i's pretrained net and
physics with the baseline), and how many seeds a 95 % interval of +-0.1 would take
(delta method)::

    python -m fedq.simulations.seed_spread simulations/results/privacy_pretrain/results.json

``privacy_pretrain``'s report uses it too; no cell's code includes it, so a change here
re-stales nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESAMPLES = 20_000
TARGET_SHARE = 0.9  # issue 20 item 4: >= 90 % of the non-private return


@dataclass(frozen=True)
class ShareSpread:
    """One setting's final-return share of the baseline, and how uncertain it is."""

    setting: str
    seeds: int
    share: float
    low: float  # 2.5th percentile of the paired bootstrap
    high: float  # 97.5th percentile
    p_at_target: float  # bootstrap share of resamples at or above TARGET_SHARE
    seeds_for_tenth: int  # seeds for a 95 % interval of +-0.1 (delta method)


def per_seed_finals(results: dict) -> dict[str, np.ndarray]:
    """Each summary row's per-seed final returns, by setting name."""
    rows = results.get("summary")
    if not isinstance(rows, list) or not all("per-seed final" in r for r in rows):
        raise ValueError("results.json: its summary rows carry no 'per-seed final' "
                         "(only the privacy_pretrain* benchmarks record it)")
    return {r["setting"]: np.asarray(r["per-seed final"], dtype=np.float64) for r in rows}


def baseline_setting(finals: dict[str, np.ndarray], name: str | None) -> str:
    """``name``, or the one setting whose name starts with 'no-dp'."""
    if name is not None:
        if name not in finals:
            raise ValueError(f"--baseline: no setting {name!r}; settings: {', '.join(finals)}")
        return name
    found = [s for s in finals if s.startswith("no-dp")]
    if len(found) != 1:
        raise ValueError(f"--baseline: name it; settings: {', '.join(finals)}")
    return found[0]


def share_spread(setting: str, finals: np.ndarray, baseline: np.ndarray,
                 rng: np.random.Generator) -> ShareSpread:
    """Paired bootstrap of mean(finals) / mean(baseline) over seeds."""
    if finals.shape != baseline.shape:
        raise ValueError(f"{setting}: {finals.size} seeds against the baseline's "
                         f"{baseline.size}; a paired interval needs the same seeds")
    n = finals.size
    share = float(finals.mean() / baseline.mean())
    picks = rng.integers(0, n, (RESAMPLES, n))
    shares = finals[picks].mean(axis=1) / baseline[picks].mean(axis=1)
    low, high = np.percentile(shares, [2.5, 97.5])
    cov = np.cov(finals, baseline) if n > 1 else np.zeros((2, 2))
    sd = math.sqrt(max(cov[0, 0] + share**2 * cov[1, 1] - 2 * share * cov[0, 1], 0.0))
    sd /= baseline.mean()
    return ShareSpread(setting, n, share, float(low), float(high),
                       float(np.mean(shares >= TARGET_SHARE)),
                       math.ceil((1.96 * sd / 0.1) ** 2))


def spreads(results: dict, baseline: str | None = None, seed: int = 0) -> list[ShareSpread]:
    """Every setting's spread against the baseline (the baseline itself left out)."""
    finals = per_seed_finals(results)
    base = baseline_setting(finals, baseline)
    rng = np.random.default_rng(seed)
    return [share_spread(s, v, finals[base], rng) for s, v in finals.items() if s != base]


def table(rows: Sequence[ShareSpread]) -> str:
    """A markdown table of the spreads."""
    lines = ["| setting | seeds | share of baseline | 95 % paired bootstrap | "
             f"P(share >= {TARGET_SHARE:g}) | seeds for +-0.1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.setting} | {r.seeds} | {r.share:.2f} | [{r.low:.2f}, {r.high:.2f}] | "
              f"{r.p_at_target:.2f} | {r.seeds_for_tenth} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedq.simulations.seed_spread",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a privacy benchmark's results.json")
    parser.add_argument("--baseline", help="the setting to divide by (default: 'no-dp...')")
    args = parser.parse_args(argv)
    try:
        rows = spreads(json.loads(args.results.read_text()), args.baseline)
    except (OSError, ValueError) as err:
        parser.error(f"{args.results}: {err}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
