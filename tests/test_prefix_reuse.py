"""Prefix reuse: the next turn of a conversation prefills only what a finished request's slot
does not already cache, and gets exactly the tokens a full prefill gives (fp32 with images,
INT4 text); a different image at the same place is not reused past its first pad; concurrent
conversations sharing the pool keep their own caches (the freed cache survives the slot
compaction by a swap)."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile import Pipeline
from qwen3vl_compile.runtime.scheduler import MIN_REUSED_TOKENS

TOKENS = 12


def _image(seed: int, size: int = 256) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _turns(pipe, first_user: list, follow_ups: list[str]) -> list:
    """A conversation: the first user turn, then each follow-up after the previous answer;
    the results of every turn."""
    messages = [{"role": "user", "content": first_user}]
    results = []
    for i in range(len(follow_ups) + 1):
        r = pipe.submit(messages=messages, max_new_tokens=TOKENS).wait()
        results.append(r)
        if i < len(follow_ups):
            messages = messages + [{"role": "assistant", "content": r.text},
                                   {"role": "user", "content": follow_ups[i]}]
    return results


def _first_user(seed: int) -> list:
    return [{"type": "image", "image": _image(seed)}, {"type": "text", "text": "Describe this picture in detail."}]


@pytest.fixture(scope="module")
def pipes(vision_bundle):
    with Pipeline.load(vision_bundle, max_batch=2) as reuse, \
            Pipeline.load(vision_bundle, max_batch=2, reuse_prefix=False, vision_cache_mb=0) as full:
        yield reuse, full


def test_next_turns_reuse_the_cache_and_give_the_same_tokens(pipes):
    reuse, full = pipes
    follow = ["What colours stand out?", "Say it again in one sentence."]
    got = _turns(reuse, _first_user(1), follow)
    want = _turns(full, _first_user(1), follow)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(r.timings["prefix_reused_tokens"] == 0 for r in want)
    reused = [r.timings["prefix_reused_tokens"] for r in got]
    # Turn 2 reuses at least turn 1's prompt (its answer too, where the answer's text
    # tokenizes back to the generated ids: the random model's rare tokens need not), turn 3
    # at least turn 2's prompt.
    assert reused[1] >= got[0].prompt_tokens and reused[2] >= got[1].prompt_tokens, reused


def test_another_image_is_not_reused_past_its_first_pad(pipes):
    reuse, full = pipes
    reuse.generate(images=[_image(2)], prompt="Describe this picture in detail.", max_new_tokens=4)
    r = reuse.generate(images=[_image(3)], prompt="Describe this picture in detail.", max_new_tokens=TOKENS)
    first_pad = int(np.flatnonzero(_ids(reuse, _image(3)) == reuse.image_token_id)[0])
    assert r.timings["prefix_reused_tokens"] in (0, first_pad)
    assert first_pad < MIN_REUSED_TOKENS or r.timings["prefix_reused_tokens"] == first_pad
    assert r.token_ids == full.generate(images=[_image(3)], prompt="Describe this picture in detail.",
                                        max_new_tokens=TOKENS).token_ids


def _ids(pipe, image) -> np.ndarray:
    from qwen3vl_compile.runtime.chat import build_messages

    return pipe.chat.encode_messages(build_messages("Describe this picture in detail.", 1),
                                     [pipe._header_tokens(image)])[0]


def test_concurrent_conversations_keep_their_own_caches(pipes):
    """Two conversations at once on a pool of two slots, one finishing before the other: each
    gets the tokens it gets alone without reuse, and the later turns find their caches (the
    compaction swaps the freed cache into the free slot instead of overwriting it)."""
    reuse, full = pipes
    follows = {4: ["And the background?"], 5: ["What is in the corner?", "Once more, shorter."]}
    want = {seed: [r.token_ids for r in _turns(full, _first_user(seed), f)] for seed, f in follows.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {seed: pool.submit(_turns, reuse, _first_user(seed), f) for seed, f in follows.items()}
        got = {seed: f.result(timeout=300) for seed, f in futures.items()}
    assert {seed: [r.token_ids for r in rs] for seed, rs in got.items()} == want
    assert sum(r.timings["prefix_reused_tokens"] > 0 for rs in got.values() for r in rs[1:]) >= 2


def test_int4_text_turns_equal_a_full_prefill(tmp_path):
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path / "int4"
    assert compile_main(["--model", "tiny-random", "--graphs", "embedding,decoder", "-o", str(out), "-q"]) == 0
    first = [{"type": "text", "text": "Tell me a long story about a lighthouse keeper and the sea."}]
    follow = ["What happened next?", "How does it end?"]
    with Pipeline.load(out) as reuse, Pipeline.load(out, reuse_prefix=False) as full:
        got, want = _turns(reuse, first, follow), _turns(full, first, follow)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(r.timings["prefix_reused_tokens"] > 0 for r in got[1:])
