"""A Hugging Face causal LM's decoding step over a static key/value cache: the form
compress's own GPT decodes in (:class:`compress.models.gpt.Decoder`), so that the evaluator
times it in every runtime and the step exports to ONNX with its cache.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

# Positions a decoding step's cache holds: a 128-token prompt and 128 new tokens, what the
# evaluator times (a model's own maximum, often thousands, would only add masked work).
DECODE_POSITIONS = 256


class Decoder(nn.Module):
    """``(ids (N, 1), position (1,), cache)`` to ``(logits (N, 1, vocabulary), new)``: the
    cache ``(layers, 2, N, key/value heads, positions, head width)`` holds the keys and values
    before ``position``, masked beyond it, and the caller writes the step's ``new`` ones
    (``(layers, 2, N, heads, 1, width)``) into it at ``position``. Static shapes, so that the
    step compiles and exports; transformers' own cache is made from it inside the step.

    Example:
        >>> step = hugging_face({"model_type": "llama", ...}, num_classes=84).decoder()
        >>> cache = step.empty_cache(batch=1)
        >>> logits, new = step(torch.tensor([[3]]), torch.tensor([0]), cache)
        >>> cache[:, :, :, :, 0] = new[:, :, :, :, 0]
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def empty_cache(self, batch: int = 1) -> torch.Tensor:
        config = cast(Any, self.lm).config
        width = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attention = next((m for n, m in self.lm.named_modules() if n.endswith("k_proj")), None)
        if isinstance(attention, nn.Linear):  # after head pruning the config still says before
            heads = attention.out_features // width
        positions = min(config.max_position_embeddings, DECODE_POSITIONS)
        layers = config.num_hidden_layers
        weight = next(self.lm.parameters())
        return torch.zeros(layers, 2, batch, heads, positions, width, dtype=weight.dtype)

    def forward(
        self, ids: torch.Tensor, position: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache  # the model is one: transformers is there

        past = DynamicCache()
        for layer in range(cache.shape[0]):
            past.update(cache[layer, 0], cache[layer, 1], layer)
        before = torch.arange(cache.shape[4], device=ids.device) < position
        mask = torch.cat((before[None].expand(ids.shape[0], -1), ids.new_ones(ids.shape[0], 1)), 1)
        out = self.lm(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=position[None].expand(ids.shape[0], 1),
            cache=past,
            use_cache=True,
        )
        new = [
            torch.stack((layer.keys[:, :, -1:], layer.values[:, :, -1:]))
            for layer in out.cache.layers
        ]
        return out.logits, torch.stack(new)
