"""Which implementation an op runs: the torch reference, the Triton kernels or the C++/CUDA extension.

``NSRU_BACKEND`` chooses: ``reference`` (plain torch everywhere), ``triton`` (the Triton kernels,
also on CPU tensors, which needs ``TRITON_INTERPRET=1``) or ``auto`` (the default: Triton for CUDA
tensors, the compiled extension for the statistics, the torch reference otherwise). It is read at
every call so that tests and users can switch it at run time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "triton", "auto")


def requested_backend() -> str:
    """The backend named by ``NSRU_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get("NSRU_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"NSRU_BACKEND={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


# Looked up once at import (plain module constants also keep torch.compile's tracing simple).
_TRITON = importlib.util.find_spec("triton") is not None
try:
    from nsru import _C  # noqa: F401  (registers the torch.ops.nsru operators)

    _EXTENSION = True
except ImportError:
    _EXTENSION = False


def triton_available() -> bool:
    return _TRITON


def extension_available() -> bool:
    """Whether ``nsru._C`` was built and loads."""
    return _EXTENSION


def extension_has_device(device: torch.device) -> bool:
    """Whether the extension was compiled with kernels for ``device``'s type (CPU always, CUDA optionally)."""
    if not extension_available():
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("nsru::second_moment_", key)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel should run on ``tensors``."""
    name = requested_backend()
    if name == "reference":
        return False
    if name == "triton":
        if not triton_available():
            raise RuntimeError("NSRU_BACKEND=triton but triton is not installed (pip install triton)")
        return True
    return triton_available() and all(t.is_cuda for t in tensors)


def use_extension(*tensors: torch.Tensor) -> bool:
    """Whether the compiled extension should run on ``tensors``."""
    if requested_backend() == "reference" or not tensors:
        return False
    return extension_has_device(tensors[0].device)
