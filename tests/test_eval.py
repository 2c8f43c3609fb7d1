"""qwen3vl-eval: bad eval files refused in one line naming the line, before any model work;
scores; a bundle and Hugging Face compared item for item."""

import json

import pytest

from qwen3vl_compile.runtime.eval import load_items, main as eval_main, score


def _run(capsys, *argv):
    rc = eval_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.mark.parametrize("lines,needle", [
    (['{"images": [], "prompt": "hi", "answer": "a"}', '{"prompt": "x", '], "items.jsonl line 2: not valid JSON"),
    (['[1, 2]'], "items.jsonl line 1: not a JSON object"),
    (['{"images": [], "prompt": "hi"}'], 'items.jsonl line 1: "answer" must be a non-empty string'),
    (['{"images": "a.png", "prompt": "hi", "answer": "a"}'], 'items.jsonl line 1: "images" must be a list of paths'),
    (['', '{"images": ["nope.png"], "prompt": "hi", "answer": "a"}'], "items.jsonl line 2: image nope.png not found"),
    ([], "items.jsonl: no items"),
])
def test_bad_eval_files_are_refused_in_one_line(tmp_path, capsys, lines, needle):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(lines))
    # The bundle is never opened: the file is checked first.
    rc, _, err = _run(capsys, tmp_path / "no-bundle", items)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwen3vl-eval: error: [input] ") and needle in err, err


def test_scoring_is_case_insensitive_exact_and_contains():
    assert score(" Red.", "red") == (True, True)
    assert score("It is red", "red") == (False, True)
    assert score("blue", "red") == (False, False)
    assert score("12", "1") == (False, True)


def test_image_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    (tmp_path / "items.jsonl").write_text('{"images": ["img/a.png"], "prompt": "p", "answer": "a", "kind": "k"}\n')
    (item,) = load_items(tmp_path / "items.jsonl")
    assert item.images == (tmp_path / "img" / "a.png",) and item.kind == "k" and item.line == 1


@pytest.mark.slow  # Hugging Face generate on every item
def test_bundle_and_reference_agree_item_for_item(text_bundle, tiny_path, tmp_path, capsys):
    """An fp32 bundle answers exactly as Hugging Face: agreement 100%, equal accuracy, no
    differences listed; the bundle's answers are Pipeline's own."""
    from qwen3vl_compile.runtime.pipeline import Pipeline

    prompts = ["Say hello.", "What is two plus two?", "Name a colour."]
    pipe = Pipeline.load(text_bundle)
    answers = [pipe.generate([], p, max_new_tokens=6).text for p in prompts]
    items = tmp_path / "items.jsonl"
    # Two answers are the bundle's own (exact match), one is not.
    rows = [{"images": [], "prompt": p, "answer": a} for p, a in zip(prompts[:2], answers[:2])]
    rows.append({"images": [], "prompt": prompts[2], "answer": "definitely not this"})
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, out, err = _run(capsys, text_bundle, items, "--reference", tiny_path, "--max-new-tokens", 6, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["items"] == 3 and r["agreement"] == 1.0 and r["differences"] == []
    assert r["bundle"]["exact"] == r["reference"]["exact"] == pytest.approx(2 / 3)
