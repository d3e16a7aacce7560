"""Physics overrides: the knobs that make one device's env differ from another's.

A federation of real devices is never identical: poles of different lengths, robots of
different masses, landers in different wind. ``env-physics`` (a JSON object, per device
through a scenario or a node config) names such knobs by a short lowercase name; this
module knows, per gymnasium env class, which knobs exist, their valid range, and how each
one reaches the env:

- ``attribute`` knobs are set on ``env.unwrapped`` after ``gym.make``. Set on the
  *instance*: Acrobot's link lengths and masses are class attributes, and assigning the
  class would leak one device's physics into every other device in the same process
  (which is exactly how Flower's simulation engine hosts virtual devices).
- ``make-kwarg`` knobs are keyword arguments of ``gym.make`` (LunarLander's gravity and
  wind are read once, in ``__init__``).

CartPole derives ``total_mass`` and ``polemass_length`` from its masses and half-length
once in ``__init__``; :func:`apply_physics` recomputes them, or a longer pole would not
change the dynamics at all.

Ranges are what the env's equations stay meaningful in (positive masses and lengths, a
stable integration step), or what the env itself asserts (LunarLander's -12 < gravity < 0).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from fedq.common.config import ConfigError

_KEY = "env-physics"


@dataclass(frozen=True)
class Knob:
    """One physics parameter: where it goes and which values are valid."""

    target: str  # attribute name on env.unwrapped, or make() keyword
    low: float
    high: float
    make_kwarg: bool = False
    low_open: bool = True  # low itself excluded (a zero mass or length is not physics)
    boolean: bool = False

    def problem(self, value: Any) -> str | None:
        if self.boolean:
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        above_low = value > self.low if self.low_open else value >= self.low
        if not (above_low and value <= self.high):
            bracket = "(" if self.low_open else "["
            return f"must be in {bracket}{self.low:g}, {self.high:g}], got {value!r}"
        return None


# Keyed by the env class name of the gymnasium entry point (CartPole-v0 and -v1 share one).
PHYSICS: dict[str, dict[str, Knob]] = {
    "CartPoleEnv": {
        "gravity": Knob("gravity", 0.0, 100.0),
        "masscart": Knob("masscart", 0.0, 100.0),
        "masspole": Knob("masspole", 0.0, 10.0),
        "length": Knob("length", 0.0, 10.0),  # half the pole's length, as in gymnasium
        "force_mag": Knob("force_mag", 0.0, 100.0),
        "tau": Knob("tau", 0.0, 0.1),  # Euler step; larger steps make the dynamics unstable
    },
    "AcrobotEnv": {
        "link_length_1": Knob("LINK_LENGTH_1", 0.0, 10.0),
        "link_mass_1": Knob("LINK_MASS_1", 0.0, 10.0),
        "link_mass_2": Knob("LINK_MASS_2", 0.0, 10.0),
        "link_com_pos_1": Knob("LINK_COM_POS_1", 0.0, 10.0),
        "link_com_pos_2": Knob("LINK_COM_POS_2", 0.0, 10.0),
        "link_moi": Knob("LINK_MOI", 0.0, 10.0),
    },
    "LunarLander": {
        "gravity": Knob("gravity", -12.0, 0.0, make_kwarg=True),  # env asserts -12 < g < 0
        "enable_wind": Knob("enable_wind", 0, 0, make_kwarg=True, boolean=True),
        "wind_power": Knob("wind_power", 0.0, 20.0, make_kwarg=True, low_open=False),
        "turbulence_power": Knob("turbulence_power", 0.0, 2.0, make_kwarg=True,
                                 low_open=False),
    },
}
# Knobs that look like physics but are not: say why instead of "unknown key".
_NOT_DYNAMICS = {
    ("AcrobotEnv", "link_length_2"): "gymnasium's Acrobot uses LINK_LENGTH_2 only to draw "
                                     "the second link; it does not enter the dynamics",
}
_RELATED = {"LunarLander": ("wind_power", "turbulence_power", "enable_wind")}


def env_class_name(env_id: str) -> str:
    """The entry point's class name of a registered id, without making the env."""
    try:
        entry = gym.spec(env_id).entry_point
    except gym.error.Error as err:
        raise ConfigError("env-id", f"cannot look up {env_id!r}: {err}") from None
    return entry.rsplit(":", 1)[-1] if isinstance(entry, str) else entry.__name__


def check_physics(env_id: str, physics: Mapping[str, Any]) -> dict[str, Knob]:
    """The knobs ``physics`` sets on ``env_id``; a :class:`ConfigError` naming
    ``env-physics.<knob>`` for an unknown knob, a value out of range or a wind setting
    without ``enable_wind``."""
    if not physics:
        return {}
    cls = env_class_name(env_id)
    table = PHYSICS.get(cls)
    if table is None:
        supported = ", ".join(sorted(PHYSICS))
        raise ConfigError(_KEY, f"{env_id!r} ({cls}) has no physics overrides; supported "
                                f"env classes: {supported}. Use env-kwargs for make() options")
    knobs = {}
    for name, value in physics.items():
        field_name = f"{_KEY}.{name}"
        if (cls, name) in _NOT_DYNAMICS:
            raise ConfigError(field_name, _NOT_DYNAMICS[(cls, name)])
        if name not in table:
            hint = difflib.get_close_matches(name, table, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(field_name, f"unknown physics key for {cls}{suggestion}; known: "
                                          f"{', '.join(table)}")
        problem = table[name].problem(value)
        if problem:
            raise ConfigError(field_name, problem)
        knobs[name] = table[name]
    if cls in _RELATED:
        wind = [k for k in ("wind_power", "turbulence_power") if k in physics]
        if wind and physics.get("enable_wind") is not True:
            raise ConfigError(f"{_KEY}.{wind[0]}", "has no effect unless enable_wind is true")
    return knobs


def physics_make_kwargs(env_id: str, physics: Mapping[str, Any],
                        env_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The make() keywords the physics contributes, refusing ones env-kwargs also sets
    (two places for one value is a conflict waiting to be misread)."""
    out = {}
    for name, knob in check_physics(env_id, physics).items():
        if not knob.make_kwarg:
            continue
        if knob.target in env_kwargs:
            raise ConfigError(f"{_KEY}.{name}", f"also set in env-kwargs as {knob.target!r}; "
                                                "set it in one place")
        out[knob.target] = physics[name]
    return out


def apply_physics(env_id: str, env: gym.Env, physics: Mapping[str, Any]) -> None:
    """Set the attribute knobs on this env instance and recompute derived quantities."""
    base = env.unwrapped
    for name, knob in check_physics(env_id, physics).items():
        if not knob.make_kwarg:
            setattr(base, knob.target, float(physics[name]))
    if type(base).__name__ == "CartPoleEnv":
        base.total_mass = base.masspole + base.masscart
        base.polemass_length = base.masspole * base.length
