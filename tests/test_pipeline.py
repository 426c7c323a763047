"""The headline command end to end on a reduced budget, and the run directory's rules."""

import json
import subprocess
import sys

import pytest

from compress.artifact import load

EVALUATION_KEYS = {
    "name",
    "params",
    "nonzero_params",
    "size_bytes",
    "flops",
    "macs",
    "memory_access_bytes",
    "compute_dtype",
    "latency_ms",
    "batch_size",
    "threads",
    "throughput_per_s",
    "gflops_per_s",
    "accuracy_top1",
    "accuracy_top5",
    "accuracy_drop",
    "notes",
}
REDUCED = [
    "--set",
    "train.max_steps=15",
    "--set",
    "data.train_subset=2000",
    "--set",
    "data.test_subset=500",
    "--set",
    "evaluate.iterations=20",
    "--set",
    "evaluate.warmup=3",
    "--set",
    "stages[0].quantize.calibration_batches=1",
]


def _compress(*args, env_cache):
    env = {**__import__("os").environ, "COMPRESS_CACHE": str(env_cache)}
    return subprocess.run(
        [sys.executable, "-m", "compress", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_headline_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = _compress(
        "run", "recipes/resnet_int8.yaml", "--out", str(out), *REDUCED, env_cache=tmp_path / "c"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantize:int8_static" in result.stdout and "p50 ms" in result.stdout  # the table

    report = json.loads((out / "report.json").read_text())
    assert {"torch", "device", "threads", "cpu"} <= set(report["environment"])
    base, int8 = report["evaluations"]
    assert [base["name"], int8["name"]] == ["baseline", "quantize:int8_static"]
    for evaluation in (base, int8):
        assert set(evaluation) == EVALUATION_KEYS
        assert set(evaluation["latency_ms"]) == {"p50", "p90", "p99", "mean"}
        assert evaluation["batch_size"] == 1 and evaluation["macs"] > 0
    assert base["accuracy_drop"] is None and set(int8["accuracy_drop"]) == {"points", "percent"}
    assert int8["compute_dtype"] == "int8" and int8["size_bytes"] < 0.3 * base["size_bytes"]
    for name in ("report.md", "recipe.yaml", "run.log", "model/manifest.json"):
        assert (out / name).is_file(), name
    assert "| baseline |" in (out / "report.md").read_text()
    assert load(out / "model").param_counts[0] == base["params"]

    # The trained baseline is cached: `eval` reuses it instead of training again.
    again = _compress("eval", "recipes/resnet_int8.yaml", *REDUCED, env_cache=tmp_path / "c")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "using the cached baseline" in again.stderr
    assert f"{base['accuracy_top1']:.2f}" in again.stdout

    # A run directory is never reused.
    refused = _compress(
        "run", "recipes/resnet_int8.yaml", "--out", str(out), env_cache=tmp_path / "c"
    )
    assert refused.returncode == 2
    assert "never writes over a run" in refused.stderr and "Traceback" not in refused.stderr


def test_runtime_failure_exits_1_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nmodel: {{name: resnet18, checkpoint: {tmp_path / 'missing.pt'}}}\n"
        "data: {name: synthetic, synthetic_channels: 1}\n"
    )
    result = _compress("run", str(recipe), "--out", str(tmp_path / "run"), env_cache=tmp_path / "c")
    assert result.returncode == 1
    assert "missing.pt" in result.stderr and "Traceback" not in result.stderr
    assert "run failed" in (tmp_path / "run" / "run.log").read_text()
