"""Recipe validation: every class of bad input names the key path and what is allowed."""

import re
import textwrap

import pytest
import yaml

from compress.core.errors import RecipeError, UsageError
from compress.spec.recipe import (
    Recipe,
    TrainConfig,
    apply_override,
    load_recipe,
    parse_recipe,
    parse_stage_options,
)
from compress.stages.prune import PruneConfig
from compress.stages.quantize import QuantizeConfig
from tests.conftest import run_cli

GOOD = {
    "name": "r",
    "model": {"name": "resnet18"},
    "stages": [{"quantize": {"method": "int8_static", "calibration_batches": 2}}],
}


def _error(raw) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, source="r.yaml")
    return str(info.value)


def test_good_recipe_is_typed():
    recipe = parse_recipe(GOOD)
    assert recipe.stages[0].kind == "quantize"
    assert isinstance(recipe.stages[0].config, QuantizeConfig)
    assert recipe.stages[0].config.calibration_batches == 2
    assert recipe.data.name == "fashion_mnist"  # default


@pytest.mark.parametrize(
    ("raw", "path", "expected"),
    [
        ({"modle": {}}, "modle", "did you mean 'model'"),
        ({"data": {"batch_sise": 3}}, "data.batch_sise", "did you mean 'batch_size'"),
        (
            {"stages": [{"quantize": {"calibration_batchs": 3}}]},
            "stages[0].quantize.calibration_batchs",
            "did you mean 'calibration_batches'",
        ),
        ({"stages": [{"quantise": {}}]}, "stages[0].quantise", "did you mean 'quantize'"),
        (
            {"stages": [{"quantize": {"method": "int8_statik"}}]},
            "stages[0].quantize.method",
            "did you mean 'int8_static'",
        ),
        ({"data": {"name": "fashion-mnist"}}, "data.name", "did you mean 'fashion_mnist'"),
        ({"data": {"batch_size": "big"}}, "data.batch_size", "expected an integer"),
        ({"data": {"batch_size": 0}}, "data.batch_size", "out of range"),
        ({"data": {"batch_size": True}}, "data.batch_size", "expected an integer"),
        ({"train": {"momentum": 1.5}}, "train.momentum", "between 0.0 and 1.0"),
        ({"device": "tpu"}, "device", "allowed: auto, cpu, cuda"),
        ({"evaluate": {"accuracy": "yes"}}, "evaluate.accuracy", "expected true or false"),
        ({"stages": {"quantize": {}}}, "stages", "expected a list of stages"),
        ({"model": {"name": "resnet181"}}, "model.name", "did you mean 'resnet18'"),
        (
            {"stages": [{"quantize": {"observer": "hist"}}]},
            "stages[0].quantize.observer",
            "allowed: minmax",
        ),
        (
            {"stages": [{"quantize": {"percentile": 50}}]},
            "stages[0].quantize.percentile",
            "between 90.0 and 100.0",
        ),
        (
            {"stages": [{"quantize": {"method": "fp16", "observer": "minmax"}}]},
            "stages[0].quantize.observer",
            "not used by method 'fp16'",
        ),
        (
            {"stages": [{"quantize": {"method": "int8_qat", "fine_tune": {"epoch": 1}}}]},
            "stages[0].quantize.fine_tune.epoch",
            "did you mean 'epochs'",
        ),
        (
            {"stages": [{"quantize": {"per_channel": "yes"}}]},
            "stages[0].quantize.per_channel",
            "expected true or false",
        ),
        (
            {"stages": [{"quantize": {"symmetric": 1}}]},
            "stages[0].quantize.symmetric",
            "expected true or false",
        ),
        (
            {"stages": [{"quantize": {"max_accuracy_drop": -1}}]},
            "stages[0].quantize.max_accuracy_drop",
            "out of range",
        ),
        (
            {"stages": [{"quantize": {"method": "int4_weight_only", "group_size": 4}}]},
            "stages[0].quantize.group_size",
            "out of range",
        ),
        (
            {"stages": [{"quantize": {"method": "int8_qat", "max_accuracy_drop": 0.5}}]},
            "stages[0].quantize.max_accuracy_drop",
            "not used by method 'int8_qat'",
        ),
        (
            {"stages": [{"quantize": {"skip": "layer1"}}]},
            "stages[0].quantize.skip",
            "expected a list",
        ),
    ],
)
def test_bad_input_names_key_path_and_allowed(raw, path, expected):
    message = _error(raw)
    assert message.startswith("r.yaml: ")
    assert f" {path}: " in message
    assert expected in message


def test_stage_order_is_checked_up_front():
    good = {"stages": [{"prune": {}}, {"distill": {}}, {"quantize": {}}]}
    assert [s.kind for s in parse_recipe(good).stages] == ["prune", "distill", "quantize"]
    bad = {"stages": [{"quantize": {"method": "int8_qat"}}, {"distill": {}}]}
    message = _error(bad)
    assert "stages[1].distill: cannot follow stages[0].quantize (int8_qat)" in message


def test_nested_defaults_and_inherited_target():
    def quantize_stage(options):
        raw = {"evaluate": {"max_accuracy_drop": 0.4}, "stages": [{"quantize": options}]}
        return parse_recipe(raw).stages[0].config

    qat = quantize_stage({"method": "int8_qat", "fine_tune": {"max_steps": 5}})
    assert (qat.fine_tune.max_steps, qat.fine_tune.lr, qat.fine_tune.epochs) == (
        5,
        1e-3,
        1,
    )  # QAT defaults
    assert qat.max_accuracy_drop is None  # QAT has no layer-by-layer fallback
    assert (
        quantize_stage({"method": "int8_static"}).max_accuracy_drop == 0.4
    )  # inherited from evaluate


def test_override_sets_nested_values_and_is_validated():
    raw = apply_override({"stages": [{"quantize": {}}]}, "stages[0].quantize.calibration_batches=7")
    raw = apply_override(raw, "data.batch_size=64")
    recipe = parse_recipe(raw)
    assert recipe.stages[0].config.calibration_batches == 7
    assert recipe.data.batch_size == 64
    bad = apply_override({}, "data.batch_size=-1")
    assert "data.batch_size" in _error(bad)


def test_override_index_out_of_range():
    with pytest.raises(RecipeError, match="out of range"):
        apply_override({"stages": []}, "stages.0.quantize.method=int8_static")


def test_stage_options_from_python_are_validated():
    assert parse_stage_options("quantize", {"calibration_batches": 3}).calibration_batches == 3
    with pytest.raises(RecipeError, match="calibration_batches"):
        parse_stage_options("quantize", {"calibration_batches": 0})


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        # The resolved recipe a run writes (recipe.yaml) is itself a recipe that runs again,
        # and resolves to the same: it holds only the options each stage's method reads.
        resolved = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
        assert parse_recipe(resolved, str(path)).to_dict() == resolved


def test_cli_validate_misspelled_key_exits_2_with_one_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        textwrap.dedent("""
        name: typo
        stages:
          - quantize: {method: int8_static, calibraton_batches: 4}
    """)
    )
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "stages[0].quantize.calibraton_batches" in lines[0]
    assert "did you mean 'calibration_batches'" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_validate_good_recipe_and_set(tmp_path):
    result = run_cli("validate", "recipes/resnet_int8.yaml", "--set", "data.batch_size=32")
    assert result.returncode == 0, result.stderr
    assert "batch_size: 32" in result.stdout


@pytest.mark.slow  # a real `python -m compress` process
def test_cli_usage_error_exits_2():
    result = run_cli("run", process=True)  # as a shell runs it: `python -m compress run`
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the following arguments are required: recipe")


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda: QuantizeConfig(method="int9"),
            "QuantizeConfig.method: 'int9' is not a valid choice",
        ),
        (
            lambda: QuantizeConfig(calibration_batches=0),
            "QuantizeConfig.calibration_batches: 0 is out of range",
        ),
        (
            lambda: QuantizeConfig(method="fp16", group_size=64),
            "QuantizeConfig.group_size: not used by method 'fp16'",
        ),
        (
            lambda: PruneConfig(ratio=0.3, target_macs=0.5),
            "PruneConfig.target_macs: give one target",
        ),
        (lambda: TrainConfig(schedule="cosin"), "did you mean 'cosine'"),
        (lambda: Recipe(name="../up"), "Recipe.name: '../up' is not a plain name"),
    ],
)
def test_configs_built_in_python_check_themselves(build, expected):
    """The Python API gets the recipe's errors: a config is checked when it is made."""
    with pytest.raises(UsageError, match=re.escape(expected)):
        build()


def test_a_config_is_coerced_and_completed_when_built():
    assert PruneConfig(method="structured").ratio == 0.5  # no target given: the default one
    assert PruneConfig(method="structured", target_macs=0.5).ratio is None
    assert isinstance(TrainConfig(lr=1).lr, float)


def test_every_usage_error_is_one_line_and_exit_2(tmp_path):
    """A wrong module name in prune.ignore is a usage error naming that key (it used to be a
    quantization error naming `skip`, exit 1)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: compress.models:mlp, kwargs: {hidden: 8}}\n"
        "data: {train_subset: 256, test_subset: 100, calibration_size: 100}\n"
        "train: {epochs: 0, max_steps: 1}\n"
        "stages: [{prune: {method: magnitude, ignore: [no_such_layer]}}]\n"
        "evaluate: {iterations: 1, warmup: 0, profile: false, runtimes: [torch]}\n"
    )
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: prune.ignore: 'no_such_layer' matches no module"), last


@pytest.mark.parametrize(
    "raw",
    [
        {"stages": [{"distill": {"teacher": {"\n": None}}}]},  # found by test_hostile's fuzzing
        {"stages": [{"a\nb": {}}]},
        {"x\ny": 1},
    ],
)
def test_a_key_with_a_line_break_still_gives_one_line(raw):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    assert "\n" not in str(info.value) and "\\n" in str(info.value)


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"std": [0]}, "data.std[0]", "must be above 0 (images are divided by it)"),
        ({"std": [-0.3]}, "data.std[0]", "must be above 0"),
        ({"std": [0.3, 0.3, 0.3]}, "data.std", "fashion_mnist images have 1 channel"),
        ({"name": "cifar10", "mean": [0.5]}, "data.mean", "cifar10 images have 3 channels"),
        ({"mean": []}, "data.mean", "has 0 values"),
        ({"name": "synthetic", "std": [1.0]}, "data.std", "not used by data.name 'synthetic'"),
        ({"calibration_size": 60_000}, "data.calibration_size", "leaves no training images"),
        ({"name": "cifar10", "calibration_size": 50_000}, "data.calibration_size", "has 50000"),
        ({"train_subset": 1}, "data.train_subset", "out of range (must be between 2 and"),
    ],
)
def test_values_that_break_arithmetic_are_refused_at_validation(data, path, expected):
    message = _error({"data": data})
    assert f" {path}: " in message and expected in message, message


@pytest.mark.parametrize(
    ("text", "sets"),
    [("", []), ("# a comment only\n", []), ("{}\n", []), ("", ["data.batch_size=64"])],
)
def test_an_empty_recipe_is_refused_with_a_minimal_one(tmp_path, text, sets):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="the recipe is empty; a minimal recipe is") as info:
        load_recipe(recipe, sets)
    minimal = str(info.value).split("`")[1]  # the minimal recipe it quotes is valid
    assert parse_recipe(yaml.safe_load(minimal)).stages[0].name == "quantize:int8_static"


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["model.name=vgg11", "data.image_size=8"], "vgg11 cannot take 1x8x8 images"),
        (["model.name=vit_b_16"], "vit_b_16 cannot take 1x28x28 images"),
        (["data.name=synthetic", "model.name=alexnet"], "alexnet cannot take 3x28x28 images"),
        (["data.batch_size=1"], "1 image a batch, which resnet18's BatchNorm cannot normalise"),
    ],
)
def test_an_input_too_small_for_the_network_is_refused_at_validation(sets, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/resnet_int8.yaml", sets)
    message = str(info.value)
    key = "data.batch_size" if "data.batch_size=1" in sets else "data.image_size"
    assert f" {key}: " in message and expected in message, message
    assert load_recipe("recipes/resnet_int8.yaml", ["model.name=vgg11", "data.image_size=32"])


def test_sync_batchnorm_in_the_train_section_holds_for_every_training_of_the_run():
    raw = {
        "train": {"sync_batchnorm": True},
        "stages": [{"prune": {}}, {"distill": {}}, {"quantize": {"method": "int8_qat"}}],
    }
    prune, distill, quantize = (s.config for s in parse_recipe(raw).stages)
    assert prune.fine_tune.sync_batchnorm and distill.train.sync_batchnorm
    assert quantize.fine_tune.sync_batchnorm
    assert not parse_recipe({"stages": [{"distill": {}}]}).stages[0].config.train.sync_batchnorm


def test_a_run_from_before_a_new_option_still_resumes():
    """A run's recipe.yaml written before an option existed lacks its key: at its off
    default it is no difference (`train.sync_batchnorm` came after runs that resume)."""
    from compress.workflow.rundir import _differences

    now = {"train": {"epochs": 2, "sync_batchnorm": False}}
    assert _differences({"train": {"epochs": 2}}, now) == []
    changed = {"train": {"epochs": 2, "sync_batchnorm": True}}
    assert _differences({"train": {"epochs": 2}}, changed) == [("train.sync_batchnorm", None, True)]
