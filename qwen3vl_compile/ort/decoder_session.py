"""Running decoder.onnx over a preallocated KV cache: a pool of slots, one sequence each.

One buffer per layer and per K/V, ``[max_batch, kv_heads, max_length, head_dim]`` float32,
is allocated once (a *pool*; row ``i`` is slot ``i``). A run over the contiguous slots
``[lo, hi)`` binds views of those rows through IOBinding as both ``past_key_values.i.*`` and
``present.i.*`` (``OrtValue.ortvalue_from_numpy`` wraps a CPU view without copying it).
GroupQueryAttention (ONNX Runtime 1.32, CPU) sees the same pointer on both sides and writes
the new keys/values in place at rows ``[past, past + S)`` of each slot; nothing copies the
cache. Where each slot's cache ends comes from ``attention_mask`` ``[n, max(past) + S]``:
row ``r`` has ``past_r + S`` leading ones and zeros after, and the graph turns it into
``seqlens_k = past_r + S - 1`` per row and ``total_sequence_length`` = the mask's width.
Rows at or beyond a slot's length are never read, so a freed slot needs no clearing.

Measured on the tiny model: a batch-2 decode step over two slots with different lengths
gives logits identical (max abs difference 0.0, fp32 and INT4) to two batch-1 steps, and a
batch-1 prefill into one slot followed by batched decode steps gives the tokens of the
sequence decoded alone. A right-padded batched *prefill* is not exact (with ``logits
last`` the shorter rows would read a pad position), so a run of several slots takes one new
token per slot; prompts are prefilled one slot at a time.

Measured on ORT 1.32 CPU: binding a max_length buffer as past with ``present`` left unbound
also works, but then ORT allocates a fresh max_length ``present`` and copies the past into it
on every call; a growing cache (past of exactly ``past`` rows) reallocates every step.

:class:`DecoderPool` is the pool; :class:`DecoderSession` is a pool of one slot that keeps
its own length (``prefill`` starts a sequence, ``step`` appends generated tokens with zero
DeepStack, ``run`` appends without resetting).
"""

from __future__ import annotations

import numpy as np

from ..errors import RuntimeInputError

META_PREFIX = "qwen3vl_compile."
DEFAULT_MAX_LENGTH = 4096


class DecoderPool:
    """The decoder graph and a KV pool of ``max_batch`` slots of ``max_length`` tokens."""

    def __init__(self, path, *, max_batch: int = 1, max_length: int | None = None, threads: int = 0, session=None,
                 head_dim: int | None = None, packed_levels: int = 0, before_allocate=None):
        """``before_allocate(pool)``: called once the graph's interface and the pool's size
        (:attr:`nbytes`) are known and before any buffer is allocated (it may refuse)."""
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
        self.max_batch = int(max_batch)
        if before_allocate is not None:
            before_allocate(self)
        self.cache = self._allocate()
        self._bindings: dict[tuple[int, int], object] = {}

    def _allocate(self) -> list[list[np.ndarray]]:
        """K and V buffers per layer. np.zeros maps untouched pages lazily: resident memory
        follows the tokens cached."""
        shape = (self.max_batch, self.kv_heads, self.max_length, self.head_dim)
        return [[np.zeros(shape, np.float32) for _ in range(2)] for _ in range(self.num_layers)]

    @staticmethod
    def pool_bytes(num_layers: int, kv_heads: int, head_dim: int, max_batch: int, max_length: int) -> int:
        """Bytes of a pool: K and V per layer, float32."""
        return 2 * num_layers * max_batch * kv_heads * max_length * head_dim * 4

    @property
    def nbytes(self) -> int:
        return self.pool_bytes(self.num_layers, self.kv_heads, self.head_dim, self.max_batch, self.max_length)

    def _binding(self, lo: int, hi: int):
        """One IOBinding per slot range, made once: views of the pool's rows bound as past and
        present. ``logits`` is bound first so that it is output 0."""
        key = (lo, hi)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits")
            for i, (k, v) in enumerate(self.cache):
                for name, buf in (("key", k), ("value", v)):
                    value = self.ort.OrtValue.ortvalue_from_numpy(buf[lo:hi])
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{name}", value)
                    binding.bind_ortvalue_output(f"present.{i}.{name}", value)
            self._bindings[key] = binding
        return self._bindings[key]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``src`` into slot ``dst``."""
        for k, v in self.cache:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the cached tokens of slots ``a`` (``length_a`` of them) and ``b``."""
        for k, v in self.cache:
            for buf in (k, v):
                keep = buf[a, :, :length_a].copy()
                buf[a, :, :length_b] = buf[b, :, :length_b]
                buf[b, :, :length_a] = keep

    def run(self, lo: int, lengths, inputs_embeds: np.ndarray, position_ids: np.ndarray,
            deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """Append ``inputs_embeds [n, S, H]`` to slots ``[lo, lo + n)`` holding ``lengths[r]``
        tokens each; return the logits as the graph gives them (``[n, S, vocab]``, or
        ``[n, 1, vocab]`` for a ``logits="last"`` decoder). Several slots take one token each."""
        embeds = np.ascontiguousarray(inputs_embeds, dtype=np.float32)
        positions = np.ascontiguousarray(position_ids, dtype=np.int64)
        lengths = [int(x) for x in lengths]
        n = len(lengths)
        if embeds.ndim != 3 or embeds.shape[0] != n or embeds.shape[2] != self.hidden:
            raise RuntimeInputError(f"inputs_embeds must be [{n}, S, {self.hidden}], got {list(embeds.shape)}")
        s = embeds.shape[1]
        if n > 1 and s != 1:
            raise RuntimeInputError(f"a run over {n} slots appends one token per slot, got {s}")
        if not 0 <= lo and lo + n <= self.max_batch:
            raise RuntimeInputError(f"slots [{lo}, {lo + n}) are outside the pool of {self.max_batch}")
        if positions.shape != (3, n, s):
            raise RuntimeInputError(f"position_ids must be [3, {n}, {s}], got {list(positions.shape)}")
        longest = max(lengths) + s
        if longest > self.max_length:
            raise RuntimeInputError(f"sequence of {longest} tokens exceeds the context of {self.max_length} tokens")
        if self.context_length is not None and s and positions.max() >= self.context_length:
            raise RuntimeInputError(
                f"position {int(positions.max())} is beyond the decoder's rotary table of {self.context_length} positions"
            )
        binding = self._binding(lo, lo + n)
        mask = np.zeros((n, longest), np.int64)
        for r, length in enumerate(lengths):
            mask[r, : length + s] = 1
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        if self.has_deepstack:
            if deepstack_embeds is None:
                deep = np.zeros((self.levels, n, s, self.hidden), np.float32)
            else:
                deep = np.ascontiguousarray(deepstack_embeds, dtype=np.float32)
                if deep.shape != (self.levels, n, s, self.hidden):
                    raise RuntimeInputError(
                        f"deepstack_embeds must be [{self.levels}, {n}, {s}, {self.hidden}], got {list(deep.shape)}"
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
        return binding.get_outputs()[0].numpy()


class DecoderSession(DecoderPool):
    """One sequence: a pool of one slot that keeps its length."""

    def __init__(self, path, *, max_length: int | None = None, threads: int = 0, session=None, head_dim: int | None = None,
                 packed_levels: int = 0):
        super().__init__(path, max_batch=1, max_length=max_length, threads=threads, session=session, head_dim=head_dim,
                         packed_levels=packed_levels)
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
        logits = super().run(0, [self.length], inputs_embeds, position_ids, deepstack_embeds)
        self.length += np.shape(inputs_embeds)[1]
        return logits
