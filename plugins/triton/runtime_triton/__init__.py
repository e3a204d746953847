"""runtime-triton: the Triton kernels runtime-cuda (NVIDIA) and runtime-rocm (AMD) share.

A library, not a plugin: it has no entry point and registers nothing. A platform plugin imports
it only where its platform is available (importing triton costs time, and fails without a GPU
driver unless Triton's interpreter is on) and registers ``registry.kernels(NAME)`` and a subclass
of ``attention.TritonAttentionBackend``.
"""

__version__ = "0.2.0"
