"""The curious server: each hole of issue 17, played against the real ClientApp and the
server's screening and strategy. The server controls the run config and every message,
so each test sends what such a server could send and checks what the device does with it
and what leaves the device (its state on disk is compared before and after)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _replies import _metadata, as_numpy, device_context, instruction, reply, train_metrics
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from fedq.client.client_app import app
from fedq.client.edge import main as client_main
from fedq.client.metric_release import EVALUATION_METRICS, TRAINING_DATA_METRICS
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.privacy import PRIVACY_BUDGET_ERROR_CODE, extend
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE, PrivacyPolicy
from fedq.common.trainer import LocalTrainer
from fedq.server.privacy_log import PrivacyLog, read_privacy_log
from fedq.server.server_app import build_strategy
from fedq.server.submit import run_config as submitted_run_config
from fedq.server.update_validation import screen_replies

SMALL = {"hidden-sizes": "16,16", "buffer-size": 600, "batch-size": 16, "learning-starts": 100,
         "target-update-interval": 50, "exploration-steps": 500, "local-steps": 300,
         "eval-episodes": 2, "dp-enabled": True}


def _run_config(tmp_path: Path, **overrides) -> dict:
    return {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path), **overrides}


def _weights() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())


def _train(partition: int = 0) -> Message:
    return instruction(partition, "train", RecordDict(
        {"arrays": _weights(), "config": ConfigRecord({"local-steps": 300})}))


def _evaluate(partition: int = 0, personalize_steps: int = 0) -> Message:
    return instruction(partition, "evaluate", RecordDict(
        {"arrays": _weights(), "config": ConfigRecord(
            {"server-round": 1, "personalize-steps": personalize_steps})}))


def _state(tmp_path: Path, partition: int = 0) -> dict[str, bytes]:
    """Every file of the device's state, to show that a refusal changes nothing."""
    root = tmp_path / "devices" / f"partition-{partition}"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _assert_refused(answer: Message, *words: str) -> None:
    assert answer.has_error(), "the device answered instead of refusing"
    assert answer.error.code == PRIVACY_POLICY_ERROR_CODE
    assert all(word in answer.error.reason for word in words), answer.error.reason


# --- hole 1: personalisation outside the ledger ----------------------------------------------
def test_an_evaluate_message_cannot_make_a_dp_device_fine_tune_outside_its_ledger(tmp_path):
    context = device_context(0, _run_config(tmp_path))
    assert not app(_train(), context).has_error()
    before = _state(tmp_path)
    answer = app(_evaluate(personalize_steps=300), context)
    _assert_refused(answer, "personalize-steps")
    assert _state(tmp_path) == before  # ledger, buffer and counters untouched
    assert not app(_evaluate(), context).has_error()  # plain evaluation still answers


def test_personalisation_is_refused_after_a_budget_decline_and_with_dp_switched_off(tmp_path):
    run_config = _run_config(tmp_path)
    one, two = _epsilons_of_one_and_two_rounds(tmp_path)
    budget = device_context(0, run_config, **{"dp-target-epsilon": (one + two) / 2})
    assert not app(_train(), budget).has_error()
    assert app(_train(), budget).error.code == PRIVACY_BUDGET_ERROR_CODE  # declined
    before = _state(tmp_path)
    # a short fine-tune would still fit the budget: it must not run outside the ledger
    _assert_refused(app(_evaluate(personalize_steps=50), budget), "personalize-steps")
    assert _state(tmp_path) == before
    # a device that trained with DP keeps its buffer private when the server turns DP off
    assert not app(_train(1), device_context(1, run_config)).has_error()
    plain = device_context(1, {**run_config, "dp-enabled": False})
    before = _state(tmp_path, 1)
    _assert_refused(app(_evaluate(1, personalize_steps=50), plain), "personalize-steps")
    assert _state(tmp_path, 1) == before


def _epsilons_of_one_and_two_rounds(tmp_path: Path) -> tuple[float, float]:
    """Epsilon after one and after two 300-step rounds (200 and 500 DP updates)."""
    planner = LocalTrainer(FedqConfig.from_mapping(_run_config(tmp_path)), seed=0)
    rates = planner.privacy.sample_rates(planner.planned_update_buffer_lengths(600))
    return (planner.privacy.epsilon(extend([], 1.0, rates[:200])),
            planner.privacy.epsilon(extend([], 1.0, rates)))


def test_a_non_dp_device_may_forbid_personalisation_and_the_run_cannot_allow_it(tmp_path):
    run_config = _run_config(tmp_path, **{"dp-enabled": False,
                                          "privacy-allow-personalize": True})
    context = device_context(0, run_config, **{"privacy-allow-personalize": False})
    _assert_refused(app(_evaluate(personalize_steps=50), context),
                    "privacy-allow-personalize")
    allowed = app(_evaluate(personalize_steps=50), device_context(0, run_config))
    assert math.isfinite(allowed.content["metrics"]["personalized-return-mean"])


# --- hole 2: the server sets the device's privacy -----------------------------------------
@pytest.mark.parametrize(("node", "run", "key"), [
    ({"privacy-dp-required": True}, {"dp-enabled": False}, "privacy-dp-required"),
    # bounds that only DP can meet: without DP the device's epsilon is infinite
    ({"privacy-max-epsilon": 8.0}, {"dp-enabled": False}, "privacy-max-epsilon = 8"),
    ({"privacy-min-noise-multiplier": 0.5}, {"dp-enabled": False},
     "privacy-min-noise-multiplier = 0.5"),
    ({"privacy-min-noise-multiplier": 0.8}, {"dp-noise-multiplier": 0.1},
     "privacy-min-noise-multiplier"),
    # derived from a plan: 1000 updates spending epsilon 1000 need little noise
    ({"privacy-min-noise-multiplier": 0.8},
     {"dp-target-epsilon": 1000.0, "dp-planned-updates": 1000},
     "privacy-min-noise-multiplier"),
    ({}, {"dp-delta": 0.1}, "privacy-max-delta"),  # epsilon means little at that delta
    ({"privacy-max-delta": 1e-6}, {"dp-delta": 1e-5}, "privacy-max-delta"),
    # the run's policy keys tighten a device that set none
    ({}, {"dp-enabled": False, "privacy-dp-required": True}, "privacy-dp-required"),
])
def test_a_run_config_cannot_loosen_the_devices_privacy(tmp_path, node, run, key):
    run_config = _run_config(tmp_path, **run)
    first = app(_train(), device_context(0, _run_config(tmp_path)))  # a device with state
    assert not first.has_error()
    before = _state(tmp_path)
    answer = app(_train(), device_context(0, run_config, **node))
    _assert_refused(answer, key)
    assert _state(tmp_path) == before


def test_the_server_logs_every_refusal_with_its_reason(tmp_path):
    run_config = _run_config(tmp_path, **{"dp-enabled": False})
    refusal = app(_train(), device_context(0, run_config, **{"privacy-dp-required": True}))
    answer = Message(refusal.error, metadata=_metadata(5))  # as the server receives it
    log = PrivacyLog(tmp_path, first_round=1)
    entry = log.record(3, [answer, reply(6, as_numpy(_weights()))])
    assert entry["refused"] == 1 and entry["refused-nodes"] == [5]
    evaluated = log.record(3, [Message(Error(code=PRIVACY_POLICY_ERROR_CODE, reason="x"),
                                       metadata=_metadata(6))], phase="evaluate")
    assert evaluated == {"evaluate-refused": 1, "evaluate-refused-nodes": [6]}
    rows = read_privacy_log(tmp_path)
    assert [(r["node-id"], r["status"], r["phase"]) for r in rows] == [
        (5, "refused", "train"), (6, "refused", "evaluate")]
    assert "privacy-dp-required" in rows[0]["reason"]


def test_the_run_config_cannot_raise_the_devices_epsilon_cap(tmp_path):
    one, two = _epsilons_of_one_and_two_rounds(tmp_path)
    run_config = _run_config(tmp_path, **{"dp-target-epsilon": 1000.0,
                                          "privacy-max-epsilon": 1000.0})
    context = device_context(0, run_config, **{"privacy-max-epsilon": (one + two) / 2})
    assert app(_train(), context).content["metrics"]["dp-epsilon"] == pytest.approx(one)
    declined = app(_train(), context)
    assert declined.error.code == PRIVACY_BUDGET_ERROR_CODE
    assert f"dp-target-epsilon {(one + two) / 2:g}" in declined.error.reason


def test_switching_dp_off_keeps_the_ledger_and_voids_the_guarantee(tmp_path):
    """A device without privacy-dp-required may be told to train without DP; its saved
    ledger must not be lost, and its epsilon is then inf (non-private updates)."""
    run_config = _run_config(tmp_path)
    app(_train(), device_context(0, run_config))
    history = _ledger(tmp_path)
    plain = app(_train(), device_context(0, {**run_config, "dp-enabled": False}))
    assert not plain.has_error() and _ledger(tmp_path) == history
    again = app(_train(), device_context(0, run_config))
    assert again.content["metrics"]["dp-epsilon"] == math.inf


def _ledger(tmp_path: Path) -> list:
    root = tmp_path / "devices" / "partition-0"
    generation = (root / "CURRENT").read_text()
    return json.loads((root / generation / "privacy.json").read_text())["history"]


def test_a_deployed_device_ignores_the_run_configs_audit_directory(tmp_path):
    chosen_by_server = tmp_path / "server-chosen"
    run_config = _run_config(tmp_path, **{"message-audit-dir": str(chosen_by_server)})
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                      node_config={"state-dir": str(tmp_path / "state")})
    assert not app(_evaluate(), context).has_error()
    assert not chosen_by_server.exists()
    own = tmp_path / "own-audit"
    context.node_config["message-audit-dir"] = str(own)
    app(_evaluate(), context)
    assert len(list(own.glob("*.json"))) == 1


# --- hole 3: central DP screening that depends on the other devices' data ---------------------
def _update(node: int, norm: float, global_weights: dict[str, np.ndarray]) -> Message:
    direction = {k: np.ones_like(v) for k, v in global_weights.items()}
    scale = norm / math.sqrt(sum(d.size for d in direction.values()))
    return reply(node, {k: (global_weights[k] + scale * direction[k]).astype(np.float32)
                        for k in global_weights})


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_with_central_dp_no_update_is_dropped_for_what_the_others_sent(mode):
    global_arrays = _weights()
    global_weights = as_numpy(global_arrays)
    norms = [0.05] * 5 + [1.0] * 4  # with 4 small ones all pass; a 5th small one drops 4
    config = FedqConfig.from_mapping({"central-dp": mode, "central-dp-clients": len(norms),
                                      "central-dp-clip-norm": 1.0})
    replies = [_update(n, norm, global_weights) for n, norm in enumerate(norms)]
    screening = screen_replies(replies, global_arrays, config, server_round=1)
    assert screening.rejected == {} and len(screening.accepted) == len(norms)
    # without central DP the median rule still protects plain FedAvg
    plain = FedqConfig.from_mapping({})
    replies = [_update(n, norm, global_weights) for n, norm in enumerate(norms)]
    assert len(screen_replies(replies, global_arrays, plain, 1).rejected) == 4


def test_with_central_dp_a_broken_update_counts_as_zero_and_weights_are_equal(
        server_process):
    global_arrays = _weights()
    global_weights = as_numpy(global_arrays)
    config = FedqConfig.from_mapping({"central-dp": "client-fixed", "central-dp-clients": 3,
                                      "central-dp-noise-multiplier": 0.0})
    broken = {k: np.full_like(v, np.nan) for k, v in global_weights.items()}
    good = _update(0, 0.5, global_weights)
    light = reply(1, as_numpy(_update(1, 0.5, global_weights).content["arrays"]),
                  train_metrics(num_examples=1e-9))  # a device that shrinks its weight
    screening = screen_replies([good, light, reply(2, broken)], global_arrays, config, 1)
    assert list(screening.zeroed) == [2] and len(screening.accepted) == 3
    arrays, _ = build_strategy(config).aggregate_train(1, screening.replies)
    # the sum of two updates of norm 0.5 and a zero one over 3: norm 1/3, whatever the
    # devices claim as num-examples
    moved = math.sqrt(sum(float(np.square(a - global_weights[k], dtype=np.float64).sum())
                          for k, a in as_numpy(arrays).items()))
    assert moved == pytest.approx(1 / 3, rel=1e-4)
    # federated evaluation still weights each device by its episodes
    evaluations = [Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": n, "eval-return-mean": r, "eval-return-min": r,
         "eval-return-max": r})}), metadata=_metadata(node))
        for node, (n, r) in enumerate([(1, 10.0), (3, 30.0)])]
    summary = build_strategy(config).aggregate_evaluate(1, evaluations)
    assert summary["eval-return-mean"] == pytest.approx(25.0)


# --- hole 4: metrics computed from private data ----------------------------------------------
def test_a_dp_devices_replies_carry_no_metric_computed_from_its_transitions(tmp_path):
    audit = tmp_path / "audit"
    run_config = _run_config(tmp_path, **{"privacy-release-metrics": "all"})  # cannot loosen
    context = device_context(0, run_config, **{"message-audit-dir": str(audit)})
    app(_train(), context)
    app(_evaluate(), context)
    sent = {m["message-type"]: m["records"]["metrics"]["metrics"]
            for m in (json.loads(p.read_text()) for p in audit.glob("*.json"))}
    train, evaluation = sent["train"], sent["evaluate"]
    for key in TRAINING_DATA_METRICS:  # loss, returns, episodes, timings: withheld
        assert math.isnan(train[key]), key
    assert train["num-examples"] == 300 and train["dp-enabled"] == 1
    assert math.isfinite(train["dp-epsilon"]) and sum(train["dp-round-steps"]) == 200
    # greedy returns of the global model on fresh episodes read no stored transition
    assert math.isfinite(evaluation["eval-return-mean"])
    # a device that releases the minimum withholds those too
    minimal = device_context(0, run_config, **{"privacy-release-metrics": "minimal"})
    metrics = app(_evaluate(), minimal).content["metrics"]
    assert all(math.isnan(metrics[k]) for k in EVALUATION_METRICS if k in metrics)
    # a device without DP claims no guarantee and keeps releasing everything
    plain = app(_train(1), device_context(1, {**run_config, "dp-enabled": False}))
    assert all(math.isfinite(plain.content["metrics"][k]) for k in TRAINING_DATA_METRICS)


def test_the_server_aggregates_around_withheld_metrics(tmp_path):
    run_config = _run_config(tmp_path)
    replies = [app(_train(0), device_context(0, run_config)),
               app(_train(1), device_context(1, {**run_config, "dp-enabled": False}))]
    _, metrics = build_strategy(FedqConfig.from_mapping(run_config)).aggregate_train(1, replies)
    released = replies[1].content["metrics"]
    assert metrics["clients"] == 2 and metrics["env-steps"] == 600
    assert metrics["mean-loss"] == pytest.approx(released["mean-loss"])
    assert metrics["train-seconds-max"] == pytest.approx(released["train-seconds"])
    assert metrics["episodes"] == released["episodes"]
    _, private_only = build_strategy(FedqConfig.from_mapping(run_config)).aggregate_train(
        1, replies[:1])
    assert math.isnan(private_only["mean-episode-return"])  # withheld, not a return of 0
    assert math.isnan(private_only["episodes"]) and private_only["env-steps"] == 300


# --- bad policies fail at device start, naming the key ------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("privacy-dp-required", 1, "expected true or false"),
    ("privacy-min-noise-multiplier", "high", "expected a number"),
    ("privacy-min-noise-multiplier", -1.0, "finite number >= 0"),
    ("privacy-min-noise-multiplier", float("inf"), "finite number >= 0"),
    ("privacy-max-epsilon", 0.0, "no run can train"),
    ("privacy-max-delta", 1.0, "no run can train"),
    ("privacy-release-metrics", "some", "one of"),
    ("privacy-max-epsilom", 1.0, "did you mean 'privacy-max-epsilon'"),
])
def test_a_bad_policy_fails_at_device_start_naming_the_key(tmp_path, capsys, key, value,
                                                          message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        PrivacyPolicy.from_mapping({key: value})
    assert message in str(err.value)
    with pytest.raises(ConfigError, match=f"'{key}'"):  # the handler refuses it too
        app(_train(), device_context(0, _run_config(tmp_path), **{key: value}))
    assert not (tmp_path / "devices" / "partition-0" / "CURRENT").exists()
    literal = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) \
        else "inf"
    with pytest.raises(SystemExit) as exited:
        client_main(["--server", "127.0.0.1:9", "--state-dir", str(tmp_path / "edge"),
                     "--insecure", "--set", f"{key}={literal}"])
    assert exited.value.code == 2 and f"'{key}'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"'{key}'"):  # and fedq-submit, in a run config
        submitted_run_config(None, [f"{key}={literal}"])


def test_the_edge_client_requires_signed_apps_with_trusted_entities(tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f"fpk_1: '{public}'\n")
    client_main(["--server", "h:1", "--state-dir", str(tmp_path / "s"), "--insecure",
                 "--trusted-entities", str(trusted), "--print-command"])
    command = capsys.readouterr().out.split()
    assert command[command.index("--trusted-entities") + 1] == str(trusted.resolve())
    trusted.write_text("fpk_1: 'ecdsa-sha2-nistp256 AAAA'\n")
    with pytest.raises(SystemExit):
        client_main(["--server", "h:1", "--state-dir", str(tmp_path / "s"), "--insecure",
                     "--trusted-entities", str(trusted), "--print-command"])
    assert "'fpk_1' is not an Ed25519 public key" in capsys.readouterr().err
