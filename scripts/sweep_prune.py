"""Structured pruning across torchvision's classification models: which ones prune.

For each model (random weights, 1 x 3 x 64 x 64 input, 30 % of channels, L1): prunes,
runs a forward pass, and prints one JSON line with the MACs ratio or the first line of
the error. The coverage table in docs/results.md comes from this script.

    python scripts/sweep_prune.py [--models resnet18 vit_b_16 ...] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compress.core.distributed import set_threads
from compress.data import build_data
from compress.measure.counts import count_flops
from compress.models import build_model
from compress.spec.architectures import torchvision_models
from compress.spec.recipe import DataConfig, ModelConfig
from compress.stages.prune import prune

# One or two of each family the issue names; --models all sweeps every builder.
FAMILIES = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "convnext_tiny",
    "densenet121",
    "shufflenet_v2_x1_0",
    "vgg11_bn",
    "squeezenet1_1",
    "mnasnet0_5",
    "googlenet",
    "vit_b_16",
    "swin_t",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    set_threads(2)
    names = torchvision_models() if args.models == ["all"] else args.models
    for name in names:
        size = (
            224 if name.startswith(("vit", "swin", "maxvit")) else args.image_size
        )  # fixed-size models
        data = build_data(
            DataConfig(
                name="synthetic",
                image_size=size,
                synthetic_size=4,
                calibration_size=4,
                eval_batch_size=4,
            ),
            seed=0,
        )
        x = data.example_input(1)
        row = {"model": name, "image_size": size}
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = build_model(ModelConfig(name=name), num_classes=10, in_channels=3).eval()
            pruned = prune(model, data, method="structured", ratio=args.ratio)
            with torch.no_grad():
                shape = tuple(pruned(x).shape)
            if shape != (1, 10):
                raise AssertionError(f"output shape {shape}, expected (1, 10)")
            row.update(ok=True, macs_ratio=round(count_flops(pruned, x) / count_flops(model, x), 3))
        except Exception as error:  # noqa: BLE001 - the sweep reports every failure and goes on
            row.update(
                ok=False,
                error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}",
            )
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
