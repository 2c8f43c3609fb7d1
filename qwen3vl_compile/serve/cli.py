"""``qwen3vl-serve OUT``: an OpenAI-compatible chat server for a compiled bundle.

    pip install 'qwen3vl-compile[serve]'
    qwen3vl-serve OUT --max-batch 4          # http://127.0.0.1:8000/v1

SIGTERM (or Ctrl-C) stops accepting connections, lets the running requests finish (up to
``--shutdown-timeout`` seconds, then cancels them) and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..errors import Qwen3VLCompileError, UsageError

EXTRA_HINT = "qwen3vl-serve needs the [serve] extra: pip install 'qwen3vl-compile[serve]'"


class ServeError(Qwen3VLCompileError):
    stage = "serve"


def _parser():
    from ..cli_io import OneLineParser, add_video_options

    p = OneLineParser(prog="qwen3vl-serve", description="Serve a compiled bundle with OpenAI's chat-completions API.")
    p.add_argument("bundle", help="bundle directory written by qwen3vl-compile")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="requests decoded together (KV pool slots; default 4)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per slot (default: the bundle's context length)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait beyond the busy slots; more get 429 (default 64)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--api-key", default=os.environ.get("QWEN3VL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN3VL_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle's source model)")
    p.add_argument("--allowed-media-dir", default=None,
                   help="serve image and video paths (and file:// URLs) inside this directory; off by default")
    p.add_argument("--allow-url-fetch", action="store_true", help="fetch http(s) image and video URLs (off by default)")
    p.add_argument("--url-timeout", type=float, default=10.0,
                   help="with --allow-url-fetch: seconds to connect, and to read an image's or video's body (default 10)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file, in MiB (default 20)")
    p.add_argument("--max-video-mb", type=float, default=64.0,
                   help="largest video file (data: URL, fetched or local), in MiB (default 64)")
    add_video_options(p)
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, in MiB (default 32)")
    p.add_argument("--vision-cache-mb", type=int, default=256,
                   help="vision features kept by image content, in MiB (default 256; 0: none)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt whole (default: a next turn reuses the cache its conversation left)")
    p.add_argument("--prepare-workers", type=int, default=2,
                   help="threads preparing requests (images, vision, embedding) (default 2)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish (default 30)")
    p.add_argument("--on-miss", default="fallback", choices=("fallback", "fit", "error"),
                   help="image size with no bucket: PyTorch fallback (default), fit to the nearest bucket, or error")
    p.add_argument("--skip-hash-check", action="store_true", help="serve even if files differ from the manifest's hashes")
    p.add_argument("--public-key", default=None, help="PEM public key: refuse a bundle not signed by its private key")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = p.add_argument_group("Ray Serve (the [ray] extra)")
    ray.add_argument("--ray", action="store_true",
                     help="serve with Ray Serve replicas, each its own engine (--threads ONNX Runtime threads and Ray CPUs)")
    ray.add_argument("--replicas", type=int, default=None, help="with --ray: replicas (default 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="with --ray: let Ray Serve scale between MIN and MAX replicas (instead of --replicas)")
    ray.add_argument("--ray-address", default=None,
                     help="with --ray: the cluster to join (default: a local Ray instance for this server)")
    return p


def main(argv=None) -> int:
    from ..cli_io import run_cli

    return run_cli(lambda: _run(argv), "qwen3vl-serve", exiting=argv is None)


def _import_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ServeError(EXTRA_HINT) from None
    return uvicorn


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_image_mb", "max_video_mb", "max_body_mb", "shutdown_timeout", "url_timeout"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_waiting < 0 or args.prepare_workers < 1:
        raise UsageError("--max-waiting must be >= 0 and --prepare-workers >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty")
    _check_ray(args)


def _check_ray(args) -> None:
    """The one check of --ray, --replicas, --autoscale and --ray-address; ``args.autoscale``
    becomes ``(MIN, MAX)`` and ``args.replicas`` a number (default 1)."""
    given = [flag for flag, value in (("--replicas", args.replicas is not None), ("--autoscale", args.autoscale),
                                      ("--ray-address", args.ray_address)) if value]
    if not args.ray:
        if given:
            raise UsageError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --ray")
        return
    if args.replicas is not None and args.autoscale is not None:
        raise UsageError("give --replicas or --autoscale MIN:MAX, not both")
    if args.replicas is None:
        args.replicas = 1
    if args.replicas < 1:
        raise UsageError(f"--replicas must be a whole number >= 1, got {args.replicas}")
    if args.autoscale is not None:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1):
            raise UsageError(f"--autoscale {args.autoscale!r}: give MIN:MAX replicas, 0 <= MIN <= MAX, MAX >= 1 (e.g. 1:4)")
        args.autoscale = (int(low), int(high))


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    media_dir = _media_dir(args)
    if args.ray:
        from .ray_serve import serve_replicas

        _import_stack()
        return serve_replicas(args, lambda name: serve_options(args, name, media_dir), load_options(args))
    uvicorn = _import_stack()
    from ..runtime.pipeline import Pipeline
    from .app import create_app

    sock = _bind(args.host, args.port)  # before the model loads: a busy port fails at once
    try:
        pipe = Pipeline.load(args.bundle, log=say, **load_options(args))
    except BaseException:
        sock.close()
        raise
    name = model_name(args, pipe.manifest)
    app = create_app(pipe, serve_options(args, name, media_dir))
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
                            lifespan="on", server_header=False)
    host, port = sock.getsockname()[:2]
    say(f"serving {name!r} (context {pipe.context_length} tokens, {args.max_batch} slot(s), up to {args.max_waiting} "
        f"waiting) at {_url(host, port)}" + (" with an API key" if args.api_key else ""))
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
        pipe.close(timeout=0)  # already closed by the app's shutdown, unless startup failed
    say("stopped")
    return 0


def say(msg: str) -> None:
    print(f"qwen3vl-serve: {msg}", file=sys.stderr, flush=True)


def _url(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"


def _media_dir(args) -> Path | None:
    if args.allowed_media_dir is None:
        return None
    media_dir = Path(os.path.realpath(args.allowed_media_dir))
    if not media_dir.is_dir():
        raise UsageError(f"--allowed-media-dir {args.allowed_media_dir!r} is not a directory")
    return media_dir


def load_options(args) -> dict:
    """``Pipeline.load``'s keywords from the options (one engine: the server's, or a replica's)."""
    from ..cli_io import video_options

    return dict(threads=args.threads, on_miss=args.on_miss, skip_hash_check=args.skip_hash_check,
                public_key=args.public_key, max_batch=args.max_batch, max_length=args.max_length,
                vision_cache_mb=args.vision_cache_mb, max_waiting=args.max_waiting,
                reuse_prefix=not args.no_prefix_reuse, **video_options(args))


def model_name(args, manifest: dict) -> str:
    return args.model_name or str((manifest.get("source") or {}).get("model") or Path(args.bundle).resolve().name)


def serve_options(args, name: str, media_dir: Path | None):
    """The app's :class:`~.app.ServeOptions` from the options."""
    from .app import ServeOptions
    from .media import MediaPolicy

    return ServeOptions(
        model_name=name, api_key=args.api_key,
        media=MediaPolicy(allowed_dir=media_dir, allow_url_fetch=args.allow_url_fetch,
                          url_timeout_s=args.url_timeout,
                          max_image_bytes=int(args.max_image_mb * 2**20),
                          max_video_bytes=int(args.max_video_mb * 2**20)),
        max_body_bytes=int(args.max_body_mb * 2**20), max_waiting=args.max_waiting,
        prepare_workers=args.prepare_workers, shutdown_timeout=args.shutdown_timeout,
    )


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without re-raising SIGTERM/SIGINT after its graceful shutdown: the
        requests in flight are finished and the process exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config):  # noqa: N802 - a class made on first use (uvicorn is an optional extra)
    return _server_class()(config)


if __name__ == "__main__":
    sys.exit(main())
