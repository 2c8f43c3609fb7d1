"""Reversible PyTorch patches of the Hugging Face Qwen3-VL code, applied only while exporting."""
