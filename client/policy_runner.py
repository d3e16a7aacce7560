"""Run an exported policy on a device with numpy alone: ``fedq-policy``.

The runner loads a policy file (:mod:`common.export.policy_file`, any weight encoding,
decoded to float32 once), checks every observation it is handed (shape, numeric dtype,
finite values: a sensor glitch must fail loudly, not turn into an arbitrary action), and
decides with the preallocated forward of :mod:`common.mlp_forward`. It never imports
torch, and :class:`PolicyRunner` needs numpy alone (gymnasium only for ``run``); a test
runs both with those imports blocked.

    fedq-policy info policy-int8.fqp
    fedq-policy run policy-int8.fqp --env CartPole-v1 --episodes 20
    fedq-policy run policy-int8.fqp --epsilon 0.05 --record-to STATE_DIR   # keep learning

``run`` plays greedy (or epsilon-greedy) episodes and reports the returns and the
per-decision latency (p50/p99, timed around each ``act`` call). With ``--record-to`` the
transitions join the device's replay buffer for its next federated round
(:mod:`client.experience_log`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedq.client.experience_log import DeviceStateError, ExperienceRecorder
from fedq.common.config import ConfigError
from fedq.common.export.policy_file import Policy, PolicyFileError, read_policy
from fedq.common.mlp_forward import MlpForward


class ObservationError(ValueError):
    """An observation the policy cannot act on (wrong shape or dtype, NaN or Inf)."""


class PolicyRunner:
    """Greedy actions of a loaded policy, one checked observation at a time."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._forward = MlpForward([(np.ascontiguousarray(w.T), b) for w, b in policy.layers])
        self._input = self._forward.input_buffer
        self._shape = (policy.obs_dim,)
        self._finite = np.zeros(policy.obs_dim, dtype=bool)

    @classmethod
    def load(cls, path: Path | str) -> PolicyRunner:
        if Path(path).suffix == ".onnx":  # what fedq-export writes for a CNN
            raise PolicyFileError(path, "an ONNX file: fedq-policy runs the .fqp policies of "
                                        "MLP Q-networks with numpy alone; a CNN's policy "
                                        "runs with onnxruntime (docs/pixels.md)")
        return cls(read_policy(path))

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """The policy's action scores for ``obs`` (a reused array: copy to keep it)."""
        if not isinstance(obs, np.ndarray):
            obs = np.asarray(obs)
        if obs.shape != self._shape:
            raise ObservationError(f"observation has shape {obs.shape}, the policy expects "
                                   f"{self._shape}")
        if obs.dtype.kind not in "fiu":
            raise ObservationError(f"observation has dtype {obs.dtype}, expected a numeric "
                                   "(float or integer) array")
        np.copyto(self._input, obs, casting="unsafe")
        if not np.isfinite(self._input, out=self._finite).all():
            raise ObservationError(f"observation contains NaN or Inf: {obs}")
        return self._forward.forward_input()

    def act(self, obs: np.ndarray) -> int:
        return int(self.q_values(obs).argmax())


@dataclass(frozen=True)
class Latency:
    """Per-decision latency percentiles in microseconds."""

    p50_us: float
    p99_us: float
    decisions: int


def latency_of(samples_ns: Sequence[int]) -> Latency:
    p50, p99 = np.percentile(np.asarray(samples_ns, dtype=np.float64), [50, 99]) / 1e3
    return Latency(p50_us=float(p50), p99_us=float(p99), decisions=len(samples_ns))


def timed(act: Callable[[np.ndarray], int], samples_ns: list[int]
          ) -> Callable[[np.ndarray], int]:
    """``act`` that appends each call's duration (ns) to ``samples_ns``."""
    clock = time.perf_counter_ns

    def timed_act(obs: np.ndarray) -> int:
        start = clock()
        action = act(obs)
        samples_ns.append(clock() - start)
        return action

    return timed_act


def measure_latency(act: Callable[[np.ndarray], int], observations: np.ndarray,
                    decisions: int) -> Latency:
    """Latency of ``decisions`` single-observation calls, cycling through ``observations``."""
    samples: list[int] = []
    timed_act = timed(act, samples)
    n = len(observations)
    for i in range(decisions):
        timed_act(observations[i % n])
    return latency_of(samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedq-policy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what a policy file holds")
    info.add_argument("policy", type=Path)
    run = sub.add_parser("run", help="play episodes and report returns and latency")
    run.add_argument("policy", type=Path)
    run.add_argument("--env", help="gymnasium id (default: the env the policy was trained on)")
    run.add_argument("--env-kwargs", default="{}", help="JSON object for gymnasium.make")
    run.add_argument("--episodes", type=int, default=20)
    run.add_argument("--seed", type=int, default=0, help="episode k resets with seed + k")
    run.add_argument("--epsilon", type=float, default=0.0,
                     help="probability of a random action (exploration while deployed)")
    run.add_argument("--record-to", type=Path, metavar="STATE_DIR",
                     help="append the transitions to this device state dir's replay buffer")
    run.add_argument("--lock-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="with --record-to: how long to wait for the device's state lock "
                          "(held while a federated round trains on it) before giving up")
    args = parser.parse_args(argv)
    try:
        runner = PolicyRunner.load(args.policy)
        if args.command == "info":
            p = runner.policy
            print(json.dumps({"variant": p.variant, "env_id": p.env_id,
                              "layer_sizes": list(p.layer_sizes), "encoding": p.encoding,
                              "parameters": p.n_parameters, "meta": p.meta}, indent=2))
            return 0
        return _run(runner, args)
    except (PolicyFileError, ObservationError, DeviceStateError, ConfigError) as err:
        print(f"fedq-policy: error: {err}", file=sys.stderr)
        return 2


def _run(runner: PolicyRunner, args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ConfigError("--episodes", f"must be >= 1, got {args.episodes}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise ConfigError("--epsilon", f"must be in [0, 1], got {args.epsilon}")
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except ValueError as err:
        raise ConfigError("--env-kwargs", f"not valid JSON: {err}") from None
    # gymnasium only for playing episodes: embedding PolicyRunner in a device's own control
    # loop needs numpy alone
    from fedq.common.rollouts import play_episodes

    if args.lock_timeout < 0:
        raise ConfigError("--lock-timeout", f"must be >= 0, got {args.lock_timeout}")
    recorder = (ExperienceRecorder(args.record_to, runner.policy.obs_dim, args.lock_timeout)
                if args.record_to else None)
    samples: list[int] = []
    returns = play_episodes(timed(runner.act, samples), args.env or runner.policy.env_id,
                            args.episodes, seed=args.seed, env_kwargs=env_kwargs,
                            epsilon=args.epsilon, on_transition=recorder)
    latency = latency_of(samples)
    print(f"episodes {len(returns)}: return mean {statistics.fmean(returns):.2f}, "
          f"min {min(returns):.2f}, max {max(returns):.2f}")
    print(f"decisions {latency.decisions}: latency p50 {latency.p50_us:.1f} us, "
          f"p99 {latency.p99_us:.1f} us")
    if recorder is not None:
        n = recorder.flush()
        print(f"recorded {n} transitions into {args.record_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
