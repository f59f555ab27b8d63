"""NSRU: null-space constrained, response-specified unlearning for large language models."""

from nsru import ops
from nsru.adapt import (
    adapter_disabled,
    apply_nsru,
    find_target_modules,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    nsru_modules,
    save_adapter,
    unmerge_adapters,
)
from nsru.layer import NSRULinear
from nsru.subspace import (
    SecondMoments,
    collect_second_moments,
    leakage,
    retain_bases,
    retain_subspaces,
    set_retain_bases,
)

__version__ = "0.1.0"

__all__ = [
    "NSRULinear",
    "SecondMoments",
    "adapter_disabled",
    "apply_nsru",
    "collect_second_moments",
    "find_target_modules",
    "leakage",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "nsru_modules",
    "ops",
    "retain_bases",
    "retain_subspaces",
    "save_adapter",
    "set_retain_bases",
    "unmerge_adapters",
]
