"""NSRU: null-space constrained, response-specified unlearning for large language models.

The public names below are imported on first use, not with the package: ``import nsru`` (and so
``nsru --help``) no longer waits for torch and transformers (about 3 s on the CI machine, 6 s on a
cold one), and the first ``nsru.apply_nsru`` pays for them instead.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "apply_nsru": "nsru.adapt",
    "find_target_modules": "nsru.adapt",
    "load_adapter": "nsru.adapt",
    "merge_adapters": "nsru.adapt",
    "merge_and_unload": "nsru.adapt",
    "save_adapter": "nsru.adapt",
    "unmerge_adapters": "nsru.adapt",
    "UnlearnConfig": "nsru.config",
    "QACollator": "nsru.data",
    "encode_qa": "nsru.data",
    "format_prompt": "nsru.data",
    "load_qa": "nsru.data",
    "load_text": "nsru.data",
    "NSRULinear": "nsru.layer",
    "adapter_disabled": "nsru.layer",
    "nsru_modules": "nsru.layer",
    "METHODS": "nsru.methods",
    "get_method": "nsru.methods",
    "register_method": "nsru.methods",
    "UnlearnResult": "nsru.pipeline",
    "unlearn": "nsru.pipeline",
    "SafeTargets": "nsru.safe_targets",
    "is_safe_response": "nsru.safe_targets",
    "SecondMoments": "nsru.subspace",
    "collect_second_moments": "nsru.subspace",
    "leakage": "nsru.subspace",
    "retain_bases": "nsru.subspace",
    "retain_subspaces": "nsru.subspace",
    "set_retain_bases": "nsru.subspace",
    "NothingToForget": "nsru.targets",
    "TargetData": "nsru.targets",
    "target_rows": "nsru.targets",
    "Trainer": "nsru.train",
}

__all__ = sorted([*_EXPORTS, "ops"])

if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from nsru import ops
    from nsru.adapt import (apply_nsru, find_target_modules, load_adapter, merge_adapters, merge_and_unload,
                            save_adapter, unmerge_adapters)
    from nsru.config import UnlearnConfig
    from nsru.data import QACollator, encode_qa, format_prompt, load_qa, load_text
    from nsru.layer import NSRULinear, adapter_disabled, nsru_modules
    from nsru.methods import METHODS, get_method, register_method
    from nsru.pipeline import UnlearnResult, unlearn
    from nsru.safe_targets import SafeTargets, is_safe_response
    from nsru.subspace import (SecondMoments, collect_second_moments, leakage, retain_bases, retain_subspaces,
                               set_retain_bases)
    from nsru.targets import NothingToForget, TargetData, target_rows
    from nsru.train import Trainer


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module("nsru.ops")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nsru' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

