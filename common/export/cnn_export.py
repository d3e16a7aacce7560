"""Export a CNN Q-network (``nature-cnn``, ``edge-cnn``) for onnxruntime: fp32, fp16 and
int8 ONNX files, each with its size, greedy agreement with the torch teacher and latency
per decision.

The ``.fqp`` formats of :mod:`common.export.cli` (and the numpy runner ``fedq-policy``) are
MLP-only; a CNN goes to ONNX, which onnxruntime runs on any device:

- ``policy.onnx``: the fp32 network, uint8 frames in (the graph scales them);
- ``policy-fp16.onnx``: every weight stored as fp16 and cast to fp32 when the session
  loads (half the file; the arithmetic stays fp32, which onnxruntime's CPU kernels need);
- ``policy-int8.onnx``: onnxruntime's dynamic quantisation (int8 weights, activations
  quantised per call) of the fp32 file.

Agreement is measured on frames the teacher visits epsilon-greedily (``n_states``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedq.common.envs import ImageObs, make_env
from fedq.common.export.onnx_export import export_onnx

CNN_FORMATS = ("onnx", "onnx-fp16", "onnx-int8")
_FILES = {"onnx": "policy.onnx", "onnx-fp16": "policy-fp16.onnx",
          "onnx-int8": "policy-int8.onnx"}


def collect_frames(net: nn.Module, env_id: str, env_kwargs: dict[str, Any], image: ImageObs,
                   n_states: int, *, seed: int = 0, epsilon: float = 0.1) -> np.ndarray:
    """``n_states`` observations (shape and dtype kept) of ``net`` acting epsilon-greedily."""
    env = make_env(env_id, env_kwargs, None, image)
    rng = np.random.default_rng(seed)
    states: list[np.ndarray] = []
    obs, _ = env.reset(seed=seed)
    try:
        while len(states) < n_states:
            states.append(np.array(obs))
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                with torch.no_grad():
                    action = int(net(torch.from_numpy(np.asarray(obs))[None]).argmax())
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                obs, _ = env.reset()
    finally:
        env.close()
    return np.stack(states)


def _fp16_weights(src: Path, dst: Path) -> None:
    """``src`` with every float32 initializer stored as fp16 and cast back on load."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                       init.name + "_fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name],
                                      to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(dst))


def _int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # the exporter's shape annotations trip the quantiser
    plain = dst.with_suffix(".tmp.onnx")
    onnx.save(model, str(plain))
    try:
        quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8)
    finally:
        plain.unlink(missing_ok=True)


def _measure(path: Path, states: np.ndarray, teacher_actions: np.ndarray) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    actions = session.run(None, {"obs": states})[0].argmax(1)
    times = []
    for state in states[:100]:
        start = time.perf_counter()
        session.run(None, {"obs": state[None]})
        times.append(time.perf_counter() - start)
    return {"file": path.name, "bytes": path.stat().st_size,
            "agreement": float((actions == teacher_actions).mean()),
            "decision_ms": statistics.median(times) * 1e3}


def export_cnn(net: nn.Module, out_dir: Path, formats: list[str], states: np.ndarray,
               metadata: dict[str, str], log: Any = print) -> dict[str, dict[str, Any]]:
    """Write the requested ONNX formats of ``net`` into ``out_dir``; returns per format
    its file, size, agreement with ``net`` on ``states`` and median latency per decision."""
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    with torch.no_grad():
        teacher_actions = net(torch.from_numpy(states)).argmax(1).numpy()
    fp32 = out_dir / _FILES["onnx"]
    export_onnx(net, fp32, metadata)
    entries: dict[str, dict[str, Any]] = {}
    for name in formats:
        path = out_dir / _FILES[name]
        if name == "onnx-fp16":
            _fp16_weights(fp32, path)
        elif name == "onnx-int8":
            _int8(fp32, path)
        entries[name] = {**_measure(path, states, teacher_actions),
                         "parameters": sum(p.numel() for p in net.parameters())}
        log(f"{name}: {path} ({entries[name]['bytes']} bytes, agreement "
            f"{entries[name]['agreement']:.4f}, {entries[name]['decision_ms']:.2f} ms/decision)")
    if "onnx" not in formats:
        fp32.unlink()
    return entries
