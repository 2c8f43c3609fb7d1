"""A bundle is checkable on the target machine: hashes, an edited manifest, missing or
truncated files, graphs from another bundle; and the bucket path runs without torch."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.runtime.cli import main as run_main


# Tests on the two compiled bundles (fp32 with buckets 224 and 448, int4 with 448): about 30 s
# of compiles on 2 cores, so they are in the slow tier; the checks that need no vision graph
# run on the shared text-only bundle instead.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = root / "a"
    assert compile_main(["--model", "tiny-random", "--buckets", "224,448", "--precision", "fp32", "-o", str(out), "-q"]) == 0
    other = root / "b"
    assert compile_main(["--model", "tiny-random", "--buckets", "448", "--precision", "int4", "-o", str(other), "-q"]) == 0
    return out, other


@pytest.fixture
def bundle(fresh, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(fresh[0], dst)
    return dst


def _verify(path, capsys):
    rc = compile_main(["verify", str(path)])
    return rc, capsys.readouterr()


@slow
def test_verify_passes_on_fresh_bundle(bundle, capsys):
    rc, out = _verify(bundle, capsys)
    assert rc == 0, out.out
    assert "all graphs within tolerance" in out.out
    for g in ("vision_224", "vision_448", "embedding", "decoder"):
        assert g in out.out


@slow
def test_inspect(bundle, capsys):
    assert compile_main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "manifest integrity ok" in out and "InsertDeepStackPass*" in out and "448 (grid 28x28" in out


@slow
def test_bundle_moved_still_runs(bundle, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(bundle), moved)
    rc, out = _verify(moved, capsys)
    assert rc == 0


def test_edited_manifest(text_copy, capsys):
    bundle = text_copy
    m = json.loads((bundle / "manifest.json").read_text())
    m["parity"]["decoder"]["golden"]["tolerance_max_rel"] = 1.0
    (bundle / "manifest.json").write_text(json.dumps(m))
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "edited after the compile" in out.err
    assert run_main([str(bundle), "--prompt", "hi"]) == 1
    assert "edited after the compile" in capsys.readouterr().err


@slow
def test_missing_file(bundle, capsys):
    (bundle / "vision_448.onnx").unlink()
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "vision_448.onnx: missing" in out.out
    assert run_main([str(bundle), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "vision_448.onnx: missing" in err and err.count("\n") == 1


def test_truncated_external_data(text_copy, capsys):
    bundle = text_copy
    data = bundle / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-1000])
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "decoder.onnx.data" in out.out and "truncated" in out.out


@slow
def test_graph_from_another_bundle(bundle, fresh, capsys):
    shutil.copy(fresh[1] / "decoder.onnx", bundle / "decoder.onnx")
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "decoder.onnx:" in out.out and ("sha256 differs" in out.out or "manifest says" in out.out)
    assert run_main([str(bundle), "--prompt", "hi"]) == 1
    assert "decoder.onnx" in capsys.readouterr().err


def test_skip_hash_check_runs_a_modified_bundle(text_copy, capsys):
    bundle = text_copy
    cfg = bundle / "generation_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert run_main([str(bundle), "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    capsys.readouterr()
    assert run_main([str(bundle), "--prompt", "hi", "--max-new-tokens", "2", "--skip-hash-check"]) == 0


@slow
def test_verify_catches_a_wrong_golden_result(bundle, capsys):
    """Tamper with a golden reference and re-hash it: the golden run itself must fail."""
    from qwen3vl_compile.bundle.manifest import sha256_file
    from qwen3vl_compile.bundle.manifest import write_manifest

    m = json.loads((bundle / "manifest.json").read_text())
    g = np.load(bundle / "golden" / "vision_224.npz")
    np.savez_compressed(bundle / "golden" / "vision_224.npz", pixel_u8=g["pixel_u8"],
                        image_features=g["image_features"] * 1.01, deepstack_features=g["deepstack_features"])
    m["files"]["golden/vision_224.npz"] = {"bytes": (bundle / "golden/vision_224.npz").stat().st_size,
                                           "sha256": sha256_file(bundle / "golden/vision_224.npz")}
    write_manifest(bundle, m)
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "vision_224" in out.out and "FAIL" in out.out


@slow
def test_verify_checks_interfaces_and_lists_stray_files(bundle, capsys):
    """A manifest whose claims were edited and re-hashed (bucket 448 said to be 480) fails on
    the graph's real interface; files the manifest does not know are listed and fail."""
    from qwen3vl_compile.bundle.manifest import write_manifest

    (bundle / "notes.txt").write_text("mine")
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "UNKNOWN  notes.txt" in out.out and "notes.txt" in out.err  # any unlisted file fails
    (bundle / "notes.txt").unlink()
    m = json.loads((bundle / "manifest.json").read_text())
    b448 = next(b for b in m["buckets"] if b["name"] == "448")
    b448.update(height=480, width=480, grid_thw=[1, 30, 30], num_tokens=225)
    write_manifest(bundle, m)
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "pixel_values has 784 rows but bucket 448 (grid 30x30) needs 900" in out.out
    m["graphs"]["decoder"]["outputs"][0]["name"] = "logits_renamed"
    write_manifest(bundle, m)
    rc, out = _verify(bundle, capsys)
    assert rc == 1 and "decoder: outputs are" in out.out and "logits_renamed" in out.out


@slow
def test_hints_only_what_helps(bundle, capsys):
    (bundle / "vision_224.onnx").unlink()
    assert run_main([str(bundle), "--prompt", "hi"]) == 1
    assert "--skip-hash-check" not in capsys.readouterr().err  # a missing file cannot be skipped over


TORCH_FREE = textwrap.dedent(
    """
    import sys
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors"):
        sys.modules[name] = None  # any import of these now raises ImportError
    from qwen3vl_compile.cli import main as compile_main
    from qwen3vl_compile.runtime.cli import main as run_main
    bundle, image = sys.argv[1], sys.argv[2]
    assert compile_main(["verify", bundle]) == 0
    rc = run_main([bundle, "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", "4", "--json"])
    assert rc == 0, rc
    # An unbucketed size needs the PyTorch fallback: a clear error, not a traceback.
    sys.exit(run_main([bundle, "--image", sys.argv[3], "--prompt", "hi"]))
    """
)


@slow
def test_bucket_path_runs_without_torch(bundle, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(img)
    odd = tmp_path / "b.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(odd)
    script = tmp_path / "torch_free.py"
    script.write_text(TORCH_FREE)
    proc = subprocess.run([sys.executable, str(script), str(bundle), str(img), str(odd)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert '"served_by": "bucket 448"' in proc.stdout
    assert "needs torch and transformers" in proc.stderr and "Traceback" not in proc.stderr
