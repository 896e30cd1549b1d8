"""The torch backend: the reference every other backend is tested against, and the CPU path.

`kernels` is its `model.backend.Kernels`; `attention`, `moe` and `packed` (oneDNN-prepacked
GEMM weights, the CPU's fast path) are what it runs.
"""
