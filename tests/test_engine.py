"""The engine (one KV pool, batched decode steps) and the scheduler behind ``Pipeline``:
batched steps give the logits of single steps, concurrent requests get the tokens they get
alone, streams belong to their call, cancelled requests free their slot, the pool's size is
checked before it is allocated, and a grid of several temporal groups is split before the
any-size vision graph."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qwen3vl_compile import Pipeline
from qwen3vl_compile.errors import GenerationError, RuntimeInputError
from qwen3vl_compile.runtime import engine as engine_mod
from qwen3vl_compile.runtime.decoder_session import DecoderSession
from qwen3vl_compile.runtime.engine import EngineOptions
from qwen3vl_compile.runtime.rope_index import decode_positions, get_rope_index

PROMPTS = ["Hello there", "Tell me a long story about a red square and a blue circle", "Count to five", "Why?"]
SAMPLING = [{}, {}, {"temperature": 0.8, "seed": 7}, {"temperature": 1.0, "top_k": 20, "seed": 3}]


@pytest.fixture(scope="module")
def alone(text_bundle):
    """Each prompt's tokens generated alone (one slot, one request at a time)."""
    with Pipeline.load(text_bundle) as pipe:
        return [pipe.generate(prompt=p, max_new_tokens=16 + 4 * i, **kw).token_ids
                for i, (p, kw) in enumerate(zip(PROMPTS, SAMPLING))]


def test_batched_step_equals_single_steps(text_bundle):
    """Two sequences of different lengths prefilled into slots 0 and 1, then one batch-2 step:
    the logits equal two batch-1 steps bit for bit (fp32)."""
    pipe = Pipeline.load(text_bundle, max_batch=2)
    eng = pipe.engine
    single = DecoderSession(text_bundle / "decoder.onnx", max_length=eng.max_length)
    rows, tokens, lengths, deltas = [], [], [], []
    for slot, prompt in enumerate(PROMPTS[:2]):
        ids = pipe.chat.encode(prompt)
        embeds, deep = eng.embed(ids)
        pos, delta = get_rope_index(ids, None, image_token_id=pipe.image_token_id, video_token_id=pipe.video_token_id,
                                    spatial_merge_size=pipe.merge)
        eng.prefill(slot, embeds, pos, deep)
        first = single.prefill(embeds, pos, deep)[0, -1]
        token = int(first.argmax())
        step_embeds, _ = eng.embed(np.array([[token]]))
        rows.append(single.step(step_embeds, decode_positions(single.length, delta))[0, -1])
        tokens.append(token), lengths.append(ids.shape[1]), deltas.append(delta)
    assert lengths[0] != lengths[1]
    batched = eng.decode(tokens, lengths, deltas)
    assert batched.shape[0] == 2
    np.testing.assert_array_equal(batched, np.stack(rows))
    pipe.close()


def test_concurrent_threads_get_what_they_get_alone(text_bundle, alone):
    """Four threads, two slots: two requests wait, the others decode together; greedy and
    seeded sampling each give the tokens of the request alone."""
    pipe = Pipeline.load(text_bundle, max_batch=2)
    out = [None] * len(PROMPTS)

    def ask(i):
        out[i] = pipe.generate(prompt=PROMPTS[i], max_new_tokens=16 + 4 * i, **SAMPLING[i]).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == alone
    # Requests were decoded together: fewer steps than tokens generated.
    assert pipe.scheduler.steps < pipe.scheduler.tokens == sum(len(a) for a in alone)
    assert pipe.scheduler.peak_active == 2
    assert (pipe.scheduler.active, pipe.scheduler.waiting) == (0, 0)
    pipe.close()


def test_interleaved_streams_each_get_their_own_result(text_bundle, alone):
    with Pipeline.load(text_bundle, max_batch=3) as pipe:
        streams = [pipe.generate(prompt=PROMPTS[i], max_new_tokens=16 + 4 * i, stream=True, **SAMPLING[i])
                   for i in range(3)]
        texts = [[] for _ in streams]
        live = list(range(3))
        while live:  # advance in turn, one piece each
            for i in list(live):
                try:
                    texts[i].append(next(streams[i]))
                except StopIteration:
                    live.remove(i)
        for i, s in enumerate(streams):
            assert s.result.token_ids == alone[i]
            assert "".join(texts[i]) == s.result.text


def test_closing_a_stream_cancels_and_frees_its_slot(text_bundle, alone):
    with Pipeline.load(text_bundle, max_batch=1) as pipe:
        stream = pipe.generate(prompt=PROMPTS[1], max_new_tokens=200, stream=True)
        next(stream)
        waiting = pipe.generate(prompt=PROMPTS[0], max_new_tokens=16, stream=True)
        stream.close()
        # The one slot is freed at the next step: the waiting request then runs.
        assert [*waiting] and waiting.result.token_ids == alone[0]
        deadline = time.time() + 10
        while pipe.scheduler.active and time.time() < deadline:
            time.sleep(0.01)
        assert pipe.scheduler.active == 0
        # A stream closed before its first piece never starts a request.
        unstarted = pipe.generate(prompt=PROMPTS[0], stream=True)
        unstarted.close()
        assert unstarted.result is None and list(unstarted) == []


def test_a_failing_row_fails_only_its_request(text_bundle, alone, monkeypatch):
    """NaN logits in one row of a batched step: that request gets the one-line error, the
    other one decodes on, unchanged."""
    pipe = Pipeline.load(text_bundle, max_batch=2)
    real = pipe.engine.decode
    calls = []

    def decode(tokens, lengths, deltas):
        logits = real(tokens, lengths, deltas).copy()
        calls.append(len(tokens))
        if len(tokens) == 2 and calls.count(2) == 3:
            logits[1] = np.nan
        return logits

    monkeypatch.setattr(pipe.engine, "decode", decode)
    errors = {}

    def ask(i):
        try:
            errors[i] = pipe.generate(prompt=PROMPTS[i], max_new_tokens=16 + 4 * i).token_ids
        except GenerationError as e:
            errors[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
    threads[0].start(), time.sleep(0.0), threads[1].start()
    for t in threads:
        t.join(60)
    failed = [i for i in (0, 1) if isinstance(errors[i], GenerationError)]
    assert len(failed) == 1, errors
    ok = 1 - failed[0]
    assert errors[ok] == alone[ok]
    assert "NaN or inf logits" in str(errors[failed[0]])
    pipe.close()


def test_pool_that_does_not_fit_is_refused_before_allocation(text_bundle, monkeypatch):
    monkeypatch.setattr(engine_mod, "available_memory", lambda: 64 * 1024**2)
    allocated = []
    monkeypatch.setattr(engine_mod.DecoderPool, "_allocate", lambda *a, **k: allocated.append(1))
    with pytest.raises(RuntimeInputError, match=r"^\[engine\] the KV pool of 64 slot\(s\) x 8192 tokens needs .* GiB, "
                                                 r"more than 80% of the 0.06 GiB available: lower max_batch or max_length$"):
        Pipeline.load(text_bundle, max_batch=64)
    assert not allocated


def test_pool_size_is_printed(text_bundle):
    lines = []
    with Pipeline.load(text_bundle, max_batch=2, max_length=512, log=lines.append) as pipe:
        assert pipe.context_length == 512
    assert len(lines) == 1 and lines[0].startswith("KV pool: 2 slot(s) x 512 tokens x 4 layers")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch must be a whole number >= 1"),
    ({"max_batch": True}, "max_batch must be a whole number >= 1"),
    ({"max_length": 1}, "max_length must be a whole number >= 2"),
    ({"providers": "CPUExecutionProvider"}, "providers must be a non-empty list"),
    ({"on_miss": "guess"}, "--on-miss 'guess'"),
])
def test_engine_options_are_checked_once(kwargs, message):
    with pytest.raises(RuntimeInputError, match=message):
        EngineOptions(**kwargs)


def test_unknown_provider_and_too_long_max_length(text_bundle):
    with pytest.raises(RuntimeInputError, match=r"\[engine\] execution provider 'NoSuchExecutionProvider' is not"):
        Pipeline.load(text_bundle, providers=["NoSuchExecutionProvider"])
    with pytest.raises(RuntimeInputError, match=r"\[engine\] max_length 100000 is above the bundle's context length 8192"):
        Pipeline.load(text_bundle, max_length=100000)


def test_closed_pipeline_refuses_new_requests(text_bundle):
    pipe = Pipeline.load(text_bundle)
    assert pipe.generate(prompt="Hi", max_new_tokens=2).token_ids
    pipe.close()
    with pytest.raises(RuntimeInputError, match=r"\[engine\] the engine is shut down"):
        pipe.generate(prompt="Hi", max_new_tokens=2)


@pytest.mark.slow
def test_temporal_groups_are_split_before_the_any_size_graph(genai_bundle, tiny_visual):
    """A grid (2, h, w) through the any-size graphs equals the unpatched Hugging Face tower
    on the same patches (which attends within each temporal group)."""
    import torch

    from qwen3vl_compile.runtime.vision import VisionEncoder
    from qwen3vl_compile.bundle.manifest import load_manifest
    from qwen3vl_compile.runtime.session import ort_session

    manifest = load_manifest(genai_bundle)
    enc = VisionEncoder(genai_bundle, manifest, ort_session)
    grid = (2, 8, 12)
    dim = tiny_visual.config.in_channels * tiny_visual.config.temporal_patch_size * tiny_visual.config.patch_size ** 2
    x = np.random.default_rng(0).standard_normal((int(np.prod(grid)), dim)).astype(np.float32)
    with torch.no_grad():
        ref = tiny_visual(torch.from_numpy(x), grid_thw=torch.tensor([grid]))
    ref_feats = (ref.pooler_output if hasattr(ref, "pooler_output") else ref[0]).numpy()
    for per_image in (True, False):
        enc.dynamic_file = "vision_dynamic.onnx" if per_image else "vision_dynamic_multi.onnx"
        enc.dynamic_per_image = per_image
        got = enc.encode_dynamic(x, [grid])
        assert got.image_features.shape == ref_feats.shape
        np.testing.assert_allclose(got.image_features, ref_feats, rtol=1e-4, atol=1e-4 * np.abs(ref_feats).max())


# -- many requests at once: fp32 tiny-random with images, and the trained tiny model in INT4 --

@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory):
    """The trained tiny model, INT4 decoder (the default precision), one 224 bucket."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("int4") / "bundle"
    assert compile_main(["--model", "tiny", "--buckets", "224", "-o", str(out), "-q"]) == 0
    return out


def _requests(n: int, image_paths) -> list[dict]:
    """``n`` different requests: prompts, images (none, one, two), lengths and sampling."""
    prompts = ["What colour is the shape?", "Describe the picture in detail.", "How many shapes are there?",
               "Hello", "Which image has more shapes?", "Tell me a story about a square.", "Is it round?", "Why?"]
    out = []
    for i in range(n):
        images = [] if i % 3 == 0 else image_paths[: 1 + (i % 3 == 2)]
        sampling = {} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.95, "seed": 10 + i}
        out.append({"images": images, "prompt": prompts[i % len(prompts)], "max_new_tokens": 6 + 5 * i, **sampling})
    return out


def _run_concurrently(pipe, requests, *, stagger: float = 0.0) -> list:
    results = [None] * len(requests)

    def ask(i):
        try:
            results[i] = pipe.generate(**requests[i]).token_ids
        except Exception as e:  # the assertion below shows it
            results[i] = e

    threads = []
    for i in range(len(requests)):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        if stagger:
            time.sleep(stagger)  # later requests arrive while earlier ones are mid-decode
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


@pytest.fixture(scope="module")
def sample_images():
    from importlib import resources

    assets = resources.files("qwen3vl_compile.assets")
    return [str(assets / "sample.png"), str(assets / "sample2.png")]


@pytest.mark.parametrize("which, n", [
    pytest.param(which, n, marks=() if (which, n) == ("fp32", 4) else pytest.mark.slow)  # the fast tier: 4, fp32
    for which in ("fp32", "int4") for n in (1, 2, 4, 8)])
def test_n_concurrent_requests_equal_their_solo_runs(which, n, request, sample_images):
    """n requests (different prompts, no/one/two images, lengths and sampling settings) from n
    threads through a pool of 4 slots: with 8 the pool is full and four wait, requests are
    admitted while others are mid-decode and finish at different steps; each gets the tokens
    it gets alone."""
    bundle = request.getfixturevalue("vision_bundle" if which == "fp32" else "int4_bundle")
    requests = _requests(n, sample_images)
    with Pipeline.load(bundle) as solo:
        alone = [solo.generate(**r).token_ids for r in requests]
    with Pipeline.load(bundle, max_batch=4) as pipe:
        assert _run_concurrently(pipe, requests, stagger=0.02) == alone
        # Whether requests overlap here depends on timing (test_concurrent_threads_... checks
        # that they decode together); the pool never holds more than its slots.
        assert pipe.scheduler.peak_active <= 4


def test_a_decode_step_that_ignores_row_lengths_is_caught(vision_bundle, sample_images, monkeypatch):
    """Planted bug: every row of a batched step attends over the longest row's length (the
    shorter rows read stale or empty cache rows). The concurrency check must fail."""
    from qwen3vl_compile.runtime.decoder_session import DecoderPool

    requests = _requests(4, sample_images)
    with Pipeline.load(vision_bundle) as solo:
        alone = [solo.generate(**r).token_ids for r in requests]
    real = DecoderPool.run

    def ignore_lengths(self, lo, lengths, *a, **k):
        return real(self, lo, [max(lengths)] * len(lengths), *a, **k)

    monkeypatch.setattr(DecoderPool, "run", ignore_lengths)
    with Pipeline.load(vision_bundle, max_batch=4) as pipe:
        assert _run_concurrently(pipe, requests) != alone


@pytest.mark.slow
def test_one_cancelled_mid_stream_while_others_continue(vision_bundle, sample_images):
    requests = _requests(3, sample_images)
    requests[1]["max_new_tokens"] = 200
    with Pipeline.load(vision_bundle) as solo:
        alone = [solo.generate(**r).token_ids for r in requests]
    with Pipeline.load(vision_bundle, max_batch=3) as pipe:
        streams = [pipe.generate(**r, stream=True) for r in requests]
        for s in streams:
            next(s)
        streams[1].close()
        assert streams[1].result.stopped == "cancelled"
        assert streams[1].result.token_ids == alone[1][: len(streams[1].result.token_ids)]
        for i in (0, 2):
            list(streams[i])
            assert streams[i].result.token_ids == alone[i]


def test_asyncio_consumers(text_bundle, alone):
    """The scheduler serves asyncio consumers too: two requests submitted from a running
    event loop, read with ``apieces()``, give their solo tokens."""
    import asyncio

    from qwen3vl_compile.runtime.sampling import SamplingConfig

    async def main(pipe):
        async def one(i):
            seq = await asyncio.to_thread(pipe.submit, prompt=PROMPTS[i], max_new_tokens=16 + 4 * i,
                                          sampling=SamplingConfig(**{k: v for k, v in SAMPLING[i].items()}))
            text = "".join([p async for p in seq.apieces()])
            return seq.result, text

        return await asyncio.wait_for(asyncio.gather(one(0), one(2)), 120)

    with Pipeline.load(text_bundle, max_batch=2) as pipe:
        (r0, t0), (r2, t2) = asyncio.run(main(pipe))
    assert (r0.token_ids, r2.token_ids) == (alone[0], alone[2])
    assert (t0, t2) == (r0.text, r2.text)
