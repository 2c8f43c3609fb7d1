"""``qwen3vl-serve``: an OpenAI-compatible chat server on the engine (the ``[serve]`` extra:
Starlette and uvicorn). :func:`~.app.create_app` builds the ASGI app around a loaded
:class:`~qwen3vl_compile.runtime.pipeline.Pipeline`; :mod:`.cli` is the command."""
