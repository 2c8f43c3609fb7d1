"""The text-side build options (decoder and embedding): one frozen object, one set of
defaults, validated once when it is made. The CLI, ``CompileConfig``, ``build_decoder``,
``build_embedding``, the decoder's parity gate and the benchmarks all take this object.

Error messages name the command-line flag (``--block-size``); the Python API's field has
the same name with underscores.
"""

from __future__ import annotations

import dataclasses
import numbers
import os

from .errors import UsageError

PRECISIONS = ("fp32", "fp16", "int4")
# Vision graphs: fp32, or int8 weights of every linear layer with int8 activations quantized
# per call (the patch embedding and attention inputs stay fp32); the PyTorch fallback stays fp32.
VISION_PRECISIONS = ("fp32", "int8")
# MatMulNBits takes a power of two >= 16 weights per scale.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level: 0 = fp32 compute (exact on the dequantized weights), 4 = int8.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# ``last``: logits of the last position only (all generation needs); ``all``: every position.
LOGITS_MODES = ("last", "all")
# ``auto``: the checkpoint's own dtype (bf16 stays bf16, exact); ``int4``: the INT4 lm_head's bytes.
EMBEDDING_PRECISIONS = ("auto", "fp32", "int4")
# The smallest KV cache worth building: a chat template alone is tens of tokens.
MIN_CONTEXT_LENGTH = 64
# The KV cache length when none is given: this, or the model's max_position_embeddings if
# that is smaller (an explicit --context-length above it is refused instead).
DEFAULT_CONTEXT_LENGTH = 8192
# The most threads any command takes: 4 per CPU this machine has. PyTorch and ONNX Runtime
# gain nothing past one thread per core (oversubscription only adds switching), 4x leaves
# room for a cgroup-limited cpu_count that under-reports, and far-out values are what hurt:
# --threads 1000 took 92 s to start and 100000 crashed ONNX Runtime's thread pool (exit 139).
MAX_THREADS = 4 * (os.cpu_count() or 1)


def whole_number(value, name: str, minimum: int, error: type[Exception] = UsageError) -> None:
    """The one check of a whole-number option (compile and run alike): an int or a numpy
    integer (not a bool) of at least ``minimum``; else ``error`` naming the option and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name} must be a whole number >= {minimum}, got {value!r}")


def check_threads(value, name: str = "--threads", error: type[Exception] = UsageError) -> None:
    """The one check of a thread count (compile, run, verify, eval and the Python API): a whole
    number, 0 (the library default) up to MAX_THREADS; else ``error`` in one line."""
    whole_number(value, name, 0, error)
    if value > MAX_THREADS:
        raise error(f"{name} {value}: at most {MAX_THREADS} (4 per CPU; this machine has {os.cpu_count()}); "
                    "0 uses the library default")


def _choice(value, flag: str, choices: tuple) -> None:
    if isinstance(value, bool) or value not in choices:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}")


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """How the text decoder (and the embedding table) are built.

    ``precision``: ``int4`` (MatMulNBits, 4 bits, symmetric, ``block_size`` weights per
    scale, ``accuracy_level`` 4 = int8 activations; the lm_head too unless
    ``keep_lm_head_fp``), ``fp16`` (weights stored in half precision, computed in fp32) or
    ``fp32``. ``context_length``: KV cache and rotary table rows (None: DEFAULT_CONTEXT_LENGTH
    or the model's max_position_embeddings, whichever is smaller). ``embedding_precision``:
    the token embedding table (``int4`` shares the decoder's INT4 lm_head bytes).
    """

    precision: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    keep_lm_head_fp: bool = False
    logits: str = "last"
    context_length: int | None = None
    embedding_precision: str = "auto"

    def __post_init__(self):
        _choice(self.precision, "--precision", PRECISIONS)
        _choice(self.logits, "--logits", LOGITS_MODES)
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size {self.block_size!r}: MatMulNBits needs a power of two >= 16 "
                             f"({', '.join(map(str, BLOCK_SIZES))})")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise UsageError(f"--accuracy-level {self.accuracy_level!r}: choose 0..4 (4 = int8 compute)")
        if not isinstance(self.keep_lm_head_fp, bool):
            raise UsageError(f"--keep-lm-head-fp {self.keep_lm_head_fp!r}: must be True or False")
        if self.context_length is not None:
            whole_number(self.context_length, "--context-length", MIN_CONTEXT_LENGTH)
        _choice(self.embedding_precision, "--embedding-precision", EMBEDDING_PRECISIONS)
        if self.embedding_precision == "int4" and (self.precision != "int4" or self.keep_lm_head_fp):
            raise UsageError("--embedding-precision int4 shares the decoder's INT4 lm_head: it needs --precision int4 "
                             "and no --keep-lm-head-fp")

    def context_for(self, max_positions) -> int:
        """The KV cache length for a model of ``max_positions`` positions (None: unknown): the
        explicit value as given (the compiler refuses one above the model's), else the default
        capped at the model's."""
        if self.context_length is not None:
            return self.context_length
        if isinstance(max_positions, int) and not isinstance(max_positions, bool) and max_positions > 0:
            return min(DEFAULT_CONTEXT_LENGTH, max_positions)
        return DEFAULT_CONTEXT_LENGTH

    def replace(self, **changes) -> "DecoderOptions":
        return dataclasses.replace(self, **changes)

    @property
    def quantization(self) -> dict | None:
        """The INT4 settings as the manifest records them (None for fp32 / fp16)."""
        if self.precision != "int4":
            return None
        return {"bits": 4, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "symmetric": True, "lm_head": "fp32" if self.keep_lm_head_fp else "int4"}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
