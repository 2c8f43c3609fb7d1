"""qwen3vl-eval: bad eval files refused in one line naming the line, before any model work;
scores; a bundle and Hugging Face compared item for item."""

import json

import pytest
from planted import png_header

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
    (['{"images": [], "prompt": "\\ud800", "answer": "a"}'],
     'items.jsonl line 1: "prompt" is not valid Unicode text (lone surrogate U+D800 at character 0)'),
    (['{"images": [], "prompt": "hi", "answer": "a"}', '{"images": ["folder.png"], "prompt": "hi", "answer": "a"}'],
     "items.jsonl line 2: image folder.png is a directory"),
])
def test_bad_eval_files_are_refused_in_one_line(tmp_path, capsys, lines, needle):
    (tmp_path / "folder.png").mkdir()
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
    assert score("12", "1") == (False, False)  # contains matches whole words and numbers only
    assert score("<unused1250><unused7>", "5") == (False, False)
    assert score("It is 5.", "5") == (False, True)
    assert score("a 5-sided shape", "5") == (False, True)
    assert score("costs $5 now", "$5") == (False, True)
    assert score("red-ish", "red") == (False, True) and score("reddish", "red") == (False, False)


def test_items_path_that_is_a_directory(tmp_path, capsys):
    rc, _, err = _run(capsys, tmp_path / "no-bundle", tmp_path)
    assert rc == 2 and err == f"qwen3vl-eval: error: [input] {tmp_path}: is a directory; give the JSONL items file"


@pytest.mark.parametrize("line2,needle", [
    ('{"images": ["one.png"], "prompt": "hi", "answer": "a"}', "'one.png': image of 1x1 pixels is smaller than one 16-pixel patch"),
    ('{"images": ["bad.png"], "prompt": "hi", "answer": "a"}', "image 'bad.png': cannot be read"),
    ('{"images": ["huge.png"], "prompt": "hi", "answer": "a"}', "prompt with image tokens is 16400 tokens, longer than the bundle's context of 8192"),
    ('{"images": [], "prompt": "%s", "answer": "a"}' % ("word " * 9000), "longer than the bundle's context of 8192"),
], ids=["1x1", "unreadable", "13000x13000-header", "long-prompt"])
def test_every_item_is_checked_before_any_model_work(text_bundle, tmp_path, monkeypatch, capsys, line2, needle):
    """Image headers, sizes and prompt lengths of every item are checked before the first
    answer: the error names the file and the line (and the image)."""
    from PIL import Image

    from qwen3vl_compile.runtime.pipeline import Pipeline

    def never(*a, **k):
        raise AssertionError("an item was answered before every item was checked")

    monkeypatch.setattr(Pipeline, "generate", never)
    monkeypatch.chdir(tmp_path)  # the image paths in the message are as the items file gives them, relative to it
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "huge.png").write_bytes(png_header(13000, 13000))
    items = tmp_path / "items.jsonl"
    items.write_text('{"images": [], "prompt": "hi", "answer": "a"}\n' + line2 + "\n")
    rc, out, err = _run(capsys, text_bundle, "items.jsonl")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwen3vl-eval: error: [input] items.jsonl line 2: ") and needle in err, err


def test_reference_must_be_the_bundles_own_checkpoint(text_bundle, tmp_path, monkeypatch, capsys):
    """The bundle is compiled from tiny-random; --reference tiny (another checkpoint) is
    refused before any answer, and --reference errors speak of --reference."""
    from qwen3vl_compile.runtime.pipeline import Pipeline

    def never(*a, **k):
        raise AssertionError("the bundle answered before --reference was checked")

    monkeypatch.setattr(Pipeline, "generate", never)
    items = tmp_path / "items.jsonl"
    items.write_text('{"images": [], "prompt": "hi", "answer": "a"}\n')
    rc, _, err = _run(capsys, text_bundle, items, "--reference", "tiny")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "[input] --reference 'tiny' is not the checkpoint the bundle was compiled from ('tiny-random')" in err, err
    rc, _, err = _run(capsys, text_bundle, items, "--reference", tmp_path / "nope")
    assert rc == 1 and f"[load] --reference '{tmp_path / 'nope'}': no such directory" in err and "--model" not in err, err


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
