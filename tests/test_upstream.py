"""The tested upstream table: pyproject pins the same ranges, and a compile on an untested
version is refused in one line before any work."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from qwen3vl_compile import upstream
from qwen3vl_compile.cli import main as compile_main

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {(r := Requirement(line)).name: str(r.specifier) for line in reqs}


def test_pyproject_pins_the_tested_table():
    pins = _pins()
    from packaging.specifiers import SpecifierSet

    for name, spec in upstream.TESTED.items():
        assert name in pins, f"pyproject.toml does not pin {name}"
        assert SpecifierSet(pins[name]) == SpecifierSet(spec), (name, pins[name], spec)


def test_this_environment_is_tested():
    assert upstream.untested() == []


def test_untested_version_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    real = upstream.installed_version
    monkeypatch.setattr(upstream, "installed_version", lambda name: "2.99.0" if name == "torch" else real(name))
    rc = compile_main(["--model", "tiny-random", "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"[upstream] torch 2.99.0 is untested (tested: torch{upstream.TESTED['torch']})" in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_local_version_tags_are_the_same_release(monkeypatch):
    real = upstream.installed_version
    monkeypatch.setattr(upstream, "installed_version", lambda name: "2.13.0+cpu" if name == "torch" else real(name))
    assert upstream.untested(("torch",)) == []
    monkeypatch.setattr(upstream, "installed_version", lambda name: None)
    assert upstream.untested(("onnx-ir",)) == ["onnx-ir is not installed (needs onnx-ir>=1.1,<1.2)"]
