"""The onnxruntime-genai target (``--target ort-genai``): the bundle also loads with
``onnxruntime_genai.Model(OUT)`` and its ``MultiModalProcessor``, DeepStack included.

onnxruntime-genai's ``qwen3_vl`` runtime runs three sessions and passes one tensor between
each: vision (``pixel_values``, ``image_grid_thw`` -> ``image_features``), embedding
(``input_ids``, ``image_features`` -> ``inputs_embeds``), decoder (``inputs_embeds``,
``attention_mask``, ``position_ids [3, B, S]``, KV cache). It knows nothing of DeepStack.
The levels ride along in extra channels (its runtime passes one tensor per step and
checks only the declared hidden size): ``genai_config.json``
declares ``decoder.hidden_size = H * (1 + K)``, and three thin graphs wrap the verified ones:

=====================  =======================  =========================================
graph                  made from                passes
=====================  =======================  =========================================
genai_vision.onnx      vision_dynamic_multi.onnx PackDeepStackOutputsPass (features + levels)
genai_embedding.onnx   embedding.onnx           UnpackDeepStackInputsPass, PackDeepStackOutputsPass
genai_decoder.onnx     decoder.onnx             UnpackDeepStackInputsPass
=====================  =======================  =========================================

The wrappers keep their weights where the source graphs keep them: an initializer stored as
external data stays a reference into the same ``.onnx.data`` file (onnx-ir saves external
tensors as references), so the INT4 decoder is not stored twice.

Each wrapper is checked like every other graph: it is run on its source graph's golden input
(packed on the host) and compared, unpacked, with the PyTorch reference recorded for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from ..bundle.records import GraphEntry, ParityRecord
from ..errors import ExportError
from .decoder import graph_interface

GENAI_CONFIG = "genai_config.json"
PROCESSOR_CONFIG = "processor_config.json"
# onnxruntime-genai's model type for Qwen3-VL (its own builder writes "qwen3vl", a name its
# runtime's model-type table does not know, so such a config fails to load).
GENAI_MODEL_TYPE = "qwen3_vl"


def _pairs(kind: str) -> dict:
    """Which (features, deepstack) pair each packed name carries, per side of the graph."""
    if kind == "vision":
        return {"outputs": {"image_features": ["image_features", "deepstack_features"]}}
    if kind == "embedding":
        return {
            "inputs": {"image_features": ["image_features", "deepstack_features"]},
            "outputs": {"inputs_embeds": ["inputs_embeds", "deepstack_embeds"]},
        }
    return {"inputs": {"inputs_embeds": ["inputs_embeds", "deepstack_embeds"]}}


def _passes(kind: str):
    from qwen3vl_compile.passes import genai_passes

    return genai_passes(_pairs(kind))


def _source_graphs(graphs: dict[str, GraphEntry]) -> dict[str, str]:
    """genai graph name -> the bundle graph it wraps; refuses a bundle without them."""
    # onnxruntime-genai sends every image of a prompt in one call: the multi-image graph.
    dynamic = next((n for n, g in graphs.items() if g.kind == "vision" and g.details.get("dynamic")
                    and g.details.get("images_per_call", "any") == "any" and not g.details.get("deepstack_packing")), None)
    sources = {"genai_vision": dynamic, "genai_embedding": "embedding", "genai_decoder": "decoder"}
    missing = [name for name, src in sources.items() if src not in graphs]
    if missing:
        raise ExportError(f"--target ort-genai: the bundle lacks the graphs that {', '.join(missing)} wrap "
                          "(it needs --buckets ...,dynamic, the embedding and the decoder)")
    return sources


def build_genai_graphs(staging: Path, graphs: dict[str, GraphEntry]) -> dict[str, GraphEntry]:
    """Write the three ``genai_*.onnx`` wrappers next to their sources (``graphs``: the
    bundle's graphs so far); return their entries."""
    from qwen3vl_compile.passes.base import check_saved_model, run_passes

    entries = {}
    levels = graphs["decoder"].details["spec"]["deepstack_levels"]
    for name, source in _source_graphs(graphs).items():
        src = graphs[source]
        model = ir.load(staging / src.file)  # external weights stay references
        model.graph.name = name
        model, reports = run_passes(model, _passes(src.kind), graph=name)
        path = staging / f"{name}.onnx"
        ir.save(model, path)
        reports.append(check_saved_model(path, graph=name, before=reports))
        interface = graph_interface(model.graph)
        entries[name] = GraphEntry(
            file=path.name,
            kind=src.kind,
            precision=src.precision,
            inputs=interface["inputs"],
            outputs=interface["outputs"],
            data_files=list(src.data_files),  # shared with the source graph
            passes=reports,
            details={
                "target": "ort-genai",
                "source_graph": source,
                **({"dynamic": True} if src.details.get("dynamic") else {}),
                **({"spec": src.details["spec"]} if src.kind == "decoder" else {}),
                "deepstack_packing": {"levels": levels, **_pairs(src.kind)},
            },
        )
        del model
    return entries


def verify_genai_graph(staging: Path, entry: GraphEntry, source: ParityRecord, *, threads: int = 0) -> ParityRecord:
    """Run the wrapper ``entry`` on its source graph's golden input (``source``: the source
    graph's parity record) and compare, unpacked, with the reference recorded for it."""
    from ..bundle.goldens import check_graph_golden

    parity = check_graph_golden(staging, entry.to_json(), source.golden.to_json(), threads=threads)
    parity.graph = entry.name
    parity.reference = (f"{source.parity.reference}; {entry.details['source_graph']}'s golden input, "
                        "DeepStack packed into channels")
    return ParityRecord(parity, source.golden)


def genai_config(ck, spec: dict, generation: dict) -> dict:
    """``genai_config.json`` for onnxruntime-genai's ``qwen3_vl`` model type (``spec``: the
    decoder's spec as recorded in its entry; ``generation``: generation_config.json)."""
    gen = generation or {}
    chat_end, text_end = ck.text_token_id("<|im_end|>"), ck.text_token_id("<|endoftext|>")
    eos = gen.get("eos_token_id", [t for t in (chat_end, text_end) if t is not None])
    io = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}}
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": gen.get("bos_token_id", text_end),
            "pad_token_id": gen.get("pad_token_id", text_end),
            "eos_token_id": eos if isinstance(eos, list) else [eos],
            "image_token_id": ck.token_id("image_token_id"),
            "video_token_id": ck.token_id("video_token_id"),
            "vision_start_token_id": ck.token_id("vision_start_token_id"),
            "vocab_size": spec["vocab"],
            "context_length": spec["context_length"],
            "decoder": {
                **io,
                "filename": "genai_decoder.onnx",
                # The wide-channel layout: features plus K DeepStack levels per token.
                "hidden_size": spec["hidden"] * (1 + spec["deepstack_levels"]),
                "head_size": spec["head_dim"],
                "num_attention_heads": spec["heads"],
                "num_key_value_heads": spec["kv_heads"],
                "num_hidden_layers": spec["layers"],
                "inputs": {
                    "inputs_embeds": "inputs_embeds",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
            "embedding": {
                **io,
                "filename": "genai_embedding.onnx",
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                **io,
                "filename": "genai_vision.onnx",
                "config_filename": PROCESSOR_CONFIG,
                "spatial_merge_size": ck.vision_config.get("spatial_merge_size", 2),
                "patch_size": ck.vision_config.get("patch_size", 16),
                "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                "outputs": {"image_features": "image_features"},
            },
        },
        "search": {
            "do_sample": bool(gen.get("do_sample", False)),
            "max_length": spec["context_length"],
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 1)),
            "top_p": float(gen.get("top_p", 1.0)),
            "length_penalty": 1.0,
            "early_stopping": True,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def processor_config(processor) -> dict:
    """onnxruntime-extensions' image pipeline with the *checkpoint's* Qwen3-VL values
    (``processor``: :class:`~qwen3vl_compile.runtime.preprocess.ProcessorConfig`), not the
    Qwen2.5-VL pixel bounds that onnxruntime-genai's examples carry (3136 / 12845056)."""

    def op(name: str, type_: str, attrs: dict | None = None) -> dict:
        return {"operation": {"name": name, "type": type_, **({"attrs": attrs} if attrs else {})}}

    return {
        "processor": {
            "name": "qwen3_vl_image_processor",
            "transforms": [
                op("decode_image", "DecodeImage", {"color_space": "RGB"}),
                op("convert_to_rgb", "ConvertRGB"),
                op("resize", "Resize", {
                    "smart_resize": 1,
                    "min_pixels": int(processor.min_pixels),
                    "max_pixels": int(processor.max_pixels),
                    "patch_size": int(processor.patch_size),
                    "merge_size": int(processor.merge_size),
                }),
                op("rescale", "Rescale", {"rescale_factor": float(processor.rescale_factor)}),
                op("normalize", "Normalize", {"mean": [float(x) for x in processor.image_mean],
                                              "std": [float(x) for x in processor.image_std], "qwen3_vl": 1}),
                op("patch_image", "PatchImage", {"patch_size": int(processor.patch_size),
                                                 "temporal_patch_size": int(processor.temporal_patch_size),
                                                 "merge_size": int(processor.merge_size)}),
            ],
        }
    }


def write_genai_configs(staging: Path, ck, spec: dict) -> list[str]:
    from ..processor_config import ProcessorConfig

    processor = ProcessorConfig.from_dict(ck.preprocessor or {})
    (staging / GENAI_CONFIG).write_text(json.dumps(genai_config(ck, spec, ck.generation_config), indent=2) + "\n")
    (staging / PROCESSOR_CONFIG).write_text(json.dumps(processor_config(processor), indent=2) + "\n")
    return [GENAI_CONFIG, PROCESSOR_CONFIG]
