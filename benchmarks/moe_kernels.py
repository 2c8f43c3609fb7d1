"""One 30B-A3B-shaped MoE layer: QMoE (``export/moe.py``'s ``moe_mlp``: INT4 block 32,
accuracy level 4) against the alternative a static graph allows with MatMulNBits (every
expert computed densely from the same quantized bytes, the router's top-k weights zeroing the
rest), 2 threads, 1 and 300 tokens; plus QMoE at accuracy level 0 and with prepacked weights.

    python benchmarks/moe_kernels.py --work /tmp/moek
"""
import argparse
import datetime
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto as TP, helper as h, numpy_helper as nh
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

from qwen3vl_compile.model.checkpoint import Checkpoint  # noqa: E402
from qwen3vl_compile.export.moe import moe_mlp  # noqa: E402
from qwen3vl_compile.export.text_decoder import _Builder, _Weights  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--work", type=Path, required=True)
root = ap.parse_args().work
root.mkdir(parents=True, exist_ok=True)
H, E, I, K, BS = 2048, 128, 768, 8, 32
ckdir = root / "ck"
pre = "model.language_model.layers.0.mlp."

def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

if not (ckdir / "model.safetensors").exists():
    ckdir.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    gu = torch.empty(E, H, 2 * I, dtype=torch.bfloat16)  # the Hub's layout
    dn = torch.empty(E, I, H, dtype=torch.bfloat16)
    for e in range(E):
        gu[e] = (torch.randn(H, 2 * I, generator=g) * 0.02).bfloat16()
        dn[e] = (torch.randn(I, H, generator=g) * 0.02).bfloat16()
    gate = (torch.randn(E, H, generator=g) * 0.02).bfloat16()
    save_file({pre + "gate.weight": gate, pre + "experts.gate_up_proj": gu, pre + "experts.down_proj": dn}, str(ckdir / "model.safetensors"))
    del gu, dn
print(f"checkpoint ready, peak RSS so far {rss_gb():.2f} GB", flush=True)

qpath = root / "qmoe.onnx"
if not qpath.exists():
    ck = Checkpoint(path=ckdir, config={}, preprocessor={})
    W = _Weights(ck, "int4", BS)
    b = _Builder()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", H]))
    y = moe_mlp(b, x, W, "layers.0.", "/model/layers.0/mlp", num_experts=E, top_k=K, norm_topk_prob=True, hidden=H,
                moe_intermediate=I, precision="int4", block_size=BS, accuracy_level=4)
    y.name = "y"
    g_ = ir.Graph(inputs=[x], outputs=[y], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 23, "com.microsoft": 1})
    r0 = rss_gb(); t = time.perf_counter()
    ir.save(ir.Model(g_, ir_version=10), qpath, external_data="qmoe.onnx.data", max_workers=1, max_in_flight_bytes=256 << 20)
    print(f"export+quantize of one layer: {time.perf_counter() - t:.1f} s, peak RSS {rss_gb():.2f} GB (before save {r0:.2f})", flush=True)

# The same bytes as an all-experts dense graph of two MatMulNBits.
m = onnx.load(str(qpath))
inits = {t.name: nh.to_array(t) for t in m.graph.initializer}
find = lambda suffix: next(v for k, v in inits.items() if k.endswith(suffix))
fc1_q, fc1_s = find("gate_up_proj.qweight"), find("gate_up_proj.scales")  # [E, 2I, H/2], [E, 2I, H/bs]
fc2_q, fc2_s = find("down_proj.qweight"), find("down_proj.scales")        # [E, H, I/2], [E, H, I/bs]
gw = find("gate.weight")                                                   # [H, E]

def dense_model(acc):
    # fc1: N = E*2I stacked experts (rows interleaved g/u), K = H
    b1 = fc1_q.reshape(E * 2 * I, H // BS, BS // 2); s1 = fc1_s.reshape(E * 2 * I, H // BS)
    # fc2: N = H, K = E*I (experts concatenated along K; I % bs == 0 so blocks align)
    b2 = fc2_q.transpose(1, 0, 2).reshape(H, E * I // BS, BS // 2); s2 = fc2_s.transpose(1, 0, 2).reshape(H, E * I // BS)
    c = lambda n, a: nh.from_array(np.asarray(a), n)
    nodes = [
        h.make_node("Reshape", ["x", "shape2d"], ["x2"]),
        h.make_node("MatMul", ["x2", "gw"], ["logits"]),
        h.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        h.make_node("TopK", ["probs", "k"], ["topv", "topi"], axis=-1),
        h.make_node("ReduceSum", ["topv", "ax1"], ["tops"], keepdims=1),
        h.make_node("Div", ["topv", "tops"], ["topw"]),
        h.make_node("Mul", ["logits", "zero"], ["zeros"]),
        h.make_node("ScatterElements", ["zeros", "topi", "topw"], ["route"], axis=1),  # [T, E], 0 off the top-k
        h.make_node("MatMulNBits", ["x2", "b1", "s1"], ["gu"], domain="com.microsoft", K=H, N=E * 2 * I, bits=4, block_size=BS, accuracy_level=acc),
        h.make_node("Reshape", ["gu", "shape_gu"], ["gu4"]),  # [T, E, I, 2]
        h.make_node("Split", ["gu4", "two"], ["g", "u"], axis=3),
        h.make_node("Sigmoid", ["g"], ["sg"]), h.make_node("Mul", ["g", "sg"], ["silu"]), h.make_node("Mul", ["silu", "u"], ["act"]),
        h.make_node("Reshape", ["route", "shape_r"], ["route4"]),  # [T, E, 1, 1]
        h.make_node("Mul", ["act", "route4"], ["wact"]),
        h.make_node("Reshape", ["wact", "shape_ei"], ["flat"]),  # [T, E*I]
        h.make_node("MatMulNBits", ["flat", "b2", "s2"], ["y2"], domain="com.microsoft", K=E * I, N=H, bits=4, block_size=BS, accuracy_level=acc),
        h.make_node("Reshape", ["y2", "shape_x"], ["y"]),
        h.make_node("Shape", ["x"], ["shape_x"]),
    ]
    nodes = nodes[-1:] + nodes[:-1]
    inits_ = [c("shape2d", np.array([-1, H], np.int64)), c("gw", gw), c("k", np.array([K], np.int64)), c("ax1", np.array([1], np.int64)),
              c("zero", np.array(0, np.float32)), c("b1", b1), c("s1", s1), c("shape_gu", np.array([-1, E, I, 2], np.int64)),
              c("two", np.array([1, 1], np.int64)), c("shape_r", np.array([-1, E, 1, 1], np.int64)), c("b2", b2), c("s2", s2),
              c("shape_ei", np.array([-1, E * I], np.int64))]
    g_ = h.make_graph(nodes, "dense", [h.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", H])], [h.make_tensor_value_info("y", TP.FLOAT, None)], inits_)
    mm = h.make_model(g_, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    p = root / f"dense_acc{acc}.onnx"
    onnx.save(mm, str(p), save_as_external_data=True, location=p.name + ".data")
    return p

def qmoe_variant(acc, prepacked):
    mm = onnx.load(str(qpath))
    for n in mm.graph.node:
        if n.op_type == "QMoE":
            for a in n.attribute:
                if a.name == "accuracy_level": a.i = acc
                if a.name == "weights_prepacked": a.i = prepacked
    p = root / f"qmoe_acc{acc}_pp{prepacked}.onnx"
    onnx.save(mm, str(p), save_as_external_data=True, location=p.name + ".data")
    return p

def sess(p):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    t = time.perf_counter(); s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]); return s, time.perf_counter() - t

def bench(s, x, reps):
    """Median over reps runs, each on fresh tokens (other experts, colder caches)."""
    s.run(None, {"x": x})
    ts = []
    for i in range(reps):
        xi = np.random.default_rng(100 + i).standard_normal(x.shape).astype(np.float32)
        t = time.perf_counter(); s.run(None, {"x": xi}); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

rng = np.random.default_rng(0)
xs = {1: rng.standard_normal((1, 1, H)).astype(np.float32), 300: rng.standard_normal((1, 300, H)).astype(np.float32)}
outs, timings = {}, {}
for label, p in [("QMoE acc4 prepacked=0 (moe_mlp)", qmoe_variant(4, 0)), ("QMoE acc4 prepacked=-1", qmoe_variant(4, -1)),
                 ("QMoE acc0 prepacked=0", qmoe_variant(0, 0)), ("dense 2xMatMulNBits acc4", dense_model(4)), ("dense 2xMatMulNBits acc0", dense_model(0))]:
    s, load = sess(p)
    r = {n: bench(s, x, 20 if n == 1 else 3) for n, x in xs.items()}
    outs[label] = {n: s.run(None, {"x": x})[0] for n, x in xs.items()}
    timings[label] = r
    print(f"{label:34s} load {load:5.2f} s | 1 token {r[1]*1e3:8.2f} ms | 300 tokens {r[300]*1e3:9.1f} ms ({r[300]/300*1e3:.2f} ms/token) | peak RSS {rss_gb():.2f} GB", flush=True)
    del s
ref = outs["QMoE acc0 prepacked=0"]
errors = {label: max(float(np.abs(o[n] - ref[n]).max() / np.abs(ref[n]).max()) for n in o) for label, o in outs.items()}
rows = [[label, f"{t[1] * 1e3:.2f}", f"{t[300] * 1e3:.1f}", f"{errors[label]:.1e}"] for label, t in timings.items()]
q = timings["QMoE acc4 prepacked=0 (moe_mlp)"]
d = timings["dense 2xMatMulNBits acc4"]
md = (f"One 30B-A3B MoE layer (H {H}, {E} experts, top-{K}, expert {I}), INT4 block {BS}, 2 threads, "
      f"{datetime.date.today().isoformat()}, {machine()['cpu']} ({machine()['isa']}); `python benchmarks/moe_kernels.py`. "
      "QMoE (what the compiler emits) against the same quantized bytes as two MatMulNBits computing every expert "
      "(a static graph cannot compute only the chosen ones).\n\n"
      + table(rows, ["graph", "1 token (ms)", "300 tokens (ms)", "max rel err vs QMoE level 0"])
      + f"\n\nQMoE is {d[1] / q[1]:.1f}x faster for one token and {d[300] / q[300]:.1f}x for 300 tokens.")
save("moe_kernels", {"timings_s": {k: {str(n): v for n, v in t.items()} for k, t in timings.items()}, "errors": errors,
                     "machine": machine()}, md)
print(md)
