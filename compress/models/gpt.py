"""A small GPT (decoder-only transformer) for character-level language models, in the
shape nanoGPT trains on Shakespeare: token and position embeddings, pre-norm blocks of
causal self-attention and an MLP, a final norm and a Linear head.

Queries, keys and values are separate ``nn.Linear`` layers, as in Llama: the form PT2E's
Linear annotation and Torch-Pruning's head grouping both read (GPT-2's fused ``Conv1D`` is
neither). Use it from a recipe as ``model: {name: "compress.models:gpt", kwargs: {...}}``;
``num_classes`` is the vocabulary, which the dataset gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"gpt: width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


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
