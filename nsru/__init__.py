"""NSRU: null-space constrained, response-specified unlearning for large language models."""

from nsru import ops
from nsru.adapt import (
    apply_nsru,
    find_target_modules,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    unmerge_adapters,
)
from nsru.config import UnlearnConfig
from nsru.data import QACollator, encode_qa, format_prompt, load_qa, load_text
from nsru.layer import NSRULinear, adapter_disabled, nsru_modules
from nsru.methods import METHODS, get_method, register_method
from nsru.safe_targets import SafeTargets, is_safe_response
from nsru.subspace import (
    SecondMoments,
    collect_second_moments,
    leakage,
    retain_bases,
    retain_subspaces,
    set_retain_bases,
)
from nsru.train import Trainer
from nsru.unlearn import UnlearnResult, unlearn

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "NSRULinear",
    "QACollator",
    "SafeTargets",
    "SecondMoments",
    "Trainer",
    "UnlearnConfig",
    "UnlearnResult",
    "adapter_disabled",
    "apply_nsru",
    "collect_second_moments",
    "encode_qa",
    "find_target_modules",
    "format_prompt",
    "get_method",
    "is_safe_response",
    "leakage",
    "load_adapter",
    "load_qa",
    "load_text",
    "merge_adapters",
    "merge_and_unload",
    "nsru_modules",
    "ops",
    "register_method",
    "retain_bases",
    "retain_subspaces",
    "save_adapter",
    "set_retain_bases",
    "unlearn",
    "unmerge_adapters",
]
