"""Graph passes over exported ONNX models, on onnx-ir."""
