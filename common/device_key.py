"""A device's stable key: the same number every run, whatever node id the SuperLink drew.

The server sums replies in a fixed device order, because float addition is not
associative and DQN amplifies last-bit differences of the global model into different
learning curves. In simulation the partition id fixes that order. A deployed device has
no partition id, and its node id is drawn at random by the SuperLink on every SuperNode
start, so ordering by node id made two deployed runs with the same seed differ. A device
therefore also reports ``device-key``: a hash of its node config (seed, env settings,
backend, ...), which its operator chose and which stays the same across runs and
restarts. Local paths (:data:`LOCAL_PATH_KEYS`: where the device keeps its state, not
what it is) are left out, so moving a device's state-dir keeps its place in the order.
Devices whose remaining node configs are identical get the same key and fall back to
node id order.

The key is a pseudonym of the node config, not the config: it reveals no setting, only
that two replies come from devices configured alike (the node id already links a
device's replies within a run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

DEVICE_KEY = "device-key"
NO_KEY = 0
LOCAL_PATH_KEYS = frozenset({"state-dir", "message-audit-dir", "run-dir"})


def device_key(node_config: Mapping[str, object]) -> int:
    """A non-negative int below 2**62 (fits Flower's int64 metrics) from ``node_config``
    without its local paths, independent of the order its keys were given in."""
    identity = {str(k): v for k, v in node_config.items() if k not in LOCAL_PATH_KEYS}
    canonical = json.dumps(identity, sort_keys=True,
                           default=str, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2
