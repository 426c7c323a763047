"""INT8 latency side by side: FP32 eager, compress INT8 (PT2E + inductor), ONNX Runtime INT8.

Prints one JSON line per model and batch size. Weights are random (nothing is downloaded):
latency does not depend on the weights' values. Static INT8 is calibrated on the same
random images for both toolkits; ONNX Runtime gets its own static QDQ quantization
(``quantize_static``, per-channel, QUInt8 activations, QInt8 weights) of the same model.
Rounds alternate the contenders so that drift on a shared machine hits all alike; the
figures are medians over all rounds.

    python scripts/bench_quantize.py                       # the issue's full set
    python scripts/bench_quantize.py --models resnet18 --batch-sizes 1 --no-ort
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compress.data import build_data
from compress.evaluate import measure_latency, set_threads
from compress.models import build_model
from compress.quantize import quantize
from compress.recipe import DataConfig, ModelConfig

# model -> quantization method (vit: Linear-heavy, so dynamic)
MODELS = {
    "resnet18": "int8_static",
    "resnet50": "int8_static",
    "mobilenet_v2": "int8_static",
    "efficientnet_b0": "int8_static",
    "vit_b_16": "int8_dynamic",
}
# Targets from the issues: INT8 >= 3x FP32 eager at batch 1; INT8 p50 <= this x ORT INT8.
SPEEDUP_TARGET = 3.0
ORT_TARGETS = {"resnet18": 1.0, "resnet50": 1.0, "mobilenet_v2": 1.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="timed seconds per contender per round"
    )
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    args = parser.parse_args()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    threads = set_threads(args.threads)
    data = build_data(
        DataConfig(
            name="synthetic",
            image_size=args.image_size,
            synthetic_size=16,
            calibration_size=32,
            eval_batch_size=8,
        ),
        seed=0,
    )
    for name in args.models:
        torch.manual_seed(0)
        fp32 = build_model(ModelConfig(name=name), num_classes=1000, in_channels=3).eval()
        options = {"calibration_batches": 4} if MODELS[name] == "int8_static" else {}
        int8 = quantize(fp32, data, method=MODELS[name], **options)
        ort = None if args.no_ort else _ort_int8(fp32, data, MODELS[name], threads)
        for batch_size in args.batch_sizes:
            batch = data.example_input(batch_size)
            contenders = {"fp32_eager": fp32, "int8": int8}
            if ort is not None:
                contenders["ort_int8"] = ort
            p50 = {label: [] for label in contenders}
            for _ in range(args.rounds):
                for label, model in contenders.items():
                    iterations = _iterations(model, batch, args.seconds)
                    p50[label].append(
                        measure_latency(model, batch, warmup=2, iterations=iterations)["p50"]
                    )
            ms = {label: statistics.median(v) for label, v in p50.items()}
            row = {
                "model": name,
                "method": MODELS[name],
                "batch_size": batch_size,
                "image_size": args.image_size,
                "threads": threads,
                **{f"{k}_p50_ms": round(v, 3) for k, v in ms.items()},
                "speedup_vs_fp32": round(ms["fp32_eager"] / ms["int8"], 2),
            }
            if "ort_int8" in ms:
                row["int8_vs_ort_int8"] = round(ms["int8"] / ms["ort_int8"], 2)
                if name in ORT_TARGETS:
                    row["ort_target"] = ORT_TARGETS[name]
                    row["ort_target_met"] = row["int8_vs_ort_int8"] <= ORT_TARGETS[name]
            if batch_size == 1:
                row["speedup_target_met"] = row["speedup_vs_fp32"] >= SPEEDUP_TARGET
            row["int8_notes"] = getattr(int8, "notes", [])
            print(json.dumps(row), flush=True)


def _iterations(model, batch: torch.Tensor, seconds: float) -> int:
    """Enough calls to fill about ``seconds`` (at least 5), from one timed call."""
    with torch.inference_mode():
        model(batch)
        start = time.perf_counter()
        model(batch)
        once = time.perf_counter() - start
    return max(5, min(500, int(seconds / max(once, 1e-5))))


class _OrtModel:
    """An ONNX Runtime session that takes and returns torch tensors (for measure_latency)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def _ort_int8(model, data, method: str, threads: int) -> _OrtModel:
    """Export to ONNX and quantize with ONNX Runtime's own tools, as its users would."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = Path(tempfile.mkdtemp(prefix="bench-ort-"))
    fp32_path, prep_path, int8_path = (
        folder / "fp32.onnx",
        folder / "prep.onnx",
        folder / "int8.onnx",
    )
    example = data.example_input(2)
    torch.onnx.export(
        model,
        (example,),
        str(fp32_path),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        external_data=False,
    )
    quant_pre_process(str(fp32_path), str(prep_path), skip_symbolic_shape=True)
    if method == "int8_dynamic":
        quantize_dynamic(
            str(prep_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True
        )
    else:
        batches = [images.numpy() for images, _ in data.loader("calibration")][:4]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter({"x": b} for b in batches)

            def get_next(self):
                return next(self.items, None)

        quantize_static(
            str(prep_path),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    session = _OrtModel(int8_path, threads)
    session(example)  # first run builds the session's kernels
    np.testing.assert_equal(session(example).shape[0], 2)
    return session


if __name__ == "__main__":
    main()
