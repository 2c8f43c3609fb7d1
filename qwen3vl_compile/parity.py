"""Parity: measure first (max abs and relative error per output), then judge against one
tolerance table keyed by (graph kind, precision). Every failure is collected; the caller
fails once with the full list.

Relative error is ``max|actual - reference| / max|reference|`` over the whole output: a
scale-aware bound that does not blow up on near-zero elements.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (graph kind, precision) -> maximum relative error.
TOLERANCES: dict[tuple[str, str], float] = {
    ("vision", "fp32"): 1e-4,
    # int8 vision graphs (--vision-precision int8) against the fp32 tower: 2.2x the worst error
    # measured (benchmarks/vision_int8.py, 2026-12-03: 0.045 / 0.039 on the 4B tower at 896 / 448
    # with random weights, 0.026 on tiny-random, 0.0047 on the trained tiny); a scale on the wrong axis or a
    # wrong grid fails it (tests/test_vision_int8.py).
    ("vision", "int8"): 0.1,
    ("embedding", "fp32"): 1e-6,
    # int4 embeddings (the INT4 lm_head's bytes) against the table's own quantize-dequantize
    # round trip: the same arithmetic (GatherBlockQuantized dequantizes in fp32).
    ("embedding", "int4"): 1e-6,
    # Decoders are gated against the exact oracle: Hugging Face in fp32 with the weights the
    # decoder stores (fp16-rounded, or int4 quantize-dequantized). Measured (3 cases x 3 seeds,
    # 2026-11-29): tiny model 1.9e-6 (fp32), 2.3e-6 (fp16), 1.4e-6 (int4 with fp32
    # activations); Qwen3-VL-4B shape cut to 4 layers 4.2e-6 (fp32), 6.1e-6 (int4).
    ("decoder", "fp32"): 1e-4,
    ("decoder", "fp16"): 1e-4,
    ("decoder", "int4"): 1e-4,
    # int4 at accuracy_level > 0 (int8 activations, MatMulNBits' default 4) against the same
    # oracle. Measured: 0.031-0.053 (tiny), 0.027-0.032 (4B shape, 4 layers); ~3x the worst.
    # This noise hides a dropped DeepStack (~0.02-0.03 on the last position), which is why the
    # exact check above runs the same graph at accuracy_level 0.
    ("decoder", "int4-activations"): 0.15,
    # The same for MoE decoders: int8 activations also move router logits, and a token near a
    # tie between two experts switches expert. Measured on tiny-moe (3 cases x 4 seeds):
    # 0.042-0.143; ~3x the worst.
    ("decoder", "int4-activations-moe"): 0.45,
}


@dataclasses.dataclass(frozen=True)
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    reference_max_abs: float
    tolerance: float
    cosine: float | None = None
    top1_agreement: float | None = None

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance

    def to_json(self) -> dict:
        out = {
            "max_abs": float(f"{self.max_abs:.3e}"),
            "max_rel": float(f"{self.max_rel:.3e}"),
            "reference_max_abs": float(f"{self.reference_max_abs:.4g}"),
            "tolerance_max_rel": self.tolerance if np.isfinite(self.tolerance) else None,
            "passed": self.passed,
        }
        if self.cosine is not None:
            out["cosine"] = round(self.cosine, 6)
        if self.top1_agreement is not None:
            out["top1_agreement"] = round(self.top1_agreement, 4)
        return out


def measure(name: str, actual: np.ndarray, reference: np.ndarray, tolerance: float, *, logits: bool = False,
            cosine: bool = False) -> OutputParity:
    """Max abs / relative error; for logits (or with ``cosine``: features of a reduced
    precision) also the cosine similarity of each row (the minimum over rows); for logits the
    fraction of rows whose argmax agrees."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        return OutputParity(name, float("inf"), float("inf"), float(np.abs(reference).max(initial=0)), tolerance)
    diff = float(np.abs(actual - reference).max(initial=0.0))
    scale = float(np.abs(reference).max(initial=0.0))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    row_cosine = top1 = None
    if logits or cosine:
        a = actual.reshape(-1, actual.shape[-1])
        r = reference.reshape(-1, reference.shape[-1])
        cos = (a * r).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1) + 1e-30)
        row_cosine = float(cos.min())
        if logits:
            top1 = float((a.argmax(-1) == r.argmax(-1)).mean())
    return OutputParity(name, diff, rel, scale, tolerance, row_cosine, top1)


@dataclasses.dataclass
class GraphParity:
    graph: str
    kind: str
    precision: str
    reference: str
    cases: dict[str, list[OutputParity]]
    # Small input/reference-output arrays kept in the bundle (golden/<graph>.npz) so that
    # `qwen3vl-compile verify` can re-measure parity with ONNX Runtime alone.
    golden: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    # Facts about the check itself (e.g. layers checked, the oracle), copied into the manifest.
    details: dict = dataclasses.field(default_factory=dict)
    # The tolerance `verify` applies to the golden (None: derived from kind and precision).
    golden_tolerance: float | None = None

    @property
    def worst_rel(self) -> float:
        return max((o.max_rel for outs in self.cases.values() for o in outs), default=0.0)

    @property
    def passed(self) -> bool:
        return all(o.passed for outs in self.cases.values() for o in outs)

    def failures(self) -> list[str]:
        return [
            f"{self.graph} [{case}] {o.name}: relative error {o.max_rel:.3e} > {o.tolerance:.0e} (max abs {o.max_abs:.3e})"
            for case, outs in self.cases.items()
            for o in outs
            if not o.passed
        ]

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "precision": self.precision,
            "reference": self.reference,
            "passed": self.passed,
            **self.details,
            "cases": {case: {o.name: o.to_json() for o in outs} for case, outs in self.cases.items()},
        }


def parity_summary(entry: dict) -> str:
    """One line for a manifest parity entry: the worst gated error (and, where reported, the
    lowest cosine to the unrounded model, the cost of a reduced precision)."""
    named = [(name, o) for case in entry["cases"].values() for name, o in case.items()]
    level = [o for name, o in named if name.startswith("logits_at_accuracy_level")]
    gated = [o for name, o in named if o.get("tolerance_max_rel") is not None and o not in level]
    worst = max((o["max_rel"] for o in gated), default=0.0)
    text = f"parity max rel err {worst:.2e}"
    if level:
        text += (f", {max(o['max_rel'] for o in level):.2e} with int8 activations "
                 f"(<= {level[0]['tolerance_max_rel']:.2g})")
    reported = [o["cosine"] for name in ("logits_vs_unrounded_fp32",) for case in entry["cases"].values()
                if name in case and (o := case[name]).get("cosine") is not None]
    if reported:
        text += f", cosine to fp32 weights >= {min(reported):.3f}"
    if entry.get("kind") == "vision" and entry.get("precision") != "fp32":
        rows = [o["cosine"] for _, o in named if o.get("cosine") is not None]
        if rows:
            text += f", per-token cosine >= {min(rows):.4f}"
    if entry.get("layers_checked") is not None and entry.get("layers_checked") != entry.get("layers"):
        text += f" (first {entry['layers_checked']} of {entry['layers']} layers)"
    return f"{text} ({'ok' if entry['passed'] else 'FAILED'})"
