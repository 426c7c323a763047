"""Where a deployed model's time goes: OpenVINO's per-node counters and the nodes ONNX
Runtime runs after its graph optimisations (which QDQ patterns it fused).

For each OpenVINO IR (.xml): the p50 of a call, the sum of its nodes' times and the
time outside them, and the time per (node type, kernel). For each ONNX file: the op
types of the optimised graph. One JSON line per file, as compress deploys it (2 threads,
one stream, batch 1; the input shape is read from the file).

    python -m compress export MODEL_DIR --format openvino      # writes MODEL_DIR.xml
    python scripts/runtime_layers.py MODEL_DIR.xml RUN_DIR/model.xml RUN_DIR/model.onnx
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from compress.measure.runtimes import OnnxRuntimeModel, OpenVinoModel


def openvino_nodes(path: Path, threads: int, calls: int) -> dict:
    model = OpenVinoModel(path, threads, profile=True)
    request = model.request
    shape = [1 if d.is_dynamic else d.get_length() for d in request.model_inputs[0].partial_shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(calls):  # warm-up
        request.infer({0: x}, share_inputs=True, share_outputs=True)
    times, nodes = [], collections.Counter()
    for _ in range(calls):
        start = time.perf_counter()
        request.infer({0: x}, share_inputs=True, share_outputs=True)
        times.append(time.perf_counter() - start)
        for node in request.profiling_info:
            if node.status.name == "EXECUTED":
                nodes[f"{node.node_type} {node.exec_type}"] += node.real_time.total_seconds()
    p50_us = 1e6 * statistics.median(times)
    in_nodes_us = 1e6 * sum(nodes.values()) / calls
    return {
        "file": str(path),
        "precision": model.precision,
        "calls": calls,
        "p50_us": round(p50_us, 1),
        "in_nodes_us": round(in_nodes_us, 1),
        "outside_nodes_us": round(p50_us - in_nodes_us, 1),
        "nodes_us": {k: round(1e6 * v / calls, 1) for k, v in nodes.most_common()},
    }


def onnxruntime_ops(path: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        OnnxRuntimeModel(path, threads, optimized_to=optimized)
        graph = onnx.load(str(optimized)).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    return {"file": str(path), "ops": dict(ops.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help=".xml (OpenVINO) or .onnx files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    for path in args.files:
        if path.suffix == ".xml":
            print(json.dumps(openvino_nodes(path, args.threads, args.calls)), flush=True)
        else:
            print(json.dumps(onnxruntime_ops(path, args.threads)), flush=True)


if __name__ == "__main__":
    main()
