"""Patch ``Qwen3VLVisionAttention.forward``: one attention call over all patches.

Why export fails without it: the non-flash path splits q/k/v per image with
``torch.split(tensor, lengths.tolist())``; under torch.export the split sizes are unbacked
symbols (``GuardOnDataDependentSymNode ... Eq(u7, 0)``), even for a fixed grid, and
TorchScript bakes the traced lengths. We run the same attention interface once on the whole
sequence; when there is more than one segment (several images or frames) a block-diagonal
additive mask keeps each patch inside its own image, which equals per-segment attention.

The patch has one body and three sources for that mask (``MASK_SOURCES``):

- ``"cu_seqlens"`` (bucket graphs): built here from upstream's ``cu_seqlens``, whose length
  (segments + 1) is static even while exporting; one segment needs no mask at all, and the
  call is then exactly upstream's.
- ``"given"`` (the any-size graph, several images per call): the number of images is a
  run-time value, so the dynamic forward patch builds the mask once per call and hands it
  over in the ``cu_seqlens`` slot; it is always applied (one image: an all-zero mask, the
  same as no mask).
- ``"none"`` (the any-size graph, one image per call): one segment, no mask; ONNX Runtime
  then runs attention without materialising patches x patches scores.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

from qwen3vl_compile.errors import PatchError

from .base import Patch

TARGET = Qwen3VLVisionAttention
MASK_SOURCES = ("cu_seqlens", "given", "none")


def block_diagonal_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, N, N]`` from per-patch segment ids ``[N]``: 0 where two patches
    share a segment, else the dtype's minimum (``exp`` of it underflows to exactly 0 after the
    softmax's max shift, so the result equals attention run per segment)."""
    same = segment[:, None] == segment[None, :]
    zero = torch.zeros((), dtype=dtype, device=segment.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=segment.device)
    return torch.where(same, zero, low)[None, None]


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-patch segment ids ``[N]`` from the cumulative segment ends ``[0, e1, ..., N]``."""
    idx = torch.arange(seq_length, device=cu_seqlens.device, dtype=torch.int64)
    inner = cu_seqlens.to(torch.int64)[1:-1]
    return (idx[:, None] >= inner[None, :]).sum(-1)


def _mask(source: str, slot: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor | None:
    if source == "none":
        return None
    if source == "given":
        if slot.dim() != 4:
            raise PatchError(
                "dynamic vision attention expects the [1, 1, N, N] mask from the dynamic forward patch; "
                f"got a tensor of shape {tuple(slot.shape)} (apply the whole dynamic patch set)"
            )
        return slot.to(dtype)
    if slot.shape[0] <= 2:  # one segment
        return None
    return block_diagonal_mask(segments_from_cu_seqlens(slot, seq_length), dtype)


def make_patch(mask: str = "cu_seqlens") -> Patch:
    """The attention patch with its mask taken from ``mask`` (one of ``MASK_SOURCES``)."""
    if mask not in MASK_SOURCES:
        raise PatchError(f"vision attention patch: mask source {mask!r} is not one of {', '.join(MASK_SOURCES)}")
    original = Qwen3VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        # Only upstream's own cu_seqlens can go to the flash path; the dynamic forward patch
        # refuses flash attention before this is reached.
        if mask == "cu_seqlens" and upstream.is_flash_attention_requested(self.config):
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = upstream.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attention_interface = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, upstream.eager_attention_forward
        )
        out, _ = attention_interface(
            self, q, k, v, attention_mask=_mask(mask, cu_seqlens, seq_length, q.dtype), scaling=self.scaling,
            dropout=0.0, is_causal=False, **kwargs
        )
        return self.proj(out.reshape(seq_length, -1).contiguous())

    return Patch(TARGET, "forward", forward, reason=__doc__.split("\n\n")[1])
