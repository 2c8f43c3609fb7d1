"""The compile pipeline. Each stage returns typed records (``bundle/records.py``) and the
manifest is assembled once, at the end, from those:

1. load       resolve the model (preset or directory); check config, tokenizer, weights'
              headers, and the options against this checkpoint and this machine
2. vision     one graph per bucket (patches -> torch.onnx -> passes) and the any-size
              graph, each checked against unpatched Hugging Face; one shared weights file
3. embedding  token embeddings with image features scattered in, checked
4. decoder    the text decoder (onnx-ir builder, weights streamed), gated against Hugging
              Face in fp32 (whole depth, or a slice of the first layers for large models)
5. genai      ``--target ort-genai``: wrappers and configs onnxruntime-genai loads, checked
6. recheck    every golden rerun on the files as they will ship
7. write      fallback weights, assets, the text golden (golden/text.json), manifest with
              hashes; atomic move into place

Parity failures of stages 2-5 are collected and reported together; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
from pathlib import Path
from typing import Callable

from .bundle.writer import STAGING_MARKER, BundleWriter
from .model.checkpoint import Checkpoint, resolve_model_source
from .config import CompileConfig
from .errors import LoadError, UsageError, VerifyError, WriteError
from .bundle.manifest import assemble, hash_files, write_manifest
from .bundle.signing import check_signing_key, sign as sign_bundle
from .bundle.records import GoldenRef, GraphEntry, ParityRecord, StageResult
from .presets import is_preset
from .progress import Progress
from .model.support import check_build_options
from .runtime.text_golden import write_text_golden
from .upstream import check_upstream

ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compile_bundle(cfg: CompileConfig, progress: Progress | None = None, *,
                   on_writer: Callable[[BundleWriter], None] | None = None) -> dict:
    """Run the whole compile; return the manifest. Raises a typed error on any failure.
    ``on_writer`` is given the bundle writer as soon as it exists (the CLI asks it, on
    Ctrl-C, what is at the output now)."""
    progress = progress or Progress(enabled=cfg.verbose)
    _quiet_libraries(progress.enabled)
    model_dir = Path(cfg.model).expanduser()
    protected = [model_dir] if not is_preset(cfg.model) and model_dir.is_dir() else []
    writer = BundleWriter(cfg.output, force=cfg.force, protected=protected, log=progress.log)
    if on_writer is not None:
        on_writer(writer)
    writer.check_target()  # fail before any expensive work
    if cfg.sign_key is not None:
        check_signing_key(cfg.sign_key)
    check_upstream()

    with progress.stage("load"):
        path = resolve_model_source(cfg.model, cache_dir=cfg.cache_dir, log=progress.log)
        writer.protect(path)
        ck = Checkpoint.open(path)
        ck.check_tokenizer()
        ck.check_chat()
        _check_bucket_geometry(ck, cfg)
        cfg = _resolve_context_length(ck, cfg, progress)
        if "decoder" in cfg.graphs:
            check_build_options(ck.config, cfg.decoder.precision, cfg.decoder.block_size)
        source = {
            "model": cfg.model,
            "preset": cfg.model if is_preset(cfg.model) else None,
            "path": str(Path(path).resolve()),
            "architecture": (ck.config.get("architectures") or ["?"])[0],
            "config_sha256": ck.config_sha256,
        }
        generation = ck.generation_config
    _set_threads(cfg.threads)
    try:
        return _build(ck, cfg, source, generation, writer, progress)
    except OSError as e:
        # A full disk or a vanished directory while writing: one line; the writer has already
        # removed its staging directory.
        where = f" ({e.filename})" if e.filename else ""
        raise WriteError(f"writing the bundle failed: {e.strerror or e}{where}; nothing was written: {writer.out_now()}") from None


def _build(ck: Checkpoint, cfg: CompileConfig, source: dict, generation: dict, writer: BundleWriter,
           progress: Progress) -> dict:
    with writer as staging:
        result = StageResult()
        if "vision" in cfg.graphs:
            result.add(_vision(ck, cfg, staging, progress))
        # An INT4 embedding reuses the decoder's INT4 lm_head bytes, so it comes second.
        order = ("decoder", "embedding") if cfg.decoder.embedding_precision == "int4" else ("embedding", "decoder")
        for kind in order:
            if kind in cfg.graphs:
                result.add((_embedding if kind == "embedding" else _decoder)(ck, cfg, staging, progress))
        if cfg.target == "ort-genai":
            result.add(_genai(ck, cfg, staging, result, progress))
        if result.failures:
            raise VerifyError("parity check failed (no bundle written; use --no-verify to keep it anyway)", result.failures)
        _recheck_goldens(staging, result, cfg, progress)
        with progress.stage("write"):
            if "vision" in cfg.graphs:
                result.sections["fallback"] = _write_fallback_weights(ck, staging)
            for name in ASSET_FILES:
                src = ck.path / name
                if src.is_file():
                    shutil.copy2(src, staging / name)
            # The text side's golden, computed by the runtime's code from the files just copied.
            result.sections["text_golden"] = write_text_golden(staging, ck.preprocessor)
            manifest = assemble(command=list(cfg.command), source=source, options=cfg.options_json(),
                                processor=ck.preprocessor, generation=generation, result=result,
                                timings=progress.timings, peak_rss_bytes=peak_rss_bytes())
            hash_files(staging, manifest, exclude=(STAGING_MARKER,))
            write_manifest(staging, manifest)
            if cfg.sign_key is not None:  # signed in staging: a signed bundle appears at once
                (staging / STAGING_MARKER).unlink(missing_ok=True)  # the signature covers only the bundle
                sign_bundle(staging, cfg.sign_key, check=False)
        writer.commit()
    return manifest


def _vision(ck: Checkpoint, cfg: CompileConfig, staging: Path, progress: Progress) -> StageResult:
    from .buckets import split_buckets
    from .export.vision import export_vision_bucket, graph_name, verify_vision_bucket

    static, dynamic = split_buckets(cfg.buckets)
    with progress.stage("load vision tower"):
        visual = ck.load_vision_tower()
    out = StageResult()
    for bucket in static:
        name = graph_name(bucket)
        with progress.stage(f"export {name} (grid {bucket.grid_thw[1]}x{bucket.grid_thw[2]})"):
            entry = export_vision_bucket(visual, bucket, staging, precision=cfg.vision_precision)
        out.graphs[name] = entry
        out.buckets.append({**bucket.to_json(), "graph": entry.file})
        if cfg.verify:
            with progress.stage(f"verify {name}"):
                parity = verify_vision_bucket(staging / entry.file, visual, bucket, threads=cfg.threads,
                                              precision=cfg.vision_precision)
            _record_parity(out, staging, name, parity)
    if dynamic is not None:
        out.add(_vision_dynamic(visual, cfg, staging, progress))
    del visual
    _share_vision_weights(staging, out, progress)
    return out


VISION_WEIGHTS = "vision_weights.onnx.data"


def _share_vision_weights(staging: Path, out: StageResult, progress: Progress) -> None:
    """Every vision graph was exported with its own copy of the tower: keep one."""
    from .export.share_weights import share_weights

    entries = [g for g in out.graphs.values() if g.kind == "vision"]
    with progress.stage(f"share vision weights ({len(entries)} graphs)"):
        out.sections["vision_weights"] = share_weights(staging, [g.file for g in entries], VISION_WEIGHTS)
    for g in entries:
        g.data_files = [VISION_WEIGHTS]


def _vision_dynamic(visual, cfg: CompileConfig, staging: Path, progress: Progress) -> StageResult:
    """The any-size vision graph (``--buckets ...,dynamic``, one image per call), and for
    ``--target ort-genai`` the multi-image one its runtime needs: grid as an input, checked
    on grids the export never saw and on several images."""
    from .export.vision_dynamic import export_vision_dynamic, verify_vision_dynamic

    out = StageResult()
    for per_image in (True, False) if cfg.target == "ort-genai" else (True,):
        with progress.stage(f"export the any-size vision graph ({'one image' if per_image else 'several images'} per call)"):
            entry = export_vision_dynamic(visual, staging, per_image=per_image, precision=cfg.vision_precision)
        out.graphs[entry.name] = entry
        if not cfg.verify:
            continue
        with progress.stage(f"verify {entry.name}"):
            parity = verify_vision_dynamic(staging / entry.file, visual, threads=cfg.threads, precision=cfg.vision_precision)
        _record_parity(out, staging, entry.name, parity)
    return out


def _embedding(ck: Checkpoint, cfg: CompileConfig, staging: Path, progress: Progress) -> StageResult:
    from .export.embedding import build_embedding, verify_embedding

    out = StageResult()
    with progress.stage("build embedding"):
        out.graphs["embedding"] = entry = build_embedding(ck, staging, cfg.decoder)
    if cfg.verify:
        with progress.stage("verify embedding"):
            parity = verify_embedding(staging / entry.file, ck, precision=entry.precision,
                                      block_size=cfg.decoder.block_size, threads=cfg.threads)
        _record_parity(out, staging, "embedding", parity)
    return out


def _decoder(ck: Checkpoint, cfg: CompileConfig, staging: Path, progress: Progress) -> StageResult:
    from .export.decoder import build_decoder
    from .passes.base import check_saved_model

    out = StageResult()
    with progress.stage(f"build decoder ({cfg.decoder.precision})"):
        entry = build_decoder(ck, staging / "decoder.onnx", cfg.decoder, progress=progress.log)
    with progress.stage("check decoder"):
        entry.passes.append(check_saved_model(staging / entry.file, graph="decoder", before=entry.passes))
    out.graphs["decoder"] = entry
    if cfg.verify:
        _gate_decoder(ck, cfg, staging, entry, out, progress)
    return out


def _gate_decoder(ck: Checkpoint, cfg: CompileConfig, staging: Path, entry: GraphEntry, out: StageResult,
                  progress: Progress) -> None:
    """The decoder's parity gate (see export/decoder_gate.py): the shipped graph itself when
    the fp32 reference of the whole depth fits, else a slice of its first N layers built by
    the same builder with the same options, and the shipped graph's own output as golden."""
    from .export.decoder import build_decoder
    from .export.decoder_gate import gate_layers, self_golden, verify_decoder

    total, n = ck.text_config["num_hidden_layers"], gate_layers(ck)
    shipped = staging / entry.file
    if n == total:
        with progress.stage(f"verify decoder ({n} layers, fp32 reference)"):
            parity = verify_decoder(shipped, ck, cfg.decoder, threads=cfg.threads)
        _record_parity(out, staging, "decoder", parity)
        return
    work = staging / ".gate"
    try:
        with progress.stage(f"build the decoder's first {n} of {total} layers for the gate"):
            build_decoder(ck, work / "decoder.onnx", cfg.decoder.replace(context_length=min(cfg.decoder.context_length, 1024)),
                          layers=n)
        with progress.stage(f"verify decoder ({n} of {total} layers, fp32 reference)"):
            parity = verify_decoder(work / "decoder.onnx", ck, cfg.decoder, layers=n, threads=cfg.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size, avail = shipped.stat().st_size + sum(p.stat().st_size for p in staging.glob(shipped.name + ".data")), _available_memory()
    if avail is not None and size > 0.6 * avail:
        parity.golden = {}
        parity.details["golden_source"] = (f"not recorded: the decoder ({size / 2**30:.1f} GiB) does not fit this machine's "
                                           f"available memory ({avail / 2**30:.1f} GiB) beside the compile")
    else:
        with progress.stage("record the shipped decoder's golden"):
            parity.golden = self_golden(shipped, parity.golden, threads=cfg.threads)
        parity.details["golden_source"] = "the shipped decoder's own logits at compile time (its parity is gated on the slice)"
    _record_parity(out, staging, "decoder", parity)


def _genai(ck: Checkpoint, cfg: CompileConfig, staging: Path, done: StageResult, progress: Progress) -> StageResult:
    """``--target ort-genai``: wide-channel wrappers of the verified graphs plus
    genai_config.json / processor_config.json; each wrapper rerun on its source's golden."""
    from .export.genai import GENAI_CONFIG, GENAI_MODEL_TYPE, PROCESSOR_CONFIG, build_genai_graphs, verify_genai_graph, write_genai_configs

    out = StageResult()
    with progress.stage("build onnxruntime-genai graphs"):
        out.graphs = build_genai_graphs(staging, done.graphs)
        write_genai_configs(staging, ck, done.graphs["decoder"].details["spec"])
    out.sections["genai"] = {"model_type": GENAI_MODEL_TYPE, "config": GENAI_CONFIG, "processor_config": PROCESSOR_CONFIG,
                             "graphs": list(out.graphs), "deepstack_layout": "wide channels: hidden_size = H * (1 + K)"}
    if not cfg.verify:
        return out
    for name, entry in out.graphs.items():
        with progress.stage(f"verify {name}"):
            record = verify_genai_graph(staging, entry, done.parity[entry.details["source_graph"]], threads=cfg.threads)
        out.parity[name] = record
        out.failures += record.parity.failures()
    return out


def _recheck_goldens(staging: Path, result: StageResult, cfg: CompileConfig, progress: Progress) -> None:
    """What ships is what was checked: after every rewrite (shared vision weights, wrapper
    graphs), each graph's golden input is run again on the files as they will ship."""
    from .bundle.goldens import check_graph_golden

    names = [n for n, r in result.parity.items() if r.golden is not None]
    failures = []
    with progress.stage(f"recheck {len(names)} goldens on the files as shipped"):
        for name in names:
            record = result.parity[name]
            failures += check_graph_golden(staging, result.graphs[name].to_json(), record.golden.to_json(),
                                           reference=record.parity.reference, threads=cfg.threads).failures()
    if failures:
        raise VerifyError("a graph changed after its parity check (no bundle written)", failures)


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with the compile extra
        return None


def _record_parity(out: StageResult, staging: Path, name: str, parity) -> None:
    """Parity into the stage's records (and its failures); one input/reference pair into
    golden/<name>.npz, with the tolerance `qwen3vl-compile verify` will apply to it on any
    machine."""
    import numpy as np

    from .bundle.goldens import golden_tolerance

    golden = None
    if parity.golden:
        (staging / "golden").mkdir(exist_ok=True)
        np.savez_compressed(staging / "golden" / f"{name}.npz", **parity.golden)
        tolerance = (parity.golden_tolerance if parity.golden_tolerance is not None
                     else golden_tolerance(parity.kind, parity.precision, parity.worst_rel))
        golden = GoldenRef(f"golden/{name}.npz", tolerance)
    out.parity[name] = ParityRecord(parity, golden)
    out.failures += parity.failures()


FALLBACK_WEIGHTS = "vision_fallback.safetensors"


def _write_fallback_weights(ck: Checkpoint, staging: Path) -> dict:
    """The vision tower's weights, as stored in the checkpoint, for the PyTorch fallback on
    image sizes without a bucket: the bundle stays usable when moved or when the source
    checkpoint is gone."""
    from safetensors.torch import save_file

    from .model.checkpoint import VISION_PREFIXES

    tensors = {k: v.contiguous() for k, v in ck.tensors_with_prefix(VISION_PREFIXES)}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
    save_file(tensors, str(staging / FALLBACK_WEIGHTS), metadata={"format": "pt"})
    (staging / FALLBACK_WEIGHTS).chmod(0o644)
    return {"file": FALLBACK_WEIGHTS, "tensors": len(tensors), "dtypes": dtypes, "module": "transformers Qwen3VLVisionModel"}


def _check_bucket_geometry(ck: Checkpoint, cfg: CompileConfig) -> None:
    """Options that depend on the checkpoint, refused before any export: buckets parsed for
    another patch size, buckets larger than any image the processor produces or whose
    export cannot fit this machine's memory, a context beyond the model's positions."""
    from .buckets import split_buckets
    from .processor_config import ProcessorConfig

    v = ck.vision_config
    patch, merge = v["patch_size"], v["spatial_merge_size"]
    for b in cfg.buckets:
        if (b.patch_size, b.merge_size) != (patch, merge):
            raise LoadError(
                f"checkpoint has patch {patch} / merge {merge}; buckets were parsed for {b.patch_size} / {b.merge_size}"
            )
    max_pixels = ProcessorConfig.from_dict(ck.preprocessor).max_pixels
    avail = _available_memory()
    for b in split_buckets(cfg.buckets)[0] if "vision" in cfg.graphs else ():
        if b.height * b.width > max_pixels:
            raise UsageError(f"--buckets {b.name}: {b.height * b.width} pixels, above the checkpoint's max_pixels "
                             f"{max_pixels} (preprocessor_config.json): no image is ever that large")
        # Attention scores of one image: heads x patches^2 fp32, several live at once.
        need = 3 * 4 * v["num_heads"] * b.num_patches**2
        if avail is not None and need > avail:
            raise UsageError(f"--buckets {b.name}: exporting it needs about {need / 2**30:.0f} GiB for attention alone, "
                             f"more than this machine's {avail / 2**30:.0f} GiB available")
    max_pos = ck.text_config.get("max_position_embeddings")
    context = cfg.decoder.context_length  # None: the default, which adapts (see _resolve_context_length)
    if "decoder" in cfg.graphs and max_pos and context is not None and context > max_pos:
        raise UsageError(f"--context-length {context}: above the model's max_position_embeddings {max_pos}")


def _resolve_context_length(ck: Checkpoint, cfg: CompileConfig, progress: Progress) -> CompileConfig:
    """The default context length (none given) becomes a number: DEFAULT_CONTEXT_LENGTH, or the
    model's max_position_embeddings when that is smaller, which is then said."""
    from .options import DEFAULT_CONTEXT_LENGTH

    if cfg.decoder.context_length is not None:
        return cfg
    max_pos = ck.text_config.get("max_position_embeddings")
    context = cfg.decoder.context_for(max_pos)
    if context < DEFAULT_CONTEXT_LENGTH:
        progress.log(f"context length {context}: the model's max_position_embeddings (the default "
                     f"{DEFAULT_CONTEXT_LENGTH} is above it; --context-length sets another)")
    return dataclasses.replace(cfg, decoder=cfg.decoder.replace(context_length=context))


def _quiet_libraries(verbose: bool) -> None:
    """transformers' own progress bars and warnings stay out of a quiet compile."""
    if verbose:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
