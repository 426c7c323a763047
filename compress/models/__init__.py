"""Models: built from a recipe's ``model`` section (build), and stored and read back as
data (artifact: folders, manifests, bounded tensor reads, nothing imported or unpickled).

``compress.models:mlp`` and ``compress.models:gpt`` are the names recipes use for compress's
own small MLP and character-level GPT; ``compress.models:hugging_face`` a transformers
causal LM, built from a config or read from a local ``save_pretrained`` folder.
"""

from compress.models.build import build_model, mlp
from compress.models.gpt import gpt
from compress.models.hugging_face import hugging_face

__all__ = ["build_model", "gpt", "hugging_face", "mlp"]
