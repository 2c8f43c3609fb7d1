"""The house rules that keep the tree navigable, checked: the torch-free side (runtime,
bundle, parity, options) imports nothing from the compile side; lower layers import nothing
from higher ones; one pass per file."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TORCH_FREE_MODULES = (
    "qwen3vl_compile.runtime.cli",
    "qwen3vl_compile.runtime.pipeline",
    "qwen3vl_compile.runtime.eval",
    "qwen3vl_compile.serve.cli",
    "qwen3vl_compile.serve.app",
    "qwen3vl_compile.bundle_cli",
    "qwen3vl_compile.bundle.check",
    "qwen3vl_compile.bundle.goldens",
    "qwen3vl_compile.bundle.records",
    "qwen3vl_compile.bundle.writer",
    "qwen3vl_compile.parity",
    "qwen3vl_compile.options",
)


def test_torch_free_side_imports_no_compile_code():
    probe = (
        "import importlib, sys\n"
        f"for m in {TORCH_FREE_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnx_ir', "
        "'onnxscript', 'safetensors') or m.startswith(('qwen3vl_compile.export', 'qwen3vl_compile.model', "
        "'qwen3vl_compile.patches', 'qwen3vl_compile.passes', 'qwen3vl_compile.compiler')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def _imported_modules(path: Path) -> set[str]:
    """Every qwen3vl_compile module a file imports, at any depth of the file (lazy imports
    too), as dotted names."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("qwen3vl_compile")}


# Layers that never import upward: a reader of the bundle's format (bundle/) runs no runtime
# code; the checkpoint reader (model/) uses neither the export nor the bundle; the shared
# ONNX Runtime helpers (ort/) and the small shared modules use none of the packages above.
NEVER = {
    "qwen3vl_compile/bundle": ("qwen3vl_compile.runtime", "qwen3vl_compile.export", "qwen3vl_compile.model",
                               "qwen3vl_compile.compiler"),
    "qwen3vl_compile/model": ("qwen3vl_compile.export", "qwen3vl_compile.bundle", "qwen3vl_compile.compiler"),
    "qwen3vl_compile/ort": ("qwen3vl_compile.runtime", "qwen3vl_compile.bundle", "qwen3vl_compile.export",
                            "qwen3vl_compile.model"),
    "qwen3vl_compile/jsonio.py": ("qwen3vl_compile.runtime", "qwen3vl_compile.bundle", "qwen3vl_compile.model"),
    "qwen3vl_compile/processor_config.py": ("qwen3vl_compile.runtime", "qwen3vl_compile.bundle",
                                            "qwen3vl_compile.model"),
}


def test_no_import_climbs_back_up():
    bad = []
    for where, banned in NEVER.items():
        path = ROOT / where
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            bad += [f"{f.relative_to(ROOT)} imports {m}" for m in sorted(_imported_modules(f)) if m.startswith(banned)]
    assert not bad, bad


def test_one_pass_per_file():
    for path in sorted((ROOT / "passes").glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        tree = ast.parse(path.read_text())
        passes = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Pass")]
        assert len(passes) == 1, f"{path.name}: {passes}"


def test_every_error_is_one_line():
    from qwen3vl_compile.errors import PassError, VerifyError

    e = PassError("decoder: pass CheckModelPass failed (ValidationError: Field 'shape' of 'type'\n\n  ==> Context: Bad node\n)")
    assert str(e) == "[passes] decoder: pass CheckModelPass failed (ValidationError: Field 'shape' of 'type' | ==> Context: Bad node | )"
    assert "\n" not in str(VerifyError("parity check failed", ["a [x] y: 1 > 0", "b\nc"]))
