"""Patch ``Qwen3VLVisionAttention.forward``: one attention call over all patches.

Why export fails without it: the non-flash path splits q/k/v per image with
``torch.split(tensor, lengths.tolist())``; under torch.export the split sizes are unbacked
symbols (``GuardOnDataDependentSymNode ... Eq(u7, 0)``), even for a fixed grid, and
TorchScript bakes the traced lengths. We run the same attention interface once on the whole
sequence; when there is more than one segment (several images or frames) a block-diagonal
additive mask keeps each patch inside its own image, which equals per-segment attention.
One segment (a bucket graph) needs no mask at all: the call is then exactly upstream's.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

from .base import Patch

TARGET = Qwen3VLVisionAttention


def block_diagonal_mask(cu_seqlens: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, N, N]: 0 inside a segment, the dtype's minimum across segments."""
    idx = torch.arange(seq_length, device=cu_seqlens.device, dtype=torch.int64)
    inner = cu_seqlens.to(torch.int64)[1:-1]
    segment = (idx[:, None] >= inner[None, :]).sum(-1)
    same = segment[:, None] == segment[None, :]
    mask = torch.zeros(seq_length, seq_length, dtype=dtype, device=cu_seqlens.device)
    return mask.masked_fill(~same, torch.finfo(dtype).min)[None, None]


def make_patch() -> Patch:
    original = Qwen3VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        if upstream.is_flash_attention_requested(self.config):
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = upstream.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attention_interface = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, upstream.eager_attention_forward
        )
        # cu_seqlens has (segments + 1) entries; its length is static even while exporting.
        mask = block_diagonal_mask(cu_seqlens, seq_length, q.dtype) if cu_seqlens.shape[0] > 2 else None
        out, _ = attention_interface(
            self, q, k, v, attention_mask=mask, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        return self.proj(out.reshape(seq_length, -1).contiguous())

    return Patch(TARGET, "forward", forward, reason=__doc__.split("\n\n")[1])
