"""The upstream versions this compiler was tested with, in one table, and the check that
refuses others where our code leans on upstream internals.

The vision patches replace private functions of transformers' Qwen3-VL code; the exporter
is torch's dynamo ``torch.onnx.export`` (whose output the passes pattern-match) built on
onnxscript; the decoder builder and every pass use onnx-ir's API; the decoder's contrib ops
and its KV-buffer sharing were measured on this onnxruntime. A version outside the table
could build a graph that is silently wrong, so the compile refuses it with one line instead.
``pyproject.toml`` pins the same ranges (a test keeps the two equal).
"""

from __future__ import annotations

import importlib.metadata

from .errors import LoadError

TESTED: dict[str, str] = {
    "transformers": ">=5.20,<5.25",
    "torch": ">=2.13,<2.14",
    "onnxscript": ">=0.7,<0.8",
    "onnx-ir": ">=1.1,<1.2",
    "onnx": ">=1.20,<1.24",
    "onnxruntime": ">=1.32,<1.33",
}

# What the compile depends on (the runtime needs only onnxruntime, which pip enforces).
COMPILE = ("transformers", "torch", "onnxscript", "onnx-ir", "onnx", "onnxruntime")


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def untested(packages=COMPILE) -> list[str]:
    """One phrase per package whose installed version is outside :data:`TESTED`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    problems = []
    for name in packages:
        version = installed_version(name)
        if version is None:
            problems.append(f"{name} is not installed (needs {name}{TESTED[name]})")
            continue
        # A local tag (torch's "+cpu") does not make another release.
        if not SpecifierSet(TESTED[name]).contains(Version(version).public, prereleases=True):
            problems.append(f"{name} {version} is untested (tested: {name}{TESTED[name]})")
    return problems


def check_upstream(packages=COMPILE) -> None:
    """Refuse a compile on upstream versions outside the tested table, in one line."""
    problems = untested(packages)
    if problems:
        raise LoadError("; ".join(problems) + ": install the tested versions (pip install -e '.[compile]')",
                        stage="upstream")
