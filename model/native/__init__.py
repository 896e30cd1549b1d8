"""The native CPU decode step: a batch of single-token decodes through every layer in one C++ call.

`build` compiles `decode.cpp` with the system's C++ compiler (once per source and machine,
cached) and says why not where it cannot; `decoder` packs a loaded model's weights for it and
runs the step. The torch path stays the reference it is tested against, and the path for
everything else (prefill chunks, other devices, tensor parallelism, 8-bit weights).
"""
