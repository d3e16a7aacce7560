"""Device-side DP: bad settings fail before training, the closed-form per-sample clipping
agrees with Opacus, every device's reported epsilon can be recomputed from its logged
replies with Opacus's accountant, epsilon survives restarts, and the budget is enforced."""

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _replies import device_context, instruction
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant

from fedq.client.client_app import app
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.dp_sgd import DPSGD
from fedq.common.networks import QNetwork
from fedq.common.privacy import (
    PRIVACY_BUDGET_ERROR_CODE,
    PRV_EPS_ERROR,
    PrivacyBudgetExhausted,
    extend,
    poisson_indices,
    sample_rate,
)
from fedq.common.trainer import LocalTrainer
from fedq.server.central_dp import central_dp_report
from fedq.server.server_app import build_strategy

SMALL = {"hidden-sizes": "16,16", "buffer-size": 600, "batch-size": 16, "learning-starts": 100,
         "target-update-interval": 50, "exploration-steps": 500, "local-steps": 300,
         "dp-enabled": True}


# --- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("dp-noise-multiplier", -0.5, "must be >= 0"),
    ("dp-clip-norm", 0.0, "must be > 0"),
    ("dp-clip-norm", -1.0, "must be > 0"),
    ("dp-delta", 1.0, "must be in (0, 1)"),
    ("dp-delta", 0.0, "must be in (0, 1)"),
    ("dp-target-epsilon", 0.0, "must be > 0"),
    ("dp-target-epsilon", -3.0, "must be > 0"),
    ("dp-target-epsilon", float("-inf"), "finite"),
    ("dp-target-epsilon", float("nan"), "finite"),
    ("dp-accountant", "gdp", "one of"),
    ("dp-planned-updates", -1, "must be >= 0"),
    ("dp-planned-updates", 1000, "needs a finite dp-target-epsilon"),
    ("learning-rate", float("inf"), "finite"),  # inf means "no budget" for one key only
])
def test_bad_dp_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        FedqConfig.from_mapping({key: value})
    assert message in str(err.value)


def test_inf_target_epsilon_means_no_budget_and_round_trips():
    config = FedqConfig.from_mapping({"dp-target-epsilon": float("inf")})
    assert config.dp_target_epsilon == math.inf
    assert FedqConfig.from_mapping(config.to_mapping()) == config


def test_a_bad_device_setting_fails_in_the_handler_before_any_training(tmp_path):
    run_config = {**_run_config(tmp_path), "dp-clip-norm": -1.0}
    with pytest.raises(ConfigError, match="'dp-clip-norm'"):
        app(_train_message(0), device_context(0, run_config))
    assert not (tmp_path / "devices").exists()  # no device state was created


# --- the DP-SGD gradient -----------------------------------------------------------------
def _batch(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 4, generator=gen) * 3.0  # spread of norms: some clipped, some not
    actions = torch.randint(0, 3, (n, 1), generator=gen)
    targets = torch.randn(n, 1, generator=gen) * 5.0
    return obs, actions, targets


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus hooks; inputs need no grad
def test_closed_form_norms_and_clipped_sum_match_opacus_per_sample_gradients():
    torch.manual_seed(0)
    net = QNetwork(4, 3, (32, 16))
    reference = GradSampleModule(copy.deepcopy(net), loss_reduction="sum")
    obs, actions, targets = _batch()
    F.smooth_l1_loss(reference(obs).gather(1, actions), targets, reduction="sum").backward()
    per_sample = [p.grad_sample.flatten(1) for p in reference.parameters()]
    opacus_norms = torch.cat(per_sample, dim=1).norm(dim=1)
    clip = float(opacus_norms.median())  # about half of the transitions get clipped
    factors = (clip / (opacus_norms + 1e-6)).clamp(max=1.0)
    expected = [(g * factors[:, None]).sum(0) for g in per_sample]

    dp = DPSGD(net, clip, torch.Generator())
    losses = F.smooth_l1_loss(dp.forward(obs).gather(1, actions), targets, reduction="none")
    norms = dp.backward(losses, noise_multiplier=0.0, expected_batch_size=1.0)
    torch.testing.assert_close(norms, opacus_norms, rtol=1e-4, atol=1e-6)
    assert 0 < int((factors < 1).sum()) < len(factors)
    for p, want in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad.flatten(), want, rtol=1e-4, atol=1e-6)


def test_noise_has_std_sigma_times_clip_over_the_expected_batch():
    net = QNetwork(4, 2, (64, 64))
    dp = DPSGD(net, clip_norm=2.0, generator=torch.Generator().manual_seed(3))
    obs, _, _ = _batch(32)
    losses = dp.forward(obs).sum(1) * 0.0  # zero gradients: what remains is the noise
    dp.backward(losses, noise_multiplier=1.5, expected_batch_size=40.0)
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert len(grads) > 4000
    assert float(grads.std()) == pytest.approx(1.5 * 2.0 / 40.0, rel=0.05)
    assert abs(float(grads.mean())) < 0.1 * 1.5 * 2.0 / 40.0


def test_an_empty_poisson_batch_still_takes_a_noisy_step():
    net = QNetwork(4, 2, (8,))
    dp = DPSGD(net, clip_norm=1.0, generator=torch.Generator().manual_seed(0))
    losses = dp.forward(torch.zeros(0, 4)).sum(1)
    assert dp.backward(losses, noise_multiplier=1.0, expected_batch_size=4.0).numel() == 0
    assert all(bool(p.grad.abs().sum() > 0) for p in net.parameters())


def test_poisson_sampling_keeps_each_index_with_the_rate():
    rng = np.random.default_rng(0)
    n, rate, draws = 200, 0.1, 4000
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = poisson_indices(n, rate, rng)
        assert len(np.unique(idx)) == len(idx) and (idx < n).all()
        counts[idx] += 1
        sizes.append(len(idx))
    assert counts.mean() / draws == pytest.approx(rate, rel=0.02)
    assert np.abs(counts / draws - rate).max() < 0.03  # no index favoured
    assert np.var(sizes) == pytest.approx(n * rate * (1 - rate), rel=0.1)  # binomial


def test_sample_rate_is_batch_over_length_rounded_onto_a_coarse_grid():
    for length in range(64, 60_000, 7):
        rate = sample_rate(64, length)
        assert 64 / length <= rate <= 1.25 * 64 / length
    assert sample_rate(64, 10) == 1.0
    assert len({sample_rate(64, n) for n in range(1000, 50_001)}) <= 24


# --- the learner and the trainer -----------------------------------------------------------
def _trainer(seed=0, **overrides):
    return LocalTrainer(FedqConfig.from_mapping({**SMALL, **overrides}), seed=seed)


def test_planned_sample_rates_are_the_ones_the_updates_use():
    trainer = _trainer(**{"train-frequency": 3, "gradient-steps": 2, "learning-starts": 50})
    for n_steps in (120, 400):
        planned = extend(trainer.privacy.history, trainer.privacy.noise_multiplier,
                         trainer.privacy.sample_rates(trainer.planned_update_buffer_lengths(n_steps)))
        stats = trainer.train(n_steps)
        assert trainer.privacy.history == planned
        assert trainer.privacy.steps == trainer.counters.updates
    assert stats.updates == 400 // 3 * 2


def test_dp_updates_train_the_online_net_only_and_noise_does_not_follow_the_seed():
    a, b = (_trainer(seed=4, **{"target-update-interval": 1000}) for _ in range(2))
    before = [p.clone() for p in a.learner.target.parameters()]
    online_before = [p.clone() for p in a.learner.online.parameters()]
    a.train(140)
    b.train(140)  # same seed, same config: a non-private trainer would match exactly
    assert a.counters.updates == 40
    for t, t0 in zip(a.learner.target.parameters(), before, strict=True):
        assert torch.equal(t, t0) and t.grad is None
    assert not all(torch.equal(p, q) for p, q in zip(a.learner.online.parameters(),
                                                      online_before, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.learner.online.parameters(),
                                                      b.learner.online.parameters(),
                                                      strict=True))


def test_epsilon_after_a_restart_continues_from_the_saved_ledger(tmp_path):
    trainer = _trainer(seed=1)
    first = trainer.train(300).privacy
    trainer.save(tmp_path)
    restarted = _trainer(seed=1)
    assert restarted.load(tmp_path)
    assert restarted.privacy.epsilon() == first.epsilon > 0
    second = restarted.train(300).privacy
    both_rounds, second_alone = RDPAccountant(), RDPAccountant()
    both_rounds.history = [*first.round_history, *second.round_history]
    second_alone.history = list(second.round_history)
    assert second.epsilon == pytest.approx(both_rounds.get_epsilon(1e-5), rel=1e-9)
    assert second.epsilon > max(first.epsilon, second_alone.get_epsilon(1e-5))
    assert second.steps_total == first.steps_total + 300


def test_updates_made_without_dp_void_the_guarantee(tmp_path):
    plain = _trainer(**{"dp-enabled": False})
    plain.train(200)
    plain.save(tmp_path)
    private = _trainer(**{"dp-target-epsilon": 50.0})
    private.load(tmp_path)
    assert private.privacy.epsilon() == math.inf
    with pytest.raises(PrivacyBudgetExhausted, match="100 earlier updates were made without DP"):
        private.train(100)


# --- through the ClientApp, as a federation sees it ----------------------------------------
def _run_config(tmp_path, **overrides):
    return {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path), **overrides}


def _train_message(partition, local_steps=300):
    torch.manual_seed(0)
    weights = ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())
    return instruction(partition, "train", RecordDict(
        {"arrays": weights, "config": ConfigRecord({"local-steps": local_steps})}))


def _reconstructed_epsilon(replies, accountant, delta, **options):
    accountant.history = [
        (n, q, k) for m in replies
        for n, q, k in zip(m["dp-round-noise-multipliers"], m["dp-round-sample-rates"],
                           m["dp-round-steps"], strict=True)]
    return accountant.get_epsilon(delta, **options)


@pytest.mark.slow  # 6 DP training rounds through the ClientApp
def test_every_devices_epsilon_is_reconstructed_from_its_logged_replies(tmp_path):
    """Each handler call loads the device from disk: every round is a client restart."""
    run_config = _run_config(tmp_path)
    devices = {0: {}, 1: {"dp-noise-multiplier": 1.7, "dp-delta": 1e-6, "batch-size": 32}}
    logged = {partition: [] for partition in devices}
    for _round in range(3):
        for partition, node in devices.items():
            reply = app(_train_message(partition), device_context(partition, run_config, **node))
            assert not reply.has_error()
            logged[partition].append(dict(reply.content["metrics"]))
    for replies in logged.values():
        epsilons = [m["dp-epsilon"] for m in replies]
        assert epsilons[0] < epsilons[1] < epsilons[2]  # cumulative, never reset
        delta = replies[-1]["dp-delta"]
        for k in range(1, 4):
            assert epsilons[k - 1] == pytest.approx(
                _reconstructed_epsilon(replies[:k], RDPAccountant(), delta), rel=1e-9)
        assert replies[-1]["dp-steps-total"] == sum(sum(m["dp-round-steps"]) for m in replies)
    # each device accounts with its own node config
    assert logged[1][0]["dp-noise-multiplier"] == 1.7 and logged[1][0]["dp-delta"] == 1e-6
    assert logged[1][0]["dp-sample-rate"] == pytest.approx(2 * logged[0][0]["dp-sample-rate"])


def test_prv_accountant_is_selectable_and_reconstructible(tmp_path):
    # buffer full before the first update: one sample rate, so PRV stays fast
    run_config = _run_config(tmp_path, **{"dp-accountant": "prv", "learning-starts": 600})
    replies = [dict(app(_train_message(0, local_steps=700), device_context(0, run_config))
                    .content["metrics"]) for _ in range(2)]
    assert replies[0]["dp-epsilon"] < replies[1]["dp-epsilon"]
    assert replies[1]["dp-epsilon"] == pytest.approx(
        _reconstructed_epsilon(replies, PRVAccountant(), 1e-5, eps_error=PRV_EPS_ERROR),
        rel=1e-9)
    rdp = _reconstructed_epsilon(replies, RDPAccountant(), 1e-5)
    assert replies[1]["dp-epsilon"] < rdp  # PRV is the tighter bound


def test_a_device_declines_the_round_that_would_exceed_its_budget(tmp_path):
    planner = _trainer()
    lengths = planner.planned_update_buffer_lengths(600)
    noise, rates = planner.privacy.noise_multiplier, planner.privacy.sample_rates(lengths)
    one_round = planner.privacy.epsilon(extend([], noise, rates[:200]))
    two_rounds = planner.privacy.epsilon(extend([], noise, rates))
    run_config = _run_config(tmp_path)
    context = device_context(0, run_config, **{"dp-target-epsilon": (one_round + two_rounds) / 2})

    first = app(_train_message(0), context)
    assert first.content["metrics"]["dp-epsilon"] == pytest.approx(one_round, rel=1e-9)
    state_dir = tmp_path / "devices" / "partition-0"
    saved = (state_dir / "CURRENT").read_text()
    declined = app(_train_message(0), context)
    assert declined.has_error() and declined.error.code == PRIVACY_BUDGET_ERROR_CODE
    assert "dp-target-epsilon" in declined.error.reason and f"{one_round:.4g}" in \
        declined.error.reason
    assert (state_dir / "CURRENT").read_text() == saved  # nothing trained, nothing saved
    history = json.loads((state_dir / saved / "privacy.json").read_text())["history"]
    assert sum(k for _, _, k in history) == 200
    weights = _train_message(0).content["arrays"]
    evaluation = app(instruction(0, "evaluate", RecordDict(
        {"arrays": weights, "config": ConfigRecord({"server-round": 2})})), context)
    assert not evaluation.has_error()
    assert evaluation.content["metrics"]["num-examples"] == run_config["eval-episodes"]


@pytest.mark.slow  # bisects the noise over the accountant, then 500 DP updates
def test_noise_multiplier_derived_from_planned_updates_spends_the_target(tmp_path):
    run_config = _run_config(tmp_path, **{"dp-target-epsilon": 4.0, "dp-planned-updates": 500})
    context = device_context(0, run_config)
    replies = [app(_train_message(0), context) for _ in range(3)]
    r1, r2 = (dict(r.content["metrics"]) for r in replies[:2])
    assert r1["dp-noise-multiplier"] == r2["dp-noise-multiplier"] > 0  # kept across restarts
    assert r2["dp-steps-total"] == 500
    assert 4.0 - 0.011 <= r2["dp-epsilon"] <= 4.0  # the plan spends the budget, no more
    assert r2["dp-epsilon"] == pytest.approx(
        _reconstructed_epsilon([r1, r2], RDPAccountant(), 1e-5), rel=1e-9)
    assert replies[2].has_error() and "dp-target-epsilon 4" in replies[2].error.reason


def test_the_servers_fedavg_aggregates_the_others_when_a_device_declines(tmp_path):
    run_config = _run_config(tmp_path)
    config = FedqConfig.from_mapping(run_config)
    replies = [
        app(_train_message(0), device_context(0, run_config, **{"dp-target-epsilon": 0.01})),
        app(_train_message(1), device_context(1, run_config, **{"dp-enabled": False})),
    ]
    assert replies[0].has_error() and not replies[1].has_error()
    assert replies[1].content["metrics"]["dp-epsilon"] == math.inf  # no DP, no guarantee
    strategy = build_strategy(config)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients"] == 1
    assert strategy.aggregate_train(2, replies[:1]) == (None, None)  # server keeps its model
    private = app(_train_message(2), device_context(2, run_config))  # DP next to a plain device
    _, mixed = strategy.aggregate_train(3, [replies[1], private])  # same metric keys
    assert mixed["clients"] == 2


# --- central DP settings and the server's privacy log ---------------------------------------
@pytest.mark.parametrize(("mapping", "key", "message"), [
    ({"central-dp": "secagg"}, "central-dp", "one of"),
    ({"central-dp-noise-multiplier": -1.0}, "central-dp-noise-multiplier", "must be >= 0"),
    ({"central-dp-clip-norm": 0.0}, "central-dp-clip-norm", "must be > 0"),
    ({"central-dp": "server-fixed"}, "central-dp-clients", "must be >= 1"),
    ({"central-dp": "client-fixed", "central-dp-clients": 2, "update-compression": "int8"},
     "update-compression", "use none"),
    ({"central-dp": "server-fixed", "central-dp-clients": 2, "strategy": "fedmedian"},
     "strategy", "not one"),
])
def test_bad_central_dp_settings_name_the_key(mapping, key, message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        FedqConfig.from_mapping(mapping)
    assert message in str(err.value)


def test_privacy_log_keeps_dp_devices_and_budget_declines_and_resumes_cleanly(tmp_path):
    from fedq.server.privacy_log import PrivacyLog, read_privacy_log
    from tests._replies import error_reply, reply, train_metrics

    weights = {"w": np.zeros(2, np.float32)}
    private = train_metrics()
    private.update({"dp-enabled": 1, "dp-epsilon": 1.5, "dp-delta": 1e-5,
                    "dp-round-steps": [10], "partition-id": 0})
    plain = train_metrics()
    plain.update({"dp-enabled": 0, "dp-epsilon": math.inf})
    declined = Message(Error(code=PRIVACY_BUDGET_ERROR_CODE, reason="privacy budget: ..."),
                       metadata=error_reply(3).metadata)
    replies = [reply(1, weights, private), reply(2, weights, plain), declined,
               error_reply(4, "crashed")]  # another error: not a privacy event
    log = PrivacyLog(tmp_path, first_round=1)
    assert log.record(1, replies) == {"declined": 1, "declined-nodes": [3], "refused": 0,
                                      "refused-nodes": []}
    log.record(2, replies[:1])
    rows = read_privacy_log(tmp_path)
    assert [(r["round"], r["node-id"], r["status"]) for r in rows] == [
        (1, 1, "trained"), (1, 3, "declined"), (2, 1, "trained")]
    assert rows[0]["dp-epsilon"] == 1.5 and rows[0]["dp-round-steps"] == [10]
    PrivacyLog(tmp_path, first_round=2)  # a server resuming after round 1 redoes round 2
    assert [r["round"] for r in read_privacy_log(tmp_path)] == [1, 1]


def test_central_epsilon_composes_the_released_rounds_with_opacus():
    """Central DP's (epsilon, delta) is that of one Gaussian release per round that
    produced a model (no sampling amplification claimed), as Opacus computes it."""
    config = FedqConfig.from_mapping({"central-dp": "server-fixed", "central-dp-clients": 4,
                                      "central-dp-noise-multiplier": 2.0})
    accountant = RDPAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=2.0, sample_rate=1.0)
    report = central_dp_report(config, 10)
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(config.dp_delta))
    assert report["released-rounds"] == 10 and report["delta"] == config.dp_delta
    assert central_dp_report(config, 0)["epsilon"] == 0.0
    assert central_dp_report(config, 20)["epsilon"] > report["epsilon"]


def test_a_resume_keeps_a_damaged_privacy_log_aside_instead_of_dropping_it(tmp_path, caplog):
    """Issue 16: a garbled ``privacy.jsonl`` (a torn append, a damaged disk block) must not
    vanish on resume: its unreadable lines and the rows of rounds the resume repeats move
    to ``privacy.superseded.jsonl`` with a warning naming the file, as metrics.jsonl's do;
    before, a resume rewrote the file without them and the devices' recorded epsilon went."""
    from fedq.server.privacy_log import FILE_NAME, SUPERSEDED_FILE_NAME, PrivacyLog

    path = tmp_path / FILE_NAME
    rows = [{"round": 1, "node-id": 7, "status": "trained", "dp-epsilon": 0.5},
            {"round": 2, "node-id": 7, "status": "trained", "dp-epsilon": 0.9}]
    garbage = "\x00\x17garbage{"
    path.write_text(json.dumps(rows[0]) + "\n" + garbage + "\n" + json.dumps(rows[1]) + "\n")
    with caplog.at_level(logging.WARNING):
        PrivacyLog(tmp_path, first_round=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:1]
    aside = [json.loads(line) for line in
             (tmp_path / SUPERSEDED_FILE_NAME).read_text().splitlines()]
    assert [a.get("torn-line") for a in aside if "torn-line" in a] == [garbage]
    assert [a["round"] for a in aside if "round" in a] == [2]
    assert FILE_NAME in caplog.text and SUPERSEDED_FILE_NAME in caplog.text


def test_a_resume_names_a_missing_privacy_log_of_a_run_with_dp_devices(tmp_path, caplog):
    """A removed ``privacy.jsonl`` loses the server's record of every DP device's epsilon:
    the resume says so (clients.jsonl shows DP devices replied) rather than starting an
    empty log silently; a run without DP devices gets no warning."""
    from fedq.server.privacy_log import PrivacyLog

    clients = tmp_path / "clients.jsonl"
    clients.write_text(json.dumps({"round": 1, "node-id": 7, "dp-enabled": 0}) + "\n")
    with caplog.at_level(logging.WARNING):
        PrivacyLog(tmp_path, first_round=2)
    assert "privacy.jsonl is missing" not in caplog.text
    clients.write_text(json.dumps({"round": 1, "node-id": 7, "dp-enabled": 1}) + "\n")
    with caplog.at_level(logging.WARNING):
        PrivacyLog(tmp_path, first_round=2)
    assert "privacy.jsonl is missing" in caplog.text
