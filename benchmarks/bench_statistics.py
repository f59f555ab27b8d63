"""Retain statistics vs the plain forward over the same batches.

A Llama with Llama-7B's proportions (MLP 2.69x the hidden width; 512 wide, 4 layers on the CPU in
fp32; 2048 wide in bf16 on CUDA) with NSRU adapters on every projection, over batches of padded
sequences. Rows, each against the forward (no gradients, adapters disabled: what the statistics
pass runs):

* ``collect_second_moments``: forward + hooks + grouped ``second_moment_`` (the extension);
  issue 11's target: <= 1.30x the forward;
* the same with ``NSRU_BACKEND=reference`` (a torch ``addmm_`` per module);
* ``retain_subspaces``: the eigendecompositions (``subspace_update``), a fixed cost per run that
  more statistics tokens amortise.

Per layer, the statistics are one d x d second moment per distinct input (q/k/v share one,
gate/up share one): as upper triangles about 45 % of the layer's GEMM work, so exact fp32
statistics at the forward's GEMM speed cost ~+40 % of it on any machine.

    pytest benchmarks/bench_statistics.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

import cases

TARGET = 1.30
_cache: dict = {}


def _model(device: str):
    if device not in _cache:
        _cache.clear()
        _cache[device] = cases.statistics_model(device)
    return _cache[device]


def _with_backend(backend: str, fn):
    def run():
        before = os.environ.get("NSRU_BACKEND")
        os.environ["NSRU_BACKEND"] = backend
        try:
            return fn()
        finally:
            if before is None:
                os.environ.pop("NSRU_BACKEND", None)
            else:
                os.environ["NSRU_BACKEND"] = before

    return run


def _fns(model, batches) -> dict:
    import nsru
    from nsru.layer import adapter_disabled

    state = {}

    def forward():
        with torch.no_grad(), adapter_disabled(model):
            for batch in batches:
                model(**batch)

    def collect():
        state["moments"] = nsru.collect_second_moments(model, batches, progress=False)

    def subspaces():
        if "moments" not in state:
            collect()
        nsru.retain_subspaces(state["moments"], "energy=0.9")

    return {
        "forward": forward,
        "collect_second_moments": _with_backend("auto", collect),
        "collect_second_moments (reference backend)": _with_backend("reference", collect),
        "retain_subspaces (eigh)": subspaces,
    }


@pytest.mark.parametrize("impl", ["forward", "collect_second_moments", "collect_second_moments (reference backend)",
                                  "retain_subspaces (eigh)"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_statistics(paired, device, impl):
    model, batches, c = _model(device)
    fns = {name: cases.synced(fn, device) for name, fn in _fns(model, batches).items()}
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    paired(
        fns[impl], fns["forward"],
        group=f"statistics {device} (Llama h{c['hidden']} mlp{c['intermediate']} x{c['layers']} {dtype}, {tokens} tokens)",
        label=impl, baseline_label="forward", target=TARGET if impl == "collect_second_moments" else None,
        rounds=3,
    )  # fmt: skip
