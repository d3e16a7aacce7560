"""Who this device is: its config (run config + node config), seed and state directory.

A SuperNode's ``--node-config`` may override any fedq key for that device (its env id,
env kwargs, seed, state directory, ...). In Flower's simulation engine the node config
holds only ``partition-id`` / ``num-partitions``; the partition id then picks the
device's seed, its state directory under the run directory and its entry of the run
config's ``client-overrides`` (a scenario's per-client env, physics and training
settings, :mod:`simulations.scenario`), applied over the run config.

The device's privacy policy (:mod:`common.privacy_policy`) is read from its node config;
the run config's ``privacy-*`` keys (and, in simulation, its partition's
``client-overrides``) can only tighten it, never loosen it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from fedq.common.config import FedqConfig
from fedq.common.device_key import DEVICE_KEY, device_key
from fedq.common.privacy_policy import PrivacyPolicy

_FLOWER_NODE_KEYS = ("partition-id", "num-partitions")
SEED_STRIDE = 1000


@dataclass(frozen=True)
class Device:
    """A device's resolved identity and settings."""

    name: str
    config: FedqConfig
    seed: int
    state_dir: Path
    partition: int = -1  # simulation partition id; -1 on a real device
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)  # effective (tightest)
    key: int = 0  # hash of the node config: orders deployed devices (common/device_key.py)

    def identity_metrics(self) -> dict[str, int]:
        """Lets the server tell replies apart and order them the same way every run
        (node ids change between runs; partition ids and node configs do not)."""
        return {"partition-id": self.partition, DEVICE_KEY: self.key}


def device_from_context(context: Context) -> Device:
    """Resolve the device from Flower's context; bad node config raises ConfigError."""
    node = dict(context.node_config)
    partition = node.get("partition-id")
    fedq_node = {k: v for k, v in node.items() if k not in _FLOWER_NODE_KEYS}
    config = FedqConfig.from_mapping({**context.run_config, **fedq_node})
    policy = PrivacyPolicy.from_mapping(fedq_node).tightened(
        PrivacyPolicy.from_mapping(context.run_config))
    if partition is not None:
        name = f"partition-{int(partition)}"
        own = config.client_overrides.get(str(int(partition)), {})
        policy = policy.tightened(PrivacyPolicy.from_mapping(own))
        config = config.for_partition(int(partition))
        # a scenario's explicit per-client seed is that device's seed, as on a real device
        seed = config.seed if "seed" in own else config.seed + SEED_STRIDE * int(partition)
    else:  # a real device: its node config sets seed and state-dir explicitly
        name = f"node-{context.node_id}"
        seed = config.seed
    if "state-dir" in fedq_node and config.state_dir:
        state_dir = Path(config.state_dir)
    else:
        state_dir = Path(config.run_dir) / "devices" / name
    return Device(name=name, config=config, seed=seed, state_dir=state_dir,
                  partition=-1 if partition is None else int(partition), policy=policy,
                  key=device_key(node))
