"""Write a preset as an ordinary Hugging Face checkpoint directory.

The compiler then loads it through exactly the code path a downloaded checkpoint takes.
Directories are cached (keyed by a hash of config, seed and generator version) and built in
a temporary directory that is renamed into place, so an interrupted build leaves nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..model.tokens import SPECIAL_TOKENS
from .configs import SMALL, TRAINED, preset_config

GENERATOR_VERSION = 1
TINY_SEED = 1234

PREPROCESSOR_CONFIG = {
    # The values published Qwen3-VL checkpoints ship (patch 16, mean/std 0.5, their pixel
    # bounds), not the image processor class defaults.
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1.0 / 255.0,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}
# video_preprocessor_config.json as the published Qwen3-VL Instruct checkpoints ship it: the
# pixel bounds count all sampled frames together; fps and the frame bounds are the video
# processor's defaults (2 per second, 4 to 768 frames).
VIDEO_PREPROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

GENERATION_CONFIG = {
    "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
    "eos_token_id": [SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]],
    "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"],
    "do_sample": False,
}


def default_cache_dir() -> Path:
    root = os.environ.get("QWEN3VL_COMPILE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen3vl-compile"


def trained_asset(name: str) -> Path | None:
    """The file of trained tensors a preset ships with (None for random presets)."""
    if name not in TRAINED:
        return None
    return Path(__file__).resolve().parent.parent / "assets" / TRAINED[name]


def _key(name: str, seed: int) -> str:
    asset = trained_asset(name)
    trained = hashlib.sha256(asset.read_bytes()).hexdigest() if asset is not None and asset.is_file() else None
    blob = json.dumps({"config": preset_config(name), "seed": seed, "v": GENERATOR_VERSION, "trained": trained},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize_preset(name: str, cache_dir: Path | None = None, *, seed: int = TINY_SEED, log=None) -> Path:
    """Return a checkpoint directory for preset ``name``, building it once if needed."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"{name.replace(':', '-L')}-{_key(name, seed)}"
    if (target / "config.json").is_file():
        _add_video_config(target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        if log:
            what = "trained weights" if name in TRAINED else "random weights"
            log(f"building the {name!r} preset checkpoint ({what}, seed {seed}) in {target}")
        if name in TRAINED:  # stored in bf16, as the Hub ships checkpoints (the trained tensors are bf16)
            import torch

            build_trained_model(name, seed).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        elif name in SMALL:
            build_random_model(preset_config(name), seed).save_pretrained(tmp, safe_serialization=True)
        else:
            _write_random_large(tmp, name, seed)
        write_tokenizer_files(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nobody: re-raise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _add_video_config(target: Path) -> None:
    """A preset cached before presets carried a video processor config gets one (written to
    a temporary name and renamed: never half-written)."""
    path = target / "video_preprocessor_config.json"
    if path.is_file():
        return
    tmp = target / f".video_preprocessor_config.json.{os.getpid()}"
    tmp.write_text(json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2))
    os.replace(tmp, path)


def write_tokenizer_files(out: Path) -> None:
    from transformers import Qwen2Tokenizer

    from .tokenizer import CHAT_TEMPLATE, build_tokenizer

    tok = Qwen2Tokenizer(
        tokenizer_object=build_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_random_model(values: dict, seed: int = TINY_SEED, *, std: float | None = None):
    """A Qwen3-VL model (dense or MoE, from its ``architectures``) in memory, with random
    weights. Norm weights and biases are randomised too (Hugging Face initialises them to 1
    and 0), so a weight that an export forgets to load changes the outputs. ``std``
    overrides the config's ``initializer_range``."""
    import torch
    import transformers

    values = copy.deepcopy(values)
    if std is not None:
        values["text_config"]["initializer_range"] = values["vision_config"]["initializer_range"] = std
    arch = values["architectures"][0]
    config = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def build_trained_model(name: str = "tiny", seed: int = TINY_SEED):
    """A trained preset in memory: the seeded init of its config, with every tensor that
    training changed loaded from the package's asset file (all but the token embedding,
    plus the embedding rows training used, ``embed_rows.index`` / ``embed_rows.weight``)."""
    import torch
    from safetensors.torch import load_file

    from ..errors import LoadError

    asset = trained_asset(name)
    if asset is None or not asset.is_file():
        raise LoadError(f"preset {name!r}: its trained weights {asset} are missing (reinstall, or run scripts/train_tiny.py)")
    model = build_random_model(preset_config(name), seed)
    trained = load_file(str(asset))
    rows, weight = trained.pop("embed_rows.index"), trained.pop("embed_rows.weight")
    state = model.state_dict()
    unknown = sorted(set(trained) - set(state))
    missing = sorted(k for k in state if k not in trained and not k.endswith("embed_tokens.weight") and k != "lm_head.weight")
    if unknown or missing:
        raise LoadError(f"preset {name!r}: {asset.name} does not fit the architecture "
                        f"(unknown {unknown[:3]}, missing {missing[:3]})")
    with torch.no_grad():
        for key, value in trained.items():
            state[key].copy_(value.to(state[key].dtype))
        model.get_input_embeddings().weight[rows] = weight.to(torch.float32)
    return model



def write_checkpoint(out: Path, model, *, dtype=None, max_shard_size: str | int | None = None,
                     generation: dict | None = None) -> Path:
    """Save ``model`` as a Hugging Face checkpoint directory the way the Hub ships one:
    weights (optionally cast, e.g. to bf16, and sharded with ``model.safetensors.index.json``),
    tokenizer and chat template, preprocessor and generation config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    write_tokenizer_files(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation or GENERATION_CONFIG, indent=2))
    return out


def _write_random_large(out: Path, name: str, seed: int, shard_bytes: int = 2 << 30) -> None:
    """Random bf16 weights written tensor by tensor: memory stays at one shard, not the model."""
    import torch
    import transformers
    from safetensors.torch import save_file

    values = preset_config(name)
    arch = values["architectures"][0]
    config = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(**values)
    with torch.device("meta"):
        meta = getattr(transformers, arch)(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    shapes = [(k, tuple(v.shape)) for k, v in meta.state_dict().items() if k not in tied]
    del meta
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        if not shard:
            return
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        files.append((fname, list(shard)))
        shard, size = {}, 0

    for key, shape in shapes:
        if key.endswith("bias"):
            t = torch.zeros(shape)
        elif "norm" in key:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * std
        t = t.to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
    flush()
    total = len(files)
    weight_map = {}
    for i, (fname, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.rename(out / fname, out / final)
        weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = config.to_dict()
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
