"""The one configuration object of a fedq run, validated once at the edge.

Flower hands apps a flat mapping of kebab-case keys to TOML scalars (the
``[tool.flwr.app.config]`` table of ``pyproject.toml``, ``--run-config`` overrides and,
on each device, ``--node-config``). :func:`FedqConfig.from_mapping` turns such a mapping
into a typed, frozen :class:`FedqConfig` and refuses anything it cannot trust with a
:class:`ConfigError` that names the offending key, so no run starts training on a
config that would fail (or silently misbehave) later.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fedq.common.central_dp_registry import (
    CENTRAL_DP_REGISTRY,
    NO_CENTRAL_DP,
    central_dp_names,
)
from fedq.common.dp_mechanism_registry import (
    DEFAULT_DP_MECHANISM,
    DP_MECHANISM_REGISTRY,
    dp_accountant_names,
    unregistered,
)
from fedq.common.network_registry import NETWORK_REGISTRY, network_names, network_spec
from fedq.common.return_bounds import REWARD_RANGES, reward_range
from fedq.common.secure_aggregation import secure_aggregation_problem
from fedq.common.strategy_registry import STRATEGY_REGISTRY, strategy_names, strategy_spec

ConfigScalar = bool | int | float | str

_LOSSES = ("huber", "mse")
BACKENDS = ("torch", "numpy")
EXPLORATION_CLOCKS = ("device", "federation")
# round-config key: env steps of all devices already in the global model being sent
FEDERATION_STEPS_KEY = "federation-env-steps"
# round-protocol values (server/round_protocol.py), and the fused protocol's round-config
# key (evaluate the received model as this round's global model before training on it)
# and reply record (that evaluation's metrics)
ROUND_PROTOCOLS = ("fused", "train-then-evaluate")
EVALUATE_ROUND_KEY = "evaluate-round"
EVALUATION_RECORD = "evaluation"
COMPRESSIONS = ("none", "fp16", "int8")
# keys of the device's privacy policy (common/privacy_policy.py), not of FedqConfig
POLICY_PREFIX = "privacy-"


# What a resumed run may change: how long it goes on and where its operator watches it,
# never what its devices learn or how the server aggregates (that would silently turn the
# resumed rounds into another experiment).
RESUME_CHANGEABLE_KEYS = frozenset({"num-server-rounds", "round-timeout", "resume", "run-dir"})


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config field '{key}': {problem}")
        self.key = key
        self.problem = problem


def unknown_key(key: str, known: Iterable[str], what: str) -> ConfigError:
    """The error for a key nobody knows, with the closest known one as a hint."""
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(key, f"unknown {what}{suggestion}")


def _check(predicate: Callable[[Any], bool], problem: str) -> Callable[[Any], str | None]:
    return lambda value: None if predicate(value) else problem


_positive = _check(lambda v: v > 0, "must be > 0")
_non_negative = _check(lambda v: v >= 0, "must be >= 0")
_at_least_one = _check(lambda v: v >= 1, "must be >= 1")
_probability = _check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_open_unit = _check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")


def _opt(default: Any, doc: str, check: Callable[[Any], str | None] | None = None,
         allow_inf: bool = False) -> Any:
    """A config field; ``allow_inf`` lets +inf through (TOML ``inf``) where it means "none"."""
    return field(default=default, metadata={"doc": doc, "check": check, "allow_inf": allow_inf})


@dataclass(frozen=True)
class FedqConfig:
    """Everything that shapes a run: environment, learner, federation and outputs.

    Field names map to config keys by replacing ``_`` with ``-`` (``learning_rate`` is
    ``learning-rate``). Env-step counts are per device.
    """

    # --- environment -------------------------------------------------------------
    env_id: str = _opt("CartPole-v1", "gymnasium id; Box observations, Discrete actions")
    env_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "JSON object of keyword arguments for gymnasium.make", "check": None})
    env_physics: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "JSON object of physics overrides set on the env after make (CartPole "
               "length/masspole/..., Acrobot link_*, LunarLander gravity/wind; see "
               "common/physics.py)", "check": None})
    seed: int = _opt(0, "base seed; device k uses seed + 1000 * k", _non_negative)
    obs_grayscale: bool = _opt(False, "image observations: gymnasium's GrayscaleObservation")
    obs_resize: int = _opt(0, "image observations: ResizeObservation to N x N (0: keep)",
                           _non_negative)
    obs_frame_stack: int = _opt(
        1, "image observations: FrameStackObservation of N frames (1: none); the replay "
        "buffer stores each frame once", _at_least_one)
    action_repeat: int = _opt(
        1, "env steps per agent decision: each action is played N times and the rewards "
        "summed (frame-skip, common/action_repeat.py); step counts (local-steps, "
        "learning-starts, exploration-steps, ...) count decisions", _at_least_one)
    # --- Q-network and DQN learner -------------------------------------------------
    hidden_sizes: tuple[int, ...] = _opt(
        (64, 64),
        "comma-separated hidden layer widths of the MLP Q-network",
        _check(lambda v: len(v) >= 1 and all(h >= 1 for h in v), "needs widths >= 1"),
    )
    network: str = _opt(
        "mlp", f"Q-network architecture: one of {', '.join(network_names())} (registered in "
        "common/network_registry.py; docs/networks.md says which backends and observations "
        "each serves)",
        lambda v: None if v in NETWORK_REGISTRY else f"one of {network_names()}")
    backend: str = _opt(
        "torch", "the device's learner: torch or numpy (MLP Q-networks in numpy alone; the "
        "device needs no torch, RDP accountant only; docs/backends.md)",
        _check(lambda v: v in BACKENDS, f"one of {BACKENDS}"))
    learning_rate: float = _opt(5e-4, "Adam learning rate", _positive)
    learning_rate_final: float = _opt(
        0.0, "Adam learning rate at the end of the linear decay from learning-rate (used "
        "with learning-rate-decay-steps > 0)", _non_negative)
    learning_rate_decay_steps: int = _opt(
        150_000, "env steps of the linear learning-rate decay from learning-rate to "
        "learning-rate-final, counted on the device's own steps whatever exploration-clock "
        "says (a per-device budget the same in FedAvg and sequential rounds; the federation "
        "clock would spend it N times faster) (0: constant learning-rate); "
        "the default is CartPole's 150k budget, where a learner still taking full steps "
        "loses what it learnt (simulations/results/stability_sweep_cartpole5): with the "
        "default final rate of 0 a device stops learning after 150k steps, so a longer "
        "run sets its own per-device budget here", _non_negative)
    gamma: float = _opt(0.99, "discount factor", _open_unit)
    buffer_size: int = _opt(50_000, "replay buffer capacity (transitions)", _at_least_one)
    buffer_memory_mb: float = _opt(
        2048.0, "most memory (MiB) a device's replay buffer may take; a run whose buffer "
        "would need more is refused before it starts", _positive)
    batch_size: int = _opt(64, "transitions per gradient step", _at_least_one)
    learning_starts: int = _opt(1_000, "env steps before the first update", _non_negative)
    train_frequency: int = _opt(1, "env steps between updates", _at_least_one)
    gradient_steps: int = _opt(1, "gradient steps per update", _at_least_one)
    target_update_interval: int = _opt(
        250, "env steps between target-network syncs", _at_least_one
    )
    tau: float = _opt(1.0, "target sync weight (1 = hard copy, <1 = Polyak)", _open_unit)
    double_dqn: bool = _opt(True, "use the Double DQN target")
    td_target_clip: bool | str = _opt(
        "auto", "clip TD targets to the env's discounted-return bounds, [min(r_min, "
        "r_min/(1-gamma)), max(r_max, r_max/(1-gamma))] from its per-step reward range "
        "(common/return_bounds.py): true (envs with a known range only), false, or auto "
        "(clip where the range is known, else not; the default because unclipped targets "
        "let CartPole's Q-values run past their bound and the learned policy collapse, "
        "simulations/results/stability_sweep_cartpole5)",
        _check(lambda v: v is True or v is False or v == "auto", 'true, false or "auto"'))
    loss: str = _opt(
        "huber", "TD loss: huber or mse", _check(lambda v: v in _LOSSES, f"one of {_LOSSES}")
    )
    max_grad_norm: float = _opt(10.0, "gradient-norm clip", _positive)
    exploration_initial_eps: float = _opt(1.0, "epsilon at step 0", _probability)
    exploration_final_eps: float = _opt(0.02, "epsilon after the decay", _probability)
    exploration_steps: int = _opt(
        10_000, "env steps of the linear epsilon decay, counted by exploration-clock",
        _non_negative)
    exploration_clock: str = _opt(
        "device", "whose env steps the epsilon schedule counts: device (this device's own) "
        "or federation (all env steps that went into the global model this device starts "
        "the round from, as the server reports them, plus its own since)",
        _check(lambda v: v in EXPLORATION_CLOCKS, f"one of {EXPLORATION_CLOCKS}"))
    # --- federation ------------------------------------------------------------------
    num_server_rounds: int = _opt(10, "federated rounds", _at_least_one)
    local_steps: int = _opt(5_000, "env steps each client runs per round", _at_least_one)
    fraction_train: float = _opt(1.0, "share of connected clients sampled per round", _open_unit)
    fraction_evaluate: float = _opt(
        1.0, "share of connected clients sampled for federated evaluation per round",
        _open_unit)
    round_protocol: str = _opt(
        "fused", "messages per device and round: fused (one; the train message of round r+1 "
        "first evaluates the model it carries, round r's, and a last evaluate message "
        "evaluates the final model) or train-then-evaluate (a train and an evaluate "
        "message); strategies and sampling that need two messages use the latter "
        "(server/round_protocol.py)",
        _check(lambda v: v in ROUND_PROTOCOLS, f"one of {ROUND_PROTOCOLS}"))
    flat_wire: bool = _opt(
        True, "send each message's Q-network weights as one flat array with a layout "
        "record (common/flat_wire.py): a deployed hop moves 7 Flower objects instead of 16; "
        "false sends one array per tensor, for devices whose fedq predates it")
    min_available_clients: int = _opt(
        1, "clients that must be connected before a round starts", _at_least_one
    )
    personalize_steps: int = _opt(
        0, "> 0: in the last round's evaluation each client also fine-tunes the global "
        "model this many env steps on its own env (from its own replay buffer, never "
        "saved) and reports that greedy return too", _non_negative)
    client_overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "JSON object: simulation partition id -> config keys that device overrides "
               "(written by fedq-simulate --scenario)", "check": None})
    eval_episodes: int = _opt(10, "greedy episodes per client in federated evaluation",
                              _at_least_one)
    round_timeout: float = _opt(
        3600.0, "seconds to wait for replies in a round; devices that have not answered by "
        "then are left out of it", _positive)
    min_train_replies: int = _opt(
        1, "fewest valid training replies a round aggregates; with fewer the global model "
        "stays unchanged for that round", _at_least_one)
    failed_rounds_threshold: float = _opt(
        0.5, "share of rounds (0-1) that may fail (no update accepted, a device failed for "
        "another reason than its privacy budget) before the run ends failed instead of "
        "degraded (server/outcome.py)", _check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"))
    target_return: float = _opt(
        math.inf, "stop after the first round whose federated greedy return mean reaches "
        "this (inf: run every round)", allow_inf=True)
    # --- aggregation strategy (server/strategies.py) -------------------------------------
    strategy: str = _opt(
        "fedavg", f"server aggregation: one of {', '.join(strategy_names())} (registered in "
        "common/strategy_registry.py; docs/strategies.md says what each does)",
        lambda v: None if v in STRATEGY_REGISTRY else f"one of {strategy_names()}",
    )
    proximal_mu: float = _opt(
        0.0, "FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 in the "
        "device's loss (> 0 with strategy fedprox, else 0)", _non_negative)
    server_momentum: float = _opt(
        0.0, "FedAvgM: momentum beta of the server's step v = beta v + (mean - w_global), "
        "w_global += v (> 0 with strategy fedavgm, else 0)",
        _check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    server_learning_rate: float = _opt(
        0.01, "FedAdam/FedYogi: server step size eta on the averaged update", _positive)
    server_beta1: float = _opt(
        0.9, "FedAdam/FedYogi: first-moment decay", _check(lambda v: 0.0 <= v < 1.0,
                                                           "must be in [0, 1)"))
    server_beta2: float = _opt(
        0.99, "FedAdam/FedYogi: second-moment decay", _check(lambda v: 0.0 <= v < 1.0,
                                                             "must be in [0, 1)"))
    server_tau: float = _opt(
        1e-3, "FedAdam/FedYogi: adaptivity epsilon tau added to sqrt(v)", _positive)
    trim_beta: float = _opt(
        0.2, "FedTrimmedAvg: share of updates cut at each end, per coordinate",
        _check(lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)"))
    krum_byzantine: int = _opt(
        0, "Krum: number of Byzantine devices f it tolerates", _non_negative)
    # --- update checks and compression (server/update_validation.py, common/compression.py)
    validate_updates: bool = _opt(
        True, "reject updates with NaN/Inf, a wrong layout or an outlying norm before "
        "aggregation (with central-dp: no norm rule, and a broken update counts as zero)")
    update_norm_factor: float = _opt(
        10.0, "reject an update whose norm ||w_i - w_global|| exceeds this times the "
        "round's median update norm (with >= 3 updates)",
        _check(lambda v: v >= 1.0, "must be >= 1"))
    update_compression: str = _opt(
        "none", "device-to-server update encoding: none (fp32 weights), fp16 or int8 "
        "deltas with error feedback", _check(lambda v: v in COMPRESSIONS,
                                             f"one of {COMPRESSIONS}"))
    # --- differential privacy on the device (common/privacy.py) --------------------------
    dp_enabled: bool = _opt(False, "DP-SGD on the online Q-network (privacy unit: one transition)")
    dp_mechanism: str = _opt(
        DEFAULT_DP_MECHANISM, "device-side DP mechanism with dp-enabled (registered in "
        "common/dp_mechanism_registry.py; docs/privacy.md lists each one's backends and "
        "accountants)", unregistered)
    dp_noise_multiplier: float = _opt(
        1.0, "Gaussian noise std per update, in units of dp-clip-norm", _non_negative
    )
    dp_clip_norm: float = _opt(1.0, "per-transition gradient-norm bound of DP-SGD", _positive)
    dp_delta: float = _opt(
        1e-5, "delta of the reported (epsilon, delta)",
        _check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    )
    dp_accountant: str = _opt(
        "rdp", "Opacus accountant: rdp or prv (the numpy backend: rdp, common/rdp.py)",
        lambda v: None if v in dp_accountant_names() else f"one of {dp_accountant_names()}",
    )
    dp_target_epsilon: float = _opt(
        math.inf, "lifetime epsilon budget of a device (inf: no budget); a device declines "
        "a round that would exceed it", _positive, allow_inf=True,
    )
    dp_planned_updates: int = _opt(
        0, "> 0: derive the noise multiplier so that this many private updates over the "
        "device's lifetime spend dp-target-epsilon", _non_negative,
    )
    # --- central DP on the aggregate (server/strategies.py, client/central_dp.py) ---------
    central_dp: str = _opt(
        NO_CENTRAL_DP, "Flower's central DP on the averaged update, Gaussian noise on the "
        "average (registered in common/central_dp_registry.py): "
        + "; ".join(f"{m.name}: {m.doc}" for m in CENTRAL_DP_REGISTRY.values()),
        lambda v: None if v in CENTRAL_DP_REGISTRY else f"one of {central_dp_names()}")
    central_dp_noise_multiplier: float = _opt(
        1.0, "central DP: noise std on the sum of updates, in units of central-dp-clip-norm",
        _non_negative)
    central_dp_clip_norm: float = _opt(
        1.0, "central DP: bound on each device's update norm ||w_i - w_global||", _positive)
    central_dp_clients: int = _opt(
        0, "central DP: devices sampled per round (noise std on the average is noise x clip "
        "/ this); required >= 1 with central-dp", _non_negative)
    # --- secure aggregation (server/secure_aggregation.py, client/secure_aggregation.py) ----
    secure_aggregation: bool = _opt(
        False, "aggregate the training updates with Flower's SecAgg+: the server learns only "
        "their sum (docs/privacy.md); needs an averaging strategy, validate-updates = false "
        "and update-compression none; central DP with it is central-dp = distributed")
    secagg_num_shares: int = _opt(
        3, "SecAgg+: devices (itself included) each device secret-shares its keys with; odd "
        "or >= the devices sampled (then a round tolerates devices - threshold dropouts)")
    secagg_reconstruction_threshold: int = _opt(
        2, "SecAgg+: shares needed to unmask; a round survives as long as every device keeps "
        "this many live neighbours (>= 2, < secagg-num-shares)")
    secagg_clipping_range: float = _opt(
        8.0, "SecAgg+: each coordinate of a device's update (w_i - w_global, weighted) is "
        "clipped to +-this before quantisation", _positive)
    secagg_quantization_range: int = _opt(
        4194304, "SecAgg+: integer levels of the quantiser (2**22); the rounding error of a "
        "coordinate is at most 2 x secagg-clipping-range / this", _at_least_one)
    # --- outputs -----------------------------------------------------------------------
    run_dir: str = _opt(
        "runs/default", "where config, metrics, checkpoints and plots are written",
        _check(lambda v: v.strip() != "", "must not be empty"),
    )
    resume: bool = _opt(False, "continue from the run directory's last checkpoint")
    initial_weights: str = _opt(
        "", "start round 1 from the Q-network in this fedq checkpoint (e.g. another run's "
        "checkpoints/best.pt, pretrained on a public simulator), read by the ServerApp, "
        "instead of a fresh seeded one; empty: fresh. A resumed run continues from its own "
        "checkpoint")
    state_dir: str = _opt(
        "", "device state directory (empty: <run-dir>/devices/<partition-id>)"
    )
    message_audit_dir: str = _opt(
        "", "if set, every device writes a JSON summary (array names and shapes, metrics) of "
        "each message it sends into this directory (client/message_audit.py)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, ConfigScalar]) -> FedqConfig:
        """Parse and validate a flat kebab-case mapping; missing keys take defaults.

        ``privacy-*`` keys are skipped: they are a device's privacy policy, which
        :class:`common.privacy_policy.PrivacyPolicy` parses and validates."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in mapping.items():
            if key.startswith(POLICY_PREFIX):
                continue
            if key not in known:
                raise unknown_key(key, known, "key")
            values[known[key].name] = coerce(key, known[key].type, raw)
        config = replace(cls(), **values)
        config.validate()
        return config

    def with_overrides(self, mapping: Mapping[str, ConfigScalar]) -> FedqConfig:
        """Return a copy with some keys overridden (e.g. a device's node config)."""
        return FedqConfig.from_mapping({**self.to_mapping(), **mapping})

    def validate(self) -> None:
        """Check every field's range and the constraints between fields."""
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if (isinstance(value, float) and not math.isfinite(value)
                    and not (f.metadata.get("allow_inf") and value == math.inf)):
                raise ConfigError(_key(f.name), f"must be finite, got {value}")
            problem = check(value) if check else None
            if problem:
                raise ConfigError(_key(f.name), f"{problem}, got {value!r}")
        if self.batch_size > self.buffer_size:
            raise ConfigError(
                "batch-size", f"{self.batch_size} exceeds buffer-size {self.buffer_size}"
            )
        if self.exploration_final_eps > self.exploration_initial_eps:
            raise ConfigError(
                "exploration-final-eps",
                f"{self.exploration_final_eps} exceeds exploration-initial-eps "
                f"{self.exploration_initial_eps}",
            )
        if self.learning_rate_decay_steps and self.learning_rate_final > self.learning_rate:
            raise ConfigError(
                "learning-rate-final", f"{self.learning_rate_final} exceeds learning-rate "
                f"{self.learning_rate} (the schedule decays)")
        if self.td_target_clip is True and reward_range(self.env_id, self.env_kwargs) is None:
            raise ConfigError(
                "td-target-clip", f"no known reward range for {self.env_id!r} (known: "
                f"{', '.join(REWARD_RANGES)}; common/return_bounds.py); set it to false "
                "or auto")
        self._check_strategy_switches()
        if self.backend not in network_spec(self.network).backends:
            raise ConfigError(
                "network", f"{self.network!r} runs on backend "
                f"{' or '.join(network_spec(self.network).backends)}, not {self.backend!r}; "
                f"on {self.backend!r} use one of " + ", ".join(
                    s.name for s in NETWORK_REGISTRY.values() if self.backend in s.backends))
        if self.personalize_steps and self.dp_enabled:
            raise ConfigError(
                "personalize-steps", "fine-tuning on private data outside the accountant "
                "would release returns no epsilon covers; use 0 with dp-enabled")
        self._check_client_overrides()
        self._check_central_dp()
        problem = secure_aggregation_problem(self)
        if problem is not None:
            raise ConfigError(*problem)
        if self.dp_enabled:
            self._check_dp_mechanism()
        if self.dp_planned_updates and self.dp_target_epsilon == math.inf:
            raise ConfigError(
                "dp-planned-updates", "needs a finite dp-target-epsilon to derive the noise "
                "multiplier from"
            )

    def _check_strategy_switches(self) -> None:
        """A strategy's switch key (FedProx's proximal-mu, FedAvgM's server-momentum) is
        > 0 exactly when that strategy runs: elsewhere it would be silently ignored."""
        for spec in STRATEGY_REGISTRY.values():
            if spec.switch is None:
                continue
            value = getattr(self, spec.switch.replace("-", "_"))
            if (self.strategy == spec.name) != (value > 0):
                raise ConfigError(
                    spec.switch, f"{value} with strategy {self.strategy}: {spec.name} needs "
                    f"{spec.switch} > 0 and other strategies ignore it, so set it to 0")

    def _check_dp_mechanism(self) -> None:
        """The DP mechanism serves this backend and can be accounted by dp-accountant
        there (PRV is Opacus's: the numpy backend accounts with RDP, common/rdp.py)."""
        backends = DP_MECHANISM_REGISTRY[self.dp_mechanism].backends
        if self.backend not in backends:
            raise ConfigError("dp-mechanism", f"{self.dp_mechanism!r} is not registered for "
                              f"backend {self.backend!r} (it serves {', '.join(backends)})")
        accountants = backends[self.backend].accountants
        if self.dp_accountant not in accountants:
            serving = [repr(b) for b, spec in backends.items()
                       if self.dp_accountant in spec.accountants]
            raise ConfigError(
                "dp-accountant", f"{self.dp_accountant!r} with {self.dp_mechanism} needs "
                f"backend {' or '.join(serving)}; on backend {self.backend!r} it is accounted "
                f"with {' or '.join(accountants)}")

    def _check_central_dp(self) -> None:
        if self.central_dp == NO_CENTRAL_DP:
            return
        if self.central_dp_clients < 1:
            raise ConfigError("central-dp-clients", f"must be >= 1 with central-dp "
                              f"{self.central_dp!r}: the noise is calibrated to it")
        if self.update_compression != "none":
            raise ConfigError("update-compression", "central DP clips full weights against "
                              "the global model; use none with central-dp")
        if not strategy_spec(self.strategy).averages:
            averaging = [s.name for s in STRATEGY_REGISTRY.values() if s.averages]
            raise ConfigError("strategy", f"central DP's noise is calibrated to an average; "
                              f"{self.strategy!r} is not one (use {' or '.join(averaging)})")

    def _check_client_overrides(self) -> None:
        for partition, overrides in self.client_overrides.items():
            key = f"client-overrides.{partition}"
            if not partition.isdigit():
                raise ConfigError(key, "keys are partition ids (0, 1, ...)")
            if not isinstance(overrides, dict):
                raise ConfigError(key, f"expected a JSON object of config keys, got "
                                       f"{overrides!r}")
            if "client-overrides" in overrides:
                raise ConfigError(f"{key}.client-overrides", "cannot nest")

    def for_partition(self, partition: int) -> FedqConfig:
        """This config as simulation partition ``partition`` sees it: with its entry of
        ``client-overrides`` applied (and the table itself dropped)."""
        overrides = self.client_overrides.get(str(partition), {})
        try:
            return FedqConfig.from_mapping(
                {**self.to_mapping(), "client-overrides": "{}", **overrides})
        except ConfigError as err:
            raise ConfigError(f"client-overrides.{partition}.{err.key}", err.problem) from None

    def to_mapping(self) -> dict[str, ConfigScalar]:
        """The flat kebab-case form (what ``pyproject.toml`` and Flower carry)."""
        out: dict[str, ConfigScalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            out[_key(f.name)] = value
        return out

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(key, default, meaning) rows; ``common/config_docs.py`` writes docs/configuration.md."""
        rows = []
        for key, value in FedqConfig().to_mapping().items():
            doc = next(f.metadata["doc"] for f in fields(FedqConfig) if _key(f.name) == key)
            shown = "inf" if value == math.inf else json.dumps(value)  # TOML spelling
            rows.append((key, shown, doc))
        return rows


def _key(name: str) -> str:
    return name.replace("_", "-")


def coerce(key: str, annotation: str, raw: Any) -> Any:
    """Turn a TOML scalar into the field's type, refusing lossy or ambiguous input."""
    kind = annotation.replace(" ", "")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind == "bool|str":  # a switch with a string mode beside on/off (e.g. "auto")
        if isinstance(raw, bool | str):
            return raw
        raise ConfigError(key, f"expected true, false or a string, got {raw!r}")
    if isinstance(raw, bool):  # bool is an int subclass: never let True mean 1
        raise ConfigError(key, f"expected a number, got {raw!r}")
    if kind == "tuple[int,...]" and isinstance(raw, int):  # TOML reads "3" as an integer
        return (raw,)
    if kind == "int":
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    if kind == "float":
        if isinstance(raw, int | float):
            return float(raw)
        raise ConfigError(key, f"expected a number, got {raw!r}")
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    if kind == "str":
        return raw
    if kind == "tuple[int,...]":
        try:
            return tuple(int(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ConfigError(key, f"expected comma-separated integers, got {raw!r}") from None
    if kind == "dict[str,Any]":
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise ConfigError(key, f"invalid JSON ({err.msg}): {raw!r}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(key, f"expected a JSON object, got {raw!r}")
        return parsed
    raise TypeError(f"no parser for field type {annotation}")  # programming error


def parse_assignment(text: str) -> tuple[str, ConfigScalar]:
    """``KEY=VALUE`` with VALUE read as a TOML scalar (``3``, ``0.5``, ``true``,
    ``"text"``); anything else (e.g. a JSON object for ``env-physics``) stays a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw
    return key, value if isinstance(value, bool | int | float | str) else raw
