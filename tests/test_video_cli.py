"""Video on the command lines: ``qwen3vl-run --video`` gives the tokens of
``Pipeline.generate(videos=[path])`` and reports the videos in ``--json``; a missing, truncated,
random, still-image or audio-only file and a video too long for the context are each one line
on stderr and exit 2; the video options are checked as arguments. ``qwen3vl-eval`` items with
``"videos"``: checked before any model work (naming the file and line), then run and scored."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from clips import write_clip
from qwen3vl_compile import Pipeline
from qwen3vl_compile.runtime.cli import main as run_main
from qwen3vl_compile.runtime.eval import main as eval_main

av = pytest.importorskip("av", reason="PyAV (the [video] extra) writes the clips")


def noise_clip(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A good lossless clip (8 frames of 224x224 at 4 fps: 4 sampled, the 224 bucket) and the
    bad files."""
    d = tmp_path_factory.mktemp("clips")
    write_clip(d / "clip.mkv", noise_clip(8, 224, 224, seed=3), 4)
    write_clip(d / "ok.mp4", noise_clip(20, 64, 64), 10, codec="mpeg4")
    data = (d / "ok.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the moov atom is at the end: gone
    (d / "random.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "still.png")
    os.rename(d / "still.png", d / "still.mp4")
    with av.open(str(d / "audio.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    # 20 frames of 1280x720 at 2 fps: all 20 sampled, 10 groups of 880 tokens, over 8192.
    write_clip(d / "long.mp4", np.full((20, 720, 1280, 3), 100, np.uint8), 2, codec="mpeg4")
    return d


def _one_line(capsys, rc, code, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _exit_code(argv) -> int:
    try:
        return run_main(argv)
    except SystemExit as e:
        return e.code


def test_run_video_json_equals_pipeline(vision_bundle, clips, capsys):
    clip = clips / "clip.mkv"
    with Pipeline.load(vision_bundle) as pipe:
        want = pipe.generate(videos=[clip], prompt="What happens?", max_new_tokens=8)
    rc = run_main([str(vision_bundle), "--video", str(clip), "--prompt", "What happens?", "--max-new-tokens", "8", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    got = json.loads(out.out)
    assert got["token_ids"] == want.token_ids
    (info,) = got["videos"]
    assert info["grid_thw"] == [2, 14, 14] and info["frames"] == 4 and info["tokens"] == 98, info
    assert info["served_by"].startswith("bucket 224") and info["fps"] == 4.0, info
    # --max-frames reaches the pipeline; plain output names the video on stderr
    assert run_main([str(vision_bundle), "--video", str(clip), "--prompt", "Hi", "--max-new-tokens", "2",
                     "--max-frames", "2"]) == 0
    err = capsys.readouterr().err
    assert "[video 0: 2 frames, grid 1x14x14, 49 tokens, bucket 224" in err, err


BAD_VIDEOS = [
    ("missing.mp4", "[input] video '__DIR__/missing.mp4': no such file"),
    ("truncated.mp4", "truncated.mp4': cannot be read (Invalid data found"),
    ("random.mp4", "random.mp4': cannot be read ("),
    ("still.mp4", "still.mp4' is a still image (png_pipe), not a video"),
    ("audio.wav", "audio.wav' has no video stream"),
    ("long.mp4", "[input] prompt with image and video tokens is 8947 tokens, longer than the bundle's context of 8192"),
    ("long.mp4", "(videos: 20 frames of 1280x704 = 8800 tokens); lower --max-frames, --video-fps or --video-max-pixels"),
]


@pytest.mark.parametrize("name,needle", BAD_VIDEOS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_VIDEOS)])
def test_bad_videos_give_one_line(text_bundle, clips, capsys, name, needle):
    """Refused from the file's header (the text-only bundle: no vision work could happen)."""
    rc = run_main([str(text_bundle), "--video", str(clips / name), "--prompt", "Hi"])
    _one_line(capsys, rc, 2, "qwen3vl-run: error: ", needle.replace("__DIR__", str(clips)))


@pytest.mark.parametrize("args,needle", [
    (["--max-frames", "0"], "argument --max-frames: must be a whole number >= 1, got '0'"),
    (["--max-frames", "2.5"], "argument --max-frames: must be a whole number >= 1, got '2.5'"),
    (["--video-fps", "-1"], "argument --video-fps: must be a positive number, got '-1'"),
    (["--video-fps", "nan"], "argument --video-fps: must be a positive number, got 'nan'"),
    (["--video-max-pixels", "0"], "argument --video-max-pixels: must be a whole number >= 1"),
])
def test_video_options_are_checked_as_arguments(capsys, args, needle):
    rc = _exit_code(["/no/such/bundle", "--prompt", "Hi", *args])  # refused before the bundle is opened
    _one_line(capsys, rc, 2, "qwen3vl-run: error: [arguments] ", needle)


# -- qwen3vl-eval --------------------------------------------------------------------------------

def _eval(capsys, *argv):
    rc = eval_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_eval_items_with_a_missing_video_name_the_line(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "hi", "answer": "a"}\n{"videos": ["clips/nope.mp4"], "prompt": "hi", "answer": "a"}\n')
    rc, _, err = _eval(capsys, tmp_path / "no-bundle", items)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "[input] items.jsonl line 2: video clips/nope.mp4 not found (paths are relative to" in err, err
    items.write_text('{"videos": "a.mp4", "prompt": "hi", "answer": "a"}\n')
    rc, _, err = _eval(capsys, tmp_path / "no-bundle", items)
    assert rc == 2 and 'items.jsonl line 1: "videos" must be a list of paths' in err, err


def test_eval_checks_video_headers_before_any_model_work(text_bundle, clips, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "hi", "answer": "a"}\n'
                     f'{{"videos": ["{clips / "audio.wav"}"], "prompt": "hi", "answer": "a"}}\n')
    rc, _, err = _eval(capsys, text_bundle, items)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "items.jsonl line 2: video " in err and "has no video stream" in err, err


def test_eval_runs_and_scores_a_video_item(vision_bundle, clips, tmp_path, capsys):
    (tmp_path / "media").mkdir()
    os.symlink(clips / "clip.mkv", tmp_path / "media" / "clip.mkv")
    with Pipeline.load(vision_bundle) as pipe:
        want = pipe.generate(videos=[clips / "clip.mkv"], prompt="What happens?", max_new_tokens=4).text
    items = tmp_path / "items.jsonl"
    rows = [{"videos": ["media/clip.mkv"], "prompt": "What happens?", "answer": want},
            {"videos": ["media/clip.mkv"], "prompt": "What happens?", "answer": "definitely not this"}]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, out, err = _eval(capsys, vision_bundle, items, "--max-new-tokens", 4, "--json", "-q")
    assert rc == 0, err
    r = json.loads(out)
    assert r["items"] == 2 and r["bundle"]["exact"] == 0.5, r
