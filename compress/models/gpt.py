"""A small GPT (decoder-only transformer) for character-level language models, in the
shape nanoGPT trains on Shakespeare: token and position embeddings, pre-norm blocks of
causal self-attention and an MLP, a final norm and a Linear head.

Queries, keys and values are separate ``nn.Linear`` layers, as in Llama: the form PT2E's
Linear annotation and Torch-Pruning's head grouping both read (GPT-2's fused ``Conv1D`` is
neither). Use it from a recipe as ``model: {name: "compress.models:gpt", kwargs: {...}}``;
``num_classes`` is the vocabulary, which the dataset gives.

``GPT.decoder()`` is the same weights as one decoding step with a key/value cache of
static shape (every layer's keys and values for ``context`` positions, those not yet
written masked): what generation runs, one token at a time, and what ONNX Runtime and
OpenVINO run too, since no shape changes from one step to the next. A step returns only
its own position's keys and values, which the caller writes into the cache in place.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    shape_attributes = ("heads",)  # what structured pruning changes, saved with the shapes

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"gpt: width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        inner = self.query.out_features  # heads x head width: fewer once heads are pruned
        shape = (batch, length, self.heads, inner // self.heads)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, inner))

    def step(
        self, x: torch.Tensor, cache: torch.Tensor, before: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x (N, 1, W); cache (2, N, heads, context, W / heads) of the keys
        and values so far, ``before`` (1, context) true where they are. Returns the output
        and this position's keys and values (2, N, heads, 1, W / heads): the caller writes
        them into its cache, so that no step copies the whole cache (it did, three times,
        and that was most of a step's time)."""
        batch, inner = x.shape[0], self.query.out_features
        shape = (batch, 1, self.heads, inner // self.heads)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        # Softmax over the cached positions and this one, which is not in the cache yet.
        scale = (inner // self.heads) ** -0.5
        cached = (q @ cache[0].transpose(-1, -2) * scale).masked_fill(~before, float("-inf"))
        weights = torch.softmax(torch.cat((cached, (q * k).sum(-1, keepdim=True) * scale), -1), -1)
        context = cached.shape[-1]
        mixed = weights[..., :context] @ cache[1] + weights[..., context:] * v
        out = self.out(mixed.transpose(1, 2).reshape(batch, 1, inner))
        return out, torch.stack((k, v))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = _Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def step(
        self, x: torch.Tensor, cache: torch.Tensor, before: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, new = self.attention.step(self.norm1(x), cache, before)
        x = x + mixed
        return x + self.mlp(self.norm2(x)), new


class GPT(nn.Module):
    """Token ids (N, T) to next-token logits (N, T, vocabulary); T ≤ ``context``."""

    def __init__(self, vocabulary: int, context: int, layers: int, heads: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        places = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.tokens(ids) + self.positions(places))))

    def decoder(self) -> Decoder:
        """This model's weights as one decoding step with a static key/value cache."""
        return Decoder(self)


class Decoder(nn.Module):
    """One decoding step of a :class:`GPT`: ``(ids (N, 1), position (1,), cache)`` to
    ``(logits (N, 1, vocabulary), new)``; the cache ``(layers, 2, N, heads, context,
    width / heads)`` (from :meth:`empty_cache`) holds every layer's keys and values before
    ``position``; the caller writes the step's ``new`` ones (``(layers, 2, N, heads, 1,
    width / heads)``) into it at ``position``.

    Example:
        >>> model = gpt(num_classes=84, context=16)
        >>> step, ids = model.decoder(), torch.tensor([[3, 1, 4]])
        >>> cache = step.empty_cache(batch=1)
        >>> for i in range(3):
        ...     logits, new = step(ids[:, i : i + 1], torch.tensor([i]), cache)
        ...     cache[:, :, :, :, i] = new[:, :, :, :, 0]
        >>> torch.allclose(logits[:, 0], model(ids)[:, 2], atol=1e-5)
        True
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def empty_cache(self, batch: int = 1) -> torch.Tensor:
        model = self.model
        layers, context = len(model.blocks), model.positions.num_embeddings
        attention = cast(_Block, model.blocks[0]).attention  # pruning keeps layers alike
        heads = attention.heads
        shape = (layers, 2, batch, heads, context, attention.query.out_features // heads)
        return torch.zeros(shape, device=self.model.tokens.weight.device)

    def forward(
        self, ids: torch.Tensor, position: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        places = torch.arange(model.positions.num_embeddings, device=ids.device)
        before = (places < position)[None]
        x = model.tokens(ids) + model.positions(position)
        new = []
        for layer, block in enumerate(model.blocks):
            x, layer_new = cast(_Block, block).step(x, cache[layer], before)
            new.append(layer_new)
        return model.head(model.norm(x)), torch.stack(new)


def gpt(
    num_classes: int = 65, context: int = 256, layers: int = 4, heads: int = 4, width: int = 128
) -> nn.Module:
    """A GPT over ``num_classes`` tokens (nanoGPT's CPU shape for Shakespeare by default: 4
    layers, 4 heads, 128 wide; ``context`` must cover the data's ``context``).

    Example:
        >>> model = gpt(num_classes=84, context=64)
        >>> model(torch.zeros(2, 64, dtype=torch.long)).shape
        torch.Size([2, 64, 84])
    """
    return GPT(num_classes, context, layers, heads, width)
