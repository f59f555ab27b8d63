"""Test-wide set-up: without a GPU the Triton kernels run in Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before any test module imports ``nsru.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
