"""Ray Serve's HTTP proxy, answering in OpenAI's error shape where it would not.

When a replica dies with requests in flight (killed, out of memory, its node lost), Ray Serve's
proxy ends those requests without a response of ours: a request whose response had not started
would get uvicorn's bare ``500 Internal Server Error`` (text), and a stream already started
would be cut off mid-body (the client sees a broken connection). Its own refusals (a timeout,
no replica available) are plain text too. :class:`OpenAIErrors` wraps the proxy's ASGI app so
that a client always gets the shape the single-process server gives:

- no response started: ``503`` ``{"error": {..., "code": "replica_unavailable"}}`` (OpenAI's
  clients retry a 503 by themselves);
- a stream (``text/event-stream``) cut off: an error event ``data: {"error": {...}}`` and
  ``data: [DONE]``, as the server sends when generation fails mid-stream (the status, 200, was
  already sent); OpenAI's client raises ``APIError`` with that body;
- a 4xx/5xx of Ray Serve's own in text: the same status, its message in OpenAI's shape.

Ray Serve loads it in the proxy from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (which must be
in the proxy's environment when Serve starts); ``qwen3vl-serve --ray`` sets it for the local Ray
instance it starts. Answers of our app (JSON, or a finished stream) pass through untouched.
"""

from __future__ import annotations

import json

from .errors import ApiError

IMPORT_PATH = "qwen3vl_compile.serve.ray_proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REPLICA_GONE = "the replica serving this request stopped before it finished; retry (Ray Serve replaces the replica)"


def middlewares() -> list:
    """What Ray Serve's proxy calls (through :data:`ENV`): the middleware list to wrap itself in."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]


def _error_body(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(ApiError(status, message, code=code).body()).encode()


class OpenAIErrors:
    """Pure ASGI middleware (streams pass through chunk by chunk): see the module's docstring."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "done": False, "sse": False, "held": None, "text": b""}

        async def relay(message):
            kind = message["type"]
            if kind == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers") or []}
                ctype = headers.get(b"content-type", b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                    state["held"] = message  # Serve's own error in text: rewritten when its body ends
                    return
                state["started"], state["sse"] = True, ctype.startswith(b"text/event-stream")
            elif kind == "http.response.body":
                if state["held"] is not None:
                    state["text"] += message.get("body", b"")
                    if not message.get("more_body", False):
                        await self._rewrite(send, state)
                    return
                if not message.get("more_body", False):
                    state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, relay)
        except Exception:  # noqa: BLE001 - whatever broke the proxy's answer: the client still gets one
            pass
        if state["done"]:
            return
        try:
            if state["held"] is not None:
                await self._rewrite(send, state)
            elif not state["started"]:
                await _send_json(send, 503, _error_body(503, REPLICA_GONE, "replica_unavailable"))
            elif state["sse"]:
                event = b"data: " + _error_body(503, REPLICA_GONE, "replica_unavailable") + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
            # a JSON body cut off halfway (never seen: our app sends a JSON body in one message) is
            # left as it is: the connection closes and the client sees a broken response
        except Exception:  # noqa: BLE001 - the client has gone: nothing to tell it
            pass

    @staticmethod
    async def _rewrite(send, state):
        held = state["held"]
        state["held"], state["done"] = None, True
        status = held["status"]
        lines = [line.strip() for line in state["text"].decode("utf-8", "replace").splitlines() if line.strip()]
        message = (lines[0] if lines else f"HTTP {status} from Ray Serve")[:500]
        extra = [(k, v) for k, v in held.get("headers") or [] if k.lower() == b"retry-after"]
        await _send_json(send, status, _error_body(status, message), extra)


async def _send_json(send, status: int, body: bytes, extra_headers=()):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
