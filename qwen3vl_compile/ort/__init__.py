"""ONNX Runtime helpers shared by every side that runs a graph: the compile's parity gates
(``export/``), a bundle's re-verification (``bundle/``) and the runtime (``runtime/``).
They sit below all three and import nothing of theirs: :mod:`.session` makes every
``InferenceSession``; :mod:`.decoder_session` runs decoder.onnx over a preallocated KV cache."""
