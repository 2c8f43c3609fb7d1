"""Graph passes over exported ONNX models, on onnx-ir.

The order is the design: each graph kind runs exactly the passes listed below, in this order.
``FuseSiblingMatMulNBitsPass`` (one INT4 MatMul for q/k/v and for gate/up; exact) is in no
list: measured, it moved decode speed by -4% (AMD EPYC, AVX2) and +4% (Xeon, 2 cores), prefill
by -1% to -2% (``benchmarks/fusion_bench.py``, results in ``benchmarks/results/fusion_4b_*``).
"""


def vision_passes(precision: str = "fp32"):
    """Passes for a vision graph exported by torch.onnx; ``precision="int8"`` adds the int8
    weights of every linear layer (``QuantizeGemmInt8Pass``; the patch embedding stays fp32)."""
    from .check_model import CheckModelPass
    from .cleanup import CleanupPass
    from .fuse_attention import FuseAttentionPass
    from .unify_index_types import UnifyIndexTypesPass

    quantize = ()
    if precision == "int8":
        from .quantize_gemm_int8 import QuantizeGemmInt8Pass

        quantize = (QuantizeGemmInt8Pass(),)
    return (UnifyIndexTypesPass(), CleanupPass(), FuseAttentionPass(), *quantize, CheckModelPass())


def decoder_passes(spec):
    """Passes for the text decoder built by qwen3vl_compile.export.text_decoder."""
    from .insert_deepstack import InsertDeepStackPass

    return (InsertDeepStackPass(spec.deepstack_levels, spec.hidden),)


def genai_passes(pairs: dict):
    """Passes that turn a verified graph into its onnxruntime-genai twin (wide-channel
    DeepStack). ``pairs``: {"inputs"/"outputs": {packed name: [features, deepstack]}}."""
    from .pack_deepstack import PackDeepStackOutputsPass
    from .unpack_deepstack import UnpackDeepStackInputsPass

    unpack = [UnpackDeepStackInputsPass(f, d, packed) for packed, (f, d) in pairs.get("inputs", {}).items()]
    pack = [PackDeepStackOutputsPass(f, d, packed) for packed, (f, d) in pairs.get("outputs", {}).items()]
    return (*unpack, *pack)
