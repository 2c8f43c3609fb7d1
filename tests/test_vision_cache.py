"""Multi-turn on the Pipeline: ``submit(messages=...)`` renders a conversation through the
bundle's chat template (one user turn equals ``generate``), and vision features are cached by
image content so a follow-up turn about the same image skips the vision graph."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_compile import Pipeline
from qwen3vl_compile.errors import ContextLengthError, RuntimeInputError
from qwen3vl_compile.runtime.scheduler import QueueFull
from qwen3vl_compile.runtime.vision import FeatureCache


class _Counting:
    """A session proxy that counts its runs."""

    def __init__(self, session, counter):
        self._session, self._counter = session, counter

    def run(self, *a, **kw):
        self._counter.append(1)
        return self._session.run(*a, **kw)


@pytest.fixture
def counted_pipe(vision_bundle):
    pipe = Pipeline.load(vision_bundle)
    runs: list[int] = []
    real = pipe.vision._session
    pipe.vision._session = lambda file: _Counting(real(file), runs)
    yield pipe, runs
    pipe.close()


def _image(seed, size=224):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_follow_up_turn_skips_the_vision_graph(counted_pipe):
    pipe, runs = counted_pipe
    image = _image(1)
    first = pipe.generate(images=[image], prompt="Describe this image", max_new_tokens=8)
    assert len(runs) == 1 and first.images[0]["served_by"] == "bucket 256"
    # The same image again (a new array, equal pixels): no vision run, the same answer.
    again = pipe.generate(images=[image.copy()], prompt="Describe this image", max_new_tokens=8)
    assert len(runs) == 1 and again.images[0]["served_by"] == "bucket 256 (cached)"
    assert again.token_ids == first.token_ids
    follow_up = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image"}]},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "What colour dominates?"},
    ]
    assert pipe.submit(messages=follow_up, max_new_tokens=8).wait().images[0]["served_by"].endswith("(cached)")
    assert len(runs) == 1
    # Another image runs the graph; the cache counts hits and misses.
    pipe.generate(images=[_image(2)], prompt="And this?", max_new_tokens=2)
    assert len(runs) == 2 and (pipe.vision.cache.hits, pipe.vision.cache.misses) == (2, 2)


def test_cached_answer_equals_uncached(vision_bundle):
    image = _image(3, 256)
    with Pipeline.load(vision_bundle, vision_cache_mb=0) as plain:
        assert plain.vision.cache is None
        want = plain.generate(images=[image], prompt="What is it?", max_new_tokens=8).token_ids
    with Pipeline.load(vision_bundle) as cached:
        got = [cached.generate(images=[image], prompt="What is it?", max_new_tokens=8).token_ids for _ in range(2)]
    assert got == [want, want]


def test_feature_cache_is_a_bounded_lru():
    cache = FeatureCache(max_bytes=3 * 400)
    arrays = {i: (np.full((10, 5), i, np.float32), np.full((1, 10, 5), i, np.float32)) for i in range(4)}  # 400 B each
    keys = {i: cache.key(np.full((4, 4), i, np.float32), (1, 2, 2)) for i in range(4)}
    assert keys[0] != cache.key(np.full((4, 4), 0, np.float32), (1, 4, 1))  # the grid is part of the key
    for i in range(3):
        cache.put(keys[i], *arrays[i], "bucket x")
    assert cache.get(keys[0]) is not None  # 0 is now the most recent: 1 goes first
    cache.put(keys[3], *arrays[3], "bucket x")
    assert cache.get(keys[1]) is None and len(cache) == 3 and cache.bytes == 1200
    feats, _, _ = cache.get(keys[3])
    assert not feats.flags.writeable


def test_messages_equal_the_single_prompt_api(text_bundle):
    with Pipeline.load(text_bundle) as pipe:
        want = pipe.generate(prompt="Hello there", system="Be brief", max_new_tokens=6)
        messages = [{"role": "system", "content": "Be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
        got = pipe.submit(messages=messages, max_new_tokens=6).wait()
        assert (got.token_ids, got.prompt_tokens) == (want.token_ids, want.prompt_tokens)
        assert pipe.check_request(messages=messages) == want.prompt_tokens
        with pytest.raises(ContextLengthError, match="longer than the bundle's context") as e:
            pipe.check_request(messages=[{"role": "user", "content": "word " * 9000}])
        assert e.value.prompt_tokens > e.value.context_length == pipe.context_length
        for bad, match in [
            ([], "non-empty list"),
            ([{"role": "tool", "content": "x"}], "role must be one of"),
            ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\].content\[0\]"),
            ([{"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}], "user messages"),
            ([{"role": "user", "content": "<|image_pad|>"}], "literal"),
        ]:
            with pytest.raises(RuntimeInputError, match=match):
                pipe.submit(messages=bad)
        with pytest.raises(RuntimeInputError, match="not both"):
            pipe.submit(prompt="hi", messages=messages)


def test_max_waiting_counts_free_slots(text_bundle):
    """With max_waiting=0 a request that a free slot takes is accepted; with every slot busy
    the next one is refused."""
    with Pipeline.load(text_bundle, max_batch=1, max_waiting=0) as pipe:
        busy = pipe.submit(prompt="go on", max_new_tokens=2000)
        pieces = busy.pieces()
        next(pieces)  # decoding: the one slot is busy
        with pytest.raises(QueueFull, match="every slot is busy"):
            pipe.submit(prompt="me too", max_new_tokens=2)
        pieces.close()
        busy.wait_finished(30)
        assert pipe.submit(prompt="now", max_new_tokens=2).wait().token_ids
