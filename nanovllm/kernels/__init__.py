"""Triton kernels for the attention backend.

Nothing here is imported by `import nanovllm`: only `layers/backends/triton_backend.py`
imports these modules, so CPU-only installs never touch Triton.
"""
