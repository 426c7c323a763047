"""Mixed-precision training through the shared loop: images per second with train.amp
off, bf16 and fp16, side by side in one run (CUDA; on a CPU amp is ignored).

Prints one JSON line per (model, amp) with the throughput and its ratio to fp32.

    python scripts/bench_amp.py [--device cuda] [--models resnet18 resnet50] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compress.data import build_data
from compress.models.build import build_model
from compress.spec.recipe import DataConfig, ModelConfig, TrainConfig
from compress.training.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    data = build_data(
        DataConfig(
            name="synthetic",
            image_size=args.image_size,
            synthetic_size=args.batch_size * args.steps,
            calibration_size=args.batch_size,
            batch_size=args.batch_size,
        ),
        seed=0,
    )
    for name in args.models:
        fp32 = None
        for amp in ("off", "bf16", "fp16"):
            torch.manual_seed(0)
            model = build_model(ModelConfig(name=name), num_classes=10, in_channels=3)
            warmup = TrainConfig(epochs=0, max_steps=3, amp=amp, validate=False)
            train(model, data, warmup, device=args.device)  # cuDNN autotuning, allocator
            config = TrainConfig(epochs=0, max_steps=args.steps, amp=amp, validate=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            train(model, data, config, device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rate = args.steps * args.batch_size / (time.perf_counter() - start)
            fp32 = fp32 or rate
            line = {
                "model": name,
                "device": args.device,
                "amp": amp,
                "images_per_s": round(rate, 1),
                "vs_fp32": round(rate / fp32, 2),
                "batch_size": args.batch_size,
                "image_size": args.image_size,
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
