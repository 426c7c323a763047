"""Datasets and their splits (train, calibration held out of train, test): each dataset
registered with ``@register_dataset`` in its own module here, so a new one is one new file.

Example:
    >>> from compress.data import build_data
    >>> data = build_data({"name": "fashion_mnist", "test_subset": 1000})
"""

import importlib as _importlib
import pkgutil as _pkgutil

from compress.core.registry import DATASETS
from compress.data.datasets import Data, build_data, dataset_length

for _module in _pkgutil.iter_modules(__path__):  # importing a module registers its datasets
    _importlib.import_module(f"{__name__}.{_module.name}")

from compress.data.fashion_mnist import fashion_mnist_scenes, scenes_root  # noqa: E402

__all__ = [
    "DATASETS",
    "Data",
    "build_data",
    "dataset_length",
    "fashion_mnist_scenes",
    "scenes_root",
]
