"""``qwen3vl-eval --ray`` and ``qwen3vl_compile.batch``: the held-out items answered by a Ray
Data actor pool give the same answers, item for item, and the same scores as ``qwen3vl-eval``
without ``--ray``; an item that fails is recorded with its error (the others are answered); a
corrupt bundle stops the run in one line; the options are checked in one place, and a slim
install is told which extra to install.

Ray runs locally (node address 127.0.0.1), with 2 CPUs and a small object store; the fixture always
shuts it down."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from qwen3vl_compile.runtime.eval import main as eval_main

N_ITEMS = 64  # held-out items (the number)


def _run(capsys, *argv):
    rc = eval_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="warning", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """The trained tiny model at fp32 with one bucket (images of other sizes are fitted to it:
    the answers need not be good, only the same with and without Ray)."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("trained") / "bundle"
    assert compile_main(["--model", "tiny", "--precision", "fp32", "--buckets", "256", "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from qwen3vl_compile.presets.shapes import HELDOUT_SEED, write_set

    return write_set(tmp_path_factory.mktemp("heldout"), HELDOUT_SEED, N_ITEMS)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # compiles a bundle, starts Ray, answers 64 items twice
def test_ray_answers_equal_the_single_process_item_for_item(ray_local, trained_bundle, heldout, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    common = ["--max-new-tokens", 8, "--on-miss", "fit", "--json", "-q"]
    rc, out, err = _run(capsys, trained_bundle, heldout, *common, "--output", tmp_path / "plain.jsonl")
    assert rc == 0, err
    plain = json.loads(out)
    # The same items as Parquet (beside the JSONL: the image paths are relative to it), answers as Parquet.
    items_pq = heldout.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(_jsonl(heldout)), items_pq)
    rc, out, err = _run(capsys, trained_bundle, items_pq, *common, "--ray", "--actors", 2,
                        "--output", tmp_path / "ray.parquet")
    assert rc == 0, err
    ray = json.loads(out)
    a, b = _jsonl(tmp_path / "plain.jsonl"), pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert len(a) == len(b) == N_ITEMS
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert [r["line"] for r in a] == [r["line"] for r in b] == list(range(1, N_ITEMS + 1))
    assert all(r["error"] is None and r["seconds"] > 0 for r in a + b)
    assert any(r["prediction"].strip() for r in a)  # answers, not empty strings compared
    for key in ("exact", "contains", "by_kind"):
        assert plain["bundle"][key] == ray["bundle"][key], key
    assert "failed" not in plain and "failed" not in ray and plain["items"] == ray["items"] == N_ITEMS


@pytest.mark.slow  # starts Ray actors
def test_a_failed_item_is_recorded_with_its_error(ray_local, trained_bundle, heldout, tmp_path, capsys):
    """A truncated PNG (its header is fine: it fails only when decoded) and a 1x1 image (refused by
    the checks): both recorded with their errors and scored as wrong; the other items answered as
    without Ray. Without --ray the same file stops at the first (the run's one-line error)."""
    from PIL import Image

    rows = _jsonl(heldout)[:4]
    folder = heldout.parent
    good = (folder / rows[0]["images"][0]).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (1, 1)).save(folder / "one.png")
    rows[1] = {**rows[1], "images": ["truncated.png"]}
    rows[3] = {**rows[3], "images": ["one.png"]}
    items = folder / "bad.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(capsys, trained_bundle, items, "--max-new-tokens", 8, "--on-miss", "fit", "--json", "-q",
                        "--ray", "--output", tmp_path / "a.jsonl")
    assert rc == 0, err
    r = json.loads(out)
    failed = {f["line"]: f["error"] for f in r["failed"]}
    assert sorted(failed) == [2, 4], failed
    assert failed[2].startswith("[input] bad.jsonl line 2: ") and "truncated.png" in failed[2], failed[2]
    assert failed[4].startswith("[input] bad.jsonl line 4: ") and "smaller than one 16-pixel patch" in failed[4], failed[4]
    answers = _jsonl(tmp_path / "a.jsonl")
    assert [a["error"] is None for a in answers] == [True, False, True, False]
    assert answers[1]["prediction"] == "" and answers[1]["exact"] is False
    from qwen3vl_compile.runtime.pipeline import Pipeline

    pipe = Pipeline.load(trained_bundle, on_miss="fit")
    for i in (0, 2):
        expected = pipe.generate([str(folder / p) for p in rows[i]["images"]], rows[i]["prompt"], max_new_tokens=8).text
        assert answers[i]["prediction"] == expected
    pipe.close()
    rc, _, err = _run(capsys, trained_bundle, items, "--max-new-tokens", 8, "--on-miss", "fit", "-q")
    assert rc == 2 and err.startswith("qwen3vl-eval: error: [input] bad.jsonl line 4: ") and len(err.splitlines()) == 1, err


@pytest.mark.slow  # starts a Ray actor
def test_a_corrupt_bundle_stops_the_run_in_one_line(ray_local, trained_bundle, heldout, tmp_path, capsys):
    """Each actor verifies the bundle's hashes as it loads it: a changed byte in a graph stops the
    run with the bundle's own one-line error, no item answered."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    data = bytearray((bundle / "embedding.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "embedding.onnx").write_bytes(bytes(data))
    rc, out, err = _run(capsys, bundle, heldout, "--on-miss", "fit", "--limit", 2, "-q", "--ray",
                        "--output", tmp_path / "a.jsonl")
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwen3vl-eval: error: [bundle] ") and "embedding.onnx" in err, err
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.slow  # starts Ray Data (whose actors cannot start)
def test_actors_that_cannot_start_stop_the_run_instead_of_hanging(ray_local, text_bundle):
    """Each actor asks for --threads Ray CPUs: 4 on this 2-CPU instance never start, and the run
    ends with one [ray] error after the actor start timeout."""
    from qwen3vl_compile.batch import RayError, answer_items
    from qwen3vl_compile.runtime.eval import EvalItem

    with pytest.raises(RayError, match=r"the actor pool failed after 0 of 1 items: .*Timed out while starting actors"):
        answer_items(text_bundle, [EvalItem(1, (), "hi", "a")], threads=4, actor_start_timeout=5)


@pytest.mark.parametrize("argv,needle", [
    (["--actors", "2"], "[arguments] --actors needs --ray"),
    (["--ray-address", "ray://x:1"], "[arguments] --ray-address needs --ray"),
    (["--ray", "--actors", "0"], "[arguments] --actors must be a whole number >= 1, got 0"),
    (["--ray", "--reference", "tiny"], "[arguments] --reference runs Hugging Face in this process"),
])
def test_ray_options_are_checked_before_anything(tmp_path, capsys, argv, needle):
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "hi", "answer": "a"}\n')
    rc, out, err = _run(capsys, tmp_path / "no-bundle", items, *argv)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and needle in err, err


def test_without_ray_the_extra_is_named(tmp_path, monkeypatch, text_bundle, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a slim install
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "hi", "answer": "a"}\n')
    rc, _, err = _run(capsys, text_bundle, items, "--ray")
    assert rc == 1 and err == "qwen3vl-eval: error: [ray] --ray needs the [ray] extra: pip install 'qwen3vl-compile[ray]'", err


def test_parquet_items_are_checked_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the [ray] extra is not installed")
    import pyarrow.parquet as pq

    from qwen3vl_compile.errors import RuntimeInputError
    from qwen3vl_compile.runtime.eval import load_items

    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist([{"images": ["a.png"], "prompt": "p", "answer": "x"},
                                         {"images": None, "prompt": "q", "answer": "y"}]), path)
    first, second = load_items(path)
    assert first.images == (tmp_path / "a.png",) and second.images == () and second.line == 2
    pq.write_table(pa.Table.from_pylist([{"images": ["nope.png"], "prompt": "p", "answer": "x"}]), path)
    with pytest.raises(RuntimeInputError, match="items.parquet row 1: image nope.png not found"):
        load_items(path)
