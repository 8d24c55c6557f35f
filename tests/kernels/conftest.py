"""Triton kernels run on CPU through the interpreter, which must be switched on before triton is imported.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, i.e. when a ``kernels/<op>/triton.py``
module is first imported. With a GPU present the kernels compile for real unless the variable is set by hand.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
