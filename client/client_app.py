"""The fedq ClientApp: one edge device training a local DQN between federated rounds.

Train: load the device's state from its disk, load the global weights into the online
network and re-sync the target network to them, run ``local-steps`` env steps, save
the state, reply with the online weights and scalar metrics. Evaluate: greedy episodes
of the global model on the device's own env. Only weights and scalars leave the device;
the replay buffer never does.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import Device, device_from_context
from common.trainer import LocalTrainer
from common.weights import to_record, to_state_dict

torch.set_num_threads(1)  # tiny MLPs: threads cost more than they give, and devices share cores

app = ClientApp()


def _load_trainer(device: Device) -> LocalTrainer:
    trainer = LocalTrainer(device.config, seed=device.seed)
    trainer.load(device.state_dir)
    return trainer


def _global_weights(msg: Message, trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return to_state_dict(msg.content["arrays"], trainer.learner.online)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the device."""
    started = time.perf_counter()
    device = device_from_context(context)
    trainer = _load_trainer(device)
    trainer.learner.load_online(_global_weights(msg, trainer), sync_target=True)
    local_steps = int(msg.content["config"].get("local-steps", device.config.local_steps))
    stats = trainer.train(local_steps)
    trainer.counters.rounds += 1
    trainer.save(device.state_dir)
    returns = stats.episode_returns
    metrics = MetricRecord({
        "num-examples": stats.env_steps,  # FedAvg weight: env steps collected this round
        "env-steps-total": trainer.counters.env_steps,
        "updates": stats.updates,
        "updates-total": trainer.counters.updates,
        "rounds-total": trainer.counters.rounds,
        "mean-loss": stats.mean_loss if stats.updates else 0.0,
        "episodes": len(returns),
        "mean-episode-return": float(np.mean(returns)) if returns else 0.0,
        "epsilon": stats.epsilon,
        "train-seconds": stats.seconds,
        "handler-seconds": time.perf_counter() - started,
    })
    trainer.close()
    return Message(RecordDict({"arrays": to_record(trainer.learner.online), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Greedy episodes of the global model on this device's env (device state untouched)."""
    device = device_from_context(context)
    trainer = LocalTrainer(device.config, seed=device.seed)
    trainer.learner.load_online(_global_weights(msg, trainer), sync_target=False)
    server_round = int(msg.content["config"].get("server-round", 0))
    returns = trainer.evaluate(device.config.eval_episodes,
                               seed=device.seed + 10**6 + 1000 * server_round)
    trainer.close()
    metrics = MetricRecord({
        "num-examples": len(returns),
        "eval-return-mean": float(np.mean(returns)),
        "eval-return-min": float(np.min(returns)),
        "eval-return-max": float(np.max(returns)),
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

