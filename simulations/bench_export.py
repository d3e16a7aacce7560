"""Exported policy formats side by side: file size, single-decision latency, greedy return.

For each teacher (CartPole-v1 with fedq's default 64-64 MLP; Acrobot-v1 with a 256-256
MLP), trained by :class:`common.trainer.LocalTrainer` with the default config until its
greedy return reaches the goal (an ``export-teacher`` cell of :mod:`simulations.harness`,
cached under ``runs/harness/`` and reused while its code and parameters stay the same),
``fedq-export``'s code writes every format (an ``export-measure`` cell), and each one is
measured the same way:

- size: bytes of the file a device would receive (torch row: the ``torch.save``d
  state dict of the checkpoint);
- latency: p50/p99 of single-observation decisions (batch 1) on held-out teacher states,
  ``decisions`` per repeat, formats interleaved, median over ``repeats``; on one core
  with one thread (the harness pins the cell): ``torch`` eager fp32 (``inference_mode``)
  is the baseline row, ``numpy`` rows go through
  :class:`client.policy_runner.PolicyRunner` (observation checks included),
  ``onnxruntime`` with one intra-op thread;
- return: mean greedy return over ``episodes`` episodes (same seeds for every format)
  and its ratio to the fp32 teacher's (``1 - (fp32 - x) / |fp32|``, so it also reads
  right for Acrobot's negative returns); then again over ``confirm-episodes`` other
  episodes. Acrobot's returns spread widely (-63 to -151 for one policy), and one flipped
  action sends an episode down another trajectory, so a policy that acts like the
  teacher in 99.8% of states can still differ by 3% over 20 episodes, either way; the
  longer run tells a real loss from that noise.

    flock /tmp/fedq-bench.lock python -m fedq.simulations.bench export
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.client.policy_runner import PolicyRunner, measure_latency
from fedq.common.config import FedqConfig
from fedq.common.export.checkpoint import Teacher, load_teacher
from fedq.common.export.cli import FORMATS, export_policies
from fedq.common.export.onnx_export import onnx_available
from fedq.common.networks import NumpyPolicy
from fedq.common.rollouts import collect_states, play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.server.run_directory import RunDirectory
from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    Summary,
    one_core,
    register_benchmark,
    workdir_of,
)
from fedq.simulations.results_io import markdown_table

TEACHERS = {  # name: (config overrides, greedy goal)
    "CartPole-v1 64-64": ({"env-id": "CartPole-v1", "hidden-sizes": "64,64"}, 475.0),
    "Acrobot-v1 256-256": ({"env-id": "Acrobot-v1", "hidden-sizes": "256,256"}, -100.0),
}
_EVAL_SEED = 50_000  # episodes the teacher was never selected on
_CONFIRM_SEED = 60_000  # and a second, disjoint set for the longer return measurement


def train_teacher(name: str, overrides: dict[str, Any], goal: float, max_steps: int,
                  root: Path, chunk: int = 5000) -> Path:
    """Train in ``root`` until 20 greedy episodes average >= ``goal`` (keeping the best
    checkpoint seen); returns the run directory."""
    run_dir = RunDirectory(root)
    chunk = min(chunk, max_steps)
    config = FedqConfig.from_mapping({**overrides, "run-dir": str(run_dir.root)})
    run_dir.start(config)
    trainer = LocalTrainer(config, seed=0)
    best = -np.inf
    while trainer.counters.env_steps < max_steps:
        trainer.train(chunk)
        score = statistics.fmean(trainer.evaluate(20))
        print(f"{name}: {trainer.counters.env_steps} steps, greedy return {score:.1f}",
              flush=True)
        if score > best:
            best = score
            run_dir.save_checkpoint(trainer.counters.env_steps // chunk,
                                    trainer.learner.online.state_dict(),
                                    {"greedy_return": score,
                                     "env_steps": trainer.counters.env_steps})
        if score >= goal:
            break
    trainer.close()
    return run_dir.root


def torch_act(net: torch.nn.Module) -> Callable[[np.ndarray], int]:
    def act(obs: np.ndarray) -> int:
        with torch.inference_mode():
            return int(net(torch.from_numpy(obs)).argmax())
    return act


def onnx_act(path: Path) -> Callable[[np.ndarray], int]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run = session.run

    def act(obs: np.ndarray) -> int:
        return int(run(None, {"obs": obs.reshape(1, -1)})[0].argmax())
    return act


def bench_teacher(name: str, teacher: Teacher, out: Path, args: Mapping[str, Any]
                  ) -> list[dict[str, Any]]:
    manifest = export_policies(teacher, out, [f for f in FORMATS
                                              if f != "onnx" or onnx_available()])
    formats = manifest["formats"]
    buffer = io.BytesIO()
    torch.save(teacher.net.state_dict(), buffer)
    rows: dict[str, dict[str, Any]] = {
        "torch eager fp32": {"bytes": buffer.getbuffer().nbytes,
                             "parameters": formats["fp32"]["parameters"],
                             "act": torch_act(teacher.net)}}
    for variant in ("fp32", "fp16", "int8-ptq", "int8", "pruned", "student"):
        runner = PolicyRunner.load(out / formats[variant]["file"])
        rows[f"numpy {variant}"] = {"bytes": formats[variant]["bytes"],
                                    "parameters": runner.policy.n_parameters,
                                    "agreement": formats[variant]["agreement"],
                                    "act": runner.act}
    if "onnx" in formats:
        rows["onnxruntime fp32"] = {"bytes": formats["onnx"]["bytes"],
                                    "parameters": formats["onnx"]["parameters"],
                                    "act": onnx_act(out / formats["onnx"]["file"])}
    states = collect_states(NumpyPolicy(teacher.net).act, teacher.env_id, 2000, seed=_EVAL_SEED)
    p50s: dict[str, list[float]] = {k: [] for k in rows}
    p99s: dict[str, list[float]] = {k: [] for k in rows}
    for rep in range(args["repeats"]):
        for key, row in rows.items():
            measure_latency(row["act"], states, 500)  # warm-up
            latency = measure_latency(row["act"], states, args["decisions"])
            p50s[key].append(latency.p50_us)
            p99s[key].append(latency.p99_us)
        print(f"{name} latency repeat {rep + 1}/{args['repeats']} done", flush=True)
    fp32_bytes = formats["fp32"]["bytes"]
    teacher_params = formats["fp32"]["parameters"]
    table = []
    for key, row in rows.items():
        returns = play_episodes(row["act"], teacher.env_id, args["episodes"], seed=_EVAL_SEED)
        confirm = play_episodes(row["act"], teacher.env_id, args["confirm-episodes"],
                                seed=_CONFIRM_SEED)
        table.append({"teacher": name, "format": key, "bytes": row["bytes"],
                      "size vs fp32 file": row["bytes"] / fp32_bytes,
                      "parameters": row["parameters"],
                      "params vs teacher": row["parameters"] / teacher_params,
                      "p50 us": statistics.median(p50s[key]),
                      "p99 us": statistics.median(p99s[key]),
                      "return mean": statistics.fmean(returns),
                      "confirm return mean": statistics.fmean(confirm),
                      "agreement": row.get("agreement", 1.0),
                      "p50 runs": p50s[key], "p99 runs": p99s[key], "returns": returns,
                      "confirm returns": confirm})
        print(f"{name} {key}: return {table[-1]['return mean']:.1f}", flush=True)
    fp32 = next(r for r in table if r["format"] == "numpy fp32")
    for r in table:
        for prefix in ("", "confirm "):
            reference = fp32[f"{prefix}return mean"]
            r[f"{prefix}return vs fp32"] = (1 - (reference - r[f"{prefix}return mean"])
                                           / abs(reference))
    return table


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    def row(teacher: str, fmt: str) -> dict[str, Any]:
        return next(r for r in rows if r["teacher"] == teacher and r["format"] == fmt)

    checks = []
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        int8, student = row(teacher, "numpy int8"), row(teacher, "numpy student")
        checks += [
            {"teacher": teacher, "target": f"{fmt} greedy-action agreement >= 99%",
             "measured": row(teacher, f"numpy {fmt}")["agreement"],
             "met": row(teacher, f"numpy {fmt}")["agreement"] >= 0.99}
            for fmt in ("fp16", "int8")]
        checks += [
            {"teacher": teacher, "target": "int8 size <= 30% of fp32",
             "measured": int8["size vs fp32 file"], "met": int8["size vs fp32 file"] <= 0.30},
            {"teacher": teacher, "target": "int8 return >= 98% of fp32",
             "measured": int8["return vs fp32"], "met": int8["return vs fp32"] >= 0.98},
            {"teacher": teacher, "target": "int8 return >= 98% of fp32, confirm episodes",
             "measured": int8["confirm return vs fp32"],
             "met": int8["confirm return vs fp32"] >= 0.98},
            {"teacher": teacher, "target": "student params <= 25% of teacher",
             "measured": student["params vs teacher"],
             "met": student["params vs teacher"] <= 0.25},
            {"teacher": teacher, "target": "student return >= 95% of teacher",
             "measured": student["return vs fp32"], "met": student["return vs fp32"] >= 0.95},
            {"teacher": teacher, "target": "student return >= 95% of teacher, confirm episodes",
             "measured": student["confirm return vs fp32"],
             "met": student["confirm return vs fp32"] >= 0.95}]
    cartpole = next(iter(TEACHERS))
    if not any(r["teacher"] == cartpole for r in rows):
        return checks
    numpy_p50 = row(cartpole, "numpy fp32")["p50 us"]
    checks.append({"teacher": cartpole, "target": "numpy runner p50 <= 10 us",
                   "measured": numpy_p50, "met": numpy_p50 <= 10.0})
    torch_p50 = row(cartpole, "torch eager fp32")["p50 us"]
    checks.append({"teacher": cartpole, "target": "numpy p50 speed-up vs torch eager",
                   "measured": torch_p50 / numpy_p50, "met": torch_p50 > numpy_p50})
    return checks


def run_teacher(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """An ``export-teacher`` cell: the teacher trained into ``workdir`` (kept)."""
    overrides, goal = TEACHERS[params["teacher"]]
    train_teacher(params["teacher"], overrides, goal, params["max-steps"], workdir)
    checkpoint = torch.load(load_teacher(workdir).source, weights_only=True)
    return {"env_steps": checkpoint.get("env_steps"),
            "greedy_return_at_selection": checkpoint.get("greedy_return")}


_CODE = (*PRODUCT_CODE, "fedq.simulations.bench_export")
TEACHER = CellKind("export-teacher", run_teacher, _CODE)


def _teacher_cell(params: Mapping[str, Any]) -> Cell:
    return Cell(TEACHER, {"teacher": params["teacher"], "max-steps": params["max-steps"]})


def run_measure(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """An ``export-measure`` cell: every format of the teacher's cell, measured."""
    teacher_dir = workdir_of(_teacher_cell(params), workdir)
    teacher = load_teacher(teacher_dir)
    with one_core():
        rows = bench_teacher(params["teacher"], teacher, workdir / "export", params)
    return {"teacher": {"checkpoint": str(teacher.source)}, "rows": rows}


MEASURE = CellKind("export-measure", run_measure, _CODE)


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """Per teacher: its training, then its measurement (which reads the trained one)."""
    names = [n for n in TEACHERS if params["teachers"] == "all" or
             n.startswith(str(params["teachers"]))]
    out = []
    for name in names:
        out.append(_teacher_cell({"teacher": name, "max-steps": params["max-teacher-steps"]}))
        out.append(Cell(MEASURE, {
            "teacher": name, "max-steps": params["max-teacher-steps"],
            **{k: params[k] for k in ("decisions", "repeats", "episodes",
                                      "confirm-episodes")}}))
    return out


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    rows: list[dict[str, Any]] = []
    teachers_info = {}
    for cell, result in done:
        if cell.kind is TEACHER:
            teachers_info[cell.params["teacher"]] = result
        else:
            rows += result["rows"]
    columns = ["teacher", "format", "bytes", "size vs fp32 file", "parameters",
               "params vs teacher", "p50 us", "p99 us", "return mean", "return vs fp32",
               "confirm return mean", "confirm return vs fp32", "agreement"]
    checks = check_targets(rows)
    targets = markdown_table(checks, ["teacher", "target", "measured", "met"])
    notes = (f"Latency: median over {params['repeats']} repeats of p50/p99 over "
             f"{params['decisions']} batch-1 decisions; return: mean greedy return over "
             f"{params['episodes']} episodes (same seeds for every format); confirm return: "
             f"over {params['confirm-episodes']} other episodes; agreement: share of 2000 "
             "held-out teacher states where the format's greedy action equals the fp32 "
             "teacher's.")

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        for teacher in dict.fromkeys(r["teacher"] for r in rows):
            mine = [r for r in rows if r["teacher"] == teacher]
            ax.scatter([r["bytes"] / 1024 for r in mine], [r["p50 us"] for r in mine],
                       label=teacher)
            for r in mine:
                ax.annotate(r["format"], (r["bytes"] / 1024, r["p50 us"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("file KiB")
        ax.set_ylabel("p50 us per decision (batch 1, one core)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Summary(rows, columns, f"{notes}\n\n{targets}",
                   payload={"teachers": teachers_info, "targets": checks}, plot=plot)


register_benchmark(Benchmark(
    "export", "exported policy formats: file size, single-decision latency, greedy return",
    defaults={"teachers": "all", "max-teacher-steps": 200_000, "decisions": 10_000,
              "repeats": 3, "episodes": 20, "confirm-episodes": 200},
    quick={"teachers": "CartPole", "max-teacher-steps": 1_000, "decisions": 200,
           "repeats": 1, "episodes": 2, "confirm-episodes": 2},
    cells=cells, summarise=summarise, parallel=False))
