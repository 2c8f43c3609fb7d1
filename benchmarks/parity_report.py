"""Print a bundle's parity figures (from its manifest) as the Markdown table the README quotes.

    python benchmarks/parity_report.py OUT [OUT2 ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(bundle: Path) -> list[list[str]]:
    m = json.loads((bundle / "manifest.json").read_text())
    out = []
    for graph, p in m["parity"].items():
        for case, outputs in p["cases"].items():
            for name, o in outputs.items():
                extra = ""
                if "cosine" in o:
                    extra = f"cosine {o['cosine']:.4f}, top-1 {o['top1_agreement']:.2f}"
                tol = o["tolerance_max_rel"]
                out.append([
                    m["source"]["model"], graph, p["precision"], case, name,
                    f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", extra,
                    (f"<= {tol:.2g}" if tol is not None else "reported") + (" ok" if o["passed"] else " FAILED"),
                ])
    return out


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import table

    all_rows = [r for b in argv for r in rows(Path(b))]
    print(table(all_rows, ["model", "graph", "precision", "case", "output", "max abs", "max rel", "logits", "gate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
