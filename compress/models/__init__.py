"""Models: built from a recipe's ``model`` section (build), and stored and read back as
data (artifact: folders, manifests, bounded tensor reads, nothing imported or unpickled).

``compress.models:mlp`` is the name recipes use for compress's own small MLP.
"""

from compress.models.build import build_model, mlp

__all__ = ["build_model", "mlp"]
