"""The ``language_model`` task: next-token prediction, scored in nats per token."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from compress.core.errors import TaskError
from compress.spec.tasks import Task, _shape, register_task


@register_task("language_model")
class LanguageModel(Task):
    """Next-token prediction: a model takes token ids (N, T) and returns logits (N, T,
    vocabulary); the targets are the ids shifted by one (N, T). The metric is the loss in
    nats per token (lower is better) and its perplexity, from per-block rows (summed
    negative log-likelihood, tokens), so a drop is paired block by block with a bootstrap.
    Distillation is the KL over the vocabulary at every position, as segmentation's per
    pixel: :meth:`output` puts the vocabulary in dimension 1, where the other tasks keep
    their classes.

    Example:
        >>> task = get_task("language_model")
        >>> task.summarize(task.scores(task.output(logits), targets))
        {'loss': 1.52, 'perplexity': 4.57}
    """

    metric = "loss"
    unit = "nats/token"
    higher_is_better = False
    images = False  # token ids: no crop, flip or erase
    interval_method = "paired bootstrap over test blocks"

    def output(self, raw):
        logits = super().output(raw)
        if logits.ndim != 3:
            raise TaskError(
                f"task language_model: expected logits (N, T, vocabulary); got"
                f" {tuple(logits.shape)}"
            )
        return logits.transpose(1, 2)  # (N, vocabulary, T): the vocabulary is the class axis

    def loss(self, output, targets, label_smoothing=0.0):
        return F.cross_entropy(output, targets, label_smoothing=label_smoothing)

    def check_targets(self, output, targets):
        if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
            raise TaskError(
                f"task language_model: expected next-token ids (N, T); got {_shape(targets)}"
            )
        if targets.dtype.is_floating_point or output.shape[-1] != targets.shape[-1]:
            raise TaskError(
                f"task language_model: targets must be integer ids, one per position of the"
                f" {output.shape[-1]} the model predicts; got {targets.dtype}"
                f" {tuple(targets.shape)}"
            )

    def scores(self, output, targets):
        """Per block: its summed negative log-likelihood (nats) and its token count."""
        self.check_targets(output, targets)
        nll = F.cross_entropy(output.float(), targets, reduction="none").sum(1)
        tokens = torch.full_like(nll, targets.shape[1])
        return torch.stack([nll, tokens], 1).cpu().numpy().astype(np.float64)

    def from_totals(self, totals):
        loss = float(totals[0] / max(float(totals[1]), 1.0))
        return {"loss": loss, "perplexity": float(np.exp(loss))}

    def _headline(self, totals):
        return totals[:, 0] / np.maximum(totals[:, 1], 1)
