"""``qwen3vl-compile inspect OUT``, ``qwen3vl-compile verify OUT [--public-key PUB]`` and
``qwen3vl-compile sign OUT --key KEY`` (torch-free).

``verify`` checks the manifest's integrity and every file's size and sha256, then reruns each
graph's golden input with ONNX Runtime and prints a table of max errors; exit 0 only when
everything is within the recorded tolerances.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError
from ..parity import parity_summary


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_bundle(root: Path) -> int:
    from .check import check_manifest_integrity, load_manifest
    from .signing import integrity_line

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
    print(f"options    " + ", ".join(f"{k}={v}" for k, v in m.get("options", {}).items()))
    if m.get("buckets"):
        print("buckets    " + ", ".join(f"{b['name']} (grid {b['grid_thw'][1]}x{b['grid_thw'][2]}, {b['num_tokens']} tokens)" for b in m["buckets"]))
    print("graphs")
    for name, g in m.get("graphs", {}).items():
        size = sum(m["files"].get(f, {}).get("bytes", 0) for f in [g["file"], *g.get("data_files", [])])
        parity = m.get("parity", {}).get(name)
        verdict = parity_summary(parity) if parity else "not verified"
        passes = ", ".join(p["pass"] + ("*" if p["modified"] else "") for p in g.get("passes", []))
        if g.get("source_graph") and g.get("data_files"):  # an onnxruntime-genai wrapper reading its source's data
            size = m["files"].get(g["file"], {}).get("bytes", 0)
            verdict += f"; external weights shared with {g['source_graph']}"
        print(f"  {name:<18} {g['kind']:<9} {g['precision']:<5} {_fmt_bytes(size):>9}  {verdict}")
        print(f"  {'':<18} passes: {passes}  (* = changed the graph)")
    total = sum(f["bytes"] for f in m.get("files", {}).values())
    print(f"files      {len(m.get('files', {}))} files, {_fmt_bytes(total)}")
    if m.get("peak_rss_bytes"):
        print(f"compile    peak RSS {_fmt_bytes(m['peak_rss_bytes'])}; " + ", ".join(f"{k} {v:.1f}s" for k, v in m.get("timings", {}).items()))
    return 0


def verify_bundle(root: Path, *, threads: int = 0, public_key: Path | None = None) -> int:
    from .check import check_files, check_manifest_integrity, load_manifest
    from ..runtime.session import ort_session
    from .goldens import check_golden, check_interface
    from ..options import check_threads
    from .signing import SIGNATURE, integrity_line, verify as verify_signature

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
        return 1
    print(f"files: {len(m['files'])} ok (sizes and sha256 match the manifest)")
    known = set(m["files"]) | {"manifest.json", SIGNATURE}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in known:
            print(f"UNKNOWN  {rel}: not written by the compiler (the manifest does not list it)")
    rows, ok = [], True
    for name, graph in m.get("graphs", {}).items():
        session = ort_session(Path(root) / graph["file"], threads)
        problems = check_interface(session, m, name)
        for p in problems:
            rows.append((name, "interface", "-", "-", f"FAIL ({p})"))
        ok &= not problems
        entry = m.get("parity", {}).get(name, {})
        if "golden" not in entry:
            if str(entry.get("golden_source", "")).startswith("not recorded"):
                rows.append((name, "-", "-", "-", f"no golden: {entry['golden_source']}"))
                continue
            rows.append((name, "-", "-", "-", "no golden (compiled with --no-verify)"))
            ok = False
            continue
        res = check_golden(root, m, name, threads=threads, session=session)
        for o in res.cases["golden"]:
            status = "ok" if o.passed else "FAIL"
            ok &= o.passed
            rows.append((name, o.name, f"{o.max_abs:.2e}", f"{o.max_rel:.2e}", f"{status} (tolerance {o.tolerance:.1e})"))
    widths = [max(len(str(r[i])) for r in rows + [("graph", "output", "max abs", "max rel", "verdict")]) for i in range(5)]
    for r in [("graph", "output", "max abs", "max rel", "verdict"), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("verify: " + ("all graphs within tolerance" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str], *, exiting: bool = False) -> int:
    from ..cli_io import run_cli

    return run_cli(lambda: _main(argv), f"qwen3vl-compile {argv[0]}", exiting=exiting)


def _main(argv: list[str]) -> int:
    from ..cli_io import OneLineParser

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
        from .signing import integrity_line, sign

        print(f"wrote {sign(args.bundle, args.key)}")
        print(integrity_line(args.bundle))
        return 0
    return verify_bundle(args.bundle, threads=args.threads, public_key=args.public_key)
