"""Batch inference on Ray Data: the items of ``qwen3vl-eval`` answered by a pool of actors,
each of which loads (and verifies) the bundle once. Needs the ``[ray]`` extra.

    from qwen3vl_compile import batch
    result = batch.run("OUT", "items.jsonl", actors=2, output="answers.parquet")
    result["bundle"]["exact"]

The items file is read and checked on this process (every line, as ``qwen3vl-eval`` does: a
bad line stops the run before any model work); the items then go to Ray Data, whose actor pool
answers them greedily. An item that fails there (an image that cannot be decoded, a prompt too
long for the context) is recorded with its error and scored as wrong, never dropped: one bad
image does not stop a night's run. The scores are ``qwen3vl-eval``'s own
(:func:`~qwen3vl_compile.runtime.eval.report`). Image and video paths are made absolute: on a
cluster they must be readable at the same path on every node, as the bundle must.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from .errors import Qwen3VLCompileError, RuntimeInputError

EXTRA_HINT = "--ray needs the [ray] extra: pip install 'qwen3vl-compile[ray]'"


class RayError(Qwen3VLCompileError):
    """Ray could not be started or joined, or its actors failed (not one item: the pool)."""

    stage = "ray"


def import_ray():
    """``ray`` (with Ray Data), or one line naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayError(EXTRA_HINT) from None
    return ray


@contextlib.contextmanager
def connected(address: str | None = None, **init_kwargs):
    """Ray for the length of the block: the instance this process already has, else the
    cluster at ``address``, else a local instance (node address 127.0.0.1, no dashboard UI) that is
    shut down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = {"address": address} if address else {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    try:
        with _quiet(None):  # its notices (token authentication, ...) are in its logs
            ray.init(**kwargs, **init_kwargs, logging_level="warning", log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ValueError...
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise RayError(f"cannot start or join {where}: {_first_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet(progress):
    """For the length of the block, what Ray prints in this process is dropped: Ray Data's
    execution logs, its driver's copies of the workers' failures (tracebacks) and its C++ core's
    log lines, to standard output and error alike (file descriptors 1 and 2 point at /dev/null).
    Our standard output holds only the results (``--json``) and an error is one line; Ray keeps
    all of it in its logs. Yields ``progress`` still writing to the real standard error (or None)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {}
    with open(os.devnull, "w") as sink:
        try:
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
                os.dup2(sink.fileno(), fd)
        except OSError:  # no such descriptor to save: Python's streams alone are redirected
            pass
        err = open(saved[2], "w", closefd=False) if 2 in saved else sys.stderr

        def show(done: int, total: int) -> None:
            with contextlib.redirect_stderr(err):
                progress(done, total)

        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield show if progress else None
        finally:
            if err is not sys.stderr:
                err.close()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


_OURS_IN_TEXT = re.compile(r"qwen3vl_compile\.errors\.(\w+): \[([\w-]+)\] ([^\n]*)")


def own_error(error: BaseException) -> Qwen3VLCompileError | None:
    """The error of ours that a Ray error carries (an actor's ``Pipeline.load`` that refused the
    bundle), if any: Ray wraps it as the cause of its own, or (an actor that died in its
    constructor) keeps only its traceback's text, whose last line of ours names the class."""
    from . import errors

    found = _OURS_IN_TEXT.findall(str(error))
    if found:
        name, stage, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, Qwen3VLCompileError):
            return cls(message.strip(), stage=stage)
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, Qwen3VLCompileError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


class Answerer:
    """One actor of the pool: the bundle loaded (its hashes, and signature with ``public_key``,
    checked) once; then each row answered greedily, timed, and its error recorded."""

    def __init__(self, bundle: str, *, threads: int = 0, on_miss: str = "fallback", max_new_tokens: int = 16,
                 public_key: str | None = None, skip_hash_check: bool = False, source: str = "items"):
        from .runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, threads=threads, on_miss=on_miss, public_key=public_key,
                                  skip_hash_check=skip_hash_check)
        self.max_new_tokens = max_new_tokens
        self.source = source
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, row: dict) -> dict:
        images, videos = json.loads(row["images"]), json.loads(row["videos"])
        text, error = "", None
        start = time.perf_counter()
        try:
            self.pipe.check_request(images, row["prompt"], videos=videos)
            text = self.pipe.generate(images, row["prompt"], videos=videos, max_new_tokens=self.max_new_tokens).text
        except Qwen3VLCompileError as e:
            error = f"[{e.stage}] {self.source} line {row['line']}: {e.args[0]}"
        except Exception as e:  # noqa: BLE001 - a bug of ours: recorded with the item, the run goes on
            error = f"[internal] {self.source} line {row['line']}: {type(e).__name__}: {e}"
        return {"index": row["index"], "prediction": text, "seconds": time.perf_counter() - start,
                "error": error, "worker": self.worker}


def _bound(cls, *args, **kwargs):
    """``cls`` with its constructor's arguments built in: Ray pickles the class with them, and an
    actor restarted by Ray needs no argument kept in the object store."""
    def __init__(self):
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


def answer_items(bundle, items: list, *, actors: int = 1, threads: int = 0, max_new_tokens: int = 16,
                 on_miss: str = "fallback", public_key=None, skip_hash_check: bool = False,
                 address: str | None = None, source=None, progress=None, actor_start_timeout: float = 600):
    """``items`` (:class:`~qwen3vl_compile.runtime.eval.EvalItem`) answered on Ray Data by
    ``actors`` actors of ``threads`` ONNX Runtime threads each (and as many Ray CPUs; 0: one
    CPU, ONNX Runtime's default threads), as a
    :class:`~qwen3vl_compile.runtime.eval.SystemResult` in the items' order with each item's
    error (None when answered). ``progress(done, total)`` is called as answers arrive. Actors that
    have not all started after ``actor_start_timeout`` seconds (a cluster without the CPUs they
    ask for, workers killed by Ray's memory monitor) stop the run with a RayError, never a hang."""
    from .bundle.check import open_checked
    from .options import check_threads, whole_number
    from .runtime.eval import SystemResult

    whole_number(actors, "actors", 1, RuntimeInputError)
    check_threads(threads, "threads", RuntimeInputError)
    whole_number(max_new_tokens, "max_new_tokens", 1, RuntimeInputError)
    bundle = os.path.abspath(bundle)
    open_checked(Path(bundle), skip_hash_check=True)  # here, at once: a missing bundle or file (actors hash it)
    source_name = Path(source).name if source else "items"
    rows = [{"index": i, "line": it.line, "prompt": it.prompt,
             "images": json.dumps([os.path.abspath(p) for p in it.images]),
             "videos": json.dumps([os.path.abspath(p) for p in it.videos])} for i, it in enumerate(items)]
    out: list[dict | None] = [None] * len(items)
    with _quiet(progress) as progress, connected(address) as ray:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours below: one bar, as without --ray
        context.wait_for_min_actors_s = max(1, round(actor_start_timeout))
        blocks = min(len(rows), max(64, 4 * actors))
        actor_class = _bound(Answerer, bundle, threads=threads, on_miss=on_miss, max_new_tokens=max_new_tokens,
                             public_key=None if public_key is None else str(public_key),
                             skip_hash_check=skip_hash_check, source=source_name)
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map(
            actor_class, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=max(1, threads))
        done = 0
        try:
            for row in ds.iter_rows():
                out[row["index"]] = row
                done += 1
                if progress:
                    progress(done, len(items))
        except Exception as e:  # noqa: BLE001 - Ray's errors: ours inside (a refused bundle) or Ray's own
            ours = own_error(e)
            if ours is not None:
                raise type(ours)(ours.args[0], stage=ours.stage) from None
            raise RayError(f"the actor pool failed after {done} of {len(items)} items: {_first_line(e)} "
                           "(Ray's logs: /tmp/ray/session_latest/logs)") from None
    missing = [it.line for it, r in zip(items, out) if r is None]
    if missing:  # never silently: Ray returned fewer rows than it was given
        raise RayError(f"Ray returned no answer for {len(missing)} item(s) (lines {missing[:10]})")
    return SystemResult("bundle", [r["prediction"] for r in out], [r["seconds"] for r in out],
                        [r["error"] for r in out])


def run(bundle, items_path, *, output=None, limit: int = 0, **options) -> dict:
    """``qwen3vl-eval BUNDLE ITEMS --ray`` as a function: the items file (JSONL or Parquet) read
    and checked, answered by :func:`answer_items` (``options``), the answers written to
    ``output`` (JSONL, or Parquet by its suffix) and the report returned."""
    from .runtime.eval import answer_rows, load_items, report, write_answers

    items = load_items(Path(items_path))
    if limit:
        items = items[:limit]
    result = answer_items(bundle, items, source=items_path, **options)
    if output is not None:
        write_answers(Path(output), answer_rows(items, result))
    return report(items, result, None)
