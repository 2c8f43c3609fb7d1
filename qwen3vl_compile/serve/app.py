"""The ASGI app: OpenAI's chat-completions API on a :class:`~qwen3vl_compile.runtime.pipeline.Pipeline`.

- ``POST /v1/chat/completions``: plain or streamed (server-sent events in OpenAI's chunk
  format, ``data: [DONE]`` last, ``stream_options.include_usage``);
- ``GET /v1/models``: the bundle, with its context length; ``GET /health``; ``GET /metrics``.

A request is checked on the event loop (body size, JSON, fields), then prepared in a bounded
thread pool (images and videos read and their headers checked, the prompt's token count checked
against the context before any pixel or frame is decoded and any vision work, then
preprocessing, vision and embedding) and queued on the
engine's scheduler, whose thread hands each text piece to the request's own asyncio queue. A
client that disconnects cancels its sequence (its slot is freed at the next decode step).
Every error is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a client's
mistake is a 4xx and never logs a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ContextLengthError, Qwen3VLCompileError, RuntimeInputError
from ..runtime.sampling import SamplingConfig
from ..runtime.scheduler import QueueFull
from .errors import ApiError, bad_request
from .media import MediaPolicy, decode, read_image, read_video
from .metrics import Metrics
from .protocol import ChatRequest, StopMatcher, parse_chat_request

log = logging.getLogger("qwen3vl_compile.serve")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the app serves: the model's name, an optional Bearer key, where images may come
    from and how big they and the body may be, how many requests may wait."""

    model_name: str
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    max_body_bytes: int = 32 * 2**20
    max_waiting: int | None = None  # requests beyond the busy slots (preparing + waiting); None: no limit
    prepare_workers: int = 2  # threads that read images and run vision + embedding
    shutdown_timeout: float = 30.0
    close_pipeline: bool = True  # the app's shutdown closes the pipeline (finishing what runs)


FINISH = {"stop_token": "stop", "max_new_tokens": "length", "context": "length", "cancelled": "length"}


def create_app(pipe, options: ServeOptions):
    """The Starlette app serving ``pipe``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    server = _Server(pipe, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await server.shutdown()

    async def http_error(request, exc):
        return _error_response(ApiError(exc.status_code, str(exc.detail)))

    routes = [
        Route("/v1/chat/completions", server.endpoint(server.chat_completions), methods=["POST"]),
        Route("/v1/models", server.endpoint(server.models), methods=["GET"]),
        Route("/v1/models/{model:path}", server.endpoint(server.model), methods=["GET"]),
        Route("/health", server.endpoint(server.health), methods=["GET"]),
        Route("/metrics", server.endpoint(server.metrics_text), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = server
    return app


def _error_response(error: ApiError):
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _from_runtime(error: Exception) -> ApiError:
    """An error of the pipeline as the API's status: the client's mistake 400, a full queue
    429, a closed engine 503, a failure of ours 500 (one line: never a traceback)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, QueueFull):
        return ApiError(429, f"the server is busy: {error.args[0]}; retry later", code="queue_full")
    if isinstance(error, ContextLengthError):
        videos = re.search(r"\(videos: [^)]*\)", str(error.args[0]))  # the pipeline's count of each video
        media = f"images and videos {videos.group(0)}: shorten them or send shorter or smaller videos" if videos \
            else "images: shorten them"
        return ApiError(400, f"this model's context is {error.context_length} tokens; the messages take "
                             f"{error.prompt_tokens} tokens with their {media}",
                        param="messages", code="context_length_exceeded")
    if isinstance(error, RuntimeInputError) and error.stage == "engine":
        return ApiError(503, "the server is shutting down; no new requests", code="shutting_down")
    if isinstance(error, RuntimeInputError):
        return bad_request(str(error.args[0]))
    if isinstance(error, Qwen3VLCompileError):
        log.error("request failed: %s", error)
        return ApiError(500, str(error), code="engine_error")
    log.exception("internal error")  # a bug of ours: its traceback goes to the log, never to the client
    return ApiError(500, f"internal error ({type(error).__name__})", code="internal_error")


class _Server:
    def __init__(self, pipe, options: ServeOptions):
        self.pipe = pipe
        self.options = options
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=max(1, options.prepare_workers), thread_name_prefix="qwen3vl-prepare")
        self.preparing = 0
        self.created = int(time.time())
        self.closing = False

    # -- plumbing ---------------------------------------------------------------------------
    def endpoint(self, handler):
        """``handler`` with API errors turned into responses and every response counted."""
        async def run(request):
            try:
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 - every error becomes OpenAI's shape
                response = _error_response(_from_runtime(e))
            self.metrics.request(request.url.path if not request.url.path.startswith("/v1/models/")
                                 else "/v1/models/{model}", response.status_code)
            return response

        return run

    def check_auth(self, request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(self, request):
        limit = self.options.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body is {length} bytes, over the limit of {limit}", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None

    def check_capacity(self) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down; no new requests", code="shutting_down")
        limit = self.options.max_waiting
        if limit is None:
            return
        sched = self.pipe.scheduler
        queued = self.preparing + sched.waiting + sched.active
        if queued >= self.pipe.engine.max_batch + limit:
            raise ApiError(429, f"the server is busy: {sched.active} requests decoding, {self.preparing + sched.waiting} "
                                f"waiting (the limit is {limit}); retry later", code="queue_full")

    async def shutdown(self) -> None:
        """The app's shutdown (after uvicorn's graceful wait): refuse new requests, finish
        the running ones (cancelled after the shutdown timeout), stop the engine."""
        self.closing = True
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.options.close_pipeline:
            await asyncio.to_thread(self.pipe.close, self.options.shutdown_timeout)

    # -- endpoints --------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        status = "shutting_down" if self.closing else "ok"
        return JSONResponse({"status": status, "model": self.options.model_name},
                            status_code=503 if self.closing else 200)

    def _model_card(self) -> dict:
        ctx = self.pipe.context_length
        return {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "qwen3vl-compile",
                "context_length": ctx, "max_model_len": ctx}

    async def models(self, request):
        from starlette.responses import JSONResponse

        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        self.check_auth(request)
        name = request.path_params["model"]
        if name != self.options.model_name:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def metrics_text(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(self.pipe, self.preparing), media_type="text/plain; version=0.0.4")

    async def chat_completions(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        self.check_auth(request)
        body = await self.read_json(request)
        req = parse_chat_request(body, (self.options.model_name,))
        self.check_capacity()
        events: asyncio.Queue = asyncio.Queue()
        seq = await self._submit(req, events)
        gen = _Generation(seq, events, req.stop)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(gen, req, ident, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, seq))
        try:
            text = "".join([piece async for piece in gen.pieces()])
        finally:
            watcher.cancel()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": self.options.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage(),
        })

    async def _submit(self, req: ChatRequest, events: asyncio.Queue):
        loop = asyncio.get_running_loop()

        def sink(event) -> None:  # the scheduler's thread -> this request's queue
            if event[0] == "done":  # counted here: a cancelled request's consumer is gone
                self.metrics.finished(event[1])
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody reads this request any more
                pass

        self.preparing += 1
        future = loop.run_in_executor(self.executor, self._prepare, req, sink)
        try:
            return await future
        except asyncio.CancelledError:
            # The request's task was cancelled (client gone, shutdown): cancel what it submits.
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
            raise
        finally:
            self.preparing -= 1

    def _prepare(self, req: ChatRequest, sink):
        """In a worker thread: the images and videos read, the context checked (from the image
        and video headers), the pixels decoded, then the pipeline's own preparation (the
        videos' sampled frames decoded) and queueing. Videos sent as bytes live in a private
        temporary directory for this call only."""
        policy = self.options.media
        tmp_dir = Path(tempfile.mkdtemp(prefix="qwen3vl-video-")) if req.videos else None
        videos: dict = {}
        try:
            images = {id(ref): read_image(ref.url, ref.param, policy) for ref in req.images}
            videos = {id(ref): read_video(ref.url, ref.param, policy, tmp_dir) for ref in req.videos}
            self.pipe.check_request(messages=_with_media(req.messages, {**images, **videos}))
            images = {id(ref): decode(images[id(ref)], ref.param) for ref in req.images}
            sampling = SamplingConfig(req.temperature, req.top_k, req.top_p, req.seed)
            return self.pipe.submit(messages=_with_media(req.messages, {**images, **videos}),
                                    max_new_tokens=req.max_tokens or self.pipe.context_length, sampling=sampling,
                                    sink=sink)
        except RuntimeInputError as e:
            raise _video_error(e, req, videos) from None
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    async def _sse(self, gen: "_Generation", req: ChatRequest, ident: str, created: int):
        def chunk(delta: dict, finish=None, usage=False) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.options.model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if req.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in gen.pieces():
                yield chunk({"content": piece})
        except Exception as e:  # noqa: BLE001 - the status is sent: the error goes in the stream
            yield f"data: {json.dumps(_from_runtime(e).body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, gen.finish_reason)
        if req.include_usage:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.options.model_name,
                    "system_fingerprint": None, "choices": [], "usage": gen.usage()}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def _with_media(messages: list[dict], media: dict) -> list[dict]:
    """``messages`` with each image or video part's :class:`ImageRef` / :class:`VideoRef`
    replaced by its image or video file (``media`` keyed by the ref's id)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": p["type"], p["type"]: media[id(p[p["type"]])]} if p["type"] in ("image", "video") else p
                       for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _video_error(error: RuntimeInputError, req: ChatRequest, videos: dict) -> Exception:
    """A pipeline error about one of the request's videos (unreadable, no video stream, ...)
    as a 400 naming the content part instead of the server's file (a temporary one, or the
    resolved path); other errors unchanged."""
    if isinstance(error, ContextLengthError):
        return error
    message = str(error.args[0])
    for ref in req.videos:
        path = videos.get(id(ref))
        if path is not None and f"video {str(path)!r}" in message:
            return bad_request(message.replace(f"video {str(path)!r}", f"the video of {ref.param}"), ref.param,
                               code="invalid_video")
    return error


async def _cancel_on_disconnect(request, seq) -> None:
    """Cancel ``seq`` when the client of a plain (not streamed) request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            seq.cancel()
            return


class _Generation:
    """One request's text as it arrives, cut at the first stop string (the sequence is then
    cancelled, and the slot freed at the next step)."""

    def __init__(self, seq, events: asyncio.Queue, stops: list[str]):
        self.seq = seq
        self.events = events
        self.matcher = StopMatcher(stops)
        self.result = None

    async def _next(self):
        kind, value = await self.events.get()
        if kind == "error":
            raise value
        return kind, value

    async def pieces(self):
        try:
            while True:
                kind, value = await self._next()
                if kind == "done":
                    self.result = value
                    tail = self.matcher.flush()
                    if tail:
                        yield tail
                    return
                text = self.matcher.push(value)
                if text:
                    yield text
                if self.matcher.stopped:
                    self.seq.cancel()
                    while (event := await self._next())[0] != "done":
                        pass
                    self.result = event[1]
                    return
        finally:
            if not self.seq.finished:
                self.seq.cancel()

    @property
    def finish_reason(self) -> str:
        return "stop" if self.matcher.stopped else FINISH.get(self.result.stopped, "stop")

    def usage(self) -> dict:
        prompt, completion = self.result.prompt_tokens, len(self.result.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
