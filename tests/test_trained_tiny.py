"""The embedded trained model: what ships is only what training changed, it rebuilds from the
seed, and it answers the held-out questions as the accuracy benchmark recorded."""

import json
from pathlib import Path

import numpy as np
import pytest

from qwen3vl_compile.presets.materialize import TINY_SEED, build_random_model, build_trained_model, trained_asset
from qwen3vl_compile.presets.configs import preset_config

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks" / "results" / "accuracy.json"
SLICE = 60


def test_shipped_file_holds_only_what_training_changed():
    from safetensors import safe_open

    asset = trained_asset("tiny")
    assert asset.stat().st_size < 8 << 20, asset.stat().st_size
    with safe_open(str(asset), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        rows = f.get_tensor("embed_rows.index")
    assert "model.language_model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    assert int(meta["steps"]) > 0 and meta["preset"] == "tiny" and meta["command"].startswith("python scripts/train_tiny.py")
    # Tens of rows of a 151936-row table: the prompts' and answers' tokens (86 when trained).
    assert 50 < len(rows) < 5000


def test_trained_model_rebuilds_from_the_seed():
    """Rows training never touched are the seeded init's, bit for bit; trained rows and the
    other tensors are not."""
    base = build_random_model(preset_config("tiny"), TINY_SEED)
    trained = build_trained_model("tiny")
    from safetensors import safe_open

    with safe_open(str(trained_asset("tiny")), "pt") as f:
        rows = f.get_tensor("embed_rows.index").numpy()
    e0 = base.get_input_embeddings().weight.detach().numpy()
    e1 = trained.get_input_embeddings().weight.detach().numpy()
    untouched = np.setdiff1d(np.arange(e0.shape[0]), rows)
    assert np.array_equal(e0[untouched], e1[untouched])
    assert not np.allclose(e0[rows], e1[rows])
    w0 = base.model.visual.blocks[0].attn.qkv.weight.detach().numpy()
    w1 = trained.model.visual.blocks[0].attn.qkv.weight.detach().numpy()
    assert not np.allclose(w0, w1)


@pytest.mark.slow  # compiles a bundle and runs Hugging Face on 60 items
def test_answers_reproduce_the_recorded_accuracy(tmp_path):
    """The first 60 held-out items: the fp32 bundle answers exactly as Hugging Face does, and
    the accuracy is the one benchmarks/accuracy.py recorded for them."""
    from qwen3vl_compile.cli import main as compile_main
    from qwen3vl_compile.presets.shapes import HELDOUT_SEED, write_set
    from qwen3vl_compile.runtime.eval import main as eval_main

    recorded = json.loads(RECORDED.read_text())
    items = write_set(tmp_path / "heldout", HELDOUT_SEED, SLICE)
    out = tmp_path / "b"
    assert compile_main(["--model", "tiny", "--precision", "fp32", "--buckets", recorded["sizes"], "-o", str(out), "-q"]) == 0
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert eval_main([str(out), str(items), "--reference", "tiny", "--max-new-tokens", "8", "--json", "-q",
                          "--on-miss", "error"]) == 0
    r = json.loads(buf.getvalue())
    assert r["agreement"] == 1.0, r["differences"]
    systems = recorded["systems"]
    assert r["bundle"]["exact"] == pytest.approx(systems["fp32"][f"exact_first_{SLICE}"], abs=1 / SLICE + 1e-9)
    assert r["reference"]["exact"] == pytest.approx(systems["reference"][f"exact_first_{SLICE}"], abs=1 / SLICE + 1e-9)
