"""A bundle on disk, torch-free: how it is written, described, checked and re-verified.

- ``manifest``: the one definition of ``manifest.json`` (schema, version, hashing, loading);
- ``writer``: atomic writing into place, never touching what we did not write;
- ``check``: files and the manifest's integrity against what it records;
- ``records``: the typed records of the manifest, for its writer and its readers;
- ``goldens``: rerunning each graph's golden input with ONNX Runtime alone.

Nothing here imports torch, transformers, the compiler's ``export`` package or the runtime:
``qwen3vl-compile inspect|verify|sign`` (:mod:`qwen3vl_compile.bundle_cli`) and the text
golden (:mod:`qwen3vl_compile.runtime.text_golden`) sit above both.
"""
