"""Choosing the next token from logits: greedy (temperature 0) or temperature / top-k / top-p
sampling with a seeded numpy generator."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import RuntimeInputError
from ..options import whole_number


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RuntimeInputError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("top_k", self.top_k), ("seed", self.seed)):
            if value is not None:
                whole_number(value, name, 0, RuntimeInputError)
        if self.temperature < 0:
            raise RuntimeInputError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RuntimeInputError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """``banned``: token ids that are never chosen, greedy or sampled (the multimodal
    placeholders: a generated ``<|image_pad|>`` has no image row to take its place)."""

    def __init__(self, config: SamplingConfig, banned=()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.banned = np.array(sorted({int(b) for b in banned if b is not None}), dtype=np.int64)

    def __call__(self, logits: np.ndarray) -> int:
        """``logits``: [vocab] for the last position (finite: the caller checks)."""
        logits = np.array(logits, dtype=np.float64).reshape(-1)
        banned = self.banned[self.banned < logits.size]
        logits[banned] = -np.inf
        if self.config.greedy:
            return int(np.argmax(logits))  # ties resolve to the lowest id, as torch.argmax does
        scores = logits / self.config.temperature
        if self.config.top_k:
            k = min(self.config.top_k, scores.size)
            kth = np.partition(scores, -k)[-k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < self.config.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
