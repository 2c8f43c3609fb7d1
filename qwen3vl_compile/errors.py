"""Typed errors: each says which stage of the compile (or run) failed."""

from __future__ import annotations


class Qwen3VLCompileError(Exception):
    """Base class. ``stage`` names where it happened; ``exit_code`` is what the CLI returns."""

    stage = "compile"
    exit_code = 1

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        if stage is not None:
            self.stage = stage

    def __str__(self) -> str:
        """One line, prefixed with the stage: a multi-line message from upstream (a checker's
        report, an exporter's exception) is folded, its lines joined with " | "."""
        lines = [line.strip() for line in str(self.args[0]).splitlines() if line.strip()]
        return f"[{self.stage}] {' | '.join(lines)}"


class UsageError(Qwen3VLCompileError):
    """Bad command-line input (bucket strings, precision, options). Exit code 2."""

    stage = "arguments"
    exit_code = 2


class LoadError(Qwen3VLCompileError):
    """The checkpoint could not be found, read, or is not a Qwen3-VL checkpoint."""

    stage = "load"


class PatchError(Qwen3VLCompileError):
    stage = "patch"


class ExportError(Qwen3VLCompileError):
    stage = "export"


class PassError(Qwen3VLCompileError):
    stage = "passes"


class VerifyError(Qwen3VLCompileError):
    """Parity or hash verification failed. Carries every failure, not just the first."""

    stage = "verify"

    def __init__(self, message: str, failures: list[str] | None = None, *, stage: str | None = None):
        self.failures = list(failures or [])
        if self.failures:
            message = message + ": " + "; ".join(self.failures)
        super().__init__(message, stage=stage)


class WriteError(Qwen3VLCompileError):
    stage = "write"


class BundleError(Qwen3VLCompileError):
    """A bundle on disk is missing a file, fails its hash check, or is malformed."""

    stage = "bundle"


class RuntimeInputError(Qwen3VLCompileError):
    """A user mistake at run time: unreadable image, prompt too long, and so on."""

    stage = "input"
    exit_code = 2


class ContextLengthError(RuntimeInputError):
    """A prompt (with its image tokens) that does not fit the bundle's context."""

    def __init__(self, message: str, *, prompt_tokens: int, context_length: int, stage: str | None = None):
        super().__init__(message, stage=stage)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class GenerationError(Qwen3VLCompileError):
    """Generation cannot go on (the decoder returned NaN or inf logits, say)."""

    stage = "generate"


class OutputError(Qwen3VLCompileError):
    """Standard output cannot be written (closed with ``>&-``, a full disk, ``/dev/full``)."""

    stage = "output"
