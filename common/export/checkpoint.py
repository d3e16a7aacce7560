"""Load a global checkpoint as the teacher Q-network, refusing anything that is not one.

``fedq-export`` accepts a run directory or its ``checkpoints/`` folder (the best model by
federated evaluation, ``best.pt``, where the run kept one, else the newest checkpoint;
``latest=True`` takes the newest), or one ``.pt`` file (:mod:`server.run_directory` and
:mod:`server.best_model` write them). The
env id comes from the run's ``config.json`` (or ``--env-id`` for a loose file), and the
layer sizes from the tensors themselves, which must form exactly the :class:`QNetwork`
MLP fedq trains and fit the env's observation and action spaces. Each mismatch raises
:class:`CheckpointError` naming the key or tensor at fault, before any export work.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.envs import ImageObs, env_spec
from fedq.common.network_registry import build_network
from fedq.common.networks import QNetwork

_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


class CheckpointError(ValueError):
    """The checkpoint cannot be exported: missing, unreadable or not a fedq Q-network."""

    def __init__(self, source: Path, problem: str) -> None:
        super().__init__(f"checkpoint '{source}': {problem}")
        self.source = source


@dataclass
class Teacher:
    """The Q-network to export and where it came from."""

    net: nn.Module  # a QNetwork (MLP), or a CNN (common/export/cnn_export.py)
    env_id: str
    source: Path
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    server_round: int | None = None
    image: ImageObs = field(default_factory=ImageObs)


BEST_FILE = "best.pt"  # server/best_model.py


def resolve_checkpoint(source: Path, latest: bool = False) -> Path:
    """The ``.pt`` file ``source`` names: itself, or of a run directory (or its
    ``checkpoints/``) the best model if the run kept one and ``latest`` is False, else
    the newest checkpoint."""
    if source.is_file():
        return source
    for folder in (source / "checkpoints", source):
        best = folder / BEST_FILE
        if not latest and best.is_file():
            _check_digest(best)
            return best
        pointer = folder / "LATEST"
        if pointer.is_file():
            name = pointer.read_bytes()[:64].decode("utf-8", errors="replace").strip()
            if re.fullmatch(r"round-\d{4,9}\.pt", name) is None:  # never a path elsewhere
                raise CheckpointError(source, f"LATEST holds {name[:40]!r}, not a "
                                              "checkpoint name")
            path = folder / name
            if not path.is_file():
                raise CheckpointError(source, f"LATEST names {path.name}, which is missing")
            return path
    raise CheckpointError(source, "not a checkpoint file, nor a run directory or "
                                  "checkpoints folder with a LATEST pointer")


def _check_digest(path: Path) -> None:
    """Refuse a ``best.pt`` that does not match its digest file (a torn or stale write:
    the server writes the file first and the digest after it)."""
    digest = path.with_name(path.name + ".sha256")
    if not digest.is_file():
        raise CheckpointError(path, f"has no {digest.name} (incomplete); pass --latest to "
                                    "export the newest round checkpoint instead")
    actual = f"{path.stat().st_size} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    if digest.read_text()[:200].strip() != actual:
        raise CheckpointError(path, f"does not match {digest.name}; pass --latest to export "
                                    "the newest round checkpoint instead")


def load_teacher(source: Path, env_id: str | None = None, latest: bool = False) -> Teacher:
    """Load, check and build the teacher; ``env_id`` overrides the run's config,
    ``latest`` takes a run's newest checkpoint over its best model."""
    path = resolve_checkpoint(source, latest)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types for torn or foreign files
        raise CheckpointError(path, f"cannot be loaded: {err}") from None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(path, "has no 'state_dict' entry (not a fedq checkpoint)")
    config = _run_config(path)
    env_id = env_id or config.get("env-id")
    if not env_id:
        raise CheckpointError(path, "no config.json beside its run directory names the "
                                    "env; pass --env-id")
    env_kwargs = json.loads(config.get("env-kwargs", "{}")) if config else {}
    server_round = payload.get("round")
    server_round = int(server_round) if isinstance(server_round, int) else None
    if config.get("network", "mlp") != "mlp":
        return _cnn_teacher(path, state, config, env_id, server_round)
    sizes = _check_layer_sizes(path, state)
    hidden = tuple(sizes[1:-1])
    if config.get("hidden-sizes") and config["hidden-sizes"] != ",".join(map(str, hidden)):
        raise CheckpointError(path, f"tensors give hidden sizes {hidden}, but the run's "
                                    f"config field 'hidden-sizes' is {config['hidden-sizes']!r}")
    spec = env_spec(env_id, env_kwargs)
    if (spec.obs_dim, spec.n_actions) != (sizes[0], sizes[-1]):
        raise CheckpointError(path, f"network maps {sizes[0]} inputs to {sizes[-1]} actions, "
                                    f"but {env_id} has obs dim {spec.obs_dim} and "
                                    f"{spec.n_actions} actions")
    net = build_network(replace(FedqConfig(), hidden_sizes=hidden), sizes[0], sizes[-1],
                        "torch")
    net.load_state_dict({k: t.detach().float() for k, t in state.items()})
    net.eval()
    return Teacher(net=net, env_id=env_id, source=path, env_kwargs=env_kwargs,
                   server_round=server_round)


def _cnn_teacher(path: Path, state: dict[str, Any], config: dict[str, Any], env_id: str,
                 server_round: int | None) -> Teacher:
    """The run's CNN, built by the network factory from its config.json (network, image
    keys) and the env's observation space, with the checkpoint's weights."""
    try:
        run = FedqConfig.from_mapping({**config, "env-id": env_id, "client-overrides": "{}"})
    except ConfigError as err:
        raise CheckpointError(path, f"its run's config.json: {err}") from None
    image = ImageObs.of(run)
    spec = env_spec(env_id, run.env_kwargs, None, image)
    net = build_network(run, spec.observation_space, spec.n_actions, "torch")
    try:
        net.load_state_dict({k: t.detach().float() for k, t in state.items()})
    except (RuntimeError, AttributeError) as err:
        raise CheckpointError(path, f"does not hold a {run.network!r} network for "
                                    f"{env_id}: {str(err)[:300]}") from None
    return Teacher(net=net.eval(), env_id=env_id, source=path, env_kwargs=run.env_kwargs,
                   server_round=server_round, image=image)


def _run_config(checkpoint: Path) -> dict[str, Any]:
    """``<run-dir>/config.json`` for ``<run-dir>/checkpoints/round-NNNN.pt``, if present."""
    for candidate in (checkpoint.parent.parent / "config.json", checkpoint.parent / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _check_layer_sizes(path: Path, state: dict[str, Any]) -> list[int]:
    """Widths (input first) of a ``Linear, ReLU, ..., Linear`` Sequential state dict."""
    indices = [int(m.group(1)) for k in state if (m := _KEY.match(str(k)))]
    if not indices:
        raise CheckpointError(path, f"state_dict has no '<n>.weight' / '<n>.bias' tensors "
                                    f"(keys: {sorted(map(str, state))[:6]})")
    n_layers = max(indices) // 2 + 1
    expected = {f"{2 * i}.{p}" for i in range(n_layers) for p in ("weight", "bias")}
    missing, extra = sorted(expected - set(state)), sorted(set(map(str, state)) - expected)
    if missing or extra:
        raise CheckpointError(path, f"state_dict does not form an MLP Q-network: missing keys "
                                    f"{missing}, unexpected keys {extra}")
    sizes: list[int] = []
    for i in range(n_layers):
        w_key, b_key = f"{2 * i}.weight", f"{2 * i}.bias"
        w, b = state[w_key], state[b_key]
        if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise CheckpointError(path, f"'{w_key}' / '{b_key}' are not tensors")
        if w.ndim != 2:
            raise CheckpointError(path, f"tensor '{w_key}' has shape {tuple(w.shape)}, "
                                        "expected 2 dimensions (out, in)")
        if sizes and w.shape[1] != sizes[-1]:
            raise CheckpointError(path, f"tensor '{w_key}' has shape {tuple(w.shape)}, expected "
                                        f"({w.shape[0]}, {sizes[-1]}): the previous layer has "
                                        f"{sizes[-1]} outputs")
        if tuple(b.shape) != (w.shape[0],):
            raise CheckpointError(path, f"tensor '{b_key}' has shape {tuple(b.shape)}, "
                                        f"expected ({w.shape[0]},)")
        for key, t in ((w_key, w), (b_key, b)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(path, f"tensor '{key}' is not finite floating point")
        sizes += [int(w.shape[1])] if not sizes else []
        sizes.append(int(w.shape[0]))
    return sizes


def numpy_layers(net: QNetwork) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float32 copies of ``(weight (out, in), bias)`` per Linear layer (what files store)."""
    return [(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy())
            for layer in net.linear_layers()]
