"""Run folders: a new one for each run, never reused; an interrupted one resumed only with
the same recipe; its log; and the models and evaluations it kept, read back as data.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from torch import nn

from compress.core.errors import RecipeError, RunDirError
from compress.core.schema import read_yaml
from compress.measure.evaluation import Evaluation
from compress.models import artifact
from compress.spec.recipe import Recipe


def resumable_run_dir(recipe: Recipe, path: str | Path) -> Path:
    """The folder of an interrupted run of the same recipe (checked key by key)."""
    path = Path(path)
    saved = path / "recipe.yaml"
    if not saved.is_file():
        raise RunDirError(f"--resume {path}: not a run directory (no recipe.yaml in it)")
    if (path / "report.json").is_file():
        raise RunDirError(
            f"--resume {path}: that run finished (report.json exists); nothing to resume"
        )
    try:
        before = read_yaml(saved.read_text(encoding="utf-8"), str(saved))
    except (RecipeError, UnicodeDecodeError) as error:
        raise RunDirError(f"--resume {path}: its recipe.yaml is unreadable ({error})") from None
    now = json.loads(json.dumps(recipe.to_dict()))  # tuples as lists, as YAML has them
    differences = _differences(before, now)
    if differences:
        key, old, new = differences[0]
        raise RunDirError(
            f"--resume {path}: the recipe differs from the run's recipe.yaml at {key}"
            f" ({old!r} there, {new!r} now); resume with the same recipe and --set values"
        )
    return path


def _differences(a, b, path: str = "") -> list[tuple[str, object, object]]:
    """Where ``b`` (the recipe now) differs from ``a`` (a run's recipe.yaml). A key only
    ``a`` has is an option its method does not read, which older runs wrote: not a change."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in b:
            if key not in a and b[key] in (None, False):
                continue  # an option added since that run, at its off default
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [(path, a, b)]


# Created (exclusively) in a run folder given as --out: the run that created it owns it.
CLAIMED = ".claimed"


def refuse_used_out(out: str | Path) -> Path:
    """``out`` as a path, if a run may write there (new, or an empty folder)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(
            f"--out {path}: the folder exists and is not empty; compress never writes"
            " over a run. Choose a new folder."
        )
    return path


def make_run_dir(name: str, out: str | Path | None) -> Path:
    """Create the run directory; an existing one is an error, never reused.

    The default folder is created in one step that fails if it exists; a folder given as
    ``--out`` (new, or empty: nothing in it can be lost) is claimed by creating a marker
    file exclusively. Either way two runs started at the same moment never share one.
    """
    if out is not None:
        path = refuse_used_out(out)
        path.mkdir(parents=True, exist_ok=True)
        try:  # of two runs started together on one folder, one alone creates the marker
            (path / CLAIMED).open("x").close()
        except FileExistsError:
            raise RunDirError(f"--out {path}: another run took this folder") from None
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / name / stamp
    for suffix in range(1000):
        path = base.with_name(f"{stamp}-{suffix}") if suffix else base
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"cannot create a new run directory under {base.parent}")


def recipe_imports(recipe: Recipe) -> set[str]:
    """The import paths a recipe names as models: code its author chose to run."""
    names = {recipe.model.name}
    for stage in recipe.stages:
        for config in (
            getattr(stage.config, "teacher", None),
            getattr(stage.config, "student", None),
        ):
            if config is not None:
                names.add(config.name)
    return {name for name in names if ":" in name}


def load_own(folder: Path, recipe: Recipe) -> nn.Module:
    """A model this run saved: its spec may name the recipe's own import paths."""
    return artifact.load(folder, trusted_imports=recipe_imports(recipe))


def read_record(record: Path) -> Evaluation:
    """An evaluation kept by an interrupted run; a malformed one is named, not a traceback."""
    try:
        return Evaluation.from_dict(json.loads(record.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, RecursionError) as error:
        raise RunDirError(
            f"--resume: {record} is not an evaluation compress wrote"
            f" ({type(error).__name__}: {str(error).strip()[:200]}); delete it to measure again"
        ) from None


def log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("compress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
