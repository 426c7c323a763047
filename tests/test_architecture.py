"""The import layers: a lower module never imports a higher one, nothing imports in a
circle, and an import inside a function is kept for optional dependencies and for the few
that would add seconds to every command's start."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compress"

# The layers are compress's folders, bottom first: a module may import modules of its own
# layer (without a cycle) or below. A new module in a folder needs no edit here.
LAYERS = [
    {"core"},  # errors, schema, registries, storage: knows nothing of models, stages or runs
    {"spec"},  # what a recipe names: its sections, networks by name, tasks
    {"data", "models"},  # datasets; models built, stored and read back as data
    {"measure", "training"},  # the evaluator, profile and runtimes; the training loop
    {"stages"},  # one module (or package) per stage
    {"workflow"},  # pipeline, search, reports, docs, CLI
    {"__init__", "__main__"},  # the public API and `python -m compress`
]
# Packages compress runs without; imported where they are used, so that a missing one
# fails only the feature that needs it.
OPTIONAL = {
    "onnx",
    "onnxruntime",
    "onnxscript",
    "openvino",
    "nncf",
    "matplotlib",
    "transformers",
    "tokenizers",
    "pycocotools",
}
# Imported on first use because each costs seconds at start-up (torchao's PT2E flow pulls in
# dynamo and inductor; scipy.stats ~1 s), paid only by the commands that need them.
DEFERRED = {"torchao", "scipy", "compress.stages.quantize._pt2e", "compress.stages.quantize._parts"}


def _deferred(module: str) -> bool:
    return any(module == d or module.startswith(d + ".") for d in DEFERRED)


def _modules() -> dict[str, ast.Module]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__") or "__init__"
        found[name] = ast.parse(file.read_text(), str(file))
    return found


def _unit(module: str) -> str:
    """The layer unit a module belongs to: a package's private modules count as the package."""
    return module.split(".")[0]


def _imports(name: str, tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import in ``tree``."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = name.split(".")[: -child.level or None]
                    module = ".".join(["compress", *base, *(child.module or "").split(".")])
                else:
                    module = child.module or ""
                found.append((module, child.lineno, inner))
                if module == "compress":  # `from compress import x`: x may be a module
                    found.extend((f"compress.{a.name}", child.lineno, inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, tree in modules.items():
        targets = set()
        for module, _, _ in _imports(name, tree):
            if module.startswith("compress."):
                target = module.removeprefix("compress.")
                if target in modules:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if _unit(module) in layer:
            return index
    raise AssertionError(f"compress/{module} is outside the layer folders (LAYERS above)")


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_no_upward_import():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if target == "__init__" or (node.startswith(target + ".") and target in graph):
                continue  # a package's own __init__ runs first; not a cycle of modules
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_only_for_optional_packages():
    inner = [
        f"compress/{name.replace('.', '/')}.py:{line} imports {module}"
        for name, tree in _modules().items()
        for module, line, in_function in _imports(name, tree)
        if in_function and module.split(".")[0] not in OPTIONAL and not _deferred(module)
    ]
    assert not inner, "\n".join(inner)


@pytest.mark.slow  # a fresh interpreter
def test_starting_the_command_line_imports_no_deferred_module():
    """`python -m compress --help`, a prune run or `compare` never pay for torchao or scipy:
    a module-level import of either (or of the INT8 modules) anywhere under compress.cli
    would show here."""
    code = "import sys, compress.workflow.cli; print(*sorted(sys.modules), sep='\\n')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "compress.stages.quantize" in loaded and "compress.workflow.pipeline" in loaded
    assert not {m for m in loaded if _deferred(m)}


def test_every_stage_is_registered_from_the_stages_folder():
    from compress import STAGES

    outside = [
        n for n, s in STAGES.items() if not s.function.__module__.startswith("compress.stages.")
    ]
    assert STAGES and not outside, outside


def test_every_compress_name_the_scripts_and_tests_import_exists():
    """A module moved or a name renamed fails here, not later in a script nobody ran."""
    import importlib
    import importlib.util

    def is_module(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent is a module, not a package
            return False

    missing = []
    for file in sorted([*PACKAGE.parent.glob("scripts/*.py"), *PACKAGE.parent.glob("tests/*.py")]):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                "compress"
            ):
                continue
            module = importlib.import_module(node.module)
            missing += [
                f"{file.name}:{node.lineno} {node.module}.{alias.name}"
                for alias in node.names
                if not hasattr(module, alias.name) and not is_module(f"{node.module}.{alias.name}")
            ]
    assert not missing, "\n".join(missing)


MAX_MODULE_LINES = 400  # beyond, a module's docstring says why ("Over 400 lines because")
MAX_FUNCTION_LINES = 80  # a function a reader can hold in their head


def test_modules_and_functions_stay_small_enough_to_read():
    too_long = []
    for name, tree in _modules().items():
        file = PACKAGE / (name.replace(".", "/") + ".py")
        if not file.is_file():
            file = PACKAGE / name.replace(".", "/") / "__init__.py"
        lines = len(file.read_text().splitlines())
        if lines > MAX_MODULE_LINES and "Over 400 lines because" not in (
            ast.get_docstring(tree) or ""
        ):
            too_long.append(f"compress/{name}: {lines} lines, and its docstring does not say why")
        too_long += [
            f"compress/{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        ]
    assert not too_long, "\n".join(too_long)


def test_no_public_name_hides_a_folder():
    """``compress.run`` (the function) would hide a ``compress/run/`` package: importing
    ``compress.run.x`` as a dotted path would then fail."""
    import compress

    hidden = [name for name in compress.__all__ if (PACKAGE / name).is_dir()]
    assert not hidden, hidden


@pytest.mark.slow  # a fresh mypy reads torch's stubs: ~20 s
def test_make_lints_type_check_passes():
    """The layers [tool.mypy] names type-check clean (`make lint` runs the same)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=PACKAGE.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
