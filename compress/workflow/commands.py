"""What each `python -m compress` command does, once cli.py has parsed its arguments: each
returns the process's exit code.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import yaml

from compress.core import distributed
from compress.core.distributed import set_threads
from compress.core.errors import ExportError, RecipeError, ReportError, UsageError
from compress.core.registry import STAGES
from compress.core.storage import write_atomic
from compress.core.traits import traits
from compress.data import DATASETS, build_data
from compress.measure.deploy import (
    FORMATS,
    RUNTIMES,
    deployed,
    deployed_files,
    export,
    missing_runtimes,
)
from compress.measure.evaluate import evaluate
from compress.measure.machine import environment
from compress.measure.profile import profile_model
from compress.models.artifact import MANIFEST, example_batch, input_dtype, load, read_manifest
from compress.spec.architectures import torchvision_models
from compress.spec.recipe import load_recipe
from compress.spec.tasks import TASKS
from compress.stages.quantize import QuantizeConfig, sensitivity
from compress.workflow.baseline import baseline_model
from compress.workflow.pipeline import resolve_device, run
from compress.workflow.plots import sensitivity_chart
from compress.workflow.report import Report, profile_markdown, write_profile
from compress.workflow.rundir import make_run_dir, recipe_imports
from compress.workflow.search import search
from compress.workflow.summary import summarize, write_summary
from compress.workflow.tables import markdown_table

TRUST_HELP = (
    "load a model folder whose spec names Python code ('package.module:factory') and run"
    " that code; only for folders whose author you trust (off: such folders are refused)"
)


def _run(args) -> int:

    try:
        report = run(args.recipe, out=args.out, overrides=args.overrides, resume=args.resume)
    finally:
        distributed.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(report.table())
        print(f"\nrun directory: {report.run_dir}")
    return 0


def _eval(args) -> int:

    recipe = load_recipe(args.recipe, args.overrides)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, seed=recipe.seed)
    model = (
        _load_model(args, recipe).to(device) if args.model else baseline_model(recipe, data, device)
    )
    name = args.model or "baseline"
    report = Report(recipe.name, environment(device))
    report.evaluations.append(
        evaluate(model, data, recipe.evaluate, name=name, device=device, artifact=args.model)
    )
    print(report.table())
    return 0


def _load_model(args, recipe):
    """``--model``'s folder; its spec may name the recipe's own import paths."""

    return load(args.model, trust_code=args.trust_code, trusted_imports=recipe_imports(recipe))


def _validate(args) -> int:

    recipe = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    for name in sorted(recipe_imports(recipe)):
        module = name.partition(":")[0]
        print(f"note: this recipe runs code from the module {module!r} ({name})", file=sys.stderr)
    print(f"ok: {args.recipe} is valid", file=sys.stderr)
    return 0


def _sensitivity(args) -> int:

    recipe = load_recipe(args.recipe, args.overrides)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, seed=recipe.seed)
    model = baseline_model(recipe, data, device)
    stage = next((s for s in recipe.stages if s.kind == "quantize"), None)
    config = stage.config if stage else QuantizeConfig()
    rows = sensitivity(model, data, config)
    out = make_run_dir(f"{recipe.name}-sensitivity", args.out)
    lines = [
        f"# Per-layer sensitivity: {recipe.name}, {config.method}",
        "",
        "One layer quantized at a time, the rest float; measured on the calibration split.",
        "",
        *markdown_table(
            ["layer", "accuracy drop (pts)", "SQNR (dB)"],
            [[r["layer"], f"{r['drop']:.2f}", f"{r['sqnr_db']:.1f}"] for r in rows],
        ),
    ]
    write_atomic(out / "sensitivity.md", "\n".join(lines) + "\n")
    write_atomic(out / "sensitivity.json", json.dumps(rows, indent=2))
    sensitivity_chart(
        rows, out / "sensitivity.png", f"{recipe.name}: {config.method}, one layer at a time"
    )
    print("\n".join(lines[4:]))
    print(f"\nwritten to {out}")
    return 0


def _search(args) -> int:

    targets = {
        "--target-latency-ms": (args.target_latency_ms, "target_latency_ms", "target_latency_x"),
        "--target-size-mb": (args.target_size_mb, "target_size_mb", "target_size_x"),
        "--target-macs": (args.target_macs, "target_macs", None),
    }
    given = [(flag, *spec) for flag, spec in targets.items() if spec[0] is not None]
    if len(given) != 1:
        raise UsageError(
            f"search: give exactly one of {', '.join(targets)}"
            f" (got {', '.join(g[0] for g in given) or 'none'})"
        )
    flag, text, absolute, relative = given[0]
    key = relative if relative and text.endswith("x") else absolute
    try:
        value = float(text.removesuffix("x") if key == relative else text)
    except ValueError:
        raise UsageError(
            f"search: {flag} {text!r} is not a number"
            + (" (e.g. 2.5, or 0.3x for a fraction of the baseline's)" if relative else "")
        ) from None
    found = search(
        args.recipe,
        {
            key: value,
            "max_drop": args.max_drop,
            "runtime": args.runtime,
            "budget_minutes": args.budget_minutes,
            "max_distill_stretch": args.max_distill_stretch,
        },
        out=args.out,
        overrides=args.overrides,
    )
    print(found.report.table())
    print(f"\n{found.summary}")
    print(f"run directory: {found.report.run_dir} (search.md: every candidate)")
    return 0


def _profile(args) -> int:

    recipe = load_recipe(args.recipe, args.overrides)
    threads = set_threads(recipe.evaluate.threads)
    data = build_data(recipe.data, seed=recipe.seed)
    model = _load_model(args, recipe) if args.model else baseline_model(recipe, data, "cpu")
    example = data.example_input(recipe.evaluate.latency_batch_size)
    result = profile_model(model.cpu().eval(), example, threads)
    out = make_run_dir(f"{recipe.name}-profile", args.out)
    written = write_profile(result, out, args.model or f"{recipe.name} baseline")
    print(profile_markdown(result), end="")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


def _compare(args) -> int:

    folders = []
    for given in args.runs:
        path = Path(given)
        found = sorted(p.parent for p in path.rglob("report.json")) if path.is_dir() else []
        if not found:
            raise RecipeError(
                f"compare: {given}: no finished run there (a run directory holds report.json)"
            )
        folders += found
    out = Path(args.out)
    existing = [n for n in ("summary.md", "summary.csv", "pareto.png") if (out / n).exists()]
    if existing and not args.overwrite:
        raise RecipeError(
            f"compare: --out {out} already holds {', '.join(existing)}; pass --overwrite to"
            " replace them or choose another folder"
        )
    try:
        rows = summarize([Report.read(f) for f in folders])
    except ReportError as error:
        raise RecipeError(f"compare: {error}") from None
    written = write_summary(rows, out, title=f"Summary of {len(folders)} runs")
    print((out / "summary.md").read_text(), end="")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


def _export(args) -> int:

    folder = Path(args.model)
    if not (folder / MANIFEST).is_file():
        raise RecipeError(f"export: {folder}: not a compress model folder (no {MANIFEST} in it)")
    out = Path(args.out) if args.out else folder.parent / f"{folder.name}{FORMATS[args.format]}"
    if out.suffix != FORMATS[args.format]:
        raise RecipeError(
            f"export: --out {out}: a {args.format} file ends in {FORMATS[args.format]}"
        )
    if out.exists():
        raise RecipeError(f"export: --out {out} exists; compress never overwrites a file")
    manifest = read_manifest(folder)
    shape = _export_shape(args, folder, manifest)
    # Float images, or a language model's integer token ids (float32 where not recorded).
    dtype = input_dtype(manifest.get("input_dtype"), folder)
    model = load(folder, trust_code=args.trust_code).cpu()
    example = example_batch(model, shape, dtype)  # ids: each below the model's vocabulary
    export(model, out, args.format, example)
    runtime = "onnxruntime" if args.format == "onnx" else "openvino"
    try:  # checked before it is kept: the runtime loads it and agrees with torch
        in_runtime = deployed(model, runtime, 1, example, out.parent / out.stem)
        # An INT8 model's reference graph computes its numbers without compiling kernels.
        reference = traits(model).reference
        with torch.inference_mode():
            difference = (in_runtime(example) - reference(example).float()).abs().max().item()
    except ExportError:
        for file in deployed_files(out):
            file.unlink(missing_ok=True)
        raise
    print(f"written: {out} ({runtime} max |logit difference| from torch: {difference:.3g})")
    return 0


def _export_shape(args, folder: Path, manifest: dict) -> list[int]:
    """One input's shape to export with: ``--input-shape``, else the folder's record."""
    if args.input_shape:
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1:
            raise RecipeError(
                f"export: --input-shape {args.input_shape!r}: expected C,H,W (or T for token"
                " ids) as positive integers, e.g. 1,28,28"
            )
    else:
        shape = list(manifest.get("input_shape") or [])
        if not shape:
            raise RecipeError(
                f"export: {folder} does not record its input shape; pass --input-shape C,H,W"
            )
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= 4
        and all(isinstance(d, int) and 1 <= d <= 8192 for d in shape)
        and math.prod(shape) <= 1 << 26
    ):
        raise RecipeError(
            f"export: input shape {shape!r} is not one input's (C,H,W, or T token ids)"
        )
    return shape


def _list(args) -> int:

    print("stages and methods:")
    for name, stage in STAGES.items():
        print(f"  {name}: {', '.join(stage.methods)}")
    print("datasets (data.name), or 'package.module:factory':")
    for spec in DATASETS.values():
        print(f"  {spec.name} ({spec.task}): {spec.summary}")
    print(f"tasks: {', '.join(sorted(TASKS))}, or 'package.module:factory' (data.task)")
    missing = missing_runtimes()
    print(
        f"runtimes: {', '.join(RUNTIMES)}"
        + (
            f" ({', '.join(missing)} not installed: pip install 'compress[deploy]')"
            if missing
            else ""
        )
    )
    print(
        "models: any 'package.module:factory', or a torchvision classification or segmentation model:"
    )
    print("  " + ", ".join(torchvision_models()))
    return 0


COMMANDS = {
    "run": _run,
    "search": _search,
    "compare": _compare,
    "profile": _profile,
    "eval": _eval,
    "validate": _validate,
    "sensitivity": _sensitivity,
    "list": _list,
    "export": _export,
}
