"""``bench cnn`` and ``bench secagg`` on the harness. cnn's quick variant times a real
edge-cnn's plain and DP-SGD updates on CarRacing-sized frames, the CarRacing-v3 training
loop against the env alone, and, where the export extra is installed, the network's ONNX
formats, and writes them as one result with the exact command. secagg's cells alternate
the modes repeat by repeat (so load drift hits each alike) and its table pools each mode's
repeats against the plain runs; its runs are Flower simulations (~45 s each here), which
the engine tests already exercise, so its cells are checked here without running them."""

import json

import pytest

from fedq.common.export.onnx_export import onnx_available
from fedq.simulations import bench
from fedq.simulations.bench_secagg import MODES, SECAGG_RUN, cells, summarise
from fedq.simulations.harness import BENCHMARKS, resolve_params


@pytest.mark.slow  # a CNN on 4 x 84 x 84 frames and a CarRacing env: ~15 s
def test_bench_quick_times_the_cnn_updates_the_carracing_loop_and_its_exports(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["cnn", "--quick"]) == 0
    folder = tmp_path / "runs" / "harness" / "quick" / "cnn"
    record = json.loads((folder / "results.json").read_text())
    assert record["command"] == "python -m fedq.simulations.bench cnn --quick --workers 1"
    [update] = record["summary"]
    assert update["network"] == "edge-cnn" and update["parameters"] == 344_885
    assert update["plain_update_ms"] > 0 and update["dp_over_plain"] > 0
    [loop] = record["loop"]
    assert loop["env_steps"] == 40 and loop["updates"] > 0
    # speeds, not a bound on them: 40 steps timed on a loaded CI machine can put the loop
    # (env + updates) above the env alone, so only the ratio's arithmetic is checked
    assert loop["loop_steps_per_s"] > 0 and loop["env_only_steps_per_s"] > 0
    assert loop["loop_over_env_only"] == pytest.approx(
        loop["loop_steps_per_s"] / loop["env_only_steps_per_s"], rel=0.01)
    formats = {row["format"]: row for row in record["export"]}
    if onnx_available():
        assert set(formats) == {"onnx", "onnx-fp16", "onnx-int8"}
        assert formats["onnx"]["agreement"] == 1.0
        assert formats["onnx-int8"]["bytes"] < formats["onnx"]["bytes"] / 3
    else:
        assert not formats
        assert "export extra" in (folder / "results.md").read_text()


def test_secagg_cells_alternate_the_modes_repeat_by_repeat():
    benchmark = BENCHMARKS["secagg"]
    declared = cells(resolve_params(benchmark, {}, quick=False))
    assert [(c.params["repeat"], c.params["mode"]) for c in declared] == \
        [(repeat, mode) for repeat in (0, 1) for mode in MODES]
    assert all(c.kind is SECAGG_RUN and c.params["clients"] == 4 for c in declared)


def test_secagg_table_pools_the_repeats_of_each_mode_against_plain():
    def run(mode, train, whole, sent):
        return {"mode": mode, "train-phase-seconds": train, "round-seconds": whole,
                "train-bytes-per-device-round": sent, "train-messages-per-device-round":
                1.0 if mode == "plain" else 4.0, "central-dp": None}

    params = resolve_params(BENCHMARKS["secagg"], {}, quick=False)
    done = [(None, run("plain", [1.0, 1.0], [2.0, 2.0], 100.0)),
            (None, run("secagg+", [3.0, 1.0], [3.0, 3.0], 200.0)),
            (None, run("plain", [1.0, 1.0], [2.0, 2.0], 100.0)),
            (None, run("secagg+", [2.0, 2.0], [3.0, 3.0], 220.0))]
    rows = {row["mode"]: row for row in summarise(params, done).rows}
    assert rows["plain"]["train phase vs plain"] == 1.0
    assert rows["secagg+"]["train phase s (median)"] == 2.0  # median of 3, 1, 2, 2
    assert rows["secagg+"]["round vs plain"] == 1.5
    assert rows["secagg+"]["bytes vs plain"] == 2.1  # median of 200 and 220
    assert rows["secagg+"]["train replies per device per round"] == 4.0


def test_deployment_variants_share_their_federations_and_refuse_bad_parameters():
    from fedq.simulations.bench_deployment import DEPLOYED_FEDERATION
    from fedq.simulations.bench_deployment import cells as deployment_cells
    from fedq.simulations.harness import HarnessError, cell_key

    def keys(name, **overrides):
        params = resolve_params(BENCHMARKS[name], overrides, quick=False)
        return {cell_key(c) for c in deployment_cells(params)}

    main, quiet = keys("deployment"), keys("deployment_quiet")
    assert len(main) == 4 and len(quiet) == 6
    assert len(main & quiet) == 2  # the fused federations of repeat 0 run once for both
    params = resolve_params(BENCHMARKS["deployment"], {}, quick=True)
    assert [c.kind for c in deployment_cells(params)] == [DEPLOYED_FEDERATION]
    with pytest.raises(HarnessError, match="rounds: must be >= 3"):
        deployment_cells({**params, "rounds": 2})
    with pytest.raises(HarnessError, match="setups: unknown \\['fusd'\\]"):
        deployment_cells({**params, "setups": "fusd"})


def test_cnn_networks_are_checked_against_the_registrys_image_networks():
    """A typo or an MLP in ``networks`` fails when the cells are declared, naming the
    parameter and the networks it may hold, instead of inside a cell."""
    from fedq.simulations.bench_cnn import cells as cnn_cells
    from fedq.simulations.harness import HarnessError

    params = resolve_params(BENCHMARKS["cnn"], {}, quick=False)
    assert [c.params["network"] for c in cnn_cells(params)] == ["edge-cnn", "nature-cnn"]
    for bad in ("edge-cn", "mlp"):
        with pytest.raises(HarnessError, match=f"networks: unknown \\['{bad}'\\]; "
                                               "known: nature-cnn, edge-cnn"):
            cnn_cells({**params, "networks": bad})
