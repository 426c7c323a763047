"""compress: quantize, prune and distill PyTorch models, and measure what each step buys.

Example:
    >>> import compress
    >>> recipe = compress.load_recipe("recipes/resnet_int8.yaml")
    >>> data = compress.build_data(recipe.data)
    >>> model = compress.build_model(recipe.model, data=data)
    >>> base = compress.evaluate(model, data, name="baseline")
    >>> qmodel = compress.quantize(model, data, method="int8_static")
    >>> pruned = compress.prune(model, data, method="structured", target_macs=0.5)
    >>> after = compress.evaluate(qmodel, data, baseline=base, name="int8")
    >>> compress.save(qmodel, "out/model"); qmodel = compress.load("out/model")
    >>> compress.export(qmodel, "out/model.onnx", "onnx", data.example_input(1))
"""

import logging as _logging

# Importing torchao logs a pytree deprecation notice that says nothing to users of compress.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

from compress.core.errors import CompressError, ExportError, RecipeError, UsageError  # noqa: E402
from compress.core.registry import STAGES, StageContext, register_stage  # noqa: E402
from compress.data import Data, build_data  # noqa: E402
from compress.measure.deploy import export  # noqa: E402
from compress.measure.evaluate import evaluate  # noqa: E402
from compress.measure.evaluation import Evaluation  # noqa: E402
from compress.models.artifact import load, save  # noqa: E402
from compress.models.build import build_model  # noqa: E402
from compress.spec.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from compress.spec.tasks import TASKS, Custom, Task, register_task  # noqa: E402
from compress.stages.distill import distill  # noqa: E402
from compress.stages.factorize import factorize  # noqa: E402
from compress.stages.prune import prune  # noqa: E402
from compress.stages.quantize import quantize, sensitivity  # noqa: E402
from compress.stages.share import share  # noqa: E402
from compress.training.train import train  # noqa: E402
from compress.workflow.pipeline import run  # noqa: E402
from compress.workflow.report import Report  # noqa: E402
from compress.workflow.search import SearchConfig, SearchResult, search  # noqa: E402

__all__ = [
    "STAGES",
    "TASKS",
    "CompressError",
    "Custom",
    "Data",
    "Evaluation",
    "ExportError",
    "Recipe",
    "RecipeError",
    "Report",
    "SearchConfig",
    "SearchResult",
    "StageContext",
    "Task",
    "UsageError",
    "build_data",
    "build_model",
    "distill",
    "evaluate",
    "export",
    "factorize",
    "load",
    "load_recipe",
    "parse_recipe",
    "prune",
    "quantize",
    "register_stage",
    "register_task",
    "run",
    "save",
    "search",
    "sensitivity",
    "share",
    "train",
]
