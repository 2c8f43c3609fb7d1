"""Running decoder.onnx with a preallocated KV cache.

One buffer per layer and per K/V, ``[1, kv_heads, max_length, head_dim]`` float32, is
allocated once and bound through IOBinding as both ``past_key_values.i.*`` and
``present.i.*``. GroupQueryAttention (ONNX Runtime 1.32, CPU) sees the same pointer on both
sides and writes the new keys/values in place at rows ``[past, past + S)``; nothing copies
the cache. What it needs to know where the cache ends comes from ``attention_mask``
``[1, past + S]`` (all ones): the graph turns it into ``seqlens_k = past + S - 1`` and
``total_sequence_length = past + S``. Rows at or beyond that are never read, so
:meth:`reset` only rewinds the length; stale rows from a previous prompt are harmless.

Measured on ORT 1.32 CPU: binding a max_length buffer as past with ``present`` left unbound
also works, but then ORT allocates a fresh max_length ``present`` and copies the past into it
on every call; a growing cache (past of exactly ``past`` rows) reallocates every step.

``prefill`` starts a sequence (with the prompt's DeepStack features), ``step`` appends
tokens (DeepStack zero), ``run`` appends without resetting (a second chunk of a prompt, a
second chat turn).
"""

from __future__ import annotations

import numpy as np

from ..errors import RuntimeInputError

META_PREFIX = "qwen3vl_compile."
DEFAULT_MAX_LENGTH = 4096


class DecoderSession:
    def __init__(self, path, *, max_length: int | None = None, threads: int = 0, session=None, head_dim: int | None = None,
                 packed_levels: int = 0):
        import onnxruntime as ort

        if session is None:
            from .session import ort_session

            session = ort_session(path, threads)
        self.session = session
        self.ort = ort
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in ("inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key") if n not in inputs]
        if missing:
            raise RuntimeInputError(f"{path}: not a decoder graph (inputs {missing} missing)")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        kv = inputs["past_key_values.0.key"]
        # onnxruntime-genai's decoders leave the last cache dim symbolic ("kv_cache_dim"):
        # then the caller says what it is.
        self.kv_heads = int(kv.shape[1])
        self.head_dim = int(kv.shape[3]) if isinstance(kv.shape[3], int) else head_dim
        if self.head_dim is None:
            raise RuntimeInputError(f"{path}: the KV cache's head dimension is symbolic ({kv.shape[3]!r}); pass head_dim")
        # packed_levels: an onnxruntime-genai wrapper (genai_decoder.onnx) takes the K DeepStack
        # levels in channels after the first H of inputs_embeds; the caller's interface is
        # unchanged (run() packs).
        self.packed = packed_levels > 0 and "deepstack_embeds" not in inputs
        self.hidden = int(inputs["inputs_embeds"].shape[2]) // (1 + (packed_levels if self.packed else 0))
        self.has_deepstack = self.packed or "deepstack_embeds" in inputs
        self.levels = packed_levels if self.packed else (int(inputs["deepstack_embeds"].shape[0]) if self.has_deepstack else 0)
        meta = session.get_modelmeta().custom_metadata_map
        # Rows of the rotary tables: a position at or past it is refused by MRotaryEmbedding.
        self.context_length = int(meta[META_PREFIX + "context_length"]) if META_PREFIX + "context_length" in meta else None
        self.max_length = int(max_length or self.context_length or DEFAULT_MAX_LENGTH)
        self.cache = [
            [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv_heads, self.max_length, self.head_dim), np.float32)) for _ in range(2)]
            for _ in range(self.num_layers)
        ]
        # One binding for the session's life: the cache is bound once, as input and output.
        # logits is bound first so that it is output 0 (outputs follow binding order).
        self._binding = session.io_binding()
        self._binding.bind_output("logits")
        for i, (k, v) in enumerate(self.cache):
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            self._binding.bind_ortvalue_output(f"present.{i}.key", k)
            self._binding.bind_ortvalue_output(f"present.{i}.value", v)
        self._zero_deepstack = np.zeros((self.levels, 1, 1, self.hidden), np.float32)
        self.length = 0  # tokens in the cache

    def reset(self) -> None:
        """Start a new sequence (the buffers are reused, not cleared: see the module doc)."""
        self.length = 0

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """A new sequence: ``inputs_embeds [1, S, H]``, ``position_ids [3, 1, S]``,
        ``deepstack_embeds [K, 1, S, H]`` (zero on text tokens; None = no image)."""
        self.reset()
        return self.run(inputs_embeds, position_ids, deepstack_embeds)

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Append generated token(s) to the current sequence; DeepStack is zero for them."""
        if self.length == 0:
            raise RuntimeInputError("step() before prefill(): the KV cache is empty")
        return self.run(inputs_embeds, position_ids, None)

    def run(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """Append ``inputs_embeds [1, S, H]`` to the sequence; return logits as the graph gives
        them (``[1, S, vocab]``, or ``[1, 1, vocab]`` for a ``logits="last"`` decoder)."""
        embeds = np.ascontiguousarray(inputs_embeds, dtype=np.float32)
        positions = np.ascontiguousarray(position_ids, dtype=np.int64)
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.hidden:
            raise RuntimeInputError(f"inputs_embeds must be [1, S, {self.hidden}], got {list(embeds.shape)}")
        s = embeds.shape[1]
        if positions.shape != (3, 1, s):
            raise RuntimeInputError(f"position_ids must be [3, 1, {s}], got {list(positions.shape)}")
        if self.length + s > self.max_length:
            raise RuntimeInputError(f"sequence of {self.length + s} tokens exceeds the context of {self.max_length} tokens")
        if self.context_length is not None and s and positions.max() >= self.context_length:
            raise RuntimeInputError(
                f"position {int(positions.max())} is beyond the decoder's rotary table of {self.context_length} positions"
            )
        binding = self._binding
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length + s), np.int64))
        binding.bind_cpu_input("position_ids", positions)
        if self.has_deepstack:
            if deepstack_embeds is None:
                deep = self._zero_deepstack if s == 1 else np.zeros((self.levels, 1, s, self.hidden), np.float32)
            else:
                deep = np.ascontiguousarray(deepstack_embeds, dtype=np.float32)
                if deep.shape != (self.levels, 1, s, self.hidden):
                    raise RuntimeInputError(
                        f"deepstack_embeds must be [{self.levels}, 1, {s}, {self.hidden}], got {list(deep.shape)}"
                    )
            if self.packed:
                from ..packing import pack

                embeds = pack(embeds, np.broadcast_to(deep, (self.levels, *embeds.shape)))
            else:
                binding.bind_cpu_input("deepstack_embeds", deep)
        binding.bind_cpu_input("inputs_embeds", embeds)
        # Rebound every call: ORT would otherwise try to reuse last call's logits buffer, whose
        # shape differs between a prompt and a decode step.
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        self.length += s
        return binding.get_outputs()[0].numpy()
