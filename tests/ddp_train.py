"""Trains a small MLP on a real Fashion-MNIST subset and saves this rank's weights.

Started by tests/test_distributed.py, under torchrun (2 gloo processes) or alone; writes
the weights and the threads the training used (``rank<R>-of-<W>.pt`` / ``.json``).
Usage: python tests/ddp_train.py OUT_DIR PER_PROCESS_BATCH [ACCUMULATE]
"""

import json
import sys
from pathlib import Path

import torch

from compress import distributed
from compress.data import build_data
from compress.models import mlp
from compress.recipe import DataConfig, TrainConfig
from compress.train import train

out, batch = Path(sys.argv[1]), int(sys.argv[2])
accumulate = int(sys.argv[3]) if len(sys.argv) > 3 else 1
distributed.init_from_env("cpu")
# 1,024 training images: divisible by every global batch used, so no rank is padded.
data = build_data(
    DataConfig(train_subset=1024, test_subset=500, calibration_size=200, batch_size=batch), seed=0
)
torch.manual_seed(0)
model = mlp(hidden=64)
train(model, data, TrainConfig(epochs=2, lr=0.05, accumulate=accumulate), seed=0)
name = f"rank{distributed.rank()}-of-{distributed.world_size()}-x{accumulate}"
torch.save(model.state_dict(), out / f"{name}.pt")
(out / f"{name}.json").write_text(json.dumps({"threads": torch.get_num_threads()}))
distributed.shutdown()
