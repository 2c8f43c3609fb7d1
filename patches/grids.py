"""The grids a set of vision patches is specialised for (one bucket, or several images)."""

from __future__ import annotations

import dataclasses

import torch

from qwen3vl_compile.errors import PatchError


@dataclasses.dataclass(frozen=True)
class PatchedGrids:
    """Image grids ``(t, h, w)`` in patches, in the order the images are packed."""

    grids: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, grids) -> "PatchedGrids":
        gs = tuple(tuple(int(v) for v in g) for g in grids)
        if not gs or any(len(g) != 3 or min(g) <= 0 for g in gs):
            raise PatchError(f"grids must be a non-empty list of positive (t, h, w), got {grids!r}")
        return cls(gs)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.grids, dtype=torch.int64)

    @property
    def max_side(self) -> int:
        return max(max(h, w) for _, h, w in self.grids)

    def check(self, grid_thw: torch.Tensor, where: str) -> None:
        """In eager mode, refuse to run a specialised graph on another grid (no silent wrong output)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        got = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        if got != self.grids:
            raise PatchError(f"{where}: patched for grids {list(self.grids)} but called with {list(got)}")
