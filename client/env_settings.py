"""Settings a device reads from its environment, refused by name when bad.

``fedq-supernode``'s knobs are environment variables (a Pi's service file or a compose
``environment:`` block sets them), read before Flower starts, in processes that have no
config file of their own: a typo must stop the device with a message naming the
variable, never fall back to a default without a word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def seconds(environ: Mapping[str, str], name: str, default: float, low: float,
            high: float) -> float:
    """``environ[name]`` as seconds in [``low``, ``high``] (``default`` when unset or
    empty); anything else raises ``ValueError`` naming the variable and the range."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        raise ValueError(f"{name}={raw!r}: must be a number of seconds in "
                         f"[{low:g}, {high:g}]")
    return value
