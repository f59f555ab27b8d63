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

# Issue 5: data, safe targets, objectives, methods, trainer and the one-call API.
from nsru.config import UnlearnConfig  # noqa: E402
from nsru.data import QACollator, encode_qa, format_prompt, load_qa, load_text  # noqa: E402
from nsru.methods import METHODS, get_method, register_method  # noqa: E402
from nsru.safe_targets import SafeTargets, is_safe_response  # noqa: E402
from nsru.train import Trainer  # noqa: E402
from nsru.unlearn import UnlearnResult, unlearn  # noqa: E402

__all__ += [
    "METHODS",
    "QACollator",
    "SafeTargets",
    "Trainer",
    "UnlearnConfig",
    "UnlearnResult",
    "encode_qa",
    "format_prompt",
    "get_method",
    "is_safe_response",
    "load_qa",
    "load_text",
    "register_method",
    "unlearn",
]
