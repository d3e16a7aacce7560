"""The fedq ClientApp: one edge device training a local DQN between federated rounds.

Train: load the device's state from its disk, load the global weights into the online
network and re-sync the target network to them, run ``local-steps`` env steps, save
the state, reply with the online weights (or, when the round config asks for
``update-compression``, their fp16/int8 delta to the global model with an error-feedback
residual kept on disk: :mod:`common.compression`) and scalar metrics. With FedProx's
``proximal-mu`` in the round config, local training adds the proximal term.
With ``exploration-clock = "federation"`` the round's epsilon schedule starts at the
round config's ``federation-env-steps`` (the env steps already in the global model).
Evaluate: greedy episodes of the global model on the device's own env and, with
``personalize-steps``, after a short local fine-tune of it (:mod:`client.personalize`).
Query: the device's identity (partition id), for the ``sequential`` strategy's order.
Only weights and scalars leave the device; the replay buffer never does.

The train reply also carries the device's lifetime (epsilon, delta) ((inf, 0) without
``dp-enabled``) and the accountant segments this round added. A device whose next round
would exceed its ``dp-target-epsilon`` replies with an error (code
``PRIVACY_BUDGET_ERROR_CODE``) that says why, and keeps answering evaluation. An error
reply, not a zero-weight one: Flower's FedAvg leaves error replies out of aggregation,
while a ``num-examples`` of 0 would divide by zero when every device declines.

The train and evaluate handlers enforce the device's privacy policy
(:mod:`common.privacy_policy`: node config, tightened by the run config). A train message
whose run config asks for less privacy (DP off, less noise, a larger delta) and an
evaluate message asking a private device to fine-tune get an error reply (code
``PRIVACY_POLICY_ERROR_CODE``) saying why, with the device's state untouched; the budget
is capped at ``privacy-max-epsilon``; each reply's metrics are reduced to what
``privacy-release-metrics`` allows (:mod:`client.metric_release`).
A device whose saved state cannot be loaded (a damaged generation, a privacy ledger it
cannot recover: :mod:`common.state_store`) or saved (a full disk) replies with an error
(code ``DEVICE_STATE_ERROR_CODE``) naming itself and the file, instead of training.
The round watch (:mod:`client.round_watch`) stops a round nobody can use any more (its
round-timeout passed, its SuperNode gone), keeping and saving the steps done (error code
``ROUND_STOPPED_ERROR_CODE``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.supercore import log

from fedq.client.central_dp import central_dp_clipping_mod
from fedq.client.device import Device, device_from_context
from fedq.client.flat_wire_mod import flat_wire_mod
from fedq.client.message_audit import message_audit_mod
from fedq.client.metric_release import release
from fedq.client.personalize import personalized_returns
from fedq.client.round_watch import ROUND_STOPPED_ERROR_CODE, current_watch, round_watch_mod
from fedq.client.secure_aggregation import secure_aggregation_mod
from fedq.common import hop_trace
from fedq.common.compression import encode_update
from fedq.common.config import (
    EVALUATE_ROUND_KEY,
    EVALUATION_RECORD,
    FEDERATION_STEPS_KEY,
    FedqConfig,
)
from fedq.common.envs import ImageObs, env_spec
from fedq.common.policies import global_policy, network_layout
from fedq.common.privacy import PRIVACY_BUDGET_ERROR_CODE, PrivacyBudgetExhausted, PrivacyReport
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE, PolicyRefusal
from fedq.common.rollouts import play_episodes
from fedq.common.state_store import DEVICE_STATE_ERROR_CODE, DeviceStateError, state_lock
from fedq.common.trainer import LocalTrainer, has_privacy_ledger
from fedq.common.weights import check_arrays

PROGRESS_INTERVAL_S = 15.0  # a training round's progress line at most this often


def single_threaded_torch(config: FedqConfig) -> None:
    """One torch thread on the torch backend: for tiny MLPs threads cost more than they
    give, and devices share cores. Torch is imported only here, never for numpy."""
    if config.backend == "torch":
        import torch

        torch.set_num_threads(1)


def _load_trainer(device: Device, config: FedqConfig) -> LocalTrainer:
    single_threaded_torch(config)
    trainer = LocalTrainer(config, seed=device.seed,
                           min_noise_multiplier=device.policy.min_noise_multiplier)
    trainer.load(device.state_dir)
    return trainer


def _refused(msg: Message, device: Device, refusal: PolicyRefusal) -> Message:
    """The error reply to a message the device's privacy policy does not allow."""
    log(logging.WARNING, "[fedq] %s refuses a %s message: %s", device.name,
        msg.metadata.message_type, refusal)
    return Message(Error(code=PRIVACY_POLICY_ERROR_CODE,
                         reason=f"privacy policy: {refusal}"), reply_to=msg)


def is_private(device: Device, config: FedqConfig) -> bool:
    """Whether the device's data is under DP: it trains with DP now, its policy requires
    DP, or it trained with DP before (its state holds a ledger)."""
    return (config.dp_enabled or device.policy.dp_required
            or has_privacy_ledger(device.state_dir))


def _global_weights(msg: Message, trainer: LocalTrainer) -> dict[str, np.ndarray]:
    return check_arrays(msg.content["arrays"], trainer.learner.layout)


def train(msg: Message, context: Context) -> Message:
    """One round of local training on the device, holding its state exclusively; a fused
    round's train message (round config ``evaluate-round``: server/round_protocol.py)
    first evaluates the model it carries, exactly as an evaluate message would, and the
    reply carries that evaluation (record ``evaluation``) next to the update."""
    device = device_from_context(context)
    try:
        config = device.policy.apply(device.config)
    except PolicyRefusal as refusal:
        return _refused(msg, device, refusal)
    hop_trace.mark("handler-start")
    evaluation = _fused_evaluation(msg, device)
    hop_trace.mark("handler-evaluated")
    started = time.perf_counter()
    with state_lock(device.state_dir):
        reply = _train(msg, device, config, started)
    if evaluation is not None and reply.has_content():  # an error reply carries none:
        reply.content[EVALUATION_RECORD] = evaluation  # the server asks again
    hop_trace.mark("handler-end")
    return reply


def _fused_evaluation(msg: Message, device: Device) -> MetricRecord | None:
    """The evaluation a fused train message asks for (None: not asked, or refused: the
    server then sends the evaluate message, which gets the refusal)."""
    evaluate_round = msg.content["config"].get(EVALUATE_ROUND_KEY)
    if evaluate_round is None:
        return None
    try:
        return _evaluation(device, msg.content["arrays"], int(evaluate_round), 0)
    except PolicyRefusal:
        return None


def _train(msg: Message, device: Device, config: FedqConfig, started: float) -> Message:
    try:
        trainer = _load_trainer(device, config)
    except DeviceStateError as err:
        return _state_error(msg, device, f"cannot load its state: {err}")
    global_state = _global_weights(msg, trainer)
    trainer.learner.load_online(global_state, sync_target=True)
    hop_trace.mark("handler-state-loaded")
    round_config = msg.content["config"]
    local_steps = int(round_config.get("local-steps", config.local_steps))
    trainer.learner.set_proximal(float(round_config.get("proximal-mu", 0.0)))
    watch = current_watch()  # ends work nobody can use (client/round_watch.py)
    try:
        stats = trainer.train(local_steps, exploration_start(config, round_config),
                              progress=round_progress(device.name, local_steps),
                              should_stop=watch.should_stop if watch else None)
    except PrivacyBudgetExhausted as declined:
        trainer.close()
        log(logging.WARNING, "[fedq] %s: %s", device.name, declined)
        return Message(Error(code=PRIVACY_BUDGET_ERROR_CODE, reason=str(declined)),
                       reply_to=msg)
    except PolicyRefusal as refusal:  # a derived noise multiplier below the policy's
        trainer.close()
        return _refused(msg, device, refusal)
    hop_trace.mark("handler-trained")
    trainer.counters.rounds += 1
    arrays = _outgoing_update(trainer, global_state,
                              str(round_config.get("update-compression", "none")))
    try:
        with watch.saving() if watch else contextlib.nullcontext():
            trainer.save(device.state_dir)
    except OSError as err:  # e.g. a full disk: the round's work is not kept, say so
        trainer.close()
        return _state_error(msg, device, f"cannot save its state in '{device.state_dir}' "
                                         f"({err.strerror or err}); this round's training "
                                         "is not kept")
    if watch is not None and watch.should_stop():
        trainer.close()
        reason = (f"device {device.name}: stopped after {stats.env_steps} of {local_steps} "
                  f"env steps ({watch.reason}); that work is saved in its state")
        log(logging.WARNING, "[fedq] %s", reason)
        return Message(Error(code=ROUND_STOPPED_ERROR_CODE, reason=reason), reply_to=msg)
    returns = stats.episode_returns
    metrics = MetricRecord(release({
        **device.identity_metrics(),
        **_privacy_metrics(stats.privacy),
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
    }, device.policy.release_metrics, is_private(device, config)))
    trainer.close()
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def round_progress(name: str, total: int, every_s: float = PROGRESS_INTERVAL_S
                   ) -> Callable[[int], None]:
    """A progress callback for a round's training that logs ``[fedq] <device>: done/total
    env steps (N steps/s)`` at most every ``every_s`` seconds, so a round that takes
    minutes shows it is alive (fedq-simulate shows these lines; a SuperNode logs them)."""
    started = last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log(logging.INFO, "[fedq] %s: %d/%d env steps this round (%.0f steps/s)",
                name, done, total, done / (now - started))

    return report


def _state_error(msg: Message, device: Device, problem: str) -> Message:
    """An error reply (code ``DEVICE_STATE_ERROR_CODE``) naming the device and the file."""
    reason = f"device {device.name}: {problem}"
    log(logging.ERROR, "[fedq] %s", reason)
    return Message(Error(code=DEVICE_STATE_ERROR_CODE, reason=reason), reply_to=msg)


def exploration_start(config: FedqConfig, round_config: ConfigRecord) -> int | None:
    """Where this round's epsilon schedule starts: with ``exploration-clock =
    "federation"`` at the env steps already in the global model (the server's
    ``federation-env-steps``), else None (the device's own steps)."""
    if config.exploration_clock != "federation":
        return None
    steps = round_config.get(FEDERATION_STEPS_KEY)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"round config field '{FEDERATION_STEPS_KEY}' is {steps!r}: "
                         "exploration-clock 'federation' needs the server's count (an "
                         "integer >= 0) of the env steps in the global model")
    return steps


def _outgoing_update(trainer: LocalTrainer, global_weights: dict[str, np.ndarray],
                     mode: str) -> ArrayRecord:
    """The reply's arrays: the online weights, or with ``update-compression`` their
    quantised delta to the global model (the error-feedback residual is kept in the
    trainer and saved with its state)."""
    local = trainer.learner.online_arrays()
    record, trainer.update_residual = encode_update(local, global_weights,
                                                    trainer.update_residual, mode)
    return record


def _privacy_metrics(
    report: PrivacyReport | None,
) -> dict[str, float | int | list[float] | list[int]]:
    """The device's lifetime (epsilon, delta), and this round's accountant segments so
    anyone can recompute epsilon from the logged replies.

    A device without DP reports (inf, 0) and empty segments rather than leaving the keys
    out: Flower's strategies refuse to aggregate replies whose metric keys differ, and
    federations may mix private and non-private devices.
    """
    enabled = report is not None
    if report is None:
        report = PrivacyReport(epsilon=math.inf, delta=0.0, noise_multiplier=0.0,
                               sample_rate=0.0, steps_total=0, round_history=[])
    return {
        "dp-enabled": int(enabled),
        "dp-epsilon": report.epsilon,
        "dp-delta": report.delta,
        "dp-noise-multiplier": report.noise_multiplier,
        "dp-sample-rate": report.sample_rate,
        "dp-steps-total": report.steps_total,
        "dp-round-noise-multipliers": [s[0] for s in report.round_history],
        "dp-round-sample-rates": [s[1] for s in report.round_history],
        "dp-round-steps": [s[2] for s in report.round_history],
    }


def identify(msg: Message, context: Context) -> Message:
    """Who this device is (its simulation partition id), so that the ``sequential``
    strategy can visit devices in the same order every run (server/sequential.py)."""
    device = device_from_context(context)
    return Message(RecordDict({"metrics": MetricRecord(device.identity_metrics())}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Greedy episodes of the global model on this device's env (device state untouched:
    only the numpy forward pass and a fresh env are built, not the device's trainer and
    buffer, so no backend's learner is loaded)."""
    device = device_from_context(context)
    round_config = msg.content["config"]
    try:
        metrics = _evaluation(device, msg.content["arrays"],
                              int(round_config.get("server-round", 0)),
                              int(round_config.get("personalize-steps", 0)))
    except PolicyRefusal as refusal:
        return _refused(msg, device, refusal)
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _evaluation(device: Device, arrays: ArrayRecord, server_round: int,
                personalize_steps: int) -> MetricRecord:
    """Round ``server_round``'s evaluation of the global model ``arrays`` on this device,
    reduced to what its policy releases; raises :class:`PolicyRefusal` where the policy
    forbids it."""
    config = device.config
    private = is_private(device, config)
    device.policy.check_personalize(personalize_steps, private)
    spec = env_spec(config.env_id, config.env_kwargs, config.env_physics, ImageObs.of(config))
    global_state = check_arrays(arrays, network_layout(config, spec))
    policy = global_policy(config, spec, global_state)
    eval_seed = device.seed + 10**6 + 1000 * server_round
    returns = play_episodes(policy.act, config.env_id, config.eval_episodes,
                            seed=eval_seed, env_kwargs=config.env_kwargs,
                            env_physics=config.env_physics, image=ImageObs.of(config),
                            action_repeat=config.action_repeat)
    metrics: dict[str, float | int] = {
        **device.identity_metrics(),
        "num-examples": len(returns),
        "eval-return-mean": float(np.mean(returns)),
        "eval-return-min": float(np.min(returns)),
        "eval-return-max": float(np.max(returns)),
    }
    if personalize_steps:  # same episodes' seeds as above: a paired comparison
        personal = personalized_returns(device, global_state, personalize_steps,
                                        config.eval_episodes, eval_seed)
        metrics["personalized-return-mean"] = float(np.mean(personal))
    return MetricRecord(release(metrics, device.policy.release_metrics, private))


def build_client_app(train_mods: Sequence[Mod] = ()) -> ClientApp:
    """fedq's ClientApp. ``train_mods`` wrap the train handler inside central DP clipping
    (they see the reply before it is clipped); the product adds none, a simulation adds
    its own (simulations/attacks.py) without the product knowing of them. SecAgg+
    (:mod:`client.secure_aggregation`) is outside both: it masks what they return. The
    audit mod is outermost: it sees each reply as it leaves, after clipping and masking;
    the round watch (:mod:`client.round_watch`) ends a message whose round is over. The
    flat wire mod (:mod:`client.flat_wire_mod`) just inside the audit unpacks the
    weights as they arrive and packs the reply's, so the audit records the packed reply."""
    client_app = ClientApp(mods=[message_audit_mod, flat_wire_mod, round_watch_mod])
    client_app.train(mods=[secure_aggregation_mod, central_dp_clipping_mod, *train_mods])(train)
    client_app.evaluate()(evaluate)
    client_app.query()(identify)
    return client_app


app = build_client_app()
