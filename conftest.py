"""Repository-wide test set-up.

Without a GPU, runtime-cuda's Triton kernels are tested under Triton's interpreter. The variable
must be set before anything imports triton (transformers and torch may, while other test modules
are collected), because a kernel binds to the interpreter or the compiler when it is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
