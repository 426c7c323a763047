"""The generated reference is fresh, and the front door stays short."""

from pathlib import Path

from compress.stages.quantize import QuantizeConfig
from compress.workflow import docs

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_is_generated_from_the_code():
    assert docs.DOCS.read_text() == docs.recipes_markdown(), (
        "docs/recipes.md is stale: run `python -m compress.workflow.docs` (make docs)"
    )


def test_every_registered_option_and_its_comment_is_in_the_reference():
    text = docs.recipes_markdown()
    for stage in docs.STAGES.values():
        assert f"### `{stage.name}`" in text
        for name, comment in docs.field_comments(stage.config).items():
            assert f"| `{name}` |" in text
            assert comment.replace("|", "\\|") in text
    # A comment is read from the source: it says what the option is for.
    assert (
        "one weight scale per output channel"
        in docs.field_comments(QuantizeConfig)["per_channel"].lower()
    )


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_readmes_recipe_is_the_file_make_run_runs():
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("## A recipe", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == (ROOT / "recipes/resnet_int8.yaml").read_text(), (
        "README's recipe differs from recipes/resnet_int8.yaml: copy the file into it"
    )
