"""Reproducible experiments: `compare` across runs, `make experiments`, the Python API."""

import csv
import json
import shutil
import subprocess

import pytest
import torch

import compress
from compress.workflow.plots import pareto_front
from compress.workflow.summary import SUMMARY_COLUMNS
from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"
TINY = (
    "name: {name}\nmodel: {{name: 'tests.tiny:tiny_cnn'}}\n"
    "data: {{train_subset: 1000, test_subset: 300, calibration_size: 300}}\n"
    "train: {{max_steps: 15, lr: 0.1}}\n"
    "evaluate: {{warmup: 1, iterations: 5, runtimes: [torch]}}\n"
    "stages: [{stage}]\n"
)


def _recipe(folder, name, stage):
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name, stage=stage))
    return path


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(1.0, 90.0), (2.0, 91.0), (3.0, 89.0), (2.5, 91.0), (0.5, 80.0)]
    assert pareto_front(points) == [(0.5, 80.0), (1.0, 90.0), (2.0, 91.0)]


@pytest.mark.slow
def test_compare_two_runs_writes_table_csv_and_plot(tmp_path):
    runs = tmp_path / "runs"
    for name, stage in (
        ("sparse", "{prune: {method: magnitude, sparsity: 0.5}}"),
        ("thin", "{prune: {method: structured, ratio: 0.5}}"),
    ):
        done = run_cli("run", str(_recipe(tmp_path, name, stage)), "--out", str(runs / name))
        assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "results"
    result = run_cli("compare", str(runs), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["run"] for r in rows] == ["sparse", "thin"]
    assert list(rows[0]) == SUMMARY_COLUMNS
    assert rows[0]["chain"] == "prune:magnitude" and float(rows[0]["macs_x"]) == 1.0
    assert float(rows[1]["macs_x"]) < 0.6  # half the channels: about a quarter of the MACs
    assert "| sparse | prune:magnitude |" in (out / "summary.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == PNG
    # An earlier summary is not replaced unless asked; a folder without runs is refused.
    again = run_cli("compare", str(runs), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    empty = run_cli("compare", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no finished run" in empty.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_experiments_on_a_tiny_selection(tmp_path):
    recipe = _recipe(
        tmp_path,
        "tiny_prune",
        "{prune: {method: magnitude, sparsity: 0.5, fine_tune: {epochs: 0, max_steps: 5}}}",
    )
    make = [
        "make",
        "experiments",
        f"RECIPES={recipe}",
        f"EXPERIMENTS={tmp_path / 'runs'}",
        f"RESULTS={tmp_path / 'results'}",
    ]
    result = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = tmp_path / "runs" / "tiny_prune" / "report.json"
    report = json.loads(finished.read_text())
    # The same folder again: an interrupted run resumes, a finished one is kept as it is.
    finished.unlink()
    resumed = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and "--resume" in resumed.stdout, resumed.stderr[-3000:]
    accuracies = [e["score"] for e in report["evaluations"]]
    assert [e["score"] for e in json.loads(finished.read_text())["evaluations"]] == (accuracies)
    kept = finished.read_bytes()
    again = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "finished in" in again.stdout, again.stderr[-3000:]
    assert finished.read_bytes() == kept
    assert report["control"]["training"][0]["steps"] == 5  # experiments run with the control
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| tiny_prune | prune:magnitude |" in summary
    row = next(csv.DictReader((tmp_path / "results" / "summary.csv").open()))
    assert row["metric"] == "top-1" and float(row["control_score"]) == pytest.approx(
        report["control"]["score"], abs=0.005
    )  # the summary's two decimals
    # The baseline every figure rests on is named.
    assert "tests.tiny:tiny_cnn trained on fashion_mnist: 4 epochs, at most 15 steps" in summary
    assert (tmp_path / "results" / "pareto.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_python_api_chains_like_the_recipe(tmp_path):
    data = compress.build_data({"train_subset": 2000, "test_subset": 500, "calibration_size": 500})
    torch.manual_seed(0)
    teacher = compress.build_model("tests.tiny:tiny_cnn", data=data)
    teacher = compress.train(teacher, data, {"epochs": 0, "max_steps": 40, "lr": 0.1})
    base = compress.evaluate(
        teacher, data, {"warmup": 1, "iterations": 5, "runtimes": ["torch"]}, name="baseline"
    )
    model = compress.prune(teacher, data, method="structured", target_macs=0.5)
    model = compress.distill(model, data, teacher=teacher, train={"epochs": 0, "max_steps": 20})
    model = compress.quantize(model, data, method="int8_static", goal="size", calibration_batches=1)
    report = compress.evaluate(
        model, data, {"warmup": 1, "iterations": 5, "runtimes": ["torch"]}, baseline=base
    )
    assert report.macs <= 0.5 * base.macs and report.compute_dtype == "int8"
    assert report.drop is not None and report.score > 30
    compress.save(model, tmp_path / "model")
    again = compress.load(tmp_path / "model", trust_code=True)
    images = data.example_input(250)  # an evaluation batch: the shape compiled already
    assert torch.equal(again(images).argmax(1), model(images).argmax(1))
    assert set(compress.__all__) >= {"build_model", "build_data", "prune", "distill", "quantize"}
