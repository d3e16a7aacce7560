"""Simulated attackers: chosen simulated devices send bad updates (benchmarks and tests).

Exists only so ``simulations/bench_robustness.py`` and the tests can show what update
validation and robust aggregation hold off. The product knows nothing of it: no config
key, no code in the ClientApp. A simulation that wants attackers passes an
:class:`Attack` to :func:`simulations.run.simulate`, which submits a derived Flower app
(:func:`attacker_app`) whose ClientApp is fedq's own with :func:`attack_mod` around the
train handler. A device whose simulation ``partition-id`` is in ``partitions`` trains as
usual (its state, compression residual included, stays honest) but replaces the weights
its reply *sends*:

- ``nan``: every weight NaN, like a learner that diverged;
- ``noise``: the global weights plus Gaussian noise of std ``scale`` per weight, a
  large-norm random update (a faulty or malicious device).

The noise is drawn from ``default_rng([device seed, rounds-total])``, so the same seed
gives the same attack. The mod sits inside central DP's client-side clipping, as the
attack did before it left the product, and re-encodes the bad weights with the round's
``update-compression`` (without error feedback: the device's own residual stays its
honest one).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tomli_w
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedq.client.client_app import build_client_app
from fedq.client.device import device_from_context
from fedq.common.compression import decode_update, encode_update

ATTACK_KINDS = ("nan", "noise")
APP_MODULE = "fedq_attacker_app"  # the derived app's ClientApp module

Weights = Mapping[str, np.ndarray]


class AttackError(ValueError):
    """An attack setting is missing, unknown or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"attack field '{field}': {problem}")
        self.field = field


@dataclass(frozen=True)
class Attack:
    """Which simulated devices attack, and how."""

    kind: str
    partitions: tuple[int, ...]
    scale: float = 10.0  # noise std of the ``noise`` attack

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise AttackError("kind", f"one of {ATTACK_KINDS}, got {self.kind!r}")
        if not self.partitions:
            raise AttackError("partitions", "an attack needs at least one partition id")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0
               for p in self.partitions):
            raise AttackError("partitions", f"needs partition ids >= 0, got "
                              f"{list(self.partitions)}")
        if not (isinstance(self.scale, int | float) and np.isfinite(self.scale)
                and self.scale > 0):
            raise AttackError("scale", f"must be a finite number > 0, got {self.scale!r}")

    @classmethod
    def parse(cls, kind: str, partitions: str, scale: float = 10.0) -> Attack:
        """From command-line text: ``partitions`` comma-separated (``"1,3"``)."""
        try:
            ids = tuple(int(p) for p in partitions.split(",") if p.strip())
        except ValueError:
            raise AttackError("partitions", f"expected comma-separated integers, got "
                              f"{partitions!r}") from None
        return cls(kind, ids, float(scale))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Attack:
        data = json.loads(text)
        return cls(data["kind"], tuple(data["partitions"]), float(data["scale"]))

    def sent_weights(self, local: Weights, global_weights: Weights,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The weights an attacking device sends instead of ``local``."""
        if self.kind == "nan":
            return {k: np.full_like(v, np.nan) for k, v in local.items()}
        return {k: (g + rng.normal(0.0, self.scale, g.shape)).astype(np.float32)
                for k, g in global_weights.items()}


def attack_mod(attack: Attack) -> Mod:
    """A train mod that rewrites the reply's arrays of the attacking partitions; replies
    of other devices, error replies and devices without a partition id pass unchanged."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        partition = context.node_config.get("partition-id")
        if (reply.has_error() or not reply.has_content() or partition is None
                or int(partition) not in attack.partitions):
            return reply
        mode = str(msg.content["config"].get("update-compression", "none"))
        global_record = msg.content["arrays"]
        global_weights = {k: global_record[k].numpy() for k in global_record}
        local = decode_update(reply.content["arrays"], global_weights, mode)
        rounds = int(reply.content["metrics"]["rounds-total"])
        rng = np.random.default_rng([device_from_context(context).seed, rounds])
        record, _ = encode_update(attack.sent_weights(local, global_weights, rng),
                                  global_weights, {}, mode)
        reply.content["arrays"] = record
        return reply

    return mod


def attacker_client_app(attack: Attack) -> ClientApp:
    """fedq's ClientApp with ``attack`` applied to the train replies."""
    return build_client_app(train_mods=[attack_mod(attack)])


def attacker_app(app_dir: Path, workdir: Path, attack: Attack) -> Path:
    """A Flower app directory (in ``workdir``) that is ``app_dir``'s app with
    :func:`attacker_client_app` as its ClientApp: the same pyproject (config defaults,
    ServerApp) except the ``clientapp`` component, and one generated module. Its code comes
    from the installed fedq packages, as a simulation runs on the machine that has them."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    project["tool"]["flwr"]["app"]["components"]["clientapp"] = f"{APP_MODULE}:app"
    derived = workdir / "attacker-app"
    derived.mkdir(parents=True, exist_ok=True)
    (derived / "pyproject.toml").write_text(tomli_w.dumps(project))
    (derived / f"{APP_MODULE}.py").write_text(
        '"""Generated by fedq-simulate: fedq\'s ClientApp with a simulated attacker '
        '(simulations/attacks.py)."""\n\n'
        "from fedq.simulations.attacks import Attack, attacker_client_app\n\n"
        f"app = attacker_client_app(Attack.from_json({attack.to_json()!r}))\n")
    return derived
