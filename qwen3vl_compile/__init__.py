"""qwen3vl-compile: Qwen3-VL checkpoints to verified, bucketed ONNX bundles, and a runtime for them."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "Video", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch or onnxruntime
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    if name == "Video":
        from .runtime.video import Video

        return Video
    raise AttributeError(name)
