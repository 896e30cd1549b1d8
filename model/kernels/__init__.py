"""Triton kernels of the CUDA path; every one has a torch reference it is tested against.

Importing this package imports triton. The CPU path never does: `model.ops` selects these
kernels only when asked to (on CUDA by default, on CPU under `TRITON_INTERPRET=1` in tests).
"""
