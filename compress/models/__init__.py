"""Models: built from a recipe's ``model`` section (build), and stored and read back as
data (artifact: folders, manifests, bounded tensor reads, nothing imported or unpickled).

``compress.models:mlp`` and ``compress.models:gpt`` are the names recipes use for compress's
own small MLP and character-level GPT.
"""

from compress.models.build import build_model, mlp
from compress.models.gpt import gpt

__all__ = ["build_model", "gpt", "mlp"]
