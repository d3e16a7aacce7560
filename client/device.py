"""Who this device is: its config (run config + node config), seed and state directory.

A SuperNode's ``--node-config`` may override any fedq key for that device (its env id,
env kwargs, seed, state directory, ...). In Flower's simulation engine the node config
holds only ``partition-id`` / ``num-partitions``; the partition id then picks the
device's seed and its state directory under the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from common.config import FedqConfig

_FLOWER_NODE_KEYS = ("partition-id", "num-partitions")
SEED_STRIDE = 1000


@dataclass(frozen=True)
class Device:
    """A device's resolved identity and settings."""

    name: str
    config: FedqConfig
    seed: int
    state_dir: Path


def device_from_context(context: Context) -> Device:
    """Resolve the device from Flower's context; bad node config raises ConfigError."""
    node = dict(context.node_config)
    partition = node.get("partition-id")
    fedq_node = {k: v for k, v in node.items() if k not in _FLOWER_NODE_KEYS}
    config = FedqConfig.from_mapping({**context.run_config, **fedq_node})
    if partition is not None:
        name = f"partition-{int(partition)}"
        seed = config.seed + SEED_STRIDE * int(partition)
    else:  # a real device: its node config sets seed and state-dir explicitly
        name = f"node-{context.node_id}"
        seed = config.seed
    if "state-dir" in fedq_node and config.state_dir:
        state_dir = Path(config.state_dir)
    else:
        state_dir = Path(config.run_dir) / "devices" / name
    return Device(name=name, config=config, seed=seed, state_dir=state_dir)
