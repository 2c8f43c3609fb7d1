"""A bundle on disk, torch-free: how it is written, described, checked and re-verified.

- ``manifest``: the one definition of ``manifest.json`` (schema, version, hashing, loading);
- ``writer``: atomic writing into place, never touching what we did not write;
- ``check``: files and the manifest's integrity against what it records;
- ``goldens``: rerunning each graph's golden input with ONNX Runtime alone;
- ``cli``: ``qwen3vl-compile inspect`` and ``qwen3vl-compile verify``.

Nothing here imports torch, transformers or the compiler's ``export`` package.
"""
