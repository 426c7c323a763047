"""The command line: ``python -m compress {run,search,eval,validate,sensitivity,profile,compare,export,list}``.

Exit codes: 0 success; 2 a bad recipe, option or path (one line on stderr naming the key,
the value and what is allowed); 1 a runtime failure (a short explanation, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from compress.core.errors import UsageError
from compress.measure.deploy import (
    RUNTIMES,
)
from compress.workflow.commands import COMMANDS, TRUST_HELP


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as for a bad recipe
        self.exit(
            2, f"error: {message} (see `python -m compress {self.prog.split()[-1]} --help`)\n"
        )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compress",
        description="Compress a PyTorch model as a YAML recipe says,"
        " and measure what each stage buys and costs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_recipe_commands(sub)
    _add_search(sub)
    _add_folder_commands(sub)
    return parser


def _recipe_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command that reads a recipe, with its --set overrides."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set data.batch_size=64 (repeatable)",
    )
    return p


def _add_recipe_commands(sub) -> None:
    """run, eval, validate, sensitivity, profile."""
    run = _recipe_command(sub, "run", "run the recipe: baseline, every stage, the report")
    run.add_argument(
        "--out", help="run directory (default runs/<recipe name>/<timestamp>); must be new"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run of the same recipe: finished stages are loaded,"
        " a cut-short training goes on from its last checkpoint",
    )
    ev = _recipe_command(
        sub, "eval", "evaluate the baseline (or --model) only, with the recipe's data and settings"
    )
    ev.add_argument(
        "--model", help="a saved model folder to evaluate instead of the recipe's baseline"
    )
    ev.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    _recipe_command(sub, "validate", "check a recipe and print it resolved, without running it")
    sens = _recipe_command(
        sub,
        "sensitivity",
        "quantize one layer at a time (the first quantize stage's method) and rank the layers",
    )
    sens.add_argument(
        "--out", help="output directory (default runs/<recipe name>-sensitivity/<timestamp>)"
    )
    prof = _recipe_command(
        sub,
        "profile",
        "per-layer cost breakdown (MACs, bytes, time) against this machine's measured roofline",
    )
    prof.add_argument("--model", help="a saved model folder to profile instead of the baseline")
    prof.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    prof.add_argument(
        "--out", help="output directory (default runs/<recipe name>-profile/<timestamp>)"
    )


def _add_search(sub) -> None:
    find = _recipe_command(
        sub,
        "search",
        "find the chain (prune, distill, quantize) that meets a latency, size or MACs target"
        " within an accuracy floor, then run it",
    )
    find.add_argument(
        "--target-latency-ms",
        metavar="MS|Fx",
        help="p50 at evaluate.latency_batch_size, in ms, or a fraction of the baseline's"
        " (0.3x); each model in its fastest runtime unless --runtime",
    )
    find.add_argument(
        "--target-size-mb", metavar="MB|Fx", help="size on disk in MB, or 0.1x the baseline's"
    )
    find.add_argument(
        "--target-macs", metavar="F", help="a fraction of the baseline's MACs (e.g. 0.25)"
    )
    find.add_argument(
        "--runtime", choices=RUNTIMES, help="the runtime latency counts in (default: fastest)"
    )
    find.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="points of the task's metric (top-1, mIoU, ...) the chain may lose on the"
        " calibration split (default 0.5)",
    )
    find.add_argument(
        "--budget-minutes",
        type=float,
        default=60.0,
        help="wall-clock minutes for the search, its final run included (default 60)",
    )
    find.add_argument(
        "--max-distill-stretch",
        type=int,
        default=8,
        help="when no candidate meets both, distill the nearest up to N times the recipe's"
        " epochs with the time left (default 8; 1: never)",
    )
    find.add_argument(
        "--out", help="run directory of the chosen chain (default runs/<name>-searched/<time>)"
    )


def _add_folder_commands(sub) -> None:
    """compare, export (they read run and model folders), list."""
    compare = sub.add_parser(
        "compare",
        help="summarise finished runs: results table (md, csv) and a Pareto plot",
        description="summarise finished runs: results table (md, csv) and a Pareto plot",
    )
    compare.add_argument(
        "runs", nargs="+", help="run directories, or folders holding run directories"
    )
    compare.add_argument("--out", default="results", help="output folder (default results/)")
    compare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier summary in --out (otherwise refused)",
    )
    export = sub.add_parser(
        "export",
        help="export a saved model folder to ONNX or OpenVINO IR, checked against torch",
        description="export a saved model folder to ONNX or OpenVINO IR; the exported file is"
        " run once and its logits compared with the torch model's before it is kept",
    )
    export.add_argument("model", help="a saved model folder (a run's model/ or stageN_*/)")
    export.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    export.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    export.add_argument(
        "--out", help="file to write (default: beside the folder, <folder>.onnx or <folder>.xml)"
    )
    export.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="one input's shape, for folders that do not record it (e.g. 1,28,28)",
    )
    sub.add_parser(
        "list",
        help="list stages, methods, models and datasets",
        description="list stages, methods, models and datasets",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Under torchrun only rank 0 talks; the others report warnings and errors.
    quiet = int(os.environ.get("RANK", "0")) > 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="compress: %(message)s",
        stream=sys.stderr,
    )
    # "No CUDA runtime is found", logged when inductor compiles on a CPU-only machine.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:  # a bad recipe, option, path, folder or data: exit 2
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - runtime failure: explain briefly, exit 1
        text = str(error).strip() or type(error).__name__
        print(f"failed: {type(error).__name__}: {text.splitlines()[0][:500]}", file=sys.stderr)
        return 1
