"""Patch ``Qwen3VLVisionAttention.forward`` (any-size graph): one attention call over all
patches with the block-diagonal mask the dynamic forward patch built.

Why export fails without it: the non-flash path splits q/k/v per segment with
``torch.split(tensor, lengths.tolist())``, data-dependent sizes torch.export cannot trace
(``GuardOnDataDependentSymNode``). The bucket patch decides between "no mask" and "mask"
from the static number of segments; in the any-size graph the number of images is a run-time
value, so here the mask is always applied. It is 0 inside a segment and the dtype's minimum
across segments, so the softmax gives exactly zero weight across images and frames, which
equals per-segment attention (one image: an all-zero mask, the same as no mask). The
per-image variant (one image, one segment per call) passes no mask at all.
"""

from __future__ import annotations

from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

from qwen3vl_compile.errors import PatchError

from .base import Patch

TARGET = Qwen3VLVisionAttention


def make_patch(per_image: bool = False) -> Patch:
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        # In the dynamic patch set the cu_seqlens slot holds the additive mask [1, 1, N, N]
        # (per image: an empty tensor, no mask).
        mask = cu_seqlens
        if not per_image and mask.dim() != 4:
            raise PatchError(
                "dynamic vision attention expects the [1, 1, N, N] mask from the dynamic forward patch; "
                f"got a tensor of shape {tuple(mask.shape)} (apply the whole dynamic patch set)"
            )
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = upstream.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attention_interface = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, upstream.eager_attention_forward
        )
        out, _ = attention_interface(
            self, q, k, v, attention_mask=None if per_image else mask.to(q.dtype), scaling=self.scaling, dropout=0.0,
            is_causal=False, **kwargs
        )
        return self.proj(out.reshape(seq_length, -1).contiguous())

    return Patch(TARGET, "forward", forward, reason=__doc__.split("\n\n")[1])
