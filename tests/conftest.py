import contextlib
import io
import logging
import subprocess
import sys

import pytest
import torch

from compress.data import build_data
from compress.data.shakespeare import shakespeare_archive
from compress.models.build import build_model
from compress.spec.recipe import DataConfig, ModelConfig, TrainConfig
from compress.stages.quantize._pt2e import CPP_WRAPPER_VARIABLE
from compress.training.train import train
from compress.workflow.cli import main


def run_cli(*args: str, process: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m compress ARGS``: its exit code, stdout and stderr. In this process by
    default (the same ``main`` with its own stdout, stderr and log handler: no 5 s of
    imports per call); with ``process``, in a subprocess, as a user's shell runs it."""
    if process:
        return subprocess.run(
            [sys.executable, "-m", "compress", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    out, err = io.StringIO(), io.StringIO()
    root, threads = logging.getLogger(), torch.get_num_threads()
    saved = root.handlers[:]
    root.handlers.clear()  # main's logging.basicConfig then writes to this call's stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as error:  # argparse's usage errors
                code = error.code if isinstance(error.code, int) else 0
    finally:
        root.handlers[:] = saved
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["compress", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def _session_peaks(tmp_path_factory):
    """The machine peaks (~0.3 s to measure) are the machine's: measured once a session."""
    return tmp_path_factory.mktemp("peaks")


# What `make setup` put in the user's cache and tests read (never write): Shakespeare's works.
SETUP_DATA = shakespeare_archive().parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _session_peaks):
    """Trained baselines go to a per-test cache, never the user's; the peaks are shared, and
    so is the data `make setup` downloaded."""
    cache = tmp_path_factory.mktemp("cache")  # beside the test's tmp_path, not in it
    (cache / "peaks").symlink_to(_session_peaks, target_is_directory=True)
    if SETUP_DATA.is_dir():
        (cache / SETUP_DATA.name).symlink_to(SETUP_DATA, target_is_directory=True)
    monkeypatch.setenv("COMPRESS_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _quick_int8_compiles(monkeypatch):
    """INT8 models compile without inductor's C++ wrapper: 2 s per batch size, not 9.
    No assertion times a call; test_int8_kernels_really_run keeps the default."""
    monkeypatch.setenv(CPP_WRAPPER_VARIABLE, "0")


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST: 8,000 training images, 1,000 calibration, 2,000 test."""
    return build_data(DataConfig(train_subset=8000, test_subset=2000, eval_batch_size=250), seed=0)


@pytest.fixture(scope="session")
def tiny(fmnist):
    """The tiny CNN after one epoch on the real subset (~85 %): for tests of mechanics, which
    need a model that learned something but not the accuracy the slow tests measure."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=10, in_channels=1)
    return train(model, fmnist, TrainConfig(epochs=1, lr=0.1, validate=False), seed=0)


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


@pytest.fixture(scope="session")
def scenes_folder(tmp_path_factory):
    """Real Fashion-MNIST garments on 64x64 scenes (600 train, 200 test), in the VOC layout."""
    from compress.data import fashion_mnist_scenes

    folder = tmp_path_factory.mktemp("scenes")
    return fashion_mnist_scenes(folder, counts={"train": 600, "test": 200})


@pytest.fixture(scope="session")
def scenes(scenes_folder):
    """The scenes as segmentation data through the VOC reader (100 held out to calibrate)."""
    config = DataConfig(
        name="voc",
        root=str(scenes_folder),
        classes=11,
        calibration_size=100,
        mean=[0.1009],
        std=[0.2516],
        batch_size=32,
        eval_batch_size=100,
    )
    return build_data(config, seed=0)


@pytest.fixture(scope="session")
def tiny_segmenter(scenes):
    """The tiny segmenter after 10 epochs on 500 real scenes (~28 mIoU; background alone
    scores ~8): a model that learned something, in seconds."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tests.tiny:tiny_segmenter"), data=scenes)
    return train(model, scenes, TrainConfig(epochs=10, lr=0.2, validate=False), seed=0)


# A few blocks of Shakespeare by character, 32 long: the language-model tests' data.
TINY_TEXT = {"name": "shakespeare_char", "context": 32, "calibration_size": 20, "test_subset": 20}


@pytest.fixture(scope="session")
def tiny_text():
    return build_data(TINY_TEXT)
