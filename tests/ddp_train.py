"""Trains a small MLP on a real Fashion-MNIST subset, twice: in batches of GLOBAL_BATCH /
processes, and in half those with 2 micro-batches accumulated per step; saves this rank's
weights and the threads the training used (``rank<R>-of-<W>-x<ACCUMULATE>.pt`` / ``.json``).
Then a small CNN with BatchNorm, with and without ``sync_batchnorm``
(``rank<R>-of-<W>-bn-sync<0|1>.pt``).

Run by tests/test_distributed.py under torchrun (2 gloo processes), and called there alone.
Usage: python tests/ddp_train.py OUT_DIR GLOBAL_BATCH
"""

import json
import sys
from pathlib import Path

import torch

from compress.core import distributed
from compress.data import build_data
from compress.models.build import mlp
from compress.spec.recipe import DataConfig, TrainConfig
from compress.training.train import train


def _cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        *(nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
        *(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()),
        *(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
    )


def main(out: Path, global_batch: int) -> None:
    distributed.init_from_env("cpu")
    for accumulate in (1, 2):
        batch = global_batch // distributed.world_size() // accumulate
        # 1,024 training images: divisible by every global batch used, so no rank is padded.
        data = build_data(
            DataConfig(train_subset=1024, test_subset=500, calibration_size=200, batch_size=batch),
            seed=0,
        )
        torch.manual_seed(0)
        model = mlp(hidden=64)
        train(model, data, TrainConfig(epochs=2, lr=0.05, accumulate=accumulate), seed=0)
        name = f"rank{distributed.rank()}-of-{distributed.world_size()}-x{accumulate}"
        torch.save(model.state_dict(), out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps({"threads": torch.get_num_threads()}))
    for sync in (False, True):
        batch = global_batch // distributed.world_size()
        data = build_data(
            DataConfig(train_subset=1024, test_subset=500, calibration_size=200, batch_size=batch),
            seed=0,
        )
        torch.manual_seed(0)
        model = _cnn()
        config = TrainConfig(epochs=1, lr=0.05, sync_batchnorm=sync, validate=False)
        train(model, data, config, seed=0)
        name = f"rank{distributed.rank()}-of-{distributed.world_size()}-bn-sync{int(sync)}"
        torch.save(model.state_dict(), out / f"{name}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
