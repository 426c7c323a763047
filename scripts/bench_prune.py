"""Structured pruning: MACs cut against measured speedup, side by side in one run.

For each model, the unpruned FP32 model and copies with 30 %, 50 % and 70 % of channels
removed (L1 importance, torch-pruning) are timed in alternating rounds at batch 1.
Prints one JSON line per (model, ratio) with the MACs ratio, the p50 latency ratio and
how much of the MACs reduction became speed. Weights are random: latency does not
depend on their values.

    python scripts/bench_prune.py [--models resnet18 resnet50 mobilenet_v2] [--ratios 0.3 0.5 0.7]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from compress.core.distributed import set_threads
from compress.data import build_data
from compress.measure.counts import count_flops
from compress.measure.latency import measure_latency
from compress.models.build import build_model
from compress.spec.recipe import DataConfig, ModelConfig
from compress.stages.prune import prune

TARGET = 0.8  # resnet18 at 50 %: measured speedup >= 0.8x the MACs reduction (issue 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    data = build_data(
        DataConfig(
            name="synthetic",
            image_size=args.image_size,
            synthetic_size=8,
            calibration_size=8,
            eval_batch_size=8,
        ),
        seed=0,
    )
    x = data.example_input(1)
    for name in args.models:
        torch.manual_seed(0)
        dense = build_model(ModelConfig(name=name), num_classes=1000, in_channels=3).eval()
        models = {
            0.0: dense,
            **{r: prune(dense, data, method="structured", ratio=r) for r in args.ratios},
        }
        times = {r: [] for r in models}
        for _ in range(args.rounds):
            for r, model in models.items():
                times[r].append(measure_latency(model, x, warmup=3, iterations=args.iterations).p50)
        base_ms, base_flops = statistics.median(times[0.0]), count_flops(dense, x)
        for r in args.ratios:
            ms = statistics.median(times[r])
            macs_ratio = count_flops(models[r], x) / base_flops
            row = {
                "model": name,
                "channel_ratio_removed": r,
                "threads": threads,
                "batch_size": 1,
                "macs_ratio": round(macs_ratio, 3),
                "p50_ms": round(ms, 3),
                "dense_p50_ms": round(base_ms, 3),
                "latency_ratio": round(ms / base_ms, 3),
                # speedup as a fraction of the MACs reduction: 1.0 = all of the cut became speed
                "speedup_vs_macs_reduction": round((base_ms / ms) / (1 / macs_ratio), 3),
            }
            if name == "resnet18" and r == 0.5:
                row["target"] = TARGET
                row["target_met"] = row["speedup_vs_macs_reduction"] >= TARGET
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
