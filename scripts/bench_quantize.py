"""FP32 eager vs INT8 (PT2E + inductor) latency of torchvision models, side by side.

Prints one JSON line per model, then a summary line. Weights are random (nothing is
downloaded): latency does not depend on the weights' values. Calibration uses random
images of the same shape. Rounds alternate FP32 and INT8 so that drift on a shared
machine hits both alike; figures are medians over all rounds.

    python scripts/bench_quantize.py [--models resnet18 mobilenet_v2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch

from compress.data import build_data
from compress.evaluate import measure_latency, set_threads
from compress.models import build_model
from compress.quantize import quantize
from compress.recipe import DataConfig, ModelConfig

TARGET_SPEEDUP = 3.0  # INT8 resnet18 >= 3x faster than FP32 eager at batch 1 (issue 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per round")
    args = parser.parse_args()
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    threads = set_threads(args.threads)
    data = build_data(
        DataConfig(
            name="synthetic",
            image_size=args.image_size,
            synthetic_size=16,
            calibration_size=16,
            eval_batch_size=8,
        ),
        seed=0,
    )
    batch = data.example_input(args.batch_size)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        fp32 = build_model(ModelConfig(name=name), num_classes=1000, in_channels=3).eval()
        int8 = quantize(fp32, data, method="int8_static", calibration_batches=2)
        p50 = {"fp32_eager": [], "int8": []}
        for _ in range(args.rounds):
            for label, model in (("fp32_eager", fp32), ("int8", int8)):
                p50[label].append(
                    measure_latency(model, batch, warmup=3, iterations=args.iterations)["p50"]
                )
        fp32_ms, int8_ms = statistics.median(p50["fp32_eager"]), statistics.median(p50["int8"])
        row = {
            "model": name,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "threads": threads,
            "fp32_eager_p50_ms": round(fp32_ms, 3),
            "int8_p50_ms": round(int8_ms, 3),
            "speedup": round(fp32_ms / int8_ms, 2),
            "int8_kernels": int8.int8_kernels,
            "notes": int8.notes,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    resnet = next((r for r in results if r["model"] == "resnet18"), None)
    if resnet:
        print(
            json.dumps(
                {
                    "target": f"resnet18 int8 >= {TARGET_SPEEDUP}x fp32 eager",
                    "reached": resnet["speedup"] >= TARGET_SPEEDUP,
                    "speedup": resnet["speedup"],
                }
            )
        )


if __name__ == "__main__":
    main()
