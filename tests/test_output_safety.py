"""--force never deletes what we did not write; killed compiles leave nothing behind for long.

Every case here is refused before the model is loaded, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qwen3vl_compile.bundle.writer import STAGING_MARKER, BundleWriter, remove_stale_staging
from qwen3vl_compile.cli import main
from qwen3vl_compile.errors import UsageError
from qwen3vl_compile.bundle.manifest import SCHEMA, hash_files, write_manifest


def _compile(*args: str) -> int:
    return main(["--model", "tiny-random", "--buckets", "224", "-q", *args])


def _user_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "chapter1.tex").write_text("years of work")
    (d / "figs").mkdir(exist_ok=True)
    (d / "figs" / "plot.pdf").write_bytes(b"%PDF")
    return _snapshot(d)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qwen3vl-compile: error: [arguments]"), err
    for n in needles:
        assert n in err, err
    return err


_REAL: list[Path] = []


def _fake_bundle(d: Path, extra: dict[str, str] | None = None) -> None:
    """A copy of a real compiled bundle (the embedding graph: seconds, built once), which
    passes the bundle check, plus ``extra`` files."""
    import shutil
    import tempfile

    if not _REAL:
        src = Path(tempfile.mkdtemp(prefix="qwen3vl-real-")) / "bundle"
        assert _compile("--graphs", "embedding", "--no-verify", "-o", str(src)) == 0
        _REAL.append(src)
    shutil.copytree(_REAL[0], d)
    for name, text in (extra or {}).items():
        (d / name).write_text(text)


def test_force_refuses_a_directory_of_user_files(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    before = _user_files(thesis)
    assert _compile("-o", str(thesis), "--force") == 2
    _one_error_line(capsys, "not a qwen3vl-compile bundle", "chapter1.tex", "--force replaces only")
    assert _snapshot(thesis) == before
    # Without --force the hint must not suggest --force.
    assert _compile("-o", str(thesis)) == 2
    assert "pass --force" not in _one_error_line(capsys, "not a qwen3vl-compile bundle")


@pytest.mark.parametrize("spec", [".", "", "..", "sub/.."])
def test_force_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch, capsys, spec):
    work = tmp_path / "work"
    before = _user_files(work)
    (work / "sub").mkdir()
    monkeypatch.chdir(work)
    assert _compile("-o", spec, "--force") == 2
    _one_error_line(capsys, "current directory", "name a new directory")
    assert _snapshot(work) == before


def test_force_refuses_the_model_directory_and_around_it(tmp_path, tiny_path, capsys):
    import shutil

    model = tmp_path / "models" / "ckpt"
    shutil.copytree(tiny_path, model)
    before = _snapshot(model)
    (model / "old-export").mkdir()
    for out, needle in [(model, "is the model directory"), (model.parent, "a parent of the model directory"),
                        (model / "old-export", "inside the model directory")]:
        assert main(["--model", str(model), "-o", str(out), "--force", "-q"]) == 2, out
        _one_error_line(capsys, needle)
    assert _snapshot(model) == before and (model / "old-export").is_dir()


def test_force_refuses_a_file_and_a_bundle_with_foreign_files(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert _compile("-o", str(f), "--force") == 2
    _one_error_line(capsys, "is not a directory")
    assert f.read_text() == "keep"
    b = tmp_path / "bundle"
    _fake_bundle(b, extra={"my-notes.md": "mine"})
    assert _compile("-o", str(b), "--force") == 2
    _one_error_line(capsys, "my-notes.md", "does not list")
    assert (b / "my-notes.md").read_text() == "mine"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"schema": "someone-else"}))
    assert _compile("-o", str(tmp_path / "foreign"), "--force") == 2
    _one_error_line(capsys, "not a qwen3vl-compile manifest")


def test_force_accepts_an_empty_directory_and_a_previous_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    _fake_bundle(tmp_path / "bundle")
    for name in ("empty", "bundle"):
        BundleWriter(tmp_path / name, force=True).check_target()
        with pytest.raises(UsageError, match="already exists; pass --force"):
            BundleWriter(tmp_path / name).check_target()


def test_replacing_a_bundle_keeps_nothing_of_the_old_one(tmp_path):
    out = tmp_path / "bundle"
    _fake_bundle(out)
    with BundleWriter(out, force=True) as staging:
        (staging / "new.onnx").write_text("new")
        writer_dirs = sorted(p.name for p in tmp_path.iterdir())
        assert len(writer_dirs) == 2 and (staging / STAGING_MARKER).is_file()
    # __exit__ without commit: the old bundle is untouched and the staging dir is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and (out / "embedding.onnx").exists()
    w = BundleWriter(out, force=True)
    with w as staging:
        (staging / "new.onnx").write_text("new")
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert sorted(p.name for p in out.iterdir()) == ["new.onnx"]


def test_commit_rechecks_the_target(tmp_path):
    out = tmp_path / "bundle"
    w = BundleWriter(out, force=True)
    with pytest.raises(UsageError, match="not a qwen3vl-compile bundle"):
        with w as staging:
            (staging / "x").write_text("x")
            _user_files(out)  # someone filled OUT while we compiled
            w.commit()
    assert "chapter1.tex" in _snapshot(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _staging(parent: Path, name: str, pid: int, created: float, tool: str = "qwen3vl-compile") -> Path:
    d = parent / name
    d.mkdir()
    (d / "decoder.onnx.data").write_bytes(b"x" * 10)
    (d / STAGING_MARKER).write_text(json.dumps({"tool": tool, "pid": pid, "created": created}))
    return d


def test_stale_staging_directories_are_removed_and_only_ours(tmp_path):
    dead = _staging(tmp_path, ".out.staging-1-a", _dead_pid(), time.time())
    reused = _staging(tmp_path, ".out.staging-2-b", os.getpid(), 0.0)  # pid alive, but started after the dir
    live = _staging(tmp_path, ".out.staging-3-c", os.getpid(), time.time())
    old = _staging(tmp_path, ".out.old-4-d", _dead_pid(), time.time())
    foreign = _staging(tmp_path, ".out.staging-5-e", _dead_pid(), time.time(), tool="other")
    unmarked = tmp_path / ".out.staging-6-f"
    unmarked.mkdir()
    removed = remove_stale_staging(tmp_path)
    assert sorted(removed) == sorted([dead, reused, old])
    assert live.is_dir() and foreign.is_dir() and unmarked.is_dir()
    # A compile into the same parent cleans them: the CLI path runs the same function.
    dead2 = _staging(tmp_path, ".other.staging-7-g", _dead_pid(), time.time())
    with BundleWriter(tmp_path / "new"):
        pass
    assert not dead2.exists()


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qwen3vl_compile.bundle.writer import BundleWriter
    w = BundleWriter(Path(sys.argv[1]))
    try:
        with w as staging:
            (staging / "big.onnx.data").write_bytes(b"x" * 1000)
            print("ready", flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(130)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signals_mid_compile_leave_nothing(tmp_path, sig):
    out = tmp_path / "bundle"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.iterdir())) == 1  # the staging directory
    p.send_signal(sig)
    rc = p.wait(timeout=30)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL and len(list(tmp_path.iterdir())) == 1
        assert remove_stale_staging(tmp_path)  # the next compile into this parent removes it
    else:
        assert rc == 130
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from qwen3vl_compile import compiler

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(compiler, "write_manifest", full)
    out = tmp_path / "bundle"
    assert main(["--model", "tiny-random", "--graphs", "embedding", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[write] writing the bundle failed: No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_force_refuses_a_forged_manifest(tmp_path, capsys):
    """Issue 23: a hand-written manifest that claims our schema does not make the user's files
    a bundle. (Before the fix this compiled and wiped thesis.tex and data.csv with exit 0.)"""
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data.csv").write_text("1,2\n")
    (d / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "files": {"thesis.tex": {}, "data.csv": {}}}))
    before = _snapshot(d)
    assert _compile("-o", str(d), "--force", "--graphs", "embedding", "--no-verify") == 2
    _one_error_line(capsys, "not a qwen3vl-compile bundle", "--force replaces only")
    assert _snapshot(d) == before


@pytest.mark.parametrize("case", ["no-version", "no-self-hash", "self-hash-but-no-hashes", "a-file-edited"])
def test_force_refuses_a_manifest_that_fails_the_bundle_check(tmp_path, capsys, case):
    from qwen3vl_compile.bundle.manifest import canonical_sha256

    d = tmp_path / "work"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data.csv").write_text("1,2\n")
    manifest = {"schema": SCHEMA, "schema_version": 1}
    hash_files(d, manifest)
    if case == "no-version":
        del manifest["schema_version"]
        manifest["manifest_sha256"] = canonical_sha256(manifest)
    elif case == "self-hash-but-no-hashes":
        manifest["files"] = {"thesis.tex": {}, "data.csv": {}}
        manifest["manifest_sha256"] = canonical_sha256(manifest)
    elif case == "a-file-edited":
        manifest["manifest_sha256"] = canonical_sha256(manifest)
        (d / "data.csv").write_text("1,2\n3,4\n")  # the user's edit after a forged listing
    (d / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(d)
    assert _compile("-o", str(d), "--force") == 2
    _one_error_line(capsys, "not a qwen3vl-compile bundle", "--force replaces only")
    assert _snapshot(d) == before


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "bundle"
    assert _compile("--graphs", "embedding", "--no-verify", "-o", str(out)) == 0
    return out


@pytest.mark.parametrize("thing", ["empty-folder", "fifo", "socket", "symlink", "listed-file-as-symlink"])
def test_force_refuses_a_real_bundle_holding_something_we_never_write(tmp_path, capsys, real_bundle, thing):
    import shutil
    import socket

    out = tmp_path / "bundle"
    shutil.copytree(real_bundle, out)
    BundleWriter(out, force=True).check_target()  # as compiled, it may be replaced
    if thing == "empty-folder":
        (out / "my-notes").mkdir()
        name, kind = "my-notes", "directory"
    elif thing == "fifo":
        os.mkfifo(out / "pipe")
        name, kind = "pipe", "FIFO"
    elif thing == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out / "sock"))
        s.close()
        name, kind = "sock", "socket"
    elif thing == "symlink":
        (tmp_path / "elsewhere.txt").write_text("mine")
        (out / "link").symlink_to(tmp_path / "elsewhere.txt")
        name, kind = "link", "symbolic link"
    else:  # a listed file replaced by a link to a copy: hashes match, but we never write links
        shutil.copy(out / "config.json", tmp_path / "config.json")
        (out / "config.json").unlink()
        (out / "config.json").symlink_to(tmp_path / "config.json")
        name, kind = "config.json", "symbolic link"
    before = sorted(p.name for p in out.iterdir())
    assert _compile("--graphs", "embedding", "--no-verify", "-o", str(out), "--force") == 2
    _one_error_line(capsys, f"the {kind} {name!r}", "does not list", "--force replaces only")
    assert sorted(p.name for p in out.iterdir()) == before
    assert os.path.lexists(out / name)


def test_a_stale_old_copy_is_removed_only_when_its_bundle_was_replaced(tmp_path):
    """An .old directory of a killed replace: moved back when OUT is missing, left alone when
    OUT is not a bundle, removed when OUT holds the (new) bundle."""
    def old_copy(name: str) -> Path:
        d = _staging(tmp_path, f".{name}.old-1-x", _dead_pid(), time.time())
        (d / "decoder.onnx.data").unlink()
        _fake_bundle(d / "bundle")
        marker = json.loads((d / STAGING_MARKER).read_text())
        (d / STAGING_MARKER).write_text(json.dumps({**marker, "target": name}))
        return d

    missing = old_copy("gone")
    user_made = old_copy("users")
    _user_files(tmp_path / "users")
    replaced = old_copy("new")
    _fake_bundle(tmp_path / "new")
    assert sorted(remove_stale_staging(tmp_path)) == sorted([missing, replaced])  # emptied, then removed
    assert not missing.exists() and (tmp_path / "gone" / "embedding.onnx").is_file()
    BundleWriter(tmp_path / "gone", force=True).check_target()  # a whole bundle again
    assert (user_made / "bundle" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users.old-1-x", "gone", "new", "users"]
