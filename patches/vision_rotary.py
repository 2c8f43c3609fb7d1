"""Patch ``Qwen3VLVisionRotaryEmbedding.forward``: cos/sin looked up in a precomputed table.

Why export fails without it: upstream multiplies the position ids by ``inv_freq`` and takes
cos/sin on every call, with sizes that follow the image grid; older versions built the
frequencies with ``torch.arange(max(h, w))`` from data values, which torch.export cannot
trace and TorchScript bakes. The table holds ``cos``/``sin`` of ``outer(arange(max_positions),
inv_freq)`` in float32 (the same products upstream computes, so the values are identical);
the forward is a Gather, and with a bucket's constant position ids the exporter folds it.
"""

from __future__ import annotations

import weakref

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding

from .base import Patch

TARGET = Qwen3VLVisionRotaryEmbedding


def make_patch(max_positions: int) -> Patch:
    tables: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]" = weakref.WeakKeyDictionary()

    def table(module):
        if module not in tables:
            inv_freq = module.inv_freq.detach().to(torch.float32)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq)
            tables[module] = (freqs.cos(), freqs.sin())
        return tables[module]

    @torch.no_grad()
    def forward(self, x, position_ids):
        cos_table, sin_table = table(self)
        cos = cos_table.to(x.device)[position_ids] * self.attention_scaling  # [N, 2, dim/4]
        sin = sin_table.to(x.device)[position_ids] * self.attention_scaling
        return self.recomposition_frequencies(cos), self.recomposition_frequencies(sin)

    return Patch(TARGET, "forward", forward, reason=__doc__.split("\n\n")[1])
