"""``qwen3vl-serve OUT --ray``: the same app (routes, errors, metrics) as Ray Serve replicas.

Each replica is one engine: it loads the bundle itself (its hashes, and its signature with
``--public-key``, checked in :meth:`Pipeline.load <qwen3vl_compile.runtime.pipeline.Pipeline.load>`)
and only then builds the app of :func:`~.app.create_app`, so a replica that fails verification
never takes traffic; when every try of a replica fails, the deployment refuses to start with
the bundle's one-line error. Ray Serve's proxy listens on ``--host``/``--port`` and spreads the
requests over the replicas; ``/metrics`` is the metrics of the replica that answers. The proxy
answers in OpenAI's error shape when a replica dies mid-request (:mod:`.ray_proxy`).

The equivalent ``serve run`` config is in the README (the import path is
:func:`app_builder`'s: ``qwen3vl_compile.serve.ray_serve:app_builder``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from ..batch import RayError, connected, import_ray, own_error

APP_NAME = "qwen3vl"


class Replica:
    """One replica: the bundle loaded and verified, then the app built on it."""

    def __init__(self, bundle: str, load: dict, options):
        from ..runtime.pipeline import Pipeline
        from .app import create_app

        self.pipe = Pipeline.load(bundle, **load)
        self.starlette_app = create_app(self.pipe, options)

    def __serve_build_asgi_app__(self):
        return self.starlette_app


def deployment(bundle: str, load: dict, options, *, replicas: int = 1, autoscale: tuple[int, int] | None = None):
    """The bound Ray Serve application: ``replicas`` replicas (or ``autoscale`` = (MIN, MAX)),
    each of ``load["threads"]`` Ray CPUs (at least 1), as many requests in flight per replica as
    its engine admits (its slots and waiting queue: more get the app's own 429); a replica that
    stops lets its running requests finish for ``options.shutdown_timeout`` seconds, as the
    single-process server does."""
    from ray import serve

    in_flight = max(1, load.get("max_batch", 1) + (load.get("max_waiting") or 0))
    settings = {"ray_actor_options": {"num_cpus": max(1, load.get("threads") or 0)}, "max_ongoing_requests": in_flight,
                "graceful_shutdown_timeout_s": options.shutdown_timeout, "graceful_shutdown_wait_loop_s": 0.5}
    if autoscale is not None:
        low, high = autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                          "target_ongoing_requests": max(1, load.get("max_batch", 1))}
    else:
        settings["num_replicas"] = replicas
    cls = serve.deployment(serve.ingress()(Replica), name="qwen3vl", **settings)
    return cls.bind(str(Path(bundle).resolve()), load, options)


def serve_replicas(args, make_options, load: dict) -> int:
    """Start the deployment (on a local Ray instance or the cluster at ``--ray-address``), wait
    for SIGTERM or Ctrl-C, shut it down."""
    from ..batch import _quiet
    from ..bundle.check import load_manifest
    from .cli import _url, model_name, say

    import_ray()
    manifest = load_manifest(Path(args.bundle))  # here, at once: not a bundle (replicas check every file)
    options = make_options(model_name(args, manifest))
    stop = threading.Event()
    previous = {}
    # The proxy's middleware (OpenAI-shaped errors when a replica dies): in the environment of the
    # local Ray instance started below, whose processes (the proxy's among them) inherit it.
    from .ray_proxy import ENV, IMPORT_PATH

    os.environ.setdefault(ENV, IMPORT_PATH)
    try:
        with connected(args.ray_address):  # Ray for as long as we serve
            from ray import serve

            # From here on (Serve's start included; after ray.init, which sets its own SIGTERM
            # handler), SIGTERM or Ctrl-C stops the server cleanly: Serve and Ray shut down, exit 0.
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

            app = deployment(args.bundle, load, options, replicas=args.replicas, autoscale=args.autoscale)
            try:
                with _quiet(None):
                    serve.start(http_options={"host": args.host, "port": args.port})
                    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            except Exception as e:  # noqa: BLE001 - Ray Serve's errors: ours inside (a refused bundle) or its own
                with _quiet(None):
                    why = _deployment_message(serve)
                    serve.shutdown()
                ours = own_error(RuntimeError(f"{e}\n{why}"))
                if ours is not None:
                    raise type(ours)(f"no replica started: {ours.args[0]}", stage=ours.stage) from None
                raise RayError(f"the deployment did not start: {type(e).__name__}: {_first(e)}") from None
            count = f"{args.autoscale[0]} to {args.autoscale[1]} replicas" if args.autoscale else f"{args.replicas} replica(s)"
            say(f"serving {options.model_name!r} with {count} on Ray Serve at {_url(args.host, args.port)}"
                + (" with an API key" if args.api_key else ""))
            try:
                while not stop.wait(0.5):
                    pass
            finally:
                with _quiet(None):
                    serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped")
    return 0


def _deployment_message(serve) -> str:
    """What Ray Serve says of the deployment (a failed replica's traceback), or ''."""
    try:
        app = serve.status().applications.get(APP_NAME)
        return "\n".join([app.message, *(d.message for d in app.deployments.values())]) if app else ""
    except Exception:  # noqa: BLE001 - only to explain a failure already being reported
        return ""


def _first(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def app_builder(config: dict):
    """``serve run qwen3vl_compile.serve.ray_serve:app_builder bundle=OUT [replicas=2] ...``:
    the deployment from ``qwen3vl-serve``'s own options, given as ``key=value`` (names without
    the leading dashes, ``_`` or ``-``: ``bundle``, ``replicas``, ``threads``, ``max_batch``,
    ``public_key``, ...)."""
    from .cli import _check, _media_dir, _parser, load_options, model_name, serve_options

    argv = [str(config["bundle"]), "--ray"]
    for key, value in config.items():
        if key == "bundle":
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True or value == "true" else [] if value in (False, "false") else [flag, str(value)]
    args = _parser().parse_args(argv)
    _check(args)
    from ..bundle.check import load_manifest

    options = serve_options(args, model_name(args, load_manifest(Path(args.bundle))), _media_dir(args))
    return deployment(args.bundle, load_options(args), options, replicas=args.replicas, autoscale=args.autoscale)
