"""Data-parallel training and runs under torchrun: 2 CPU processes with gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.ddp_train import main as train_alone

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
TORCHRUN += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # any free port


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_ranks_end_identical_and_match_one_process_on_the_global_batch(tmp_path):
    # Global batch 64: 2 ranks x 32, and 2 ranks x 2 accumulated micro-batches of 16.
    two = _torchrun("tests/ddp_train.py", str(tmp_path), "64")
    assert two.returncode == 0, two.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        train_alone(tmp_path, 64)  # in this process: one process, all the cores
    finally:
        torch.set_num_threads(threads)
    rank0, rank1, single, rank0_accumulated = (
        torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for name in ("rank0-of-2-x1", "rank1-of-2-x1", "rank0-of-1-x1", "rank0-of-2-x2")
    )
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the replicas identical
        assert torch.allclose(rank0[key], single[key], atol=1e-4), key  # same global batches
        assert torch.allclose(rank0_accumulated[key], single[key], atol=1e-4), key
        assert not torch.equal(rank0[key], torch.zeros_like(rank0[key]))
    # BatchNorm: each rank normalises over its 32 images unless sync_batchnorm makes it
    # the global batch of 64, as one process has it (weights and running statistics).
    single, synced, synced1, alone = (
        torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for name in (
            "rank0-of-1-bn-sync1",
            "rank0-of-2-bn-sync1",
            "rank1-of-2-bn-sync1",
            "rank0-of-2-bn-sync0",
        )
    )
    worst = {"synced": 0.0, "alone": 0.0}
    for key in single:
        assert torch.equal(synced[key], synced1[key]), key
        if single[key].is_floating_point():
            worst["synced"] = max(worst["synced"], (synced[key] - single[key]).abs().max().item())
            worst["alone"] = max(worst["alone"], (alone[key] - single[key]).abs().max().item())
    assert worst["synced"] < 1e-4 and worst["alone"] > 100 * worst["synced"], worst
    # Each rank takes its share of the machine's cores; one process takes them all.
    cores = len(os.sched_getaffinity(0))
    threads = {
        name: json.loads((tmp_path / f"{name}.json").read_text())["threads"]
        for name in ("rank0-of-2-x1", "rank1-of-2-x1", "rank0-of-1-x1")
    }
    assert threads == {
        "rank0-of-2-x1": max(1, cores // 2),
        "rank1-of-2-x1": max(1, cores // 2),
        "rank0-of-1-x1": cores,
    }


@pytest.mark.slow
def test_recipe_runs_under_torchrun_with_one_writer(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: ddp\nmodel: {name: 'compress.models:mlp', kwargs: {hidden: 64}}\n"
        "data: {train_subset: 1024, test_subset: 501, calibration_size: 200, batch_size: 32}\n"
        "train: {epochs: 1, lr: 0.05}\n"
        "evaluate: {warmup: 1, iterations: 5, runtimes: [torch]}\n"
        "stages:\n"
        "  - prune: {method: magnitude, sparsity: 0.5, fine_tune: {epochs: 1, lr: 0.01}}\n"
        "  - quantize: {method: int8_static, goal: size, calibration_batches: 1}\n"
    )
    out = tmp_path / "run"
    result = _torchrun("-m", "compress", "run", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone prints the table
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["processes"] == 2
    names = [e["name"] for e in report["evaluations"]]
    assert names == ["baseline", "prune:magnitude", "quantize:int8_static"]
    # Accuracy counted over the whole (odd-sized) test split: 501 images, none twice.
    for e in report["evaluations"]:
        assert round(e["score"] * 501 / 100, 6) == round(e["score"] * 501 / 100)
        assert e["score"] > 30
    assert len(list((out / "checkpoints").rglob("last.pt"))) == 1  # the fine-tune's, once
    # By default each rank trains on its share of the cores, and rank 0 times the model
    # alone with all of them (what a deployment has).
    cores = len(os.sched_getaffinity(0))
    log = (out / "run.log").read_text()
    assert f"2 processes, {max(1, cores // 2)} threads each" in log
    assert all(e["threads"] == cores for e in report["evaluations"])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_synced_batchnorm_is_batchnorm_over_the_summed_statistics(monkeypatch, momentum):
    """One process standing for a world whose all-reduce returns this rank's sums: the
    synced layer must then be torch's BatchNorm (output, gradients, running statistics,
    the cumulative average of momentum None), and count in fp32 for half inputs."""
    from compress.core import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce_with_gradient", lambda t: t)
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(8, momentum=momentum)
    synced = torch.nn.BatchNorm2d(8, momentum=momentum)
    synced.load_state_dict(plain.state_dict())
    model = torch.nn.Sequential(synced)
    with distributed.synced_batchnorm(model) as layers:
        assert layers == 1 and type(synced).__name__ == "SyncedBatchNorm2d"
        for _ in range(3):
            x = torch.randn(16, 8, 5, 5) * 3 + 1
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            (plain(x1) ** 2).sum().backward()
            (synced(x2) ** 2).sum().backward()
            assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
        assert torch.allclose(plain(x), synced(x), atol=1e-4)
        for key, value in plain.state_dict().items():
            assert torch.allclose(value.float(), synced.state_dict()[key].float(), atol=1e-5), key
        images = torch.randn(64, 8, 32, 32).half()  # 65,536 values a channel
        half = synced(images)
        expected = torch.nn.functional.batch_norm(images.float(), None, None, training=True)
        assert half.dtype == torch.half and torch.allclose(half.float(), expected, atol=1e-2)
    assert type(synced) is torch.nn.BatchNorm2d  # plain again after the block
