"""``qwen3vl-compile inspect OUT``, ``qwen3vl-compile verify OUT [--public-key PUB]`` and
``qwen3vl-compile sign OUT --key KEY`` (torch-free).

``verify`` checks the manifest's shape and integrity, every file's size and sha256, that the
bundle holds no file the manifest does not list, the text golden (chat template, tokenizer,
processor settings), then each graph's interface and its golden input with ONNX Runtime,
judged with this tool's tolerance table for the recorded precision; it prints a table of max
errors and exits 0 only when everything holds (else one ``[verify]`` line on stderr, exit 1).

It stands above both ``bundle/`` (the bundle's format and checks) and ``runtime/`` (whose
text side the text golden reruns).
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError, VerifyError
from .options import check_threads
from .parity import parity_summary


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_bundle(root: Path) -> int:
    from .bundle.check import check_manifest_integrity, load_manifest
    from .bundle.records import BundleManifest
    from .bundle.signing import integrity_line

    m = load_manifest(root)
    integrity = "ok"
    try:
        check_manifest_integrity(root, m)
    except BundleError as e:
        integrity = f"FAILED ({e})"
    src = m.get("source", {})
    print(f"bundle     {Path(root).resolve()}")
    print(f"schema     {m['schema']} v{m['schema_version']}   created {m.get('created')}   manifest integrity {integrity}")
    print(integrity_line(root))
    print(f"tool       {m['tool']['name']} {m['tool']['version']}; " + ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items() if v))
    print(f"source     {src.get('model')} ({src.get('architecture')}), config sha256 {str(src.get('config_sha256'))[:16]}")
    print("options    " + ", ".join(f"{k}={v}" for k, v in m.get("options", {}).items()))
    typed = BundleManifest.from_json(m)
    if typed.buckets:
        print("buckets    " + ", ".join(f"{b.name} (grid {b.grid_thw[1]}x{b.grid_thw[2]}, {b.num_tokens} tokens)" for b in typed.buckets))
    print("graphs")
    for name, g in typed.graphs.items():
        size = sum(m["files"].get(f, {}).get("bytes", 0) for f in [g.file, *g.data_files])
        parity = m.get("parity", {}).get(name)
        verdict = parity_summary(parity) if parity else "not verified"
        passes = ", ".join(p.name + ("*" if p.modified else "") for p in g.passes)
        if g.source_graph and g.data_files:  # an onnxruntime-genai wrapper reading its source's data
            size = m["files"].get(g.file, {}).get("bytes", 0)
            verdict += f"; external weights shared with {g.source_graph}"
        print(f"  {name:<18} {g.kind:<9} {g.precision:<5} {_fmt_bytes(size):>9}  {verdict}")
        print(f"  {'':<18} passes: {passes}  (* = changed the graph)")
    total = sum(f["bytes"] for f in m.get("files", {}).values())
    print(f"files      {len(m.get('files', {}))} files, {_fmt_bytes(total)}")
    if m.get("peak_rss_bytes"):
        print(f"compile    peak RSS {_fmt_bytes(m['peak_rss_bytes'])}; " + ", ".join(f"{k} {v:.1f}s" for k, v in m.get("timings", {}).items()))
    return 0


def verify_bundle(root: Path, *, threads: int = 0, public_key: Path | None = None) -> int:
    """Print the check, one row per graph output; return 0 when everything holds, else raise
    VerifyError naming what failed (one line on stderr, exit 1). With ``public_key`` the
    bundle's signature is checked first."""
    from .bundle.check import check_files, check_manifest_integrity, load_manifest, unknown_files
    from .ort.session import ort_session
    from .bundle.goldens import check_golden, check_interface, table_tolerance
    from .runtime.text_golden import check_text_golden
    from .bundle.signing import integrity_line, verify as verify_signature

    check_threads(threads)
    m = load_manifest(root)
    # The signature first: it vouches for every file, the manifest included.
    print(verify_signature(root, public_key) if public_key is not None else integrity_line(root))
    check_manifest_integrity(root, m)
    problems = check_files(root, m)
    if problems:
        for p in problems:
            print(f"FAIL  {p}")
        print(f"verify: {len(problems)} file problem(s); graphs were not run")
        raise VerifyError(f"{root}: {len(problems)} file problem(s), graphs not run: " + "; ".join(problems))
    print(f"files: {len(m['files'])} ok (sizes and sha256 match the manifest)")
    failed: list[str] = []
    unknown = unknown_files(root, m)
    for rel in unknown:
        print(f"UNKNOWN  {rel}: not written by the compiler (the manifest does not list it)")
    if unknown:
        failed.append(f"{len(unknown)} file(s) the manifest does not list ({', '.join(unknown[:5])}"
                      f"{', ...' if len(unknown) > 5 else ''}): remove them")
    text = check_text_golden(root, m)
    for p in text:
        print(f"FAIL  text golden: {p}")
    print("text golden: " + ("ok (chat template, tokenizer, stop tokens, processor settings as compiled)" if not text
                             else f"FAIL ({len(text)} difference(s))"))
    if text:
        failed.append("text golden (tokenizer, chat template or processor settings differ from the compile's)")
    rows, bad_graphs = [], []
    for name, graph in m["graphs"].items():
        graph_ok = _verify_graph(root, m, name, graph, threads, rows, ort_session, check_interface, check_golden,
                                 table_tolerance)
        if not graph_ok:
            bad_graphs.append(name)
    widths = [max(len(str(r[i])) for r in rows + [("graph", "output", "max abs", "max rel", "verdict")]) for i in range(5)]
    for r in [("graph", "output", "max abs", "max rel", "verdict"), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if bad_graphs:
        failed.insert(0, f"{len(bad_graphs)} of {len(m['graphs'])} graph(s) failed ({', '.join(bad_graphs)})")
    if failed:
        print("verify: FAILED")
        raise VerifyError(f"{root}: " + "; ".join(failed))
    print("verify: all graphs within tolerance")
    return 0


def _verify_graph(root, m, name, graph, threads, rows, ort_session, check_interface, check_golden, table_tolerance) -> bool:
    """One graph: load, interface, golden at the table's tolerance; rows appended; ok?"""
    def fail(what, verdict):
        rows.append((name, what, "-", "-", f"FAIL ({verdict})"))
        return False

    entry = m.get("parity", {}).get(name, {})
    if "golden" not in entry:
        if str(entry.get("golden_source", "")).startswith("not recorded"):
            rows.append((name, "-", "-", "-", f"no golden: {entry['golden_source']}"))
            return True
        return fail("-", "no golden (compiled with --no-verify)")
    try:
        tolerance = table_tolerance(m, name)
    except BundleError as e:
        return fail("-", str(e).removeprefix("[bundle] "))
    try:
        session = ort_session(Path(root) / graph["file"], threads)
    except Exception as e:  # onnxruntime's own error types: a file it cannot load
        return fail("load", f"ONNX Runtime cannot load it: {_first_line(e)}")
    problems = check_interface(session, m, name)
    if problems:  # the golden would not fit this graph: stop here
        for p in problems:
            rows.append((name, "interface", "-", "-", f"FAIL ({p})"))
        return False
    recorded = entry["golden"].get("tolerance_max_rel")
    if recorded != tolerance:
        rows.append((name, "-", "-", "-", f"note: the manifest's tolerance {recorded!r} is ignored; "
                                          f"this tool's table says {tolerance:.1e}"))
    try:
        res = check_golden(root, m, name, threads=threads, session=session)
    except BundleError as e:
        return fail("golden", str(e).removeprefix("[bundle] "))
    except Exception as e:  # the golden's arrays do not fit the graph (onnxruntime raises)
        return fail("golden", f"the golden cannot run: {_first_line(e)}")
    ok = True
    for o in res.cases["golden"]:
        ok &= o.passed
        rows.append((name, o.name, f"{o.max_abs:.2e}", f"{o.max_rel:.2e}",
                     f"{'ok' if o.passed else 'FAIL'} (tolerance {o.tolerance:.1e})"))
    return ok


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def main(argv: list[str], *, exiting: bool = False) -> int:
    from .cli_io import run_cli

    return run_cli(lambda: _main(argv), f"qwen3vl-compile {argv[0]}", exiting=exiting)


def _main(argv: list[str]) -> int:
    from .cli_io import OneLineParser

    p = OneLineParser(prog=f"qwen3vl-compile {argv[0]}")
    p.add_argument("bundle", type=Path)
    if argv[0] == "verify":
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--public-key", type=Path, default=None,
                       help="check the bundle's signature (model.sig) with this PEM public key first")
    if argv[0] == "sign":
        p.add_argument("--key", type=Path, required=True, help="PEM elliptic-curve private key (P-256/384/521)")
    args = p.parse_args(argv[1:])
    if argv[0] == "inspect":
        return inspect_bundle(args.bundle)
    if argv[0] == "sign":
        from .bundle.signing import integrity_line, sign

        print(f"wrote {sign(args.bundle, args.key)}")
        print(integrity_line(args.bundle))
        return 0
    return verify_bundle(args.bundle, threads=args.threads, public_key=args.public_key)
