"""The stages, one module (or package) each, registered next to their code with
``@register_stage``. Importing this package imports every module in it, so a new stage is
one new file here and nothing else to edit."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
