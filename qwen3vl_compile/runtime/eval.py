"""``qwen3vl-eval OUT ITEMS.jsonl``: what a bundle costs in answers.

Runs the bundle greedily over a JSONL file of ``{"images": [...], "videos": [...], "prompt": ...,
"answer": ...}`` (image and video paths relative to the JSONL file; ``images`` and ``videos`` may
be empty or left out; videos need the ``[video]`` extra and follow the images in the prompt) and scores each answer
case-insensitively, both as an exact match (after trimming spaces and a final full stop) and
as a contains-match. With ``--reference MODEL`` (a checkpoint directory or preset) Hugging Face
answers the same items in fp32: the accuracy of each, the rate at which the two agree, and
the items where they differ. ``--json`` prints one JSON object instead of the table.

The whole file is checked before any model work: a line that is not a JSON object with those
fields, an image or video that does not exist or cannot be read (from its header: no pixel
or frame is decoded), an image smaller than one patch, or a prompt too long for the bundle's
context with its images and videos, is refused with the file's name and the line number. ``--reference`` must be the
checkpoint the bundle was compiled from (the manifest records its config's sha256).
Answers are scored case-insensitively; ``contains`` matches the answer as whole words only
(``5`` is not found in ``<unused1250>``).

The items may be a Parquet file (``.parquet``: the same fields as columns; needs the ``[ray]``
extra). ``--output FILE`` writes each item's answer, scores, seconds and error (JSONL, or Parquet
by its suffix). ``--ray [--actors N] [--ray-address ADDR]`` answers the items on a Ray Data actor
pool (:mod:`qwen3vl_compile.batch`) with the same scores; there an item that fails (once the file
has been checked) is recorded with its error and scored as wrong instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from ..errors import LoadError, OutputError, RuntimeInputError


@dataclasses.dataclass(frozen=True)
class EvalItem:
    line: int
    images: tuple[Path, ...]
    prompt: str
    answer: str
    kind: str | None = None
    videos: tuple[Path, ...] = ()


def load_items(path: Path) -> list[EvalItem]:
    """Parse and check every line (JSONL) or row (``.parquet``, needs pyarrow: the ``[ray]``
    extra); raise RuntimeInputError naming the first bad one."""
    path = Path(path)
    if path.is_dir():
        raise RuntimeInputError(f"{path}: is a directory; give the JSONL items file")
    if not path.is_file():
        raise RuntimeInputError(f"{path}: not found")
    if path.suffix == ".parquet":
        rows = ((n, f"{path.name} row {n}", obj) for n, obj in enumerate(_parquet_rows(path), 1))
    else:
        rows = _jsonl_rows(path)
    out = [_item(obj, n, where, path) for n, where, obj in rows]
    if not out:
        raise RuntimeInputError(f"{path}: no items (one JSON object per line)")
    return out


def _jsonl_rows(path: Path):
    """``(line number, where, object)`` of each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeInputError(f"{path}: unreadable ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield n, where, obj


def _parquet_rows(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeInputError(f"{path}: Parquet items need pyarrow: pip install 'qwen3vl-compile[ray]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow's errors have no common base of their own
        raise RuntimeInputError(f"{path}: unreadable as Parquet ({type(e).__name__}: {e})") from None
    return [{k: v for k, v in row.items() if v is not None} for row in rows]  # a null column is a field left out


def _item(obj, n: int, where: str, path: Path) -> EvalItem:
    """One line's (or row's) object as an item, its fields and files checked."""
    if not isinstance(obj, dict):
        raise RuntimeInputError(f"{where}: not a JSON object")
    prompt, answer = obj.get("prompt"), obj.get("answer")
    media = {}
    for key in ("images", "videos"):
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise RuntimeInputError(f"{where}: \"{key}\" must be a list of paths")
        media[key] = _paths(value, key[:-1], path, where)
    for key, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise RuntimeInputError(f"{where}: \"{key}\" must be a non-empty string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\\ud800"
            raise RuntimeInputError(f"{where}: \"{key}\" is not valid Unicode text (lone surrogate "
                                    f"U+{ord(value[e.start]):04X} at character {e.start})") from None
    kind = obj.get("kind")
    return EvalItem(n, media["images"], prompt, answer, kind if isinstance(kind, str) else None, media["videos"])


def _paths(names: list[str], what: str, items_file: Path, where: str) -> tuple[Path, ...]:
    """``names`` relative to the items file, each an existing file."""
    paths = tuple(items_file.parent / i for i in names)
    for i, p in zip(names, paths):
        if p.is_dir():
            raise RuntimeInputError(f"{where}: {what} {i} is a directory (paths are relative to {items_file.parent})")
        if not p.is_file():
            raise RuntimeInputError(f"{where}: {what} {i} not found (paths are relative to {items_file.parent})")
    return paths


def check_items(pipe, items: list[EvalItem], source: Path) -> None:
    """Every item through the checks that need no model work (image and video headers, sizes,
    the prompt's token count against the bundle's context), each failure naming its line."""
    for it in items:
        try:
            pipe.check_request([str(p) for p in it.images], it.prompt, videos=list(it.videos))
        except RuntimeInputError as e:
            raise RuntimeInputError(f"{Path(source).name} line {it.line}: {e.args[0]}") from None


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!").strip()


def contains(prediction: str, answer: str) -> bool:
    """``answer`` in ``prediction`` as whole words: not inside a longer word or number
    (``5`` is not in ``<unused1250>``); both already normalized."""
    if not answer:
        return False
    left = r"(?<!\w)" if re.match(r"\w", answer[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", answer[-1]) else ""
    return re.search(left + re.escape(answer) + right, prediction) is not None


def score(prediction: str, answer: str) -> tuple[bool, bool]:
    """(exact, contains), case-insensitive; contains on word boundaries."""
    p, a = normalize(prediction), normalize(answer)
    return p == a, contains(p, a)


@dataclasses.dataclass
class SystemResult:
    """One system's answer to each item and the seconds it took. ``errors``: the error of each
    item that failed (None for the others; ``qwen3vl-eval --ray`` records a failed item instead of
    stopping), whose prediction is then empty and scored as wrong."""

    name: str
    predictions: list[str]
    seconds: list[float]
    errors: list[str | None] | None = None

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors or ())

    def accuracy(self, items: list[EvalItem]) -> dict:
        exact = [score(p, it.answer)[0] for p, it in zip(self.predictions, items)]
        contains = [score(p, it.answer)[1] for p, it in zip(self.predictions, items)]
        by_kind: dict[str, list[bool]] = {}
        for it, e in zip(items, exact):
            by_kind.setdefault(it.kind or "all", []).append(e)
        return {"exact": sum(exact) / len(items), "contains": sum(contains) / len(items),
                "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
                "seconds_per_item": sum(self.seconds) / len(items)}

    def subset(self, indices) -> "SystemResult":
        """The same system's answers on the items at ``indices`` only."""
        indices = list(indices)
        return SystemResult(self.name, [self.predictions[i] for i in indices], [self.seconds[i] for i in indices],
                            None if self.errors is None else [self.errors[i] for i in indices])


def answer_all(name: str, answer, items: list[EvalItem], progress=None) -> SystemResult:
    """``answer(item) -> text`` on every item, timed, with progress."""
    preds, secs = [], []
    for i, it in enumerate(items):
        t = time.perf_counter()
        preds.append(answer(it))
        secs.append(time.perf_counter() - t)
        if progress:
            progress(i + 1, len(items))
    return SystemResult(name, preds, secs)


def run_bundle(pipe, items: list[EvalItem], max_new_tokens: int, progress=None, *, source=None) -> SystemResult:
    where = f"{Path(source).name} line" if source else "line"

    def answer(it: EvalItem) -> str:
        try:
            return pipe.generate([str(p) for p in it.images], it.prompt, videos=list(it.videos),
                                 max_new_tokens=max_new_tokens).text
        except RuntimeInputError as e:  # found only when decoding (a truncated image or video): name the line
            raise RuntimeInputError(f"{where} {it.line}: {e.args[0]}") from None

    return answer_all("bundle", answer, items, progress)


def _reference_imports():
    try:
        from ..model.hf_reference import make_hf_generate
    except ImportError as e:  # the slim runtime
        raise RuntimeInputError(f"--reference needs torch and transformers ({e.name} is missing): "
                                "pip install 'qwen3vl-compile[compile]'") from None
    return make_hf_generate


def _reference_source(model: str):
    """``resolve_model_source`` with its errors naming --reference (they say --model)."""
    from ..model.checkpoint import resolve_model_source

    try:
        return resolve_model_source(model)
    except LoadError as e:
        raise LoadError(str(e.args[0]).replace("--model ", "--reference ")) from None


def check_reference(model: str, manifest: dict) -> None:
    """Refuse a --reference that is not the checkpoint the bundle was compiled from: their
    config.json differ (the manifest records the source config's sha256)."""
    from ..model.checkpoint import Checkpoint

    _reference_imports()  # a slim install is told before any work
    recorded = (manifest.get("source") or {}).get("config_sha256")
    if not recorded:  # a manifest from before the field: nothing to compare with
        return
    path = _reference_source(model)
    try:
        actual = Checkpoint.open(path).config_sha256
    except LoadError as e:
        raise LoadError(f"--reference {model!r}: {e.args[0]}") from None
    if actual != recorded:
        compiled_from = (manifest.get("source") or {}).get("model")
        raise RuntimeInputError(
            f"--reference {model!r} is not the checkpoint the bundle was compiled from ({compiled_from!r}): "
            f"its config.json sha256 is {actual[:16]}..., the bundle's manifest records {str(recorded)[:16]}...")


def run_reference(model: str, items: list[EvalItem], max_new_tokens: int, decode, progress=None) -> SystemResult:
    """Hugging Face ``generate`` in fp32 on the same items (needs torch and transformers)."""
    make_hf_generate = _reference_imports()
    try:  # our progress bar is the one to show
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers comes with the compile extra
        pass
    generate = make_hf_generate(_reference_source(model))

    def answer(it: EvalItem) -> str:
        # Hugging Face samples the frames itself (its processor's fps and bounds): give it all of them.
        videos = [_all_frames(v) for v in it.videos]
        return decode(generate([str(p) for p in it.images], it.prompt, max_new_tokens, videos=videos))

    return answer_all("reference", answer, items, progress)


def _all_frames(path: Path) -> tuple:
    """``(frames, fps)`` of every frame of a video file, for the reference."""
    from .video import VideoProcessorConfig, load_video

    clip = load_video(path, VideoProcessorConfig(do_sample_frames=False))
    return clip.frames, clip.fps


def report(items: list[EvalItem], bundle: SystemResult, reference: SystemResult | None) -> dict:
    out = {"items": len(items), "bundle": bundle.accuracy(items)}
    if bundle.failed:
        out["failed"] = [{"line": it.line, "error": e} for it, e in zip(items, bundle.errors) if e is not None]
    if reference is not None:
        out["reference"] = reference.accuracy(items)
        same = [normalize(a) == normalize(b) for a, b in zip(bundle.predictions, reference.predictions)]
        out["agreement"] = sum(same) / len(items)
        out["differences"] = [{"line": it.line, "prompt": it.prompt, "answer": it.answer, "bundle": a, "reference": b}
                              for it, a, b, s in zip(items, bundle.predictions, reference.predictions, same) if not s]
    return out


def answer_rows(items: list[EvalItem], result: SystemResult) -> list[dict]:
    """One row per item, in the items' order: its line, prompt and answer, the prediction, its
    scores, the seconds it took and its error (None when it was answered)."""
    errors = result.errors or [None] * len(items)
    rows = []
    for it, pred, sec, err in zip(items, result.predictions, result.seconds, errors):
        exact, has = score(pred, it.answer)
        rows.append({"line": it.line, "prompt": it.prompt, "answer": it.answer, "kind": it.kind,
                     "images": [str(p) for p in it.images], "videos": [str(p) for p in it.videos],
                     "prediction": pred, "exact": exact, "contains": has, "seconds": sec, "error": err})
    return rows


def write_answers(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSONL, or as Parquet when ``path`` ends in ``.parquet`` (needs pyarrow: the
    ``[ray]`` extra)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise RuntimeInputError(f"--output {path}: Parquet needs pyarrow: pip install 'qwen3vl-compile[ray]'") from None
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as e:
        raise OutputError(f"--output {path}: cannot write ({e.strerror or e})") from None


def _progress(label: str, enabled: bool):
    if not enabled:
        return None

    def show(done: int, total: int) -> None:
        width = 30
        bar = "#" * (width * done // total)
        sys.stderr.write(f"\r{label:<10} [{bar:<{width}}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _print_table(r: dict) -> None:
    rows = [("system", "exact", "contains", "s/item")]
    for name in ("bundle", "reference"):
        if name in r:
            a = r[name]
            rows.append((name, f"{a['exact']:.1%}", f"{a['contains']:.1%}", f"{a['seconds_per_item']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    kinds = r["bundle"]["by_kind"]
    if len(kinds) > 1:
        print("by kind (exact): " + ", ".join(
            f"{k} {v:.0%}" + (f" / {r['reference']['by_kind'][k]:.0%}" if "reference" in r else "") for k, v in kinds.items()))
    if r.get("failed"):
        print(f"failed: {len(r['failed'])} of {r['items']} items (scored as wrong)")
        for f in r["failed"][:10]:
            print(f"  line {f['line']}: {f['error']}")
    if "agreement" in r:
        print(f"agreement: {r['agreement']:.1%} of {r['items']} items")
        for d in r["differences"][:10]:
            print(f"  line {d['line']}: {d['prompt']!r} answer {d['answer']!r}: bundle {d['bundle']!r}, reference {d['reference']!r}")
        if len(r["differences"]) > 10:
            print(f"  ... {len(r['differences']) - 10} more (--json lists all)")


def _parser():
    from ..cli_io import OneLineParser

    p = OneLineParser(prog="qwen3vl-eval", description="Accuracy of a bundle (and of Hugging Face) on a JSONL eval set.")
    p.add_argument("bundle", help="bundle directory written by qwen3vl-compile")
    p.add_argument("items", type=Path, help='JSONL: {"images": [...], "videos": [...], "prompt": ..., "answer": ...} per line')
    p.add_argument("--reference", default=None, help="checkpoint directory or preset to answer the same items with Hugging Face (fp32)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    p.add_argument("--on-miss", default="fallback", choices=("fallback", "fit", "error"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object with every figure and difference")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", type=Path, default=None,
                   help="write each item's answer, scores, seconds and error (JSONL, or Parquet if it ends in .parquet)")
    ray = p.add_argument_group("Ray Data (the [ray] extra)")
    ray.add_argument("--ray", action="store_true",
                     help="answer the items on a Ray actor pool (each actor loads the bundle once); "
                          "a failed item is recorded with its error instead of stopping the run")
    ray.add_argument("--actors", type=int, default=1, help="with --ray: actors, each with its own copy of the model (default 1)")
    ray.add_argument("--ray-address", default=None,
                     help="with --ray: the cluster to join (default: a local Ray instance for this run)")
    return p


def main(argv=None) -> int:
    from ..cli_io import run_cli

    return run_cli(lambda: _main(argv), "qwen3vl-eval", exiting=argv is None)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    from ..options import check_threads, whole_number
    from .pipeline import Pipeline

    check_threads(args.threads, "--threads", RuntimeInputError)
    whole_number(args.limit, "--limit", 0, RuntimeInputError)
    whole_number(args.max_new_tokens, "--max-new-tokens", 1, RuntimeInputError)
    _check_ray_options(args)
    items = load_items(args.items)
    if args.limit:
        items = items[: args.limit]
    show = not args.quiet and sys.stderr.isatty()
    if args.ray:
        from ..batch import answer_items

        bundle = answer_items(args.bundle, items, actors=args.actors, threads=args.threads,
                              max_new_tokens=args.max_new_tokens, on_miss=args.on_miss, address=args.ray_address,
                              source=args.items, progress=_progress("bundle", show))
        reference = None
    else:
        pipe = Pipeline.load(args.bundle, threads=args.threads, on_miss=args.on_miss)
        check_items(pipe, items, args.items)  # before any model work: every item, named by its line
        if args.reference:
            check_reference(args.reference, pipe.manifest)
        bundle = run_bundle(pipe, items, args.max_new_tokens, _progress("bundle", show), source=args.items)
        reference = None
        if args.reference:
            reference = run_reference(args.reference, items, args.max_new_tokens, pipe.chat.decode, _progress("reference", show))
    if args.output is not None:
        write_answers(args.output, answer_rows(items, bundle))
    result = report(items, bundle, reference)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_table(result)
    return 0


def _check_ray_options(args) -> None:
    """The one check of --ray, --actors and --ray-address (before the items are read)."""
    from ..errors import UsageError
    from ..options import whole_number

    if not args.ray:
        given = [flag for flag, value in (("--actors", args.actors != 1), ("--ray-address", args.ray_address)) if value]
        if given:
            raise UsageError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --ray")
        return
    whole_number(args.actors, "--actors", 1, UsageError)
    if args.reference:
        raise UsageError("--reference runs Hugging Face in this process, item after item: run it without --ray")


if __name__ == "__main__":
    sys.exit(main())
