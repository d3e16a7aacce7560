"""Secure aggregation (SecAgg+) and distributed DP, driven in-process: the server's real
train phase (:func:`server.secure_aggregation.train_securely`, Flower's SecAggPlusWorkflow)
talks to fedq's real ClientApp (Flower's secaggplus_mod, real DQN training) through
:class:`_local_grid.LocalGrid`. A test-only train mod records each device's plain reply
inside the protocol, so the test knows what the server must not see and what the
unmasked aggregate must equal."""

import math

import numpy as np
import pytest
import torch
from _local_grid import FIRST_NODE, LocalGrid
from _replies import as_numpy, device_context, instruction
from _round_loop import run_in_process
from _uniform import looks_uniform
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedq.client.client_app import build_client_app
from fedq.client.secure_aggregation import noised_update
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.privacy import epsilon_of
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE
from fedq.common.secure_aggregation import (
    effective_noise_multiplier,
    min_clipping_range,
    noise_share_std,
)
from fedq.server.central_dp import central_dp_report
from fedq.server.secure_aggregation import train_securely
from fedq.server.sequential import DeviceOrder
from fedq.server.server_app import build_strategy

TINY = {"hidden-sizes": "16,16", "buffer-size": 200, "batch-size": 8, "learning-starts": 20,
        "target-update-interval": 20, "exploration-steps": 60, "local-steps": 60,
        "eval-episodes": 1, "validate-updates": False, "secure-aggregation": True,
        "secagg-num-shares": 4, "secagg-reconstruction-threshold": 3}
DEVICES = 4


def _config(tmp_path, **overrides) -> dict:
    return {**FedqConfig().to_mapping(), **TINY, "run-dir": str(tmp_path), **overrides}


class PlainReplies:
    """A train mod inside SecAgg+: the reply each device trained, before masking."""

    def __init__(self) -> None:
        self.by_node: dict[int, Message] = {}

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        self.by_node[context.node_id] = reply
        return reply


def _global() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())


def _secure_round(tmp_path, offline_from=None, **overrides):
    run_config = _config(tmp_path, **overrides)
    config = FedqConfig.from_mapping(run_config)
    plain = PlainReplies()
    grid = LocalGrid(build_client_app([plain]), run_config, DEVICES, offline_from)
    arrays = _global()
    phase = train_securely(grid, build_strategy(config), config, DeviceOrder(), arrays,
                           ConfigRecord({"local-steps": config.local_steps,
                                         "update-compression": "none"}), 1)
    return phase, plain, grid, arrays


def _updates(plain: PlainReplies, arrays: ArrayRecord) -> dict[int, np.ndarray]:
    """Each device's plain update w_i - w_global, flattened."""
    start = as_numpy(arrays)
    return {node: np.concatenate([(as_numpy(r.content["arrays"])[k].astype(np.float64)
                                   - start[k]).ravel() for k in start])
            for node, r in plain.by_node.items()}


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in as_numpy(record).values()])


# --- the aggregate ---------------------------------------------------------------------------
def test_the_unmasked_aggregate_is_fedavg_of_the_updates_within_quantisation_error(
        tmp_path, server_process):
    phase, plain, _, arrays = _secure_round(tmp_path)
    assert phase.arrays is not None and len(phase.screening.accepted) == DEVICES
    updates = _updates(plain, arrays)
    weights = {n: r.content["metrics"]["num-examples"] for n, r in plain.by_node.items()}
    fedavg = sum(weights[n] * u for n, u in updates.items()) / sum(weights.values())
    got = _flat(phase.arrays) - _flat(arrays)
    # stochastic rounding moves each device's coordinate by < one quantisation level
    level = 2 * 8.0 / 4194304
    assert np.max(np.abs(got - fedavg)) <= level + 1e-6
    assert np.max(np.abs(fedavg)) > 100 * level  # the devices did move the model
    assert phase.metrics["clients"] == DEVICES and phase.metrics["secagg-masked-devices"] == 4


def test_the_server_never_receives_an_individual_update(tmp_path, server_process):
    phase, plain, grid, _ = _secure_round(tmp_path)
    assert phase.arrays is not None and len(plain.by_node) == DEVICES
    vectors = []
    for reply in grid.received:  # every reply of the four stages, as the server got it
        assert not reply.has_error()
        assert all(len(record) == 0 for record in reply.content.array_records.values()), \
            "a reply carries a parameter array"
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            vectors.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                           configs[Key.MASKED_PARAMETERS]]).astype(np.float64))
    assert len(vectors) == DEVICES
    # each masked vector is uniform mod 2**32; the update, quantised as SecAgg+ does (its
    # coordinates near the middle level 2**21 of 2**22), does not show through
    for vector in vectors:
        assert looks_uniform(vector.mean() / 2**32, vector.std() / 2**32, vector.size)
        assert np.mean(np.abs(vector[1:] - 2**21) < 2**16) < 0.01


# --- dropouts -------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS])
def test_a_device_going_offline_mid_protocol_is_tolerated_up_to_the_threshold(
        tmp_path, server_process, stage):
    lost = FIRST_NODE + 2
    phase, plain, _, arrays = _secure_round(tmp_path, offline_from={lost: stage})
    assert phase.arrays is not None  # 4 - 1 >= threshold 3: the round is released
    survivors = {n: u for n, u in _updates(plain, arrays).items() if n != lost}
    assert len(survivors) == 3 and lost not in {m.metadata.src_node_id
                                                for m in phase.screening.accepted}
    mean = sum(survivors.values()) / 3  # equal local-steps: equal weights
    assert np.max(np.abs(_flat(phase.arrays) - _flat(arrays) - mean)) <= 2 * 8.0 / 4194304 + 1e-6
    # a device lost after its masked vector is in still counts
    late, _, _, _ = _secure_round(tmp_path / "late", offline_from={lost: Stage.UNMASK})
    assert late.arrays is not None and len(late.screening.accepted) == DEVICES


def test_more_dropouts_than_the_threshold_allows_release_nothing(tmp_path, server_process):
    phase, _, _, _ = _secure_round(tmp_path, offline_from={
        FIRST_NODE + 1: Stage.COLLECT_MASKED_VECTORS, FIRST_NODE + 2: Stage.COLLECT_MASKED_VECTORS})
    assert phase.arrays is None  # 2 of 4 left < threshold 3: the global model is kept
    assert phase.sent == DEVICES


# --- distributed DP ---------------------------------------------------------------------------
DP = {"central-dp": "distributed", "central-dp-clients": DEVICES,
      "central-dp-noise-multiplier": 100.0, "central-dp-clip-norm": 0.01}


@pytest.mark.parametrize("offline", [False, True])
def test_distributed_dp_the_unmasked_sum_carries_the_calibrated_noise(
        tmp_path, server_process, offline):
    lost = FIRST_NODE + 3
    phase, plain, _, arrays = _secure_round(
        tmp_path, offline_from={lost: Stage.COLLECT_MASKED_VECTORS} if offline else None, **DP)
    contributed = DEVICES - int(offline)
    assert phase.arrays is not None
    clipped = [u * min(1.0, 0.01 / np.linalg.norm(u))
               for n, u in _updates(plain, arrays).items() if n != lost or not offline]
    noise = (_flat(phase.arrays) - _flat(arrays)) * contributed - sum(clipped)
    expected = 100.0 * 0.01 * math.sqrt(contributed / DEVICES)  # sigma C sqrt(k / n)
    assert noise.std() == pytest.approx(expected, rel=0.15)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert phase.noise_multiplier == pytest.approx(100.0 * math.sqrt(contributed / DEVICES))


def test_a_devices_noise_share_is_clipped_update_plus_sigma_c_over_root_n():
    rng = np.random.default_rng(0)
    update = [np.full((100, 100), 1.0), np.full(100, 1.0)]  # norm ~100, clipped to 2
    noised = noised_update(update, 3.0, 2.0, 9, rng=rng)
    flat = np.concatenate([a.ravel() for a in noised])
    signal = 2.0 / math.sqrt(10100)
    assert (flat - signal).std() == pytest.approx(3.0 * 2.0 / 3.0, rel=0.03)
    assert (flat - signal).mean() == pytest.approx(0.0, abs=0.05)
    assert noise_share_std(3.0, 2.0, 9) == pytest.approx(2.0)
    # nine shares of std 2 sum to std 6 = sigma C; with 4 of 9 the multiplier is 3 x 2/3
    assert math.sqrt(9) * noise_share_std(3.0, 2.0, 9) == pytest.approx(3.0 * 2.0)
    assert effective_noise_multiplier(3.0, 4, 9) == pytest.approx(2.0)
    small = noised_update([np.full(4, 0.1)], 0.0, 2.0, 1)  # inside the norm: unchanged
    assert np.allclose(small[0], 0.1)


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field"), [
    ({"strategy": "fedmedian"}, "strategy"),
    ({"strategy": "fedtrimmedavg"}, "strategy"),
    ({"strategy": "krum"}, "strategy"),
    ({"strategy": "sequential"}, "strategy"),
    ({"validate-updates": True}, "validate-updates"),
    ({"update-compression": "int8"}, "update-compression"),
    ({"central-dp": "server-fixed", "central-dp-clients": 4}, "central-dp"),
    ({"central-dp": "client-fixed", "central-dp-clients": 4}, "central-dp"),
    ({"secure-aggregation": False, "central-dp": "distributed", "central-dp-clients": 4},
     "central-dp"),
    ({"secagg-num-shares": 2}, "secagg-num-shares"),
    ({"secagg-reconstruction-threshold": 4}, "secagg-reconstruction-threshold"),
    ({"secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold"),
    ({"secagg-quantization-range": 2**32}, "secagg-quantization-range"),
    ({**DP, "secagg-clipping-range": 1.0}, "secagg-clipping-range"),
])
def test_incompatible_settings_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        FedqConfig.from_mapping(_config(tmp_path, **overrides))
    assert err.value.key == field


def test_compatible_settings_pass_and_the_clipping_floor_covers_the_noise(tmp_path):
    config = FedqConfig.from_mapping(_config(tmp_path, **DP))
    # 0.01 + 8 stds of 100 x 0.01 / 2
    assert min_clipping_range(config) == pytest.approx(0.01 + 8 * 0.5)
    FedqConfig.from_mapping(_config(tmp_path, strategy="fedprox", **{"proximal-mu": 0.1}))


# --- a device that requires secure aggregation ------------------------------------------------
def test_a_device_requiring_secagg_refuses_a_plain_train_message(tmp_path, server_process):
    run_config = _config(tmp_path, **{"secure-aggregation": False})
    context = device_context(0, run_config, **{"privacy-require-secagg": True})
    message = instruction(0, "train", RecordDict({"arrays": _global(),
                                                  "config": ConfigRecord({"local-steps": 60})}))
    answer = build_client_app()(message, context)
    assert answer.has_error() and answer.error.code == PRIVACY_POLICY_ERROR_CODE
    assert "privacy-require-secagg" in answer.error.reason
    assert not (tmp_path / "devices").exists() or not any((tmp_path / "devices").rglob("CURRENT"))
    # the run config can require it too (tighten), but never waive a device's requirement
    waived = device_context(0, {**run_config, "privacy-require-secagg": False},
                            **{"privacy-require-secagg": True})
    assert build_client_app()(message, waived).has_error()


def test_a_device_refusing_inside_the_protocol_answers_with_its_own_error(
        tmp_path, server_process):
    """A device whose policy refuses the round (here: it requires DP, the run has none)
    answers the masked-vector stage with its policy error, which the server's privacy
    log reads as for a plain round; the others' sum is released."""
    overrides = '{"3": {"privacy-dp-required": true}}'
    phase, _, _, _ = _secure_round(tmp_path, **{"client-overrides": overrides})
    assert phase.arrays is not None and len(phase.screening.accepted) == 3
    (refused,) = [m for m in phase.replies if m.has_error()]
    assert refused.metadata.src_node_id == FIRST_NODE + 3
    assert refused.error.code == PRIVACY_POLICY_ERROR_CODE
    assert "privacy-dp-required" in refused.error.reason


def test_the_round_loop_accounts_each_released_sum_with_the_noise_it_holds(
        tmp_path, server_process):
    """fedq's round loop (run_rounds) over SecAgg+ with distributed DP: a device lost in
    round 1's masked-vector stage stays away (round 2 it does not even answer the setup,
    which Flower's own workflow would halt on), so both rounds release a sum of 3 of the
    4 expected noise shares; each is accounted at sigma sqrt(3/4), not sigma."""
    run_config = {**_config(tmp_path, **DP), "num-server-rounds": 2}
    grid = LocalGrid(build_client_app(), run_config, DEVICES,
                     offline_from={FIRST_NODE + 3: Stage.COLLECT_MASKED_VECTORS})
    rows, _, _ = run_in_process(tmp_path, grid, rounds=2, **{
        k: v for k, v in run_config.items() if k not in ("num-server-rounds", "run-dir")})
    reduced = 100.0 * math.sqrt(3 / 4)
    assert [r["train"]["secagg-masked-devices"] for r in rows] == [3, 3]
    report = rows[-1]["central-dp"]
    assert report["released-rounds"] == 2
    assert report["released-noise-multipliers"] == pytest.approx([reduced, reduced])
    assert report["epsilon"] == pytest.approx(
        epsilon_of("rdp", report["delta"], ((reduced, 1.0, 1), (reduced, 1.0, 1))))
    assert report["epsilon"] > central_dp_report(FedqConfig.from_mapping(run_config), 2)[
        "epsilon"]  # what sigma itself would have claimed
    assert {f["node-id"] for r in rows for f in r["device-failures"]} == {FIRST_NODE + 3}
