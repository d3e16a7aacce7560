"""Scenario files: a federation of (possibly heterogeneous) devices, declared in TOML.

A scenario says what every simulated device is: its env id, make kwargs, physics
overrides (:mod:`common.physics`), seed and training settings, each given as a value or
as a distribution that every device draws its own value from. The loader validates it
all before any Flower process starts and resolves it to two things ``fedq-simulate``
submits: the federation-wide run config and ``client-overrides``, the per-device
settings keyed by simulation partition id (what :func:`client.device.device_from_context`
applies on each virtual device, whose node config holds only its partition id).

Layout (see ``simulations/scenarios/*.toml``)::

    description = "..."
    num-clients = 8          # partitions 0..7
    draw-seed = 0            # seeds the per-client draws (client k: rng([draw-seed, k]))

    [run]                    # federation-wide config keys, over pyproject's defaults
    env-id = "CartPole-v1"
    local-steps = 2500

    [all-clients]            # every client's settings; any value may be a distribution
    physics = { length = { uniform = [0.1, 0.9] } }

    [[client]]               # optional: the k-th entry is client k, over all-clients
    physics = { length = 0.5 }

Per-client keys: ``physics`` and ``env-kwargs`` (tables, merged over the run's
``env-physics`` / ``env-kwargs``) and the device-side config keys in
:data:`DEVICE_KEYS`. A client ``seed`` is that device's seed as is; without one, device
k uses ``seed + 1000 * k``. Distributions: ``{uniform = [lo, hi]}``,
``{loguniform = [lo, hi]}``, ``{normal = [mean, std]}``, ``{randint = [lo, hi]}``
(inclusive) and ``{choice = [a, b, ...]}``. Every error names the client and the field.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedq.common.config import ConfigError, ConfigScalar, FedqConfig
from fedq.common.envs import run_env_spec

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
DISTRIBUTIONS = ("uniform", "loguniform", "normal", "randint", "choice")
# Config keys a single device may set differently from the rest of the federation. The
# others shape the whole run (the model's layout, rounds, the strategy, the run dir).
DEVICE_KEYS = frozenset({
    "env-id", "seed", "learning-rate", "gamma", "buffer-size", "batch-size",
    "learning-starts", "train-frequency", "gradient-steps", "target-update-interval", "tau",
    "double-dqn", "loss", "max-grad-norm", "exploration-initial-eps",
    "exploration-final-eps", "exploration-steps", "eval-episodes",
    "dp-enabled", "dp-mechanism", "dp-noise-multiplier", "dp-clip-norm", "dp-delta",
    "dp-accountant",
    "dp-target-epsilon", "dp-planned-updates",
})
_TABLE_KEYS = {"physics": "env-physics", "env-kwargs": "env-kwargs"}
_TOP_KEYS = ("description", "num-clients", "draw-seed", "run", "all-clients", "client")


class ScenarioError(ConfigError):
    """A scenario file is malformed; the message names the file, client and field."""

    def __init__(self, path: Path | str, client: int | None, key: str, problem: str) -> None:
        where = f"scenario '{path}'" + (f", client {client}" if client is not None else "")
        ValueError.__init__(self, f"{where}, field '{key}': {problem}")
        self.key, self.problem, self.client = key, problem, client


@dataclass(frozen=True)
class Scenario:
    """A resolved federation: the run config and each client's overrides."""

    path: Path
    description: str
    run: dict[str, ConfigScalar]  # federation-wide keys from [run]
    clients: list[dict[str, ConfigScalar]]  # client k's config overrides, drawn and flat

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_overrides(self) -> str:
        """The ``client-overrides`` run-config value: partition id -> overrides."""
        return json.dumps({str(k): c for k, c in enumerate(self.clients) if c},
                          sort_keys=True)

    def run_config(self) -> dict[str, ConfigScalar]:
        return {**self.run, "client-overrides": self.client_overrides()}

    def client_config(self, base: FedqConfig, partition: int) -> FedqConfig:
        """Client ``partition``'s full config over ``base`` (what its device resolves)."""
        return base.with_overrides(self.clients[partition])


def load_scenario(path: Path | str, num_clients: int | None = None,
                  defaults: Mapping[str, ConfigScalar] | None = None,
                  run_overrides: Mapping[str, ConfigScalar] | None = None) -> Scenario:
    """Parse, draw and validate a scenario.

    ``num_clients`` replaces the file's ``num-clients`` (a benchmark runs one scenario at
    several sizes; client k's draws do not depend on the size). ``defaults`` is the
    app's config table (pyproject) and ``run_overrides`` what the command line adds over
    ``[run]``; each client's config is validated over all three.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ScenarioError(path, None, "file", str(err)) from None
    for key in doc:
        if key not in _TOP_KEYS:
            raise ScenarioError(path, None, key, f"unknown key; known: {', '.join(_TOP_KEYS)}")
    run = _run_table(path, doc.get("run", {}))
    entries = doc.get("client", [])
    template = doc.get("all-clients", {})
    if not isinstance(template, dict):
        raise ScenarioError(path, None, "all-clients", "must be a table")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ScenarioError(path, None, "client", "must be an array of tables [[client]]")
    count = _client_count(path, doc, entries, num_clients)
    draw_seed = doc.get("draw-seed", 0)
    if isinstance(draw_seed, bool) or not isinstance(draw_seed, int) or draw_seed < 0:
        raise ScenarioError(path, None, "draw-seed", f"must be an integer >= 0, got "
                                                     f"{draw_seed!r}")
    base_mapping = {**(defaults or {}), **run, **(run_overrides or {})}
    try:
        base = FedqConfig.from_mapping(base_mapping)
        reference = run_env_spec(base)
    except ConfigError as err:
        raise ScenarioError(path, None, f"run.{err.key}", err.problem) from None
    clients = []
    for k in range(count):
        settings = _merge(template, entries[k] if k < len(entries) else {})
        rng = np.random.default_rng([draw_seed, k])
        drawn = {key: _draw_setting(path, k, key, value, rng)
                 for key, value in sorted(settings.items())}
        overrides = _flatten_client(path, k, drawn, base)
        _validate_client(path, k, base_mapping, overrides, reference)
        clients.append(overrides)
    return Scenario(path=path, description=str(doc.get("description", "")), run=run,
                    clients=clients)


def _run_table(path: Path, table: Any) -> dict[str, ConfigScalar]:
    """``[run]`` as flat config scalars (tables for env-kwargs / env-physics become JSON)."""
    if not isinstance(table, dict):
        raise ScenarioError(path, None, "run", "must be a table")
    if "client-overrides" in table:
        raise ScenarioError(path, None, "run.client-overrides",
                            "is written from the client tables; do not set it")
    return {key: json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
            for key, value in table.items()}


def _client_count(path: Path, doc: dict, entries: list, num_clients: int | None) -> int:
    count = num_clients if num_clients is not None else doc.get("num-clients", len(entries))
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ScenarioError(path, None, "num-clients", f"must be an integer >= 1, got "
                                                       f"{count!r}")
    if entries and len(entries) < count:
        raise ScenarioError(path, None, "num-clients", f"{count} clients but only "
                                                       f"{len(entries)} [[client]] entries")
    return count


def _merge(template: dict, entry: dict) -> dict:
    """Client entry over the template; ``physics`` / ``env-kwargs`` tables merge by key."""
    out = dict(template)
    for key, value in entry.items():
        if key in _TABLE_KEYS and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _draw_setting(path: Path, client: int, key: str, value: Any,
                  rng: np.random.Generator) -> Any:
    """One client setting with its distributions drawn. ``physics`` and ``env-kwargs``
    are tables of values; inside ``env-kwargs`` plain sub-tables are make() options
    (highway-env's ``config``) and are walked too."""
    if key in _TABLE_KEYS:
        if not isinstance(value, dict):
            raise ScenarioError(path, client, key, f"must be a table, got {value!r}")
        return {k: _draw(path, client, f"{key}.{k}", v, rng, walk=key == "env-kwargs")
                for k, v in sorted(value.items())}
    return _draw(path, client, key, value, rng, walk=False)


def _draw(path: Path, client: int, key: str, value: Any, rng: np.random.Generator,
          walk: bool) -> Any:
    if _is_distribution(value):
        return _sample(path, client, key, value, rng)
    if isinstance(value, dict):
        if not walk:
            kinds = ", ".join(f"{{{d} = [...]}}" for d in DISTRIBUTIONS)
            raise ScenarioError(path, client, key, f"a table here must be one distribution "
                                                   f"({kinds}), got {value!r}")
        return {k: _draw(path, client, f"{key}.{k}", v, rng, walk=True)
                for k, v in sorted(value.items())}
    return value


def _sample(path: Path, client: int, key: str, spec: dict, rng: np.random.Generator) -> Any:
    (kind, args), = spec.items()
    def fail(problem: str) -> ScenarioError:
        return ScenarioError(path, client, key, f"bad {kind} distribution {args!r}: {problem}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail("needs a non-empty list of values")
        return args[int(rng.integers(len(args)))]
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, int | float) and not isinstance(a, bool)
                       and math.isfinite(a) for a in args)):
        raise fail("needs two finite numbers")
    a, b = args
    if kind == "normal":
        if b < 0:
            raise fail("std must be >= 0")
        return float(rng.normal(a, b))
    if a > b:
        raise fail("low exceeds high")
    if kind == "uniform":
        return float(rng.uniform(a, b))
    if kind == "loguniform":
        if a <= 0:
            raise fail("low must be > 0")
        return float(math.exp(rng.uniform(math.log(a), math.log(b))))
    if not (isinstance(a, int) and isinstance(b, int)):
        raise fail("needs integer bounds")
    return int(rng.integers(a, b + 1))  # randint, inclusive


def _flatten_client(path: Path, client: int, drawn: dict[str, Any],
                    base: FedqConfig) -> dict[str, ConfigScalar]:
    """A client's drawn settings as config overrides (tables as JSON, merged over the
    run's tables)."""
    out: dict[str, ConfigScalar] = {}
    for key, value in drawn.items():
        if key in _TABLE_KEYS:
            run_table = base.env_physics if key == "physics" else base.env_kwargs
            out[_TABLE_KEYS[key]] = json.dumps({**run_table, **value}, sort_keys=True)
        elif key in DEVICE_KEYS:
            out[key] = value
        elif key in FedqConfig().to_mapping():
            raise ScenarioError(path, client, key, "is federation-wide (the same for every "
                                                   "client); set it under [run]")
        else:
            known = ", ".join(sorted([*_TABLE_KEYS, *DEVICE_KEYS]))
            raise ScenarioError(path, client, key, f"unknown client key; known: {known}")
    return out


def _validate_client(path: Path, client: int, base_mapping: Mapping[str, ConfigScalar],
                     overrides: dict[str, ConfigScalar], reference: Any) -> None:
    """The client's config parses, its env makes with its physics, and its spaces match
    the run's env (one global Q-network serves every client)."""
    try:
        config = FedqConfig.from_mapping({**base_mapping, **overrides})
        spec = run_env_spec(config)
    except ConfigError as err:
        key = err.key.replace("env-physics", "physics")
        raise ScenarioError(path, client, key, err.problem) from None
    if (spec.obs_shape, spec.n_actions) != (reference.obs_shape, reference.n_actions):
        raise ScenarioError(path, client, "env-id", f"{config.env_id!r} has observations of "
                                                    f"shape {spec.obs_shape} and "
                                                    f"{spec.n_actions} actions, the run's "
                                                    f"env has {reference.obs_shape} and "
                                                    f"{reference.n_actions}; one global "
                                                    "model cannot serve both")
