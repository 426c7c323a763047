import subprocess
import sys

import pytest
import torch

from compress.data import build_data
from compress.models import build_model
from compress.recipe import DataConfig, ModelConfig, TrainConfig
from compress.train import train


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m compress ARGS`` in a subprocess (inheriting the test's cache folder)."""
    return subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Trained baselines go to a per-test cache, never the user's."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST: 8,000 training images, 1,000 calibration, 2,000 test."""
    return build_data(DataConfig(train_subset=8000, test_subset=2000, eval_batch_size=250), seed=0)


@pytest.fixture(scope="session")
def trained_tiny(fmnist):
    """The tiny CNN trained for one epoch on the real subset (a few seconds on 2 cores)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=10, in_channels=1)
    return train(model, fmnist, TrainConfig(epochs=3, lr=0.1), seed=0)


@pytest.fixture(scope="session")
def synthetic():
    return build_data(
        DataConfig(
            name="synthetic",
            synthetic_size=64,
            synthetic_channels=1,
            calibration_size=32,
            eval_batch_size=32,
        ),
        seed=0,
    )
