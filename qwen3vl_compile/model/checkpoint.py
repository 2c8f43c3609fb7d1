"""Opening a Qwen3-VL checkpoint directory and reading its weights lazily.

A checkpoint is what ``save_pretrained`` writes (or what the Hub serves): ``config.json``,
``*.safetensors`` (optionally sharded with an index), tokenizer files and
``preprocessor_config.json``. Presets (``tiny``, ``qwen3-vl-4b``) are materialised to such a
directory first, so every model takes the same path.

Weights are read tensor by tensor with ``safetensors.safe_open``: the vision tower can be
built without touching the text weights, and the text decoder is streamed layer by layer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from ..jsonio import read_json_object
from ..errors import LoadError
from ..presets import PRESETS, is_preset, materialize_preset
from .tokens import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

# Dense and MoE Qwen3-VL: architecture -> model_type.
ARCHITECTURES = {"Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe"}
VISION_PREFIXES = ("model.visual.", "visual.")
# config.json field -> the token it names.
VISION_TOKENS = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": VISION_START,
                 "vision_end_token_id": VISION_END}
TEXT_PREFIXES = ("model.language_model.", "model.", "language_model.model.")


def resolve_model_source(spec: str, *, cache_dir: Path | None = None, log=None) -> Path:
    """``tiny`` / ``qwen3-vl-4b`` / ``qwen3-vl-8b:4`` -> a materialised preset; anything else must be a directory."""
    if is_preset(spec):
        try:
            return materialize_preset(spec, cache_dir, log=log)
        except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError, or as a library's own error
            # (safetensors' SafetensorError wraps the IoError); the half-built directory is already removed.
            where = getattr(e, "filename", None) or cache_dir or "the cache directory"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise LoadError(f"cannot write the {spec!r} preset to {where}: {reason} (set --cache-dir)") from None
    path = Path(spec).expanduser()
    if not path.exists():
        presets = ", ".join(sorted(PRESETS))
        raise LoadError(f"--model {spec!r}: no such directory (presets: {presets}; NAME:N cuts an official shape to N layers)")
    if not path.is_dir():
        raise LoadError(f"--model {spec!r}: expected a checkpoint directory, got a file")
    return path


# Qwen3VLTextConfig.default_theta (the MoE text config's too): the RoPE base when config.json names none.
DEFAULT_ROPE_THETA = 500000.0


def _rope_dict(text_cfg: dict) -> dict:
    """The text RoPE parameters read the way transformers 5 does
    (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` / ``standardize_rope_params``):
    a legacy ``rope_scaling``, when set, replaces ``rope_parameters`` whole; ``type`` is the old
    name of ``rope_type`` (``rope_type`` wins when both are there; ``default`` when neither);
    ``rope_theta`` from the dict, else text_config's ``rope_theta``, else 500000."""
    rope = text_cfg.get("rope_scaling") or text_cfg.get("rope_parameters") or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", text_cfg.get("rope_theta", DEFAULT_ROPE_THETA))
    return rope


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: dict
    preprocessor: dict

    # ---- opening and validation -------------------------------------------------
    @classmethod
    def open(cls, path: Path | str) -> "Checkpoint":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise LoadError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        config = read_json_object(cfg_file, LoadError)
        archs = config.get("architectures") or []
        mtype = config.get("model_type")
        if not set(archs) & set(ARCHITECTURES) and mtype not in ARCHITECTURES.values():
            raise LoadError(
                f"{path}: not a Qwen3-VL checkpoint (config.json architectures={archs}, model_type={mtype!r}; "
                f"expected one of {', '.join(ARCHITECTURES)})"
            )
        text = config.get("text_config")
        vision = config.get("vision_config")
        if not isinstance(text, dict):
            raise LoadError(f"{path}: config.json has no text_config")
        if not isinstance(vision, dict):
            raise LoadError(f"{path}: config.json has no vision_config")
        from .support import check_config

        check_config(config)  # RoPE, MRoPE sections and the DeepStack levels among the rest
        pre_file = path / "preprocessor_config.json"
        if not pre_file.is_file():
            raise LoadError(f"{path}: no preprocessor_config.json (the image processor settings are needed)")
        preprocessor = read_json_object(pre_file, LoadError)
        video_file = path / "video_preprocessor_config.json"
        if video_file.is_file():  # copied into the bundle: refuse bad values now, not at run time
            from ..runtime.video import VideoProcessorConfig

            VideoProcessorConfig.from_dict(read_json_object(video_file, LoadError))
        ck = cls(path=path, config=config, preprocessor=preprocessor)
        ck._check_weights_present()
        from .support import check_text_weights, check_vision_weights

        check_text_weights(ck)
        check_vision_weights(ck)
        return ck

    @functools.cached_property
    def generation_config(self) -> dict:
        """generation_config.json (sampling defaults, eos ids), or {} when there is none; read once."""
        f = self.path / "generation_config.json"
        return read_json_object(f, LoadError) if f.is_file() else {}

    def tokenizer(self):
        """The checkpoint's ``tokenizers`` tokenizer (tokenizer.json), loaded once."""
        if "_tokenizer" not in self.__dict__:
            tok_file = self.path / "tokenizer.json"
            if not tok_file.is_file():
                raise LoadError(f"{self.path}: no tokenizer.json")
            from tokenizers import Tokenizer

            try:
                self.__dict__["_tokenizer"] = Tokenizer.from_file(str(tok_file))
            except Exception as e:  # the tokenizers library raises its own exception type
                raise LoadError(f"{tok_file}: not a readable tokenizer ({e})") from None
        return self.__dict__["_tokenizer"]

    def token_id(self, field: str) -> int:
        """A vision token id (``image_token_id``, ...): config.json's value, else the
        tokenizer's id for the token (checkpoints carry both; check_tokenizer makes them agree)."""
        value = self.config.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        got = self.tokenizer().token_to_id(VISION_TOKENS[field])
        if got is None:
            raise LoadError(f"{self.path}: config.json has no {field} and the tokenizer lacks {VISION_TOKENS[field]}")
        return got

    def text_token_id(self, token: str) -> int | None:
        """The id of a chat token (``<|im_end|>``, ``<|endoftext|>``) in this tokenizer."""
        return self.tokenizer().token_to_id(token)

    def check_tokenizer(self) -> None:
        """The vocabulary must carry the vision tokens at the ids the config names."""
        tok = self.tokenizer()
        for field, token in VISION_TOKENS.items():
            want = self.config.get(field)
            got = tok.token_to_id(token)
            if got is None:
                raise LoadError(f"{self.path}: tokenizer vocabulary lacks {token} (config.{field} = {want})")
            if want is not None and got != want:
                raise LoadError(f"{self.path}: tokenizer maps {token} to {got} but config.{field} = {want}")

    def check_chat(self) -> None:
        """What the bundle's runtime needs of the chat files, checked with its own code: the
        generation ids are token ids of this vocabulary, and the chat template renders a user
        turn with an image (a template that does not parse, or is missing, is refused here,
        not at the first qwen3vl-run)."""
        from .support import check_generation_ids

        check_generation_ids(self)
        from ..errors import BundleError
        from ..runtime.chat import ChatFormatter, build_messages

        try:
            chat = ChatFormatter(self.path)
        except BundleError as e:  # no chat template, one that does not parse, no tokenizer.json
            raise LoadError(e.args[0]) from None
        try:
            chat.render(build_messages("Describe the image.", 1))
        except Exception as e:  # a template can raise anything (raise_exception, TypeError, UndefinedError, ...)
            raise LoadError(f"{self.path}: the chat template does not render a user turn with an image "
                            f"({type(e).__name__}: {e})") from None

    # ---- config accessors ----------------------------------------------------------
    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def rope(self) -> dict:
        return _rope_dict(self.text_config)

    @property
    def config_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings", False)))

    @property
    def architecture(self) -> str:
        archs = [a for a in self.config.get("architectures") or [] if a in ARCHITECTURES]
        if archs:
            return archs[0]
        return next(a for a, t in ARCHITECTURES.items() if t == self.config.get("model_type"))

    @property
    def is_moe(self) -> bool:
        return self.architecture == "Qwen3VLMoeForConditionalGeneration"

    def hf_config(self):
        """The transformers config object of this checkpoint's architecture."""
        import transformers

        return getattr(transformers, self.architecture.replace("ForConditionalGeneration", "Config")).from_pretrained(self.path)

    def hf_class(self):
        import transformers

        return getattr(transformers, self.architecture)

    # ---- weights ----------------------------------------------------------------
    def _weight_map(self) -> dict[str, Path]:
        if hasattr(self, "_wmap"):
            return self._wmap
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wmap = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise LoadError(f"{index}: not a readable weight index ({type(e).__name__}: {e})") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise LoadError(f"{self.path}: no *.safetensors weights")
            wmap = {}
            for f in files:
                for k in self._header(f):
                    wmap[k] = f
        self._wmap = wmap
        return wmap

    def _header(self, f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        """Names -> (shape, safetensors dtype such as ``BF16``) in one safetensors file (its
        header only); a file that is not readable safetensors is a one-line LoadError."""
        cache = self.__dict__.setdefault("_headers", {})
        if f not in cache:
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as fh:
                    cache[f] = {k: (tuple(sl.get_shape()), sl.get_dtype()) for k in fh.keys() for sl in [fh.get_slice(k)]}
            except Exception as e:  # safetensors raises its own error types (and OSError)
                raise LoadError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        return cache[f]

    def _entry(self, key: str) -> tuple[tuple[int, ...], str]:
        f = self._weight_map().get(key)
        if f is None:
            raise LoadError(f"{self.path}: weight {key!r} not found")
        entry = self._header(f).get(key)
        if entry is None:
            raise LoadError(f"{self.path}: {f.name} does not hold {key!r}, which model.safetensors.index.json puts there")
        return entry

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[0]

    def dtype(self, key: str) -> str:
        """The stored dtype as the safetensors header names it (``F32``, ``BF16``, ``I8``, ...)."""
        return self._entry(key)[1]

    def _check_weights_present(self) -> None:
        wmap = self._weight_map()
        for f in set(wmap.values()):
            if not f.is_file():
                raise LoadError(f"{self.path}: weight file {f.name} named by the index is missing")

    def keys(self) -> list[str]:
        return list(self._weight_map())

    def tensor(self, key: str):
        """One tensor as a torch tensor in its stored dtype."""
        from safetensors import safe_open

        f = self._weight_map().get(key)
        if f is None:
            raise LoadError(f"{self.path}: weight {key!r} not found")
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(key)

    def find(self, suffix: str, prefixes: tuple[str, ...]) -> str:
        wmap = self._weight_map()
        for p in prefixes:
            if p + suffix in wmap:
                return p + suffix
        raise LoadError(f"{self.path}: weight {suffix!r} not found under any of {prefixes}")

    def tensors_with_prefix(self, prefixes: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        """(name without prefix, tensor) for every weight under the first prefix that matches."""
        wmap = self._weight_map()
        for p in prefixes:
            names = [k for k in wmap if k.startswith(p)]
            if names:
                by_file: dict[Path, list[str]] = {}
                for k in names:
                    by_file.setdefault(wmap[k], []).append(k)
                from safetensors import safe_open

                for f, ks in by_file.items():
                    with safe_open(str(f), framework="pt") as fh:
                        for k in ks:
                            yield k[len(p):], fh.get_tensor(k)
                return
        raise LoadError(f"{self.path}: no weights under {prefixes}")

    # ---- PyTorch modules ------------------------------------------------------------
    def load_vision_tower(self, dtype=None):
        """The Hugging Face ``Qwen3VLVisionModel`` with this checkpoint's weights (fp32 default)."""
        import torch

        from .vision_tower import build_vision_tower

        dtype = dtype or torch.float32
        state = {k: v.to(dtype) for k, v in self.tensors_with_prefix(VISION_PREFIXES)}
        try:
            return build_vision_tower(self.config, state)
        except KeyError as e:
            raise LoadError(f"{self.path}: vision weights missing: {e}") from None

    def load_full_model(self, dtype=None):
        """The whole Hugging Face model, dense or MoE (for parity on small models)."""
        import torch

        return self.hf_class().from_pretrained(self.path, dtype=dtype or torch.float32).eval()
