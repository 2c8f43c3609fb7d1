"""A table of bad arguments for every command: each gets one line on stderr, prefixed with the
stage that refused it, and the documented exit code (2: the user's input; 1: a broken file or
a failed check). Output piped into a closed pipe and an ASCII-only terminal are no errors."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from planted import png_header

from qwen3vl_compile.bundle_cli import main as bundle_main
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.runtime.cli import main as run_main

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def bundle(text_bundle):
    """A text-only fp32 bundle (no vision graphs: seconds to build)."""
    return text_bundle


def _exit_code(main, argv) -> int:
    """A command's exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_line(capsys, code, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


COMPILE_CASES = [
    (["--threads", "-1"], 2, "[arguments] --threads must be a whole number >= 0, got -1"),
    (["--context-length", "100000000"], 2, "above the model's max_position_embeddings 262144"),
    (["--buckets", "99968"], 2, "above the checkpoint's max_pixels 16777216"),
    (["--buckets", "33"], 2, "[arguments]"),
    (["--precision", "int3"], 2, "[arguments] argument --precision"),
    (["--block-size", "24"], 2, "--block-size 24"),
    (["--graphs", "audio"], 2, "unknown graph kind"),
    (["--cache-dir", "/proc/qwen3vl-cache"], 1, "cannot write the 'tiny-random' preset"),
    (["--model", "/nonexistent/ckpt"], 1, "no such directory"),
    (["--threads", "two"], 2, "invalid int value"),
    (["--threads", "100000"], 2, "[arguments] --threads 100000: at most"),
    (["--buckets", "99999"], 2, "nearest valid: 4096 (the largest the checkpoint's max_pixels allows)"),
    (["--buckets", "224,448x4001"], 2, "width 4001 is not a multiple of 32 (patch 16 x merge 2); nearest valid: 4000 or 4032"),
]


@pytest.mark.parametrize("args,code,needle", COMPILE_CASES, ids=[" ".join(c[0]) for c in COMPILE_CASES])
def test_compile_refuses_bad_arguments(tmp_path, capsys, args, code, needle):
    out = tmp_path / "out"
    _one_line(capsys, code, _exit_code(compile_main, ["--model", "tiny-random", "-o", str(out), "-q", *args]), needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compile_into_an_unwritable_place(capsys):
    rc = compile_main(["--model", "tiny-random", "--graphs", "embedding", "-o", "/proc/qwen3vl-out", "-q"])
    _one_line(capsys, 1, rc, "[write] cannot create a staging directory in /proc")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "ok.png")
    (d / "folder.png").mkdir()
    (d / "huge.png").write_bytes(png_header(13000, 13000))  # 169 Mpixels: over Pillow's bomb warning
    return d


RUN_CASES = [
    (["--threads", "-1"], 2, "threads must be a whole number >= 0"),
    (["--temperature", "nan"], 2, "temperature must be a finite number"),
    (["--temperature", "inf"], 2, "temperature must be a finite number"),
    (["--seed", "-1"], 2, "seed must be a whole number >= 0"),
    (["--max-new-tokens", "0"], 2, "max_new_tokens must be a whole number >= 1"),
    (["--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    (["--image", "__DIR__"], 2, "is a directory"),
    (["--max-new-tokens", "1.5"], 2, "invalid int value"),
    (["--threads", "100000"], 2, "[input] threads 100000: at most"),
    # $'\xff' on the command line: Python hands it over as the lone surrogate U+DCFF.
    (["--prompt", "ok \udcff"], 2, "[input] the prompt is not valid UTF-8 text: character 3 is the byte 0xff"),
    (["--system", "\udce9t\udce9"], 2, "[input] the system prompt is not valid UTF-8 text: character 0 is the byte 0xe9"),
    # 13000x13000 takes 16384 image tokens: refused from the header, before any pixel is decoded.
    (["--image", "__HUGE__"], 2, "[input] prompt with image tokens is 16401 tokens, longer than the bundle's context of 8192"),
]


@pytest.mark.parametrize("args,code,needle", RUN_CASES, ids=[ascii(" ".join(c[0])) for c in RUN_CASES])
def test_run_refuses_bad_arguments(bundle, images, capsys, args, code, needle):
    args = [str(images / "folder.png") if a == "__DIR__" else str(images / "huge.png") if a == "__HUGE__" else a for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (nor any other) on the way
        _one_line(capsys, code, _exit_code(run_main, [str(bundle), "--prompt", "Hi", *args]), needle)


def test_manifest_that_is_not_an_object(bundle, tmp_path, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (b / "manifest.json").write_text("[1, 2, 3]")
    for fn, args in ((run_main, [str(b), "--prompt", "Hi"]), (bundle_main, ["verify", str(b)]), (bundle_main, ["inspect", str(b)])):
        _one_line(capsys, 1, fn(args), "not a JSON object")


def test_python_api_types(bundle, images):
    from qwen3vl_compile import Pipeline
    from qwen3vl_compile.errors import RuntimeInputError

    pipe = Pipeline.load(bundle)
    closed = Image.open(images / "ok.png")
    closed.close()
    for kw, match in [({"images": str(images / "ok.png")}, "images must be a list"),
                      ({"images": np.zeros((8, 8, 3), np.uint8)}, "images must be a list"),
                      ({"images": None}, "images must be a list"),
                      ({"prompt": None}, "prompt must be a string"),
                      ({"max_new_tokens": "5"}, "max_new_tokens must be a whole number"),
                      ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
                      ({"temperature": "0.5"}, "temperature must be a finite number"),
                      ({"seed": -3}, "seed must be a whole number"),
                      ({"prompt": b"Hi"}, r"prompt must be a string, got bytes \(decode the bytes first"),
                      ({"prompt": "Hi \ud800"}, "the prompt is not valid UTF-8 text: character 3 is a lone surrogate U\\+D800"),
                      ({"max_new_tokens": np.bool_(True)}, "max_new_tokens must be a whole number"),
                      ({"max_new_tokens": np.float64(3)}, "max_new_tokens must be a whole number"),
                      ({"images": [closed]}, r"PIL image of 64x64 pixels cannot be read \(Operation on closed image\)")]:
        args = {"images": [], "prompt": "Hi", "max_new_tokens": 2, **kw}
        with pytest.raises(RuntimeInputError, match=match):
            pipe.generate(**args)
    with pytest.raises(RuntimeInputError, match="threads must be"):
        Pipeline.load(bundle, threads=-2)
    with pytest.raises(RuntimeInputError, match="threads 100000: at most"):
        Pipeline.load(bundle, threads=100000)
    with pytest.raises(RuntimeInputError, match=r"Pipeline.load needs the bundle directory \(a str or path\), got NoneType"):
        Pipeline.load(None)


def test_numpy_integers_are_whole_numbers(bundle):
    from qwen3vl_compile import Pipeline

    pipe = Pipeline.load(bundle, threads=np.int64(1))
    plain = pipe.generate([], "Hi", max_new_tokens=3, temperature=0.7, top_k=5, seed=4)
    numpy = pipe.generate([], "Hi", max_new_tokens=np.int64(3), temperature=0.7, top_k=np.int32(5), seed=np.uint8(4))
    assert numpy.token_ids == plain.token_ids and numpy.stopped == plain.stopped


def _damaged_copy(bundle, dest: Path, name: str, damage: str) -> Path:
    """The bundle hard-linked into ``dest`` with ``name`` replaced: truncated or garbage."""
    shutil.copytree(bundle, dest, copy_function=os.link)
    data = (bundle / name).read_bytes()
    (dest / name).unlink()  # never write through the link into the shared fixture
    (dest / name).write_bytes(data[: len(data) // 3] if damage == "truncated" else b"garbage{")
    return dest


@pytest.mark.parametrize("name,damage,needle", [
    ("decoder.onnx.data", "truncated", "decoder.onnx: ONNX Runtime cannot load this graph"),
    ("embedding.onnx", "truncated", "embedding.onnx: ONNX Runtime cannot load this graph"),
    ("tokenizer.json", "garbage", "tokenizer.json: not a readable tokenizer"),
    ("config.json", "garbage", "config.json: not readable JSON"),
])
def test_skip_hash_check_with_damaged_files(bundle, tmp_path, capsys, name, damage, needle):
    """--skip-hash-check lets a changed file through; loading it is still one [bundle] line."""
    b = _damaged_copy(bundle, tmp_path / "b", name, damage)
    _one_line(capsys, 1, run_main([str(b), "--prompt", "Hi", "--skip-hash-check"]), "[bundle]", needle)


class _FullStream(io.TextIOBase):
    """A stdout on a full disk (``> /dev/full``): every write fails with ENOSPC."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stdout,why", [(None, "it is closed"), (_FullStream(), "No space left on device")],
                         ids=["closed", "full"])
def test_stdout_that_cannot_be_written(bundle, tmp_path, monkeypatch, capsys, stdout, why):
    from qwen3vl_compile.runtime.eval import main as eval_main

    items = tmp_path / "items.jsonl"
    items.write_text('{"images": [], "prompt": "Hi", "answer": "a"}\n')
    for main, argv in ((run_main, [str(bundle), "--prompt", "Hi", "--max-new-tokens", "2"]),
                       (run_main, [str(bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--json"]),
                       (eval_main, [str(bundle), str(items), "--max-new-tokens", "2"])):
        monkeypatch.setattr(sys, "stdout", stdout)
        rc = main(argv)
        monkeypatch.undo()
        _one_line(capsys, 1, rc, f"error: [output] cannot write to standard output: {why}")


def test_closed_stderr_never_sends_errors_to_stdout(bundle, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", None)
    assert run_main([str(bundle), "--prompt", "Hi", "--max-new-tokens", "0"]) == 2
    assert run_main(["/nonexistent", "--prompt", "Hi"]) == 1
    monkeypatch.undo()
    assert capsys.readouterr().out == ""


def test_threads_are_capped_everywhere(bundle, capsys):
    """One cap (options.check_threads, 4 per CPU) for compile, run, eval, verify and the API."""
    from qwen3vl_compile.buckets import parse_buckets
    from qwen3vl_compile.config import CompileConfig
    from qwen3vl_compile.errors import UsageError
    from qwen3vl_compile.options import MAX_THREADS
    from qwen3vl_compile.runtime.eval import main as eval_main

    too_many = str(MAX_THREADS + 1)
    _one_line(capsys, 2, _exit_code(bundle_main, ["verify", str(bundle), "--threads", too_many]), f"--threads {too_many}: at most")
    _one_line(capsys, 2, _exit_code(eval_main, [str(bundle), "no-items.jsonl", "--threads", too_many]), f"threads {too_many}: at most")
    with pytest.raises(UsageError, match="at most"):
        CompileConfig(model="tiny", output="o", buckets=parse_buckets("224"), threads=MAX_THREADS + 1)
    CompileConfig(model="tiny", output="o", buckets=parse_buckets("224"), threads=MAX_THREADS)


class _FullDisk(io.RawIOBase):
    """A standard output on a full disk (what ``> /dev/full`` gives): every write fails."""

    full = True

    def writable(self):
        return True

    def write(self, b):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(b)


def test_stdout_on_a_full_disk_after_the_bundle_was_written(tmp_path, capsys, monkeypatch):
    raw = _FullDisk()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(raw)))
    out = tmp_path / "e"
    rc = compile_main(["--model", "tiny-random", "--graphs", "embedding", "--precision", "fp32", "-o", str(out), "-q"])
    raw.full = False  # let the fake stream close quietly
    _one_line(capsys, 1, rc, "[output] cannot write to standard output: No space left on device")
    assert bundle_main(["verify", str(out)]) == 0  # the bundle is complete and valid


def _sh(cmd: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow  # four fresh processes, each importing the package, one compiling
def test_closed_pipes_are_not_errors(bundle, tmp_path):
    b = str(bundle)
    for cmd in (f"{BIN}/qwen3vl-compile inspect {b} | true", f"{BIN}/qwen3vl-compile verify {b} | head -c 1",
                f"{BIN}/qwen3vl-run {b} --prompt Hi --max-new-tokens 3 --json | true",
                f"{BIN}/qwen3vl-compile --model tiny --graphs embedding -o {tmp_path / 'e'} | true"):
        p = _sh(cmd)
        assert p.returncode == 0 and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, (cmd, p.stderr)
    assert (tmp_path / "e" / "manifest.json").is_file()


@pytest.mark.slow  # three fresh processes
def test_closed_or_full_output_streams(bundle, tmp_path):
    """The real thing: fd 1 closed, a stdout that cannot grow (``ulimit -f 0``: what
    ``/dev/full`` does, where there is no /dev/full to trust), fd 2 closed."""
    run = f"{BIN}/qwen3vl-run {bundle} --prompt Hi --max-new-tokens 3"
    p = _sh(f"{run} >&-")
    assert p.returncode == 1 and p.stderr == "qwen3vl-run: error: [output] cannot write to standard output: it is closed\n", p.stderr
    p = _sh(f"(ulimit -f 0; {run} > {tmp_path / 'out.txt'})")
    assert p.returncode == 1 and p.stderr == "qwen3vl-run: error: [output] cannot write to standard output: File too large\n", p.stderr
    p = _sh(f"{run} --max-new-tokens 0 2>&-")
    assert p.returncode == 2 and p.stdout == "", p.stdout


@pytest.mark.slow  # two fresh processes, one compiling
def test_ascii_terminal_and_quiet_mode(bundle, tmp_path):
    p = _sh(f"{BIN}/qwen3vl-run {bundle} --prompt 'Décris ☃' --max-new-tokens 6", PYTHONIOENCODING="ascii")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    p = _sh(f"{BIN}/qwen3vl-compile --model tiny --graphs embedding -o {tmp_path / 'q'} -q")
    assert p.returncode == 0 and p.stderr == "", p.stderr  # no upstream warnings when quiet


def test_manifest_from_a_newer_version(bundle, tmp_path, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    _one_line(capsys, 1, bundle_main(["verify", str(b)]), "schema_version 99", "newer qwen3vl-compile")
