"""Hostile inputs: model folders, weight files, recipes, run folders and data made to run
code, exhaust memory or write where they should not. Each must be refused in one line
(exit 2 at the command line, no traceback), run nothing (the payload's marker file never
appears), change no file that existed, and stay within bounded memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from compress.core.errors import DataError
from compress.data import build_data
from compress.models.artifact import ArtifactError, load, save
from compress.models.build import ModelError, build_model
from compress.spec.recipe import DataConfig, ModelConfig, RecipeError, load_recipe
from compress.workflow import cli
from tests import hostile
from tests.conftest import run_cli

MLP = ModelConfig(name="compress.models:mlp", kwargs={"hidden": 16})


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """Where a payload that ran would leave its mark; the payload module is importable."""
    path = tmp_path / "payload-ran"
    monkeypatch.setenv("COMPRESS_TEST_MARKER", str(path))
    modules = tmp_path / "modules"
    modules.mkdir()
    hostile.write_payload_module(modules)
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.setenv("PYTHONPATH", str(modules))
    yield path
    sys.modules.pop("evil_payload", None)


@pytest.fixture
def spec_folder(tmp_path):
    """A model folder as compress writes it for a spec-built model (state_dict kind)."""
    return save(build_model(MLP, 10, 1), tmp_path / "spec_model")


@pytest.fixture
def graph_folder(tmp_path):
    """A model folder holding a graph (a model compress did not build)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    return save(model, tmp_path / "graph_model", example=torch.randn(2, 1, 28, 28))


def refused(call, error=ArtifactError, match: str = "") -> str:
    """Run ``call``; it must raise ``error`` with a one-line message containing ``match``."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def cli_refused(*argv: str, match: str = "") -> str:
    """``python -m compress ARGV`` must exit 2 with one line on stderr and no traceback."""
    done = run_cli(*argv)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr and match in lines[0], lines
    return lines[0]


# ------------------------------------------------------------ model folders run no code


def test_spec_that_imports_code_is_refused_unless_trusted(spec_folder, marker, tmp_path):
    hostile.edit_manifest(spec_folder, lambda m: m["spec"].update(name="evil_payload:make"))
    before = hostile.checksums(tmp_path)
    refused(lambda: load(spec_folder), match="--trust-code")
    teacher = ModelConfig(name="resnet18", checkpoint=str(spec_folder))
    refused(lambda: build_model(teacher, 10, 1), match="imports and runs code")
    assert not marker.exists() and hostile.checksums(tmp_path) == before
    # The switch does what it says: the same folder, trusted, runs its code.
    with pytest.raises(ArtifactError):  # Linear(1, 1) does not fit the stored weights
        load(spec_folder, trust_code=True)
    assert marker.read_text() == "payload called"


def test_eval_and_distillation_refuse_a_folder_that_imports_code(spec_folder, marker, tmp_path):
    hostile.edit_manifest(spec_folder, lambda m: m["spec"].update(name="evil_payload:make"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: resnet18}\n"
        "data: {name: synthetic, synthetic_channels: 1, synthetic_size: 8, calibration_size: 8}\n"
        f"stages: [{{distill: {{teacher: {{checkpoint: {str(spec_folder)!r}}}}}}}]\n"
    )
    cli_refused("eval", str(recipe), "--model", str(spec_folder), match="imports and runs code")
    from compress.spec.recipe import parse_stage_options
    from compress.stages.distill import distill

    data = build_data(
        DataConfig(name="synthetic", synthetic_channels=1, synthetic_size=8, calibration_size=8)
    )
    options = parse_stage_options("distill", {"teacher": {"checkpoint": str(spec_folder)}})
    refused(lambda: distill(build_model(MLP, data=data), data, options), match="--trust-code")
    assert not marker.exists()


def _before_output(node: dict):
    return lambda g: g["nodes"].insert(len(g["nodes"]) - 1, node)


def _call(name: str):
    return _before_output(
        {"op": "call_function", "target": name, "args": {"tuple": []}, "kwargs": {"dict": {}}}
    )


def _attribute(name: str):
    def change(graph):
        node = next(n for n in graph["nodes"] if n["op"] == "get_attr")
        node["target"] = name

    return change


GRAPH_ATTACKS = {
    "builtin eval": _call("builtins.eval"),
    "os.system": _call("os.system"),
    "an op that reads a file": _call("aten.from_file.default"),
    "an unknown namespace": _call("evil.run.default"),
    "code in a tensor name": _attribute("weight; import os; os.system('touch x')"),
    "a dunder tensor name": _attribute("__class__"),
    "a callable argument": lambda g: g["nodes"][-1].update(args={"callable": "os.system"}),
    "a node from nowhere": lambda g: g["nodes"][-1].update(args={"node": 10**6}),
    "a pickled tensor file": lambda g: g.update(format="torch.export"),
}


def test_a_keywords_name_is_refused_before_it_becomes_code(graph_folder, marker):
    """A keyword argument's name is written into the graph's generated code: only a plain
    identifier passes, before any node runs."""
    keyword = "x=__import__('os').system('touch x'),y"
    node = {"op": "call_function", "target": "aten.relu.default"}
    node |= {"args": {"tuple": [{"node": 0}]}, "kwargs": {"dict": {keyword: 1}}}
    hostile.edit_graph(graph_folder, _before_output(node))
    refused(lambda: load(graph_folder), match="a keyword argument's name refused")
    assert not marker.exists()


@pytest.mark.parametrize("attack", sorted(GRAPH_ATTACKS))
def test_graph_names_only_allowed_operations(attack, graph_folder, marker, tmp_path):
    hostile.edit_graph(graph_folder, GRAPH_ATTACKS[attack])
    before = hostile.checksums(tmp_path)
    refused(lambda: load(graph_folder), match="refused")
    assert not marker.exists() and hostile.checksums(tmp_path) == before


def test_a_graph_does_only_the_work_its_tensors_imply(graph_folder, tmp_path, monkeypatch):
    """Nodes past the ceiling (64 a stored tensor + 1,024; 100,000 at most) are refused
    before FX builds a node or the tensors are read (300,000 chained nodes, a 35 MB file:
    refused in 2 s, where loading them took minutes)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: resnet18}\n"
        "data: {test_subset: 50, calibration_size: 100}\n"
        "evaluate: {iterations: 1, warmup: 0, profile: false, runtimes: [torch]}\n"
    )
    under = shutil.copytree(graph_folder, tmp_path / "under")
    hostile.edit_graph(under, hostile.chain(1_000))  # 1,006 nodes, 2 tensors: under 1,152
    assert len(load(under).graph.nodes) == 1_006
    over = shutil.copytree(graph_folder, tmp_path / "over")
    hostile.edit_graph(over, hostile.chain(1_200))
    refused(lambda: load(over), match="1206 nodes, more than the 1152 a network's graph holds")
    hostile.edit_graph(graph_folder, hostile.chain(300_000))

    def built(*args, **kwargs):
        raise AssertionError("a node was built or a tensor read before the count was checked")

    monkeypatch.setattr(torch.fx.Graph, "create_node", built)
    monkeypatch.setattr("compress.models.artifact.graph.read_tensors", built)
    monkeypatch.setattr("compress.models.artifact.manifest.read_tensors", built)
    cli_refused(
        "eval", str(recipe), "--model", str(graph_folder), match="300006 nodes, more than the"
    )


def test_arguments_are_bounded_across_the_graph(graph_folder):
    def long_arguments(graph):
        node = next(n for n in graph["nodes"] if n["op"] == "call_function")
        node["kwargs"] = {"dict": {"padding": list(range(40_000))}}

    hostile.edit_graph(graph_folder, long_arguments)
    refused(lambda: load(graph_folder), match="more argument values than 32 a node")


def test_torch_export_archives_are_not_loaded(graph_folder, tmp_path):
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(2, 4),))
    torch.export.save(program, graph_folder / "model.pt2")
    hostile.edit_manifest(graph_folder, lambda m: m.update(kind="quantized", file="model.pt2"))
    refused(lambda: load(graph_folder), match="torch.export archive")


def test_weight_files_are_read_as_data_only(spec_folder, marker, tmp_path):
    weights = spec_folder / "weights.pt"
    good = weights.read_bytes()
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "0.weight": hostile.Payload(marker)}, weights)
    refused(lambda: load(spec_folder), match="never unpickles code")
    assert not marker.exists()
    weights.write_bytes(good)
    hostile.rezip(weights, duplicate="/data.pkl")
    refused(lambda: load(spec_folder), match="appears twice")
    weights.write_bytes(good)
    hostile.rezip(weights, deflate=True)  # compressed entries: the way to a zip bomb
    refused(lambda: load(spec_folder), match="compressed entries")
    weights.unlink()
    weights.symlink_to("/etc/hostname")
    refused(lambda: load(spec_folder), match="not in the folder")
    hostile.edit_manifest(spec_folder, lambda m: m.update(file="../../../etc/passwd"))
    refused(lambda: load(spec_folder), match="not in the folder")


def test_manifest_values_are_checked_against_the_architecture(spec_folder):
    hostile.edit_manifest(spec_folder, lambda m: m["spec"].update(num_classes=True))
    refused(lambda: load(spec_folder), match="spec.num_classes")
    hostile.edit_manifest(spec_folder, lambda m: m["spec"].update(num_classes=10))
    hostile.edit_manifest(spec_folder, lambda m: m["spec"]["kwargs"].update(weights="DEFAULT"))
    refused(lambda: load(spec_folder), match="builder options")  # would download at load
    hostile.edit_manifest(spec_folder, lambda m: m["spec"].update(kwargs={"hidden": 16}))
    shapes = {"modules": {"1": {"forward": 3}}, "tensors": {}}
    hostile.edit_manifest(spec_folder, lambda m: m.update(shapes=shapes))
    refused(lambda: load(spec_folder), match="does not build")  # an attribute not a shape
    hostile.edit_manifest(spec_folder, lambda m: m.pop("shapes"))
    for depth in ({"stack": "1.weight", "blocks": 1}, {"stack": "", "blocks": 99}, {"blocks": 1}):
        hostile.edit_manifest(spec_folder, lambda m, d=depth: m.update(depth=d))
        refused(lambda: load(spec_folder), match="does not build")  # no stack, or no length
    hostile.edit_manifest(spec_folder, lambda m: m.pop("depth"))
    hostile.edit_manifest(spec_folder, lambda m: m.update(input_shape=[100_000] * 3))
    assert cli.main(["export", str(spec_folder)]) == 2  # 10^15 pixels: refused, not made
    assert not list(spec_folder.parent.glob("*.onnx"))
    (spec_folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: load(spec_folder), match="malformed")


# ------------------------------------------------- bounded reading: small files, no bombs

BOMBS = r"""
import json, resource, sys, torch
from pathlib import Path
from compress.models.artifact import ArtifactError, load
from compress.core.errors import DataError
from compress.data.fashion_mnist import _read_idx
from compress.core.errors import RecipeError
from compress.spec.recipe import load_recipe
from tests.conftest import run_cli

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

results, start = {}, peak()
for case in sys.argv[1:]:
    path = Path(case)
    try:
        if path.suffix == ".gz":
            _read_idx(path)
        elif path.suffix == ".yaml":
            load_recipe(path)
        else:
            load(path)
        results[path.name] = "loaded"
    except (ArtifactError, DataError, RecipeError) as error:
        results[path.name] = str(error)
print(json.dumps({"results": results, "grown": peak() - start}))
"""


@pytest.mark.slow  # a subprocess with its peak memory measured
def test_small_files_cannot_make_compress_allocate_much(tmp_path, spec_folder, graph_folder):
    import gzip

    cases = []
    # An LZMA stream of 256 MB of zeros where the model has 12,544 weights.
    lzma_case = shutil.copytree(spec_folder, tmp_path / "lzma")
    state = torch.load(lzma_case / "weights.pt", weights_only=True)
    state["1.weight.__indices"] = hostile.lzma_bomb(256)
    state["1.weight.__codebook"] = torch.zeros(1)
    del state["1.weight"]
    torch.save(state, lzma_case / "weights.pt")
    entry = {"key": "1.weight", "shape": [16, 784], "dtype": "float32", "zero": None}
    hostile.edit_manifest(lzma_case, lambda m: m.update(shared=[entry]))
    cases.append(lzma_case)
    # A sparse entry claiming 10^10 weights for a 16x784 layer.
    sparse_case = shutil.copytree(spec_folder, tmp_path / "sparse")
    big = {"key": "1.weight", "shape": [100_000, 100_000], "dtype": "float32"}
    hostile.edit_manifest(sparse_case, lambda m: m.update(sparse=[big]))
    cases.append(sparse_case)
    # A spec whose builder would allocate 4 TB of weights (a hidden layer of 2^20 x 2^20).
    spec_case = shutil.copytree(spec_folder, tmp_path / "spec")
    hostile.edit_manifest(spec_case, lambda m: m["spec"].update(kwargs={"hidden": 2**20}))
    cases.append(spec_case)
    # A graph whose one operation would make a 1 TB tensor.
    graph_case = shutil.copytree(graph_folder, tmp_path / "graph")
    zeros = {
        "op": "call_function",
        "target": "aten.zeros.default",
        "args": {"tuple": [[2**20, 2**20]]},
        "kwargs": {"dict": {}},
    }
    hostile.edit_graph(graph_case, _before_output(zeros))
    cases.append(graph_case)
    # idx files: a header announcing 2^40 bytes; a header of 100 bytes over 256 MB of zeros.
    header = tmp_path / "huge-header.gz"
    header.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (2**14).to_bytes(4, "big") * 3))
    inflating = tmp_path / "inflating.gz"
    with gzip.open(inflating, "wb", compresslevel=1) as f:
        f.write(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big"))
        for _ in range(256):
            f.write(bytes(1 << 20))
    cases += [header, inflating]
    # A recipe of nested aliases: 10^9 values from 1 KB (YAML's "billion laughs").
    laughs = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(lines) + "\nmodel: {kwargs: {x: *a8}}\n")
    cases.append(laughs)

    done = subprocess.run(
        [sys.executable, "-c", BOMBS, *map(str, cases)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    expected = {
        "lzma": "does not hold",
        "sparse": "the model has [16, 784]",
        "spec": "GiB of weights",
        "graph": "GiB; refused",
        "huge-header.gz": "not a dataset's",
        "inflating.gz": "announces 100 bytes",
        "laughs.yaml": "aliases counted",
    }
    for name, words in expected.items():
        assert words in out["results"][name], (name, out["results"][name])
    assert out["grown"] < 200 * 2**20  # peak memory grew by less than 200 MB in all


@pytest.mark.slow  # a subprocess under a memory limit
def test_a_step_past_the_machine_memory_stops_with_one_line(tmp_path):
    script = (
        "import logging\n"
        "from compress.core.memory import memory_guard, resident_bytes\n"
        f"logging.getLogger('compress').addHandler(logging.FileHandler({str(tmp_path / 'run.log')!r}))\n"
        "hoard = []\n"
        "with memory_guard('stage 0 (prune) of swin_t', resident_bytes() + 300 * 2**20):\n"
        "    while True:\n"
        "        hoard.append(bytearray(50 * 2**20))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr
    assert "out of memory: stage 0 (prune) of swin_t: stopped at" in lines[0]
    assert "stage 0 (prune) of swin_t" in (tmp_path / "run.log").read_text()


# ------------------------------------------------------------------ recipes validate fully

BAD_RECIPES = {
    "train:\n  lr: .nan\n": "train.lr: nan is not a finite number",
    "train:\n  lr: .inf\n": "train.lr: inf is not a finite number",
    "seed: 1000000000000000\n": "seed: 1000000000000000 is out of range",
    "data: {batch_size: 100000000}\n": "data.batch_size: 100000000 is out of range",
    "stages:\n  - quantize: {skip: ['re:(']}\n": "stages[0].quantize.skip[0]: 're:(' is not a valid regex",
    "train: {lr: 0.1}\ntrain: {lr: 0.2}\n": "key 'train' is given twice",
    "name: ../../outside\n": "name: '../../outside' is not a plain name",
    "name: /tmp/abs\n": "name: '/tmp/abs' is not a plain name",
    "[" * 5000 + "]" * 5000: "nested too deeply",
    "evaluate: {threads: 0}\n": "evaluate.threads: 0 is out of range",
}


@pytest.mark.parametrize("text", sorted(BAD_RECIPES))
def test_recipe_mistakes_name_their_key(text, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    refused(lambda: load_recipe(path), RecipeError, BAD_RECIPES[text])
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and BAD_RECIPES[text] in err


def test_overrides_and_encodings_are_validated_too(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: ok\n")
    refused(
        lambda: load_recipe(path, ["data.batch_size=[1,"]), RecipeError, "--set data.batch_size"
    )
    refused(lambda: load_recipe(path, ["train.lr=.nan"]), RecipeError, "train.lr")
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    refused(lambda: load_recipe(path), RecipeError, "not UTF-8")
    assert cli.main(["validate", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "examples",
    [100, pytest.param(500, marks=pytest.mark.slow)],  # fast subset; full suite
)
def test_generated_recipes_validate_or_name_a_key(examples):
    """Property: any mapping of the recipe's own keys to any YAML values is a Recipe or a
    RecipeError; nothing else escapes (no KeyError, TypeError, OverflowError...)."""
    import dataclasses
    import typing

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from compress.core.registry import STAGES
    from compress.spec.recipe import Recipe, parse_recipe

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["re:[", "re:.*", "int8_static", "resnet18", "cosine", "magnitude"]),
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )

    def as_config(cls):
        keys = [f.name for f in dataclasses.fields(cls)]
        return st.dictionaries(st.sampled_from(keys), values, max_size=4)

    hints = typing.get_type_hints(Recipe)
    stage = st.sampled_from(sorted(STAGES)).flatmap(
        lambda kind: as_config(STAGES[kind].config).map(lambda options: {kind: options})
    )
    recipe = st.fixed_dictionaries(
        {},
        optional={
            **{k: as_config(hints[k]) for k in ("model", "data", "train", "evaluate")},
            "stages": st.lists(stage, max_size=2),
            "seed": values,
            "name": values,
        },
    )

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(recipe)
    def check(raw):
        try:
            parse_recipe(yaml.safe_load(yaml.safe_dump(raw)))
        except RecipeError as error:
            assert "\n" not in str(error)

    check()


# -------------------------------------------------------------------- run directories


def test_two_runs_never_share_a_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from compress.workflow.rundir import RunDirError, make_run_dir

    def claim(out):
        try:
            return make_run_dir("r", out)
        except RunDirError:
            return None

    for i in range(20):  # runs started together on one --out: exactly one gets it
        out = tmp_path / f"out{i}"
        if i % 2:
            out.mkdir()  # made beforehand, empty
        with ThreadPoolExecutor(4) as pool:
            winners = [w for w in pool.map(claim, [out] * 4) if w is not None]
        assert winners == [out]
    (tmp_path / "file").write_text("mine")
    refused(lambda: make_run_dir("r", tmp_path / "file"), RunDirError, "not empty")
    assert (tmp_path / "file").read_text() == "mine"


def test_compare_names_a_malformed_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text('{"recipe": "r", "environment": {}, "evaluations": []}')
    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "summary")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(run / "report.json") in err


# -------------------------------------------------------------------------------- data


def test_imagefolder_with_other_test_classes_is_refused(tmp_path):
    from PIL import Image

    for split, name in [("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "cow")]:
        (tmp_path / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    config = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, calibration_size=1)
    refused(lambda: build_data(config), DataError, "only in train/: ['dog']")


def test_checkpoint_file_bounds_its_size(tmp_path):
    path = tmp_path / "huge.pt"
    torch.save({"extra": torch.zeros(4 * 2**20)}, path)  # 16 MB for a 50 KB model
    config = ModelConfig(name=MLP.name, kwargs=MLP.kwargs, checkpoint=str(path))
    refused(lambda: build_model(config, 10, 1), ModelError, "more than the")


def test_resume_loads_nothing_that_runs_code(tmp_path, marker, spec_folder):
    from compress.spec.recipe import parse_recipe
    from compress.workflow.pipeline import RunDirError, run

    recipe = parse_recipe(
        {
            "name": "r",
            "model": {"name": MLP.name, "kwargs": MLP.kwargs},
            "data": {"name": "synthetic", "synthetic_channels": 1, "synthetic_size": 16},
            "stages": [{"prune": {"method": "magnitude"}}],
            "evaluate": {"accuracy": False, "warmup": 1, "iterations": 2, "runtimes": ["torch"]},
        }
    )
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    shutil.copytree(spec_folder, folder / "model")
    hostile.edit_manifest(folder / "model", lambda m: m["spec"].update(name="evil_payload:make"))
    (folder / "evaluations").mkdir()
    (folder / "evaluations" / "stage0.json").write_text('{"name": "prune:magnitude"}')
    before = hostile.checksums(tmp_path)
    refused(lambda: run(recipe, resume=folder), match="imports and runs code")
    assert not marker.exists()
    assert {k: v for k, v in hostile.checksums(tmp_path).items() if k in before} == before
    (folder / "evaluations" / "stage0.json").write_text("[1, 2]")
    shutil.rmtree(folder / "model")
    shutil.copytree(spec_folder, folder / "model")
    refused(lambda: run(recipe, resume=folder), RunDirError, "stage0.json is not an evaluation")


@pytest.mark.parametrize(
    "field, value", [("drop", [1, 2]), ("control", "x"), ("runtimes", [1]), ("latency_ms", 3)]
)
def test_a_report_with_figures_of_the_wrong_shape_is_one_named_error(tmp_path, field, value):
    from compress.core.errors import ReportError
    from compress.workflow.report import Report

    good = {
        "name": "baseline",
        "params": 1,
        "nonzero_params": 1,
        "size_bytes": 1,
        "flops": 2,
        "macs": 1,
        "memory_access_bytes": 1,
        "compute_dtype": "float32",
        "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0},
        "batch_size": 1,
        "threads": 1,
        "throughput_per_s": 1.0,
        "gflops_per_s": 1.0,
        "score": 90.0,
    }
    run = tmp_path / "run"
    run.mkdir()
    bad = {**good, field: value}
    (run / "report.json").write_text(
        json.dumps({"recipe": "r", "environment": {}, "evaluations": [good, bad]})
    )
    with pytest.raises(ReportError, match="is not a report compress wrote"):
        Report.read(run)
