"""The old import path of :mod:`qwen3vl_compile.ort.decoder_session` (the decoder over a
preallocated KV cache), kept for callers that import it from the runtime."""

from ..ort.decoder_session import DEFAULT_MAX_LENGTH, META_PREFIX, DecoderPool, DecoderSession  # noqa: F401
