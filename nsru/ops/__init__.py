"""The primitives of NSRU, one entry per op, each with its torch reference beside it."""

from nsru.ops.backend import requested_backend
from nsru.ops.lowrank_linear import (
    lowrank_linear,
    lowrank_linear_backward_reference,
    lowrank_linear_forward_reference,
    null_space_factor,
)
from nsru.ops.project_rows import project_rows_, project_rows_reference_
from nsru.ops.second_moment import second_moment_, second_moment_reference_, symmetrize
from nsru.ops.subspace_update import (
    DEFAULT_RULE,
    Subspace,
    SubspaceRule,
    select_k,
    subspace_update,
    subspace_update_reference,
)

__all__ = [
    "DEFAULT_RULE",
    "Subspace",
    "SubspaceRule",
    "lowrank_linear",
    "lowrank_linear_backward_reference",
    "lowrank_linear_forward_reference",
    "null_space_factor",
    "project_rows_",
    "project_rows_reference_",
    "requested_backend",
    "second_moment_",
    "second_moment_reference_",
    "select_k",
    "subspace_update",
    "subspace_update_reference",
    "symmetrize",
]
