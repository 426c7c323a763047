"""The recipe reference (docs/recipes.md), generated from the configs and their comments.

    python -m compress.workflow.docs            # rewrite docs/recipes.md
    python -m compress.workflow.docs --check    # exit 1 if it is stale (tests/test_docs.py does this)

Every key's type, default, range, the methods that read it and its comment come from the
dataclasses, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from compress.core.storage import write_atomic
from compress.data import DATASETS
from compress.spec.recipe import DataConfig, EvaluateConfig, ModelConfig, Recipe, Stage, TrainConfig
from compress.workflow.pipeline import STAGES  # importing the pipeline registers every stage

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
SECTIONS = [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)]


def _doc(cls: type) -> str:
    """A class's docstring on one line (every config has one)."""
    return " ".join((cls.__doc__ or "").split())


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the ``#`` lines right above it plus its trailing comment."""
    lines, start = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.ClassDef), f"{cls.__name__}'s source is not a class"
    text = source.splitlines()
    comments = {}
    for node in tree.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: list[str] = []
        row = node.lineno - 2
        while row >= 0 and text[row].strip().startswith("#"):
            above.insert(0, text[row].strip().lstrip("#").strip())
            row -= 1
        trailing = [
            line.split("  # ", 1)[1].strip()
            for line in text[node.lineno - 1 : node.end_lineno]
            if "  # " in line
        ]
        comments[node.target.id] = " ".join(above + trailing)
    return comments


def _type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and type(None) in args:
        return _type(next(a for a in args if a is not type(None))) + " or null"
    if origin is list:
        return f"list of {_type(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _default(spec: dataclasses.Field) -> str:
    if spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
        if dataclasses.is_dataclass(value):
            overrides = spec.metadata.get("defaults")
            if type(value) in SECTION_TYPES:
                section = next(
                    n for n, c in [*SECTIONS, ("evaluate", EvaluateConfig)] if c is type(value)
                )
                where = f"the [`{section}`](#{section}) keys"
                return where + (f", except {_plain(overrides)}" if overrides else "")
            return "see below"
        return f"`{_plain(value)}`"
    if spec.default is dataclasses.MISSING:
        return "required"
    return f"`{_plain(spec.default)}`"


def _plain(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        if not value:
            return "{}"
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return str(value)


def _range(spec: dataclasses.Field) -> str:
    low, high = spec.metadata.get("min"), spec.metadata.get("max")
    if low is None and high is None:
        return ""
    if high is None:
        return f"≥ {low}"
    return f"{low} to {high}"


def _table(cls: type, prefix: str, with_methods: bool) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    headers = ["key", "type", "default", "range"]
    headers += ["methods"] if with_methods else []
    headers += ["meaning"]
    rows = [f"| {' | '.join(headers)} |", f"|{'---|' * len(headers)}"]
    nested = []
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        cells = [f"`{prefix}{spec.name}`", _type(hint), _default(spec), _range(spec)]
        if with_methods:
            methods = spec.metadata.get("methods")
            cells.append("all" if methods is None else ", ".join(methods))
        cells.append(comments.get(spec.name, "").replace("|", "\\|"))
        rows.append(f"| {' | '.join(cells)} |")
        inner = typing.get_args(hint) or (hint,)
        for candidate in inner:
            if (
                isinstance(candidate, type)
                and dataclasses.is_dataclass(candidate)
                and candidate not in {*SECTION_TYPES, Stage}
            ):
                nested.append((candidate, f"{prefix}{spec.name}"))
    out = [*rows, ""]
    for candidate, where in nested:
        out += [f"`{where}` ({candidate.__name__}): {_doc(candidate)}", ""]
        out += _table(candidate, f"{where}.", False)
    return out


SECTION_TYPES = {ModelConfig, DataConfig, TrainConfig, EvaluateConfig}


def recipes_markdown() -> str:
    """docs/recipes.md as text."""
    lines = [
        "# Recipe keys",
        "",
        "<!-- Generated by `python -m compress.workflow.docs` from the configs in compress/;"
        " edit those, not this file. -->",
        "",
        "Every key has a default; an unknown key, a value of the wrong type or out of range,",
        "and an option the chosen method does not read are errors naming the key path.",
        "Override any key from the command line with `--set key.path=value`.",
        "",
        "## Top level",
        "",
        *_table(Recipe, "", False),
    ]
    for name, cls in [*SECTIONS, ("evaluate", EvaluateConfig)]:
        lines += [
            f"## `{name}`",
            "",
            (cls.__doc__ or "").splitlines()[0],
            "",
            *_table(cls, f"{name}.", False),
        ]
        if cls is DataConfig:
            lines += ["Registered datasets (`data.name`; one module each in compress/data/):", ""]
            lines += [f"- `{d.name}` ({d.task}): {d.summary}" for d in DATASETS.values()]
            lines += [""]
    lines += [
        "## Stages",
        "",
        "`stages:` is an ordered list; each item is `{stage: {options}}`. Registered stages:",
        "",
    ]
    for name, stage in STAGES.items():
        methods = ", ".join(f"`{m}`" for m in stage.methods)
        final = " It ends a chain: no stage may follow it." if stage.final else ""
        doc = _doc(stage.config)
        lines += [f"### `{name}`", "", f"{doc} Methods: {methods}.{final}", ""]
        lines += _table(stage.config, "", len(stage.methods) > 1)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is stale")
    args = parser.parse_args(argv)
    text = recipes_markdown()
    if args.check:
        current = DOCS.read_text() if DOCS.is_file() else ""
        if current != text:
            print(f"{DOCS} is stale: run `python -m compress.workflow.docs`", file=sys.stderr)
            return 1
        return 0
    write_atomic(DOCS, text)
    print(f"written: {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
