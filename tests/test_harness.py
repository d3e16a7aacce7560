"""The benchmark harness (simulations/harness.py, simulations/bench.py): a cell runs once
and is reused until its parameters or its code change; a benchmark killed mid-cell goes
on with its unfinished cells; results carry the exact command and the environment; every
ported benchmark has a quick variant, and the cheap one runs here end to end."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedq.simulations import bench
from fedq.simulations.harness import (
    BENCHMARKS,
    Benchmark,
    Cell,
    CellKind,
    HarnessError,
    Summary,
    fingerprint,
    resolve_params,
    run_benchmark,
    staleness,
)
from fedq.simulations.results_io import RESULTS_ROOT, environment

PROBE = textwrap.dedent('''
    """A probe benchmark: cells that log each run and can be told to die mid-cell."""
    import os
    import signal
    from pathlib import Path

    from fedq.simulations.harness import Benchmark, Cell, CellKind, Summary

    VERSION = 1

    def run(params, workdir):
        stale = sorted(p.name for p in workdir.iterdir())
        (workdir / "partial").write_text("half-way")
        log = Path(params["log"])
        with log.open("a") as f:
            f.write(f"{params['seed']}\\n")
        if (log.parent / f"kill-at-{params['seed']}").exists():
            (log.parent / f"kill-at-{params['seed']}").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"value": params["seed"] * params["scale"], "stale": stale}

    KIND = CellKind("probe", run, code=("harness_probe",))

    def cells(params):
        return [Cell(KIND, {"seed": s, "scale": params["scale"], "log": params["log"]})
                for s in range(params["seeds"])]

    def summarise(params, done):
        rows = [{"seed": c.params["seed"], "value": r["value"]} for c, r in done]
        return Summary(rows, ["seed", "value"], "probe text",
                       plot=lambda path: path.write_bytes(b"png"))

    BENCHMARK = Benchmark("probe", "a probe", {"seeds": 3, "scale": 2, "log": ""},
                          {"seeds": 1}, cells, summarise)
''')


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """The probe module on sys.path, its log file, and the benchmark's overrides."""
    module = tmp_path / "harness_probe.py"
    module.write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("harness_probe", None)
    import harness_probe

    yield harness_probe, module, {"log": str(tmp_path / "runs.log")}
    sys.modules.pop("harness_probe", None)


def _runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "runs.log"
    return log.read_text().split() if log.exists() else []


def _run(benchmark: Benchmark, tmp_path: Path, **kwargs):
    return run_benchmark(benchmark, cache_root=tmp_path / "cache",
                         results_root=tmp_path / "results", log=lambda _: None,
                         command="python -m fedq.simulations.bench probe", **kwargs)


def test_a_cell_is_reused_until_its_parameters_or_code_change(probe, tmp_path):
    module, path, overrides = probe
    first = _run(module.BENCHMARK, tmp_path, overrides=overrides)
    assert (first.ran, first.cached) == (3, 0)
    again = _run(module.BENCHMARK, tmp_path, overrides=overrides)
    assert (again.ran, again.cached) == (0, 3)
    assert _runs(tmp_path) == ["0", "1", "2"]  # nothing ran the second time
    wider = _run(module.BENCHMARK, tmp_path, overrides={**overrides, "seeds": 4})
    assert (wider.ran, wider.cached) == (1, 3)  # only the new seed
    rescaled = _run(module.BENCHMARK, tmp_path, overrides={**overrides, "scale": 3})
    assert (rescaled.ran, rescaled.cached) == (3, 0)
    path.write_text(PROBE.replace("VERSION = 1", "VERSION = 2"))  # the code changed
    recoded = _run(module.BENCHMARK, tmp_path, overrides={**overrides, "scale": 3})
    assert (recoded.ran, recoded.cached) == (3, 0)
    fresh = _run(module.BENCHMARK, tmp_path, overrides={**overrides, "scale": 3}, fresh=True)
    assert (fresh.ran, fresh.cached) == (3, 0)


def test_stale_says_whether_todays_code_reproduces_the_committed_results(probe, tmp_path):
    """``bench stale``: results are current while every recorded cell fingerprint is what
    today's code and the recorded parameters give, stale once the code changes."""
    module, path, overrides = probe
    _run(module.BENCHMARK, tmp_path, overrides=overrides)
    assert staleness(module.BENCHMARK, tmp_path / "results") == "current (3 cells)"
    path.write_text(PROBE.replace("VERSION = 1", "VERSION = 2"))
    assert staleness(module.BENCHMARK, tmp_path / "results") == \
        "stale: 3 of 3 cells ran on other code"
    assert staleness(module.BENCHMARK, tmp_path / "elsewhere") == "no committed results"


def test_a_killed_benchmark_resumes_with_its_unfinished_cells(probe, tmp_path):
    module, _, overrides = probe
    (tmp_path / "kill-at-1").touch()  # cell 1 dies half-way, as a killed process would
    script = ("from pathlib import Path\nimport harness_probe\n"
              "from fedq.simulations.harness import run_benchmark\n"
              f"run_benchmark(harness_probe.BENCHMARK, overrides={overrides!r}, "
              f"cache_root=Path({str(tmp_path / 'cache')!r}), "
              f"results_root=Path({str(tmp_path / 'results')!r}))\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert killed.returncode == -9
    cached = sorted(p.name for p in (tmp_path / "cache" / "probe").iterdir())
    assert len([n for n in cached if n.endswith(".json")]) == 1  # cell 0 finished
    assert len([n for n in cached if n.endswith(".work")]) == 2  # 0 kept, 1 half-way
    assert not (tmp_path / "results" / "probe").exists()
    resumed = _run(module.BENCHMARK, tmp_path, overrides=overrides)
    assert (resumed.ran, resumed.cached) == (2, 1)
    assert _runs(tmp_path) == ["0", "1", "1", "2"]  # cell 1 again from the start, then 2
    record = json.loads((resumed.folder / "results.json").read_text())
    assert [row["value"] for row in record["summary"]] == [0, 2, 4]
    cache = tmp_path / "cache" / "probe"
    stale = [json.loads(p.read_text())["result"]["stale"] for p in cache.glob("*.json")]
    assert stale == [[], [], []]  # cell 1's half-way file was wiped before it re-ran


def test_results_carry_the_command_the_environment_the_table_and_the_plot(probe, tmp_path):
    module, _, overrides = probe
    folder = _run(module.BENCHMARK, tmp_path, overrides=overrides).folder
    assert folder == tmp_path / "results" / "probe"
    record = json.loads((folder / "results.json").read_text())
    assert record["command"] == "python -m fedq.simulations.bench probe"
    assert {"python", "torch", "flwr", "cpu"} <= set(record["environment"])
    assert record["params"] == {"seeds": 3, "scale": 2, **overrides}
    assert len(record["cells"]) == 3 and all(len(c["fingerprint"]) == 16
                                             for c in record["cells"])
    markdown = (folder / "results.md").read_text()
    assert "Command: `python -m fedq.simulations.bench probe`" in markdown
    assert "'flwr': '1.42" in markdown and "| seed | value |" in markdown
    assert "probe text" in markdown and "![probe](plot.png)" in markdown
    assert (folder / "plot.png").read_bytes() == b"png"


def test_report_runs_nothing_and_marks_a_partial_table(probe, tmp_path):
    module, _, overrides = probe
    nothing = _run(module.BENCHMARK, tmp_path, overrides=overrides, report=True)
    assert (nothing.ran, nothing.missing, nothing.folder) == (0, 3, None)
    _run(module.BENCHMARK, tmp_path, overrides={**overrides, "seeds": 1})
    partial = _run(module.BENCHMARK, tmp_path, overrides=overrides, report=True)
    assert (partial.ran, partial.cached, partial.missing) == (0, 1, 2)
    assert "Partial: 2 cell(s) not run yet" in (partial.folder / "results.md").read_text()
    assert _runs(tmp_path) == ["0"]


def test_quick_results_never_overwrite_the_committed_ones(probe, tmp_path):
    module, _, overrides = probe
    report = run_benchmark(module.BENCHMARK, overrides=overrides, quick=True,
                           cache_root=tmp_path / "cache", log=lambda _: None)
    assert report.folder == tmp_path / "cache" / "quick" / "probe"
    assert _runs(tmp_path) == ["0"]  # the quick variant: one seed


def test_an_unknown_parameter_is_refused_naming_it(probe):
    module, _, _ = probe
    with pytest.raises(HarnessError, match=r"no parameter 'sedes' \(it has: seeds, scale"):
        resolve_params(module.BENCHMARK, {"sedes": 2}, quick=False)


def test_every_ported_benchmark_has_a_small_quick_variant():
    bench.load_benchmarks()
    for name, benchmark in BENCHMARKS.items():
        cells = benchmark.cells(resolve_params(benchmark, {}, quick=True))
        assert 1 <= len(cells) <= 5, name
        for cell in cells:
            if cell.kind.name == "federated-run":  # a few hundred env steps at most
                overrides = cell.params["overrides"]
                assert overrides["num-server-rounds"] * overrides["local-steps"] <= 200, name


def test_robustness_and_communication_share_their_clean_runs():
    bench.load_benchmarks()
    hashes: dict = {}

    def prints(name):
        benchmark = BENCHMARKS[name]
        cells = benchmark.cells(resolve_params(benchmark, {}, quick=False))
        return {fingerprint(c, hashes) for c in cells}

    clean_seeds = BENCHMARKS["robustness"].defaults["seeds"]
    assert BENCHMARKS["communication"].defaults["seeds"] == clean_seeds
    assert len(prints("robustness") & prints("communication")) == clean_seeds


def test_bench_quick_runs_the_dp_cost_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["dp_cost", "--quick"]) == 0
    folder = tmp_path / "runs" / "harness" / "quick" / "dp_cost"
    record = json.loads((folder / "results.json").read_text())
    assert record["command"] == "python -m fedq.simulations.bench dp_cost --quick --workers 1"
    updates = {row["update"]: row for row in record["summary"]}
    assert updates["non-private (DQNLearner)"]["x non-private"] == 1.0
    assert updates["fedq closed-form per-sample norms"]["updates timed"] == 20
    assert (folder / "plot.png").stat().st_size > 1000
    assert bench.main(["dp_cost", "--quick"]) == 0  # the second time from the cache
    assert "1 cells, 1 cached, 0 to run" in capsys.readouterr().out


def test_results_stamp_every_flag_the_command_ran_with(probe, tmp_path, monkeypatch):
    """The stamped command is the run's own: --quick, --fresh, --report, --workers and
    each --set, so pasting it reproduces the result (a stamp without --workers 2 or a
    --set would claim defaults the numbers did not come from)."""
    module, _, overrides = probe
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(BENCHMARKS, "probe", module.BENCHMARK)
    log = 'log="' + overrides["log"] + '"'
    assert bench.main(["probe", "--quick", "--fresh", "--workers", "2", "--set", "scale=5",
                       "--set", log]) == 0
    folder = tmp_path / "runs" / "harness" / "quick" / "probe"
    stamped = json.loads((folder / "results.json").read_text())["command"]
    assert stamped == ("python -m fedq.simulations.bench probe --quick --fresh --workers 2 "
                       f"--set=scale=5 '--set={log}'")
    assert f"Command: `{stamped}`" in (folder / "results.md").read_text()
    assert bench.main(["probe", "--quick", "--report", "--set", "scale=5", "--set", log]) == 0
    stamped = json.loads((folder / "results.json").read_text())["command"]
    assert stamped == ("python -m fedq.simulations.bench probe --quick --report --workers 1 "
                       f"--set=scale=5 '--set={log}'")
    assert _runs(tmp_path) == ["0"]  # the report ran nothing; the stamp still says --report


def test_results_root_keeps_a_trial_run_off_the_committed_results(probe, tmp_path,
                                                                   monkeypatch):
    """A full-size trial with other parameters (--set) must be able to write somewhere
    else than simulations/results/, and its stamp says where, so it reproduces."""
    module, _, overrides = probe
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(BENCHMARKS, "probe", module.BENCHMARK)
    trial = tmp_path / "trial"
    log = 'log="' + overrides["log"] + '"'
    assert bench.main(["probe", "--set", "scale=5", "--set", log,
                       "--results-root", str(trial)]) == 0
    record = json.loads((trial / "probe" / "results.json").read_text())
    assert record["command"].endswith(f"--results-root {trial}")
    assert not (RESULTS_ROOT / "probe").exists()


def test_bench_refuses_unknown_names_and_parameters(capsys):
    with pytest.raises(SystemExit):
        bench.main(["robustnes"])
    assert "unknown benchmark 'robustnes'" in capsys.readouterr().err
    assert bench.main(["robustness", "--set", "sedes=2"]) == 2
    assert "no parameter 'sedes'" in capsys.readouterr().err


def test_every_committed_result_folder_is_regenerated_by_bench_all():
    """`bench all` is the one command: each folder under simulations/results/ is a
    harness benchmark's, and every benchmark is on the harness."""
    bench.load_benchmarks()
    results = Path(bench.__file__).resolve().parent / "results"
    folders = sorted(p.name for p in results.iterdir() if p.is_dir())
    assert [folder for folder in folders if folder not in BENCHMARKS] == []


def _train(params, workdir):
    (workdir / "policy.txt").write_text(f"policy {params['steps']}")
    return {}


def _read(params, workdir):
    from fedq.simulations.harness import workdir_of

    trained = workdir_of(Cell(TRAIN, {"steps": params["steps"]}), workdir)
    return {"read": (trained / "policy.txt").read_text()}


TRAIN = CellKind("probe-train", _train, code=())
READ = CellKind("probe-read", _read, code=())


def test_a_cell_reads_the_files_of_a_cell_declared_before_it(tmp_path):
    def benchmark(order):
        return Benchmark("chain", "a chain", {"steps": 5}, {}, lambda p: [
            {"train": Cell(TRAIN, dict(p)), "read": Cell(READ, dict(p))}[k] for k in order],
            lambda p, done: Summary([r for _, r in done], ["read"]), parallel=False)

    with pytest.raises(HarnessError, match="has not finished: declare it before"):
        _run(benchmark(["read", "train"]), tmp_path)
    report = _run(benchmark(["train", "read"]), tmp_path)
    record = json.loads((report.folder / "results.json").read_text())
    assert record["summary"][1] == {"read": "policy 5"}


def test_workers_run_cells_in_parallel_processes_with_the_same_results(probe, tmp_path):
    module, _, overrides = probe
    report = _run(module.BENCHMARK, tmp_path, overrides=overrides, workers=2)
    assert (report.ran, report.cached) == (3, 0)
    assert sorted(_runs(tmp_path)) == ["0", "1", "2"]
    record = json.loads((report.folder / "results.json").read_text())
    assert [row["value"] for row in record["summary"]] == [0, 2, 4]  # declared order


def test_a_cell_declared_twice_runs_once_and_is_reported_twice(tmp_path):
    runs = []

    def count(params, workdir):
        runs.append(params["steps"])
        return {"steps": params["steps"]}

    kind = CellKind("probe-count", count, code=())
    twice = Benchmark("twice", "one cell twice", {"steps": 5}, {},
                      lambda p: [Cell(kind, dict(p)), Cell(kind, dict(p))],
                      lambda p, done: Summary([r for _, r in done], ["steps"]))
    report = _run(twice, tmp_path)
    assert (report.ran, report.missing, runs) == (1, 0, [5])
    assert json.loads((report.folder / "results.json").read_text())["summary"] == [
        {"steps": 5}, {"steps": 5}]


@pytest.mark.slow
def test_bench_run_as_a_command_gives_openblas_one_thread_and_records_it(tmp_path):
    """Two cells side by side on 2 cores, each with OpenBLAS's default pool of 2 spinning
    threads, ran numpy-backend learning about 5x slower: ``python -m fedq.simulations.bench``
    sets one thread before numpy loads (a user's own setting wins), and the results say so."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    subprocess.run([sys.executable, "-m", "fedq.simulations.bench", "dp_cost", "--quick"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    record = json.loads((tmp_path / "runs" / "harness" / "quick" / "dp_cost" /
                         "results.json").read_text())
    assert record["environment"]["openblas-threads"] == "1"


def test_results_record_the_users_own_openblas_setting(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert environment()["openblas-threads"] == "4"
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert environment()["openblas-threads"] == "unset: one per core"


def test_a_list_parameter_is_parsed_once_and_a_bad_name_fails_naming_the_parameter():
    """Every benchmark's comma-separated parameters go through one parser: spaces and
    empty items are forgiven, an unknown or empty list is refused naming the parameter and
    what it may hold, and the 'everything' word expands to every known name."""
    from fedq.simulations.harness import name_list

    known = ["fedavg", "sequential", "fedprox"]
    assert name_list({"strategies": " fedavg, sequential,"}, "strategies", known) == [
        "fedavg", "sequential"]
    assert name_list({"levers": "all"}, "levers", known, everything="all") == known
    with pytest.raises(HarnessError, match=r"strategies: unknown \['fedavgg'\]; known: "
                                           r"fedavg, sequential, fedprox"):
        name_list({"strategies": "fedavgg,sequential"}, "strategies", known)
    with pytest.raises(HarnessError, match=r"levers: unknown ' ,'.*\(or 'all' for all\)"):
        name_list({"levers": " ,"}, "levers", known, everything="all")


def _fedq_modules() -> dict[str, Path]:
    """Every fedq module of this checkout: name -> file."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for folder in ("common", "client", "server", "simulations"):
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["fedq", folder, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fedq modules ``name`` imports anywhere in its source (a function's lazy imports
    too), and, in product code, those a string names (``network_registry`` imports its
    networks by name)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("fedq.") and not name.startswith("fedq.simulations")):
            found.add(node.value.split(":")[0])
    out = set()
    for dotted in found:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted.startswith("fedq."):
            out.add(dotted)
    return out


def _closure(start: str, modules: dict[str, Path], imports: dict[str, set[str]]) -> set[str]:
    """Every fedq module ``start`` reaches by imports (``imports``: a cache)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen and name in modules:
            seen.add(name)
            if name not in imports:
                imports[name] = _imports(name, modules[name], modules)
            todo += imports[name]
    return seen


def test_simulations_never_import_the_deployment_only_code_they_do_not_hash():
    """A simulation's cells hash the product less DEPLOYMENT_ONLY (fedq-supernode's warm
    executor, fedq-submit, ...), so that fixing how a device runs its ClientApps reruns only
    the benchmarks that deploy. Sound only while no other product module imports that code,
    and while every kind that reaches it (a compose topology, a Docker image) names DEPLOYS,
    whose kinds hash it."""
    from fedq.simulations.harness import DEPLOYMENT_ONLY, DEPLOYS, PRODUCT_CODE, hashed_files

    modules, imports = _fedq_modules(), {}
    deployment = set(DEPLOYMENT_ONLY)
    assert deployment <= set(modules)
    for name in modules:
        if name not in deployment and not name.startswith("fedq.simulations"):
            assert not _closure(name, modules, imports) & deployment, name
    bench.load_benchmarks()
    kinds = {kind for name, module in list(sys.modules.items())
             if name.startswith("fedq.simulations.")
             for kind in vars(module).values() if isinstance(kind, CellKind)}
    # bench_backend's in-process loops live in the module of its deployed cell
    in_process = {"backend-loops", "backend-updates", "backend-device-memory"}
    deploying = {k.name for k in kinds if k.name not in in_process
                 and _closure(k.run.__module__, modules, imports) & deployment}
    assert {"compose-check", "pi-run", "fault-drill", "deployment-federation",
            "backend-deployed"} <= deploying
    for kind in kinds:
        assert (DEPLOYS in kind.code) == (kind.name in deploying), kind.name
    simulated = {path for _, path in hashed_files(PRODUCT_CODE)}
    deployed = {path for _, path in hashed_files((*PRODUCT_CODE, DEPLOYS))}
    assert {modules[m] for m in deployment} == deployed - simulated - {modules[DEPLOYS]}
