"""Parity of decoder.onnx against Hugging Face's ``Qwen3VLForConditionalGeneration`` text path.

Cases (run through :class:`~qwen3vl_compile.runtime.decoder_session.DecoderSession`, the
runtime's own KV-cache path):

- ``text_only``: token embeddings, sequential positions; last-position logits.
- ``image``: a prompt with one image's pad tokens: random image features scattered in,
  MRoPE positions from Hugging Face's ``get_rope_index``, DeepStack features at the pad
  positions; prefill logits, then 3 decode steps with ``rope_deltas``.

The reference is the Hugging Face model in fp32 when it fits the memory budget, otherwise in
bf16 (recorded in the result). fp32 decoders are gated at relative error 1e-4; int4 figures
(cosine similarity, top-1 agreement of the logits) are reported without a gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..verify import TOLERANCES, GraphParity, measure

FP32_REFERENCE_BUDGET = 6 << 30  # bytes of fp32 weights we are willing to hold for a reference


def _reference_model(ck: Checkpoint, dtype=None):
    import torch

    if dtype is not None:
        return ck.load_full_model(dtype=dtype), dtype
    t = ck.text_config
    params = t["vocab_size"] * t["hidden_size"] * 2 + t["num_hidden_layers"] * (
        4 * t["hidden_size"] ** 2 + 3 * t["hidden_size"] * t["intermediate_size"]
    )
    dtype = torch.float32 if params * 4 <= FP32_REFERENCE_BUDGET else torch.bfloat16
    return ck.load_full_model(dtype=dtype), dtype


def verify_decoder(
    onnx_path: Path, ck: Checkpoint, precision: str, *, threads: int = 0, seed: int = 5, reference=None
) -> GraphParity:
    """``reference``: an already loaded (model, dtype) pair, to share one reference between
    several decoders; by default the model is loaded here (fp32 if it fits the budget)."""
    import torch
    from transformers import DynamicCache

    from ..runtime.decoder_session import DecoderSession

    model, dtype = reference or _reference_model(ck)
    image_id = ck.config.get("image_token_id", 151655)
    vs, ve = ck.config.get("vision_start_token_id", 151652), ck.config.get("vision_end_token_id", 151653)
    merge = ck.vision_config.get("spatial_merge_size", 2)
    levels = len(ck.vision_config.get("deepstack_visual_indexes", []))
    hidden = ck.text_config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    grid = (1, 6, 8)
    n_img = grid[1] * grid[2] // merge**2
    text = torch.randint(0, 5000, (1, 8), generator=gen)
    ids_image = torch.cat([text[:, :5], torch.tensor([[vs]]), torch.full((1, n_img), image_id), torch.tensor([[ve]]), text[:, 5:]], 1)
    session = DecoderSession(onnx_path, max_length=256, threads=threads)
    tol = TOLERANCES[("decoder", precision)]
    cases, golden = {}, {}
    embed = model.model.language_model.embed_tokens
    for case, ids in (("text_only", text), ("image", ids_image)):
        mask = ids == image_id
        with torch.no_grad():
            embeds = embed(ids).float()
        deep = torch.zeros(levels, *embeds.shape)
        ds_list = None
        if mask.any():
            feats = torch.randn(int(mask.sum()), hidden, generator=gen)
            embeds[mask] = feats
            ds_list = [torch.randn(int(mask.sum()), hidden, generator=gen) for _ in range(levels)]
            for k in range(levels):
                deep[k][mask] = ds_list[k]
            pos, delta = model.model.get_rope_index(ids, mm_token_type_ids=mask.int(), image_grid_thw=torch.tensor([grid]))
        else:
            pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
            delta = torch.zeros(1, 1, dtype=torch.long)
        cache = DynamicCache(config=model.config.text_config)
        ref_logits, ours, calls = [], [], [(embeds.numpy(), pos.numpy(), deep.numpy())]
        with torch.no_grad():
            out = model.model.language_model(
                inputs_embeds=embeds.to(dtype), position_ids=pos, attention_mask=torch.ones_like(ids),
                visual_pos_masks=mask if ds_list else None,
                deepstack_visual_embeds=[d.to(dtype) for d in ds_list] if ds_list else None,
                past_key_values=cache, use_cache=True,
            )
            ref_logits.append(model.lm_head(out.last_hidden_state[:, -1:]).float().numpy())
        session.reset()
        ours.append(session.run(embeds.numpy(), pos.numpy(), deep.numpy())[:, -1:])
        if case == "image":
            step_ids = torch.randint(0, 5000, (3,), generator=gen)
            length = ids.shape[1]
            for t, tok in enumerate(step_ids):
                with torch.no_grad():
                    e = embed(tok.view(1, 1)).float()
                    p = torch.full((3, 1, 1), length + t) + delta
                    o = model.model.language_model(
                        inputs_embeds=e.to(dtype), position_ids=p, attention_mask=torch.ones(1, length + t + 1, dtype=torch.long),
                        past_key_values=cache, use_cache=True,
                    )
                    ref_logits.append(model.lm_head(o.last_hidden_state).float().numpy())
                ours.append(session.run(e.numpy(), p.numpy()))
                calls.append((e.numpy(), p.numpy(), None))
        cases[case] = [measure("logits", np.concatenate(ours, 1), np.concatenate(ref_logits, 1), tol, logits=True)]
        if case == "image":
            golden = {
                "prefill_embeds": calls[0][0], "prefill_positions": calls[0][1], "prefill_deepstack": calls[0][2],
                "step_embeds": np.stack([c[0] for c in calls[1:]]), "step_positions": np.stack([c[1] for c in calls[1:]]),
                "reference_logits": np.concatenate(ref_logits, 1)[0],
            }
    ref_name = f"transformers Qwen3VLForConditionalGeneration ({str(dtype).replace('torch.', '')}), KV-cache prefill + decode"
    return GraphParity("decoder", "decoder", precision, ref_name, cases, golden)
