"""Bucketed vision graphs: parity against the unpatched tower, and the compile CLI around them."""

import hashlib
import json
import os

import pytest

from qwen3vl_compile import parity as verify_mod
from qwen3vl_compile.bundle.goldens import check_golden
from qwen3vl_compile.cli import main
from qwen3vl_compile.export.vision import verify_vision_bucket


# 224 is exported once per session for several modules; the other buckets are exports of their own.
@pytest.mark.parametrize("bucket", ["224", pytest.param("448", marks=pytest.mark.slow), pytest.param("128x256", marks=pytest.mark.slow)])
def test_parity_per_bucket_all_outputs(vision_graphs, tiny_visual, bucket):
    path, b, entry = vision_graphs(bucket)
    parity = verify_vision_bucket(path, tiny_visual, b)
    names = {o.name for outs in parity.cases.values() for o in outs}
    assert names == {"image_features", "deepstack_0", "deepstack_1", "deepstack_2"}
    assert parity.passed, parity.failures()
    worst = max(o.max_rel for outs in parity.cases.values() for o in outs)
    assert worst < 1e-5  # measured ~1.5e-6; the gate itself is 1e-4
    assert [p.name for p in entry.passes] == [
        "UnifyIndexTypesPass",
        "CleanupPass",
        "FuseAttentionPass",
        "CheckModelPass",
    ]
    assert entry.passes[2].stats["multi_head_attention"] == 6  # one per vision block


def test_graph_entry_json_is_the_manifest_entry(vision_graphs, tiny_visual):
    """The bucket graph's GraphEntry writes the manifest entry's keys and values."""
    from qwen3vl_compile.bundle.records import GraphEntry
    from qwen3vl_compile.patches import vision_patches

    _, b, entry = vision_graphs("224")
    j = entry.to_json()
    assert set(j) == {"file", "data_files", "kind", "precision", "bucket", "inputs", "outputs", "export", "patches", "passes"}
    assert (j["file"], j["data_files"], j["kind"], j["precision"]) == ("vision_224.onnx", [], "vision", "fp32")
    assert entry.name == "vision_224" and j["bucket"] == b.to_json()
    assert j["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [b.num_patches, b.patch_dim]}]
    hidden = tiny_visual.config.out_hidden_size
    assert j["outputs"] == [
        {"name": "image_features", "dtype": "float32", "shape": [b.num_tokens, hidden]},
        {"name": "deepstack_features", "dtype": "float32", "shape": [3, b.num_tokens, hidden]},
    ]
    assert set(j["export"]) == {"exporter", "seconds"}
    assert j["export"]["exporter"].startswith("torch.onnx.export(dynamo=True) torch ")
    assert j["patches"] == [p.name for p in vision_patches(tiny_visual, [b.grid_thw])]
    assert all(set(p) == {"pass", "modified", "stats", "seconds"} for p in j["passes"])
    assert GraphEntry.from_json(json.loads(json.dumps(j))).to_json() == j


@pytest.mark.slow  # exports the 256 bucket
def test_wrong_grid_is_caught(vision_graphs, tiny_visual):
    """A graph for a 16x16 grid checked against the same 256 patches laid out as 8x32."""
    path, b, _ = vision_graphs("256")
    parity = verify_vision_bucket(path, tiny_visual, b, reference_grid=(1, 8, 32))
    assert not parity.passed
    failed = {f.split("] ")[1].split(":")[0] for f in parity.failures()}
    assert {"image_features", "deepstack_0", "deepstack_1", "deepstack_2"} <= failed


@pytest.mark.parametrize("graph", ["vision_224", "vision_dynamic"])
def test_failed_export_is_one_line_naming_its_log(tiny_visual, tmp_path, monkeypatch, graph):
    """The exporter's multi-line output stays out of the error: it goes to a log file that
    the one-line error names; the patches are undone."""
    import torch
    from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.errors import ExportError
    from qwen3vl_compile.export.vision import export_vision_bucket
    from qwen3vl_compile.export.vision_common import export_log_path
    from qwen3vl_compile.export.vision_dynamic import export_vision_dynamic

    def broken(*args, **kwargs):
        print("exporter progress line")
        raise RuntimeError("the exporter gave up\nsecond line of detail\nthird line")

    monkeypatch.setattr(torch.onnx, "export", broken)
    log = export_log_path(graph)
    log.unlink(missing_ok=True)
    attention = upstream.Qwen3VLVisionAttention.__dict__["forward"]
    with pytest.raises(ExportError) as e:
        if graph == "vision_dynamic":
            export_vision_dynamic(tiny_visual, tmp_path)
        else:
            export_vision_bucket(tiny_visual, parse_bucket("224"), tmp_path)
    message = str(e.value)
    try:
        assert "\n" not in message
        assert message.startswith(f"[export] {graph}: torch.onnx.export failed: RuntimeError: the exporter gave up ...")
        assert message.endswith(f"(exporter log: {log})") and log.name == f"qwen3vl-compile-export-{graph}-{os.getpid()}.log"
        text = log.read_text()
        assert "exporter progress line" in text and "third line" in text and "Traceback" in text
    finally:
        log.unlink(missing_ok=True)
    assert upstream.Qwen3VLVisionAttention.__dict__["forward"] is attention
    assert list(tmp_path.iterdir()) == []


def _compile(out, *extra):
    return main(["--model", "tiny-random", "--buckets", "224,128x256", "-o", str(out), "--graphs", "vision", "-q", *extra])


@pytest.mark.slow  # two whole compiles
def test_compile_writes_bundle_with_manifest(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert _compile(out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["source"]["architecture"] == "Qwen3VLForConditionalGeneration"
    assert [b["name"] for b in m["buckets"]] == ["224", "128x256"]
    assert m["buckets"][1]["grid_thw"] == [1, 8, 16]
    for name in ("vision_224", "vision_128x256"):
        assert m["parity"][name]["passed"]
        for case in m["parity"][name]["cases"].values():
            assert set(case) == {"image_features", "deepstack_0", "deepstack_1", "deepstack_2"}
        assert len(m["graphs"][name]["passes"]) == 4
        assert m["files"][f"{name}.onnx"]["sha256"] == hashlib.sha256((out / f"{name}.onnx").read_bytes()).hexdigest()
    assert "tokenizer.json" in m["files"] and "preprocessor_config.json" in m["files"]
    assert "parity max rel err" in capsys.readouterr().out
    # One copy of the tower's weights for both graphs; the per-bucket position tables differ.
    shared = m["vision_weights"]
    assert shared["file"] == "vision_weights.onnx.data" and shared["tensors_shared"] > 0
    assert shared["bytes_after"] < 0.6 * shared["bytes_before"]
    assert all(m["graphs"][n]["data_files"] == ["vision_weights.onnx.data"] for n in ("vision_224", "vision_128x256"))
    assert [f for f in m["files"] if f.endswith(".data")] == ["vision_weights.onnx.data"]
    # The rewritten graphs still reproduce their recorded PyTorch references.
    for name in ("vision_224", "vision_128x256"):
        assert check_golden(out, m, name).passed
    # An existing output is refused without --force, replaced with it.
    assert _compile(out) == 2
    assert "already exists" in capsys.readouterr().err
    assert _compile(out, "--force") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.slow  # two whole compiles
def test_failed_parity_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(verify_mod.TOLERANCES, ("vision", "fp32"), 0.0)
    out = tmp_path / "bundle"
    assert _compile(out) == 1
    err = capsys.readouterr().err
    assert "[verify] parity check failed" in err and "vision_224" in err
    assert not out.exists() and os.listdir(tmp_path) == []
    # --no-verify keeps the bundle (and records no parity figures).
    assert _compile(out, "--no-verify") == 0
    assert json.loads((out / "manifest.json").read_text())["parity"] == {}


def _fake_checkpoint(tmp_path, config):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_non_qwen3vl_checkpoint_refused(tmp_path, capsys):
    d = _fake_checkpoint(tmp_path, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert main(["--model", str(d), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "not a Qwen3-VL checkpoint" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o").exists()


def test_missing_mrope_section_refused(tmp_path, tiny_path, capsys):
    config = json.loads((tiny_path / "config.json").read_text())
    config["text_config"].pop("rope_parameters", None)
    config["text_config"].pop("rope_scaling", None)
    d = _fake_checkpoint(tmp_path, config)
    assert main(["--model", str(d), "-o", str(tmp_path / "o"), "-q"]) == 2  # a config refusal
    assert "mrope_section" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "no such directory" in capsys.readouterr().err
