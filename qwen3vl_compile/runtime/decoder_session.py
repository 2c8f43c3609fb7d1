"""Running decoder.onnx with a preallocated KV cache.

One buffer per layer and per K/V, ``[batch, kv_heads, max_length, head_dim]``, is bound
through IOBinding as both ``past_key_values.i.*`` and ``present.i.*``: GroupQueryAttention
then writes the new keys/values in place (its shared-buffer mode), so no step copies the
cache. ``attention_mask`` is ``[batch, past + new]`` and tells GQA where the cache ends.
"""

from __future__ import annotations

import numpy as np

from ..errors import RuntimeInputError


class DecoderSession:
    def __init__(self, path, *, max_length: int, threads: int = 0, session=None):
        import onnxruntime as ort

        if session is None:
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.session = session
        self.ort = ort
        inputs = {i.name: i for i in session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        kv = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = kv.shape[1], kv.shape[3]
        self.hidden = inputs["inputs_embeds"].shape[2]
        self.has_deepstack = "deepstack_embeds" in inputs
        self.levels = inputs["deepstack_embeds"].shape[0] if self.has_deepstack else 0
        self.max_length = max_length
        self.cache = [
            [self.ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv_heads, max_length, self.head_dim), np.float32))
             for _ in range(2)]
            for _ in range(self.num_layers)
        ]
        self.length = 0  # tokens in the cache

    def reset(self) -> None:
        self.length = 0

    def run(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """Append ``inputs_embeds [1, S, H]`` to the sequence; return logits as the graph gives them."""
        s = inputs_embeds.shape[1]
        if self.length + s > self.max_length:
            raise RuntimeInputError(
                f"sequence of {self.length + s} tokens exceeds the context of {self.max_length} tokens"
            )
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length + s), np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.has_deepstack:
            if deepstack_embeds is None:
                deepstack_embeds = np.zeros((self.levels, 1, s, self.hidden), np.float32)
            binding.bind_cpu_input("deepstack_embeds", np.ascontiguousarray(deepstack_embeds, dtype=np.float32))
        binding.bind_output("logits")  # first: copy_outputs_to_cpu() follows binding order
        for i, (k, v) in enumerate(self.cache):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            binding.bind_ortvalue_output(f"present.{i}.key", k)
            binding.bind_ortvalue_output(f"present.{i}.value", v)
        self.session.run_with_iobinding(binding)
        self.length += s
        return binding.get_outputs()[0].numpy()
