"""The model as a checkpoint holds it: the directory (config, tokenizer, lazy weights), what
the compiler can express, the Hugging Face vision tower and reference model, and Qwen3-VL's
special tokens."""
