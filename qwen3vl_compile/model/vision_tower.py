"""The Hugging Face vision tower (``Qwen3VLVisionModel``) built from a checkpoint's
``config.json`` and a state dict: one place for the compiler and the runtime's fallback.

Dense and MoE Qwen3-VL checkpoints share the vision tower (the MoE modeling file carries a
copy of the same classes), so both are built as ``Qwen3VLVisionModel``: the patches apply to
that class, and tests check it against ``Qwen3VLMoeVisionModel`` on the same weights.
"""

from __future__ import annotations


def vision_config(config: dict):
    """``Qwen3VLVisionConfig`` from a config.json dict (dense or MoE)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    values = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    return Qwen3VLVisionConfig(**values)


def build_vision_tower(config: dict, state: dict):
    """The tower on the meta device, then ``state`` (name -> tensor, already in the wanted
    dtype) assigned in place; the rotary ``inv_freq`` (not in checkpoints) is recomputed."""
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = vision_config(config)
    with torch.device("meta"):
        model = Qwen3VLVisionModel(cfg)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise KeyError(sorted(missing)[:5])
    model.load_state_dict(state, strict=True, assign=True)
    rot = model.rotary_pos_emb
    inv_freq, _ = rot.compute_axial_rope_parameters(cfg)
    rot.inv_freq = inv_freq
    rot.original_inv_freq = inv_freq.clone()
    return model.eval()
