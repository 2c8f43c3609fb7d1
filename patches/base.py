"""A patch is data: which attribute of which upstream object to replace, with what, and why.

:func:`apply_patches` applies a list of patches with one ``contextlib.ExitStack``: they are
undone last-in-first-out, rolled back if applying fails halfway, and restored when the body
raises. Originals are restored by identity (the very same object is put back).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

from qwen3vl_compile.errors import PatchError
from qwen3vl_compile.upstream import TESTED

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace ``getattr(target, attribute)`` with ``replacement`` while applied."""

    target: Any
    attribute: str
    replacement: Any
    reason: str
    # The upstream versions the patch was written and tested for (a pip requirement, then
    # optional words in parentheses); applying it to another version is refused.
    versions: str = "transformers" + TESTED["transformers"]

    @property
    def name(self) -> str:
        owner = getattr(self.target, "__name__", type(self.target).__name__)
        return f"{owner}.{self.attribute}"

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        # Look in the object's own namespace (not inherited attributes) so that restoring
        # never turns an inherited attribute into an own one.
        own = vars(self.target) if hasattr(self.target, "__dict__") else {}
        original = own.get(self.attribute, _MISSING)
        check_versions(self)
        if original is _MISSING and not hasattr(self.target, self.attribute):
            raise PatchError(f"{self.name}: upstream attribute not found ({self.versions}); cannot patch")
        setattr(self.target, self.attribute, self.replacement)
        try:
            yield
        finally:
            if original is _MISSING:
                delattr(self.target, self.attribute)
            else:
                setattr(self.target, self.attribute, original)


def check_versions(patch: Patch) -> None:
    """Refuse to apply ``patch`` to an upstream version outside ``patch.versions``."""
    import importlib.metadata

    from packaging.requirements import Requirement

    req = Requirement(patch.versions.split(" (")[0])
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(f"{patch.name}: {req.name} is not installed ({patch.versions})") from None
    if not req.specifier.contains(installed, prereleases=True):
        raise PatchError(f"{patch.name}: written for {patch.versions}, found {req.name} {installed}; "
                         "install a supported version (see pyproject.toml)")


@contextlib.contextmanager
def apply_patches(patches: Sequence[Patch]) -> Iterator[list[str]]:
    """Apply ``patches`` in order; yield their names; undo all of them on exit."""
    with contextlib.ExitStack() as stack:
        names = []
        for p in patches:
            stack.enter_context(p.applied())
            names.append(p.name)
        yield names
