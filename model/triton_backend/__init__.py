"""The Triton backend of the CUDA path: fused MoE and paged attention, each tested against the
torch backend. Importing any of its modules imports triton; `model.ops` selects it only when
asked to (on CUDA by default, on CPU under `TRITON_INTERPRET=1` in tests).
"""
