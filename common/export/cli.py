"""``fedq-export``: turn a global checkpoint into deployable policy files.

    fedq-export runs/my-run                      # the run's best model (checkpoints/best.pt)
    fedq-export runs/my-run --latest             # the run's newest checkpoint instead
    fedq-export runs/my-run/checkpoints/round-0010.pt --out policies/ --formats int8,student

Writes into ``--out`` (default ``<run-dir>/export``) one file per format and a
``manifest.json`` with each file's size, parameter count and greedy-action agreement with
the fp32 teacher on held-out teacher states:

- ``policy-fp32.fqp``: the teacher's weights as they are (:mod:`common.export.encodings`);
- ``policy-fp16.fqp`` / ``policy-int8.fqp``: rounded to fp16 / int8 by calibrated
  rounding on teacher states (:mod:`common.export.calibrate`), which a converged DQN's
  small action gaps need;
- ``policy-int8-ptq.fqp``: int8 with every weight rounded to its nearest level, the
  baseline calibrated rounding is measured against;
- ``policy-pruned.fqp``: magnitude-pruned to ``--sparsity`` (largest matrices first) and
  fine-tuned back to the teacher's greedy choices with fixed masks
  (:mod:`common.export.prune`), stored sparse; not written (an error) if it still acts
  unlike the teacher in over 10% of the fine-tuning states;
- ``policy-student.fqp``: a ``--student-hidden`` student distilled from the teacher
  (:mod:`common.export.distill`);
- ``policy.onnx``: the fp32 teacher for onnxruntime (needs the ``[export]`` extra).

The ``.fqp`` files run with ``fedq-policy`` (numpy only). Calibration, pruning and
distillation use states gathered by rolling out the teacher epsilon-greedily
(``--states``, ``--seed``). A CNN checkpoint (``network = "nature-cnn"`` or
``"edge-cnn"``) exports to ONNX only, fp32, fp16 and int8, for onnxruntime
(:mod:`common.export.cnn_export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.common.atomic import atomic_write_text
from fedq.common.config import ConfigError
from fedq.common.export.checkpoint import CheckpointError, Teacher, load_teacher, numpy_layers
from fedq.common.export.cnn_export import CNN_FORMATS, collect_frames, export_cnn
from fedq.common.export.distill import distill
from fedq.common.export.onnx_export import OnnxUnavailableError, export_onnx, onnx_available
from fedq.common.export.policy_file import read_policy, write_policy
from fedq.common.export.prune import prune_and_finetune
from fedq.common.mlp_forward import MlpForward
from fedq.common.networks import NumpyPolicy, QNetwork
from fedq.common.rollouts import collect_states

FORMATS = ("fp32", "fp16", "int8", "int8-ptq", "pruned", "student", "onnx")
_HELD_OUT_SEED = 10**6  # held-out states come from episodes no training state came from
CNN_STATES = 300  # frames a CNN's formats are compared on (CarRacing: ~26 ms per step)


def default_student_hidden(hidden_sizes: Sequence[int]) -> tuple[int, ...]:
    """A quarter of each teacher width (at least 8): ~1/16 of the hidden-to-hidden weights."""
    return tuple(max(8, h // 4) for h in hidden_sizes)


def export_policies(teacher: Teacher, out_dir: Path, formats: Sequence[str], *,
                    n_states: int = 20_000, sparsity: float = 0.75, finetune_steps: int = 2000,
                    student_hidden: tuple[int, ...] | None = None, seed: int = 0,
                    log: Any = print) -> dict[str, Any]:
    """Write the requested formats of ``teacher`` into ``out_dir``; returns the manifest."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError("--formats", f"unknown {unknown}; choose from {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    net = teacher.net
    act = NumpyPolicy(net).act
    source = {"checkpoint": str(teacher.source), "round": teacher.server_round}
    held_out = collect_states(act, teacher.env_id, 2000, seed=_HELD_OUT_SEED,
                              env_kwargs=teacher.env_kwargs)
    teacher_actions = _actions(numpy_layers(net), held_out)
    states = None
    if {"fp16", "int8", "pruned", "student"} & set(formats):
        log(f"collecting {n_states} teacher states on {teacher.env_id}")
        states = collect_states(act, teacher.env_id, n_states, seed=seed,
                                env_kwargs=teacher.env_kwargs)
    entries: dict[str, dict[str, Any]] = {}

    def write(name: str, layers: list, encoding: str, meta: dict[str, Any],
              calibration_states: np.ndarray | None = None) -> None:
        path = out_dir / f"policy-{name}.fqp"
        size = write_policy(path, layers, env_id=teacher.env_id, variant=name,
                            encoding=encoding, meta={**source, **meta},
                            calibration_states=calibration_states)
        policy = read_policy(path)
        entries[name] = {"file": path.name, "bytes": size, "parameters": policy.n_parameters,
                         "agreement": _agreement(policy.layers, held_out, teacher_actions),
                         **meta}
        log(f"{name}: {path} ({size} bytes, agreement {entries[name]['agreement']:.4f})")

    if "fp32" in formats:
        write("fp32", numpy_layers(net), "fp32", {})
    for encoding in ("fp16", "int8"):
        if encoding in formats:
            write(encoding, numpy_layers(net), encoding,
                  {"rounding": "calibrated", "calibration_states": n_states}, states)
    if "int8-ptq" in formats:
        write("int8-ptq", numpy_layers(net), "int8", {"rounding": "nearest"})
    if "pruned" in formats:
        pruned, report = prune_and_finetune(net, states, sparsity, steps=finetune_steps,
                                            seed=seed)
        write("pruned", numpy_layers(pruned), "sparse", {"prune": asdict(report)})
    if "student" in formats:
        hidden = student_hidden or default_student_hidden(net.hidden_sizes)
        student, report = distill(net, states, hidden, seed=seed)
        write("student", numpy_layers(student), "fp32", {"distill": asdict(report)})
    if "onnx" in formats:
        path = out_dir / "policy.onnx"
        size = export_onnx(net, path, {"env_id": teacher.env_id, "variant": "fp32",
                                       "checkpoint": str(teacher.source)})
        entries["onnx"] = {"file": path.name, "bytes": size,
                           "parameters": sum(p.numel() for p in net.parameters())}
        log(f"onnx: {path} ({size} bytes)")
    manifest = {"env_id": teacher.env_id, "layer_sizes": [net.obs_dim, *net.hidden_sizes,
                                                          net.n_actions],
                **source, "held_out_states": len(held_out), "formats": entries}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_cnn_policies(teacher: Teacher, out_dir: Path, formats: Sequence[str], *,
                        n_states: int = CNN_STATES, seed: int = 0, log: Any = print
                        ) -> dict[str, Any]:
    """Write the requested ONNX formats of a CNN ``teacher``; returns the manifest."""
    unknown = sorted(set(formats) - set(CNN_FORMATS))
    if unknown:
        raise ConfigError("--formats", f"{unknown} are MLP formats (.fqp files for the numpy "
                          f"runner); a CNN exports to {', '.join(CNN_FORMATS)}")
    if not onnx_available():
        raise OnnxUnavailableError("a CNN exports to ONNX only, which needs the optional "
                                   "packages onnx and onnxscript: pip install 'fedq[export]'")
    log(f"collecting {n_states} teacher frames on {teacher.env_id}")
    states = collect_frames(teacher.net, teacher.env_id, teacher.env_kwargs, teacher.image,
                            n_states, seed=_HELD_OUT_SEED + seed)
    source = {"checkpoint": str(teacher.source), "round": teacher.server_round}
    entries = export_cnn(teacher.net, out_dir, list(formats), states,
                         {"env_id": teacher.env_id, "checkpoint": str(teacher.source)}, log)
    manifest = {"env_id": teacher.env_id, "obs_shape": list(states.shape[1:]), **source,
                "held_out_states": len(states), "formats": entries}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _actions(layers: list, states: np.ndarray) -> np.ndarray:
    forward = MlpForward([(np.ascontiguousarray(w.T), b) for w, b in layers])
    return np.array([forward.act(s) for s in states])


def _agreement(layers: list, states: np.ndarray, reference: np.ndarray) -> float:
    return float((_actions(layers, states) == reference).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedq-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path,
                        help="run directory or checkpoints folder (its best model by "
                             "federated evaluation, else its newest checkpoint), or a .pt file")
    parser.add_argument("--latest", action="store_true",
                        help="export the run's newest checkpoint instead of its best model")
    parser.add_argument("--out", type=Path, help="output folder (default <run-dir>/export)")
    parser.add_argument("--env-id", help="env id (default: from the run's config.json)")
    parser.add_argument("--formats", help=f"comma-separated subset of {','.join(FORMATS)} "
                                           "(default: all; onnx only if its extra is installed)")
    parser.add_argument("--states", type=int,
                        help="teacher states to calibrate (fp16, int8), fine-tune (pruned) "
                             f"and distil on (default 20000); for a CNN, the frames its "
                             f"formats are compared on (default {CNN_STATES})")
    parser.add_argument("--sparsity", type=float, default=0.75,
                        help="fraction of all weights pruned, largest matrices first")
    parser.add_argument("--finetune-steps", type=int, default=2000,
                        help="Adam steps of fine-tuning after pruning")
    parser.add_argument("--student-hidden",
                        help="student hidden sizes, e.g. 16,16 (default: teacher's / 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.formats:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    else:
        formats = [f for f in FORMATS if f != "onnx" or onnx_available()]
        if "onnx" not in formats:
            print("fedq-export: skipping onnx (pip install 'fedq[export]' to enable it)",
                  file=sys.stderr)
    try:
        student_hidden = (tuple(int(h) for h in args.student_hidden.split(","))
                          if args.student_hidden else None)
    except ValueError:
        print(f"fedq-export: error: --student-hidden {args.student_hidden!r} is not a "
              "comma-separated list of integers", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        teacher = load_teacher(args.source, args.env_id, latest=args.latest)
        print(f"fedq-export: exporting {teacher.source} (round {teacher.server_round})")
        folder = teacher.source.parent
        out = args.out or (folder.parent if folder.name == "checkpoints" else folder) / "export"
        if not isinstance(teacher.net, QNetwork):
            export_cnn_policies(teacher, out, formats if args.formats else CNN_FORMATS,
                                n_states=args.states or CNN_STATES, seed=args.seed)
            print(f"wrote {out / 'manifest.json'}")
            return 0
        export_policies(teacher, out, formats, n_states=args.states or 20_000,
                        sparsity=args.sparsity, finetune_steps=args.finetune_steps,
                        student_hidden=student_hidden, seed=args.seed)
    except (CheckpointError, ConfigError, OnnxUnavailableError, ValueError) as err:
        print(f"fedq-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
