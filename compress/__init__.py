"""compress: quantize, prune and distill PyTorch models, and measure what each step buys.

Example:
    >>> import compress
    >>> recipe = compress.load_recipe("recipes/resnet_int8.yaml")
    >>> data = compress.build_data(recipe.data)
    >>> model = compress.build_model(recipe.model, data.num_classes, data.input_shape[0])
    >>> base = compress.evaluate(model, data, name="baseline")
    >>> qmodel = compress.quantize(model, data, method="int8_static")
    >>> after = compress.evaluate(qmodel, data, baseline=base, name="int8")
    >>> compress.save(qmodel, "out/model"); qmodel = compress.load("out/model")
"""

from compress.artifact import load, save
from compress.data import Data, build_data
from compress.evaluate import Evaluation, evaluate
from compress.models import build_model
from compress.pipeline import run
from compress.quantize import quantize
from compress.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from compress.report import Report
from compress.train import train

__all__ = [
    "Data",
    "Evaluation",
    "Recipe",
    "RecipeError",
    "Report",
    "build_data",
    "build_model",
    "evaluate",
    "load",
    "load_recipe",
    "parse_recipe",
    "quantize",
    "run",
    "save",
    "train",
]
