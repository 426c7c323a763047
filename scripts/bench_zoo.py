"""The torchvision zoo through INT8 and structured pruning, each in its best runtime, against
the float model's best runtime and NNCF + OpenVINO INT8 of the same model, side by side.

For each model and image size (random weights: latency does not depend on their values;
synthetic images; batch 1; nothing is downloaded), the contenders:

- ``fp32_ort``, ``fp32_ov`` (and ``fp32_torch``, compiled by inductor, with ``--inductor``):
  the float model;
- ``int8_ort``, ``int8_ov`` (and ``int8_torch``): compress's INT8 as the quantize stage makes it
  (``int8_static``, ``goal: size``: the INT8 graph itself; ``goal: speed``, the default, keeps
  the float model wherever this graph is not faster, after timing both);
- ``nncf_ov_int8``: ``nncf.quantize`` on the OpenVINO model (the peer's default flow);
- ``pruned_ort``, ``pruned_ov`` (and ``pruned_torch``): compress's structured pruning to
  0.5x MACs, no fine-tune;
- ``chain_ov``: that pruned model, then compress's INT8, in OpenVINO.

Every toolkit calibrates on the same 4 batches. Rounds alternate the contenders, so that a
drift of this shared machine weighs on all alike; figures are medians over rounds. One JSON
line per model and size: each p50, the best of each kind and the ratios issue 34 sets
targets on. A contender a toolkit cannot make is listed under ``failed`` with the first line
of its error; transformers (``vit_*``, ``swin_*``, ``maxvit_t``) run at 224 only.

    python scripts/bench_zoo.py                                  # the issue's 17, at 224 and 64
    python scripts/bench_zoo.py --models resnet18 mobilenet_v3_small --sizes 64 --rounds 2
    python scripts/bench_zoo.py --models all > zoo.jsonl         # every torchvision classifier
    python scripts/bench_zoo.py --table zoo.jsonl                # docs/results.md's table
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from bench_quantize import CALIBRATION_BATCHES, alternating_rounds, nncf_quantize

from compress.core.distributed import set_threads
from compress.core.errors import first_line
from compress.data import build_data
from compress.measure.deploy import export
from compress.measure.machine import describe_isa
from compress.measure.machine import isa as isa_features
from compress.measure.runtimes import InductorModel, OnnxRuntimeModel, OpenVinoModel
from compress.models.build import build_model
from compress.spec.recipe import DataConfig
from compress.stages.prune import prune
from compress.stages.quantize import quantize

# The fifteen classifiers issue 34 tried, and the three its peer table adds.
ISSUE_MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "shufflenet_v2_x0_5",
    "mobilenet_v3_small",
    "densenet121",
    "efficientnet_b0",
    "maxvit_t",
    "mnasnet0_5",
    "regnet_x_400mf",
    "squeezenet1_1",
    "googlenet",
    "swin_t",
    "convnext_tiny",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg11_bn",
]
TRANSFORMERS = ("vit_", "swin_", "maxvit_")  # patch grids and windows sized for 224
TARGET_MACS = 0.5
# Issue 34's targets (best runtime against best runtime).
INT8_VS_FP32 = 1.0  # no INT8 slower than its float model
INT8_VS_NNCF = 1.05
PRUNED_VS_FP32 = {224: 0.7, 64: 1.0}
CHAIN_VS_PEER = 0.65  # at 224, on these:
CHAIN_TARGET_MODELS = ("resnet18", "resnet50", "mobilenet_v2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=ISSUE_MODELS, help="names, or 'all'")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed s per contender/round")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile")
    parser.add_argument("--table", type=Path, help="print the markdown table of a JSON-lines file")
    args = parser.parse_args()
    if args.table is not None:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line]))
        return
    if args.models == ["all"]:
        args.models = torchvision.models.list_models(module=torchvision.models)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    threads = set_threads(args.threads)
    isa = describe_isa(isa_features())
    for size in args.sizes:
        for name in args.models:
            if size < 224 and name.startswith(TRANSFORMERS):
                continue
            started = time.perf_counter()
            folder = Path(tempfile.mkdtemp(prefix=f"zoo-{name}-{size}-"))
            try:
                row = bench_model(name, size, folder, threads, args)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            row |= {"isa": isa, "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)


def bench_model(name: str, size: int, folder: Path, threads: int, args) -> dict:
    """One model at one size: make every contender (a failure is recorded, not fatal), time
    them in alternating rounds, and return the JSON row."""
    data = build_data(
        DataConfig(
            name="synthetic",
            image_size=size,
            synthetic_size=16,
            calibration_size=8 * CALIBRATION_BATCHES,
            eval_batch_size=8,
        ),
        seed=0,
    )
    calibration = [images for images, _ in data.loader("calibration")][:CALIBRATION_BATCHES]
    contenders: dict[str, torch.nn.Module] = {}
    failed: dict[str, str] = {}
    details: dict[str, float] = {}

    def attempt(label: str, make):
        """What ``make`` returns, or None with the first line of its error recorded."""
        try:
            return make()
        except Exception as error:  # noqa: BLE001 - what a toolkit cannot do is a result
            failed[label] = first_line(error)
            print(f"{name} {size}: {label} failed: {failed[label]}", file=sys.stderr)
            return None

    def contender(label: str, make) -> None:
        made = attempt(label, make)
        if made is not None:
            contenders[label] = made

    def deployed(model: torch.nn.Module, stem: str, runtimes=("ort", "ov")) -> None:
        """``stem`` in each runtime (and in PyTorch, compiled, when asked)."""
        if args.inductor:
            # compress's INT8 runs its own compiled graph; a float model goes through inductor
            compiled = (
                (lambda: model) if stem in ("int8", "chain") else lambda: InductorModel(model)
            )
            contender(f"{stem}_torch", compiled)
        if "ort" in runtimes:
            contender(
                f"{stem}_ort", lambda: OnnxRuntimeModel(_export(model, stem, "onnx"), threads)
            )
        contender(f"{stem}_ov", lambda: OpenVinoModel(_export(model, stem, "openvino"), threads))

    def _export(model: torch.nn.Module, stem: str, format: str) -> Path:
        return export(model, folder / stem, format, data.example_input(2))

    torch.manual_seed(0)
    fp32 = build_model(name, data=data).eval()
    deployed(fp32, "fp32")
    if (folder / "fp32.xml").exists():
        contender(
            "nncf_ov_int8",
            lambda: OpenVinoModel(nncf_quantize(folder / "fp32.xml", calibration), threads),
        )
    int8 = attempt("int8", lambda: _int8(fp32, data))
    if int8 is not None:
        deployed(int8, "int8")
    pruned = attempt(
        "pruned", lambda: prune(fp32, data, method="structured", target_macs=TARGET_MACS)
    )
    if pruned is not None:
        details["macs_ratio"] = round(pruned.stage_details["macs_ratio"], 3)  # the stage's count
        deployed(pruned, "pruned")
        chain = attempt("chain", lambda: _int8(pruned, data))
        if chain is not None:
            deployed(chain, "chain", runtimes=("ov",))
    p50 = alternating_rounds(contenders, data.example_input(1), args) if contenders else {}
    ms = {label: statistics.median(v) for label, v in p50.items()}
    return row_of(name, size, threads, args.rounds, ms, failed, details)


def _int8(model: torch.nn.Module, data) -> torch.nn.Module:
    return quantize(
        model, data, method="int8_static", calibration_batches=CALIBRATION_BATCHES, goal="size"
    )


def row_of(name, size, threads, rounds, ms: dict, failed: dict, details: dict) -> dict:
    """Each p50 and, for each kind (fp32, int8, pruned, chain), its fastest runtime; then the
    ratios of issue 34 and whether each target holds."""
    row: dict = {"model": name, "image_size": size, "batch_size": 1, "threads": threads}
    row |= {"rounds": rounds, **details, **{f"{k}_p50_ms": round(v, 3) for k, v in ms.items()}}
    best = {}
    for kind in ("fp32", "int8", "pruned", "chain", "nncf_ov_int8"):
        labels = [k for k in ms if k == kind or k.startswith(f"{kind}_")]
        if labels:
            best[kind] = min(labels, key=ms.get)
            row[f"best_{kind}"] = best[kind]

    def ratio(a: str, b: str) -> float | None:
        return round(ms[best[a]] / ms[best[b]], 3) if a in best and b in best else None

    row |= {
        "int8_vs_fp32": ratio("int8", "fp32"),
        "int8_vs_nncf": ratio("int8", "nncf_ov_int8"),
        "nncf_vs_fp32": ratio("nncf_ov_int8", "fp32"),
        "pruned_vs_fp32": ratio("pruned", "fp32"),
        "chain_vs_nncf": ratio("chain", "nncf_ov_int8"),
    }
    if row["int8_vs_fp32"] is not None:  # what the stage's default check would keep
        row["int8_default_keeps"] = "int8" if row["int8_vs_fp32"] < 1.0 else "float"
    targets = {
        "int8_vs_fp32": INT8_VS_FP32,
        "int8_vs_nncf": INT8_VS_NNCF,
        "pruned_vs_fp32": PRUNED_VS_FP32.get(size),
        "chain_vs_nncf": CHAIN_VS_PEER if size == 224 and name in CHAIN_TARGET_MODELS else None,
    }
    row["targets_met"] = {
        k: row[k] <= t for k, t in targets.items() if t is not None and row[k] is not None
    }
    if failed:
        row["failed"] = failed
    return row


def table(rows: list[dict]) -> str:
    """The markdown table docs/results.md quotes: one line per model and size; a target met
    in bold; "(float kept)" where the quantize stage's default check returns the float model."""
    lines = [
        "| model | size | fp32 best ms | INT8 / fp32 | INT8 / NNCF | NNCF / fp32 | pruned / fp32 "
        "(MACs) | chain / NNCF | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fp32 = row.get("best_fp32")
        cells = [
            row["model"],
            str(row["image_size"]),
            f"{row[f'{fp32}_p50_ms']:.2f} ({fp32.removeprefix('fp32_')})" if fp32 else "-",
            _ratio(row, "int8_vs_fp32")
            + (" (float kept)" if row.get("int8_default_keeps") == "float" else ""),
            *(_ratio(row, key) for key in ("int8_vs_nncf", "nncf_vs_fp32")),
            _ratio(row, "pruned_vs_fp32")
            + (f" ({row['macs_ratio']:.2f})" if "macs_ratio" in row else ""),
            _ratio(row, "chain_vs_nncf"),
            "; ".join(f"{k}: {v[:80]}" for k, v in row.get("failed", {}).items()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    met = row.get("targets_met", {}).get(key)
    return f"**{value:.2f}**" if met else f"{value:.2f}"


if __name__ == "__main__":
    main()
