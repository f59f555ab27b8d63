"""``subspace_update`` against its per-module reference, the rules that pick k, and the incremental forms
(kept statistics; a folded previous basis) against the from-scratch update on the union."""

import pytest
import torch

from nsru.ops import Subspace, SubspaceRule, second_moment_, select_k, subspace_update, subspace_update_reference
from nsru.ops.backend import extension_available
from nsru.ops.subspace_update import _eigh_torch, fold

needs_extension = pytest.mark.skipif(not extension_available(), reason="nsru._C is not built")
RULES = ["energy=0.9", "energy=1", "k=3", "k=10000", "abs=1.0", "tail=1e-3", "mean=0.5", "energy=0.99,min_null=5"]


def _moments(widths, rows=None, seed=0, lower_garbage=True):
    """Sums of ``x xᵀ`` with a decaying spectrum; the lower triangle filled with junk (only the upper counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in widths:
        x = torch.randn(rows or 2 * d + 3, d, generator=g, dtype=torch.float64)
        x = x * torch.logspace(0, -2, d, dtype=torch.float64)
        c = x.T @ x
        if lower_garbage:
            c = torch.triu(c) + torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64), -1)
        out.append(c)
    return out


def _projector(s: Subspace) -> torch.Tensor:
    u = s.basis.double()
    return u @ u.T


def _same(a: list[Subspace], b: list[Subspace], atol=1e-5, eig_rtol=1e-9) -> None:
    assert [s.k for s in a] == [s.k for s in b]
    for x, y in zip(a, b):
        assert x.basis.dtype == torch.float32 and x.basis.shape == y.basis.shape
        assert x.energy == pytest.approx(y.energy, abs=10 * eig_rtol)
        scale = float(y.eigenvalues.abs().max()) if y.eigenvalues.numel() else 1.0
        torch.testing.assert_close(x.eigenvalues, y.eigenvalues, rtol=eig_rtol, atol=eig_rtol * scale)
        torch.testing.assert_close(_projector(x), _projector(y), rtol=0, atol=atol)


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference(rule):
    moments = _moments([1, 2, 16, 16, 40, 16, 7, 40])
    got = subspace_update([m.float() for m in moments], rule)
    want = subspace_update_reference([m.float() for m in moments], rule)
    _same(got, want)


def test_basis_orthonormal_and_descending():
    (s,) = subspace_update(_moments([50]), "energy=0.95")
    eye = torch.eye(s.k, dtype=torch.float32)
    torch.testing.assert_close(s.basis.T @ s.basis, eye, atol=1e-5, rtol=0)
    assert torch.all(s.eigenvalues[:-1] >= s.eigenvalues[1:])
    assert s.energy >= 0.95 and 0 < s.k < 50


@needs_extension
def test_extension_and_torch_eigh_agree():
    moments = _moments([30, 5, 30, 64])
    lam, vec = torch.ops.nsru.symeig_upper(moments)
    for m, l, v, (tl, tv) in zip(moments, lam, vec, _eigh_torch(moments)):
        torch.testing.assert_close(l, tl)
        full = torch.triu(m) + torch.triu(m, 1).T
        torch.testing.assert_close(v @ torch.diag(l) @ v.T, full, atol=1e-9 * float(full.abs().max()), rtol=0)


@needs_extension
def test_opcheck_symeig_upper():
    moments = [torch.eye(3, dtype=torch.float64) * 2, torch.diag(torch.arange(1.0, 6.0))]
    torch.library.opcheck(torch.ops.nsru.symeig_upper.default, (moments,))


def test_degenerate_statistics():
    zero, empty = torch.zeros(6, 6), torch.zeros(0, 0)
    a, b = subspace_update([zero, empty], "energy=0.9")
    assert (a.k, a.energy, a.basis.shape) == (0, 0.0, (6, 0))
    assert (b.k, b.basis.shape) == (0, (0, 0))
    assert subspace_update([], "energy=0.9") == []


def test_select_k_rules():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1e-9], dtype=torch.float64)
    assert select_k(lam, "energy=0.7") == 2
    assert select_k(lam, "energy=0.71") == 3
    assert select_k(lam, 1.0) == 4  # a bare number is τ
    assert select_k(lam, "energy=0") == 0
    assert select_k(lam, "k=100") == 6
    assert select_k(lam, "abs=1.5") == 3
    assert select_k(lam, "tail=0.5") == 2  # above 0.5 × 4
    assert select_k(lam, "tail=0.2") == 4  # 1.0 > 0.8
    assert select_k(lam, "mean=1.0") == 3  # above the mean eigenvalue 10/6
    assert select_k(lam, "mean=1.5") == 2  # above 2.5
    # the floor of null directions wins over the rule, and says so
    assert select_k(lam, "energy=1,min_null=3") == 3
    assert SubspaceRule.parse("k=6,min_null=1").sizes(lam.reshape(1, -1)) == ([5], [True])
    assert SubspaceRule.parse("k=2,min_null=1").sizes(lam.reshape(1, -1)) == ([2], [False])


@pytest.mark.parametrize("spec, message", [
    ("", "exactly one"),
    ("energy=0.9,k=3", "exactly one"),
    ("energy=1.5", r"\[0, 1\], got 1.5"),
    ("k=-1", "whole number"),
    ("k=2.5", "whole number"),
    ("tail=-1", ">= 0"),
    ("tail=nan", "finite"),
    ("size=3", "expected one of"),
    ("energy", "expected one of"),
    ("energy=0.9,min_null=-2", "min_null"),
    ("energy=x", "numbers"),
])
def test_rule_rejects_bad_specs_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        SubspaceRule.parse(spec)


def test_rule_round_trips_through_its_string():
    for spec in ("energy=0.9", "k=16", "abs=0.02", "tail=0.001,min_null=8", "mean=0.1"):
        assert str(SubspaceRule.parse(spec)) == spec
        assert SubspaceRule.parse(str(SubspaceRule.parse(spec))) == SubspaceRule.parse(spec)


def test_errors():
    with pytest.raises(ValueError, match="square"):
        subspace_update([torch.zeros(3, 4)], "energy=0.9")
    with pytest.raises(TypeError, match="floating"):
        subspace_update([torch.zeros(3, 3, dtype=torch.int64)], "energy=0.9")
    with pytest.raises(ValueError, match="exactly one"):
        subspace_update([torch.eye(3)], "min_null=2")
    (s,) = subspace_update([torch.eye(3)], "k=1")
    with pytest.raises(ValueError, match="width"):
        subspace_update([torch.eye(4)], "k=1", previous=[s])
    with pytest.raises(ValueError, match="previous subspaces"):
        subspace_update([torch.eye(3)], "k=1", previous=[s, s])


def test_incremental_with_kept_statistics_is_exact():
    """Accumulating new data into the kept statistics == the statistics of the union, exactly."""
    g = torch.Generator().manual_seed(3)
    widths = [24, 80]
    old = [torch.randn(200, d, generator=g) for d in widths]
    new = [torch.randn(150, d, generator=g) * torch.linspace(2, 0.1, d) for d in widths]
    kept = [torch.zeros(d, d, dtype=torch.float64) for d in widths]
    second_moment_(kept, old)
    subspace_update(kept, "energy=0.9")  # a finished run
    second_moment_(kept, new)
    union = [torch.zeros(d, d, dtype=torch.float64) for d in widths]
    second_moment_(union, [torch.cat([a, b]) for a, b in zip(old, new)])
    _same(subspace_update(kept, "energy=0.9"), subspace_update(union, "energy=0.9"), atol=1e-9)


@pytest.mark.parametrize("old_rule", ["energy=1", "k=10000"])
def test_incremental_from_previous_basis_equals_from_scratch(old_rule):
    """Folding the old subspace back in is exact when it kept all of the old energy (old data of low
    rank), up to the fp32 rounding of the stored basis."""
    g = torch.Generator().manual_seed(4)
    d = 48
    old_x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, d, generator=g, dtype=torch.float64)
    new_x = torch.randn(100, d, generator=g, dtype=torch.float64)
    old_c, new_c = old_x.T @ old_x, new_x.T @ new_x
    previous = subspace_update([old_c], old_rule)
    if "energy" in old_rule:
        assert previous[0].k == 6
    got = subspace_update([new_c], "energy=0.9", previous=previous)
    want = subspace_update([old_c + new_c], "energy=0.9")
    _same(got, want, eig_rtol=1e-6)


def test_incremental_with_means_and_weights():
    """Statistics kept as means: weight the folded old mean by N_old / N_new."""
    g = torch.Generator().manual_seed(5)
    d, n_old, n_new = 20, 400, 100
    old_x = torch.randn(n_old, d, generator=g, dtype=torch.float64)
    new_x = torch.randn(n_new, d, generator=g, dtype=torch.float64) * 3
    previous = subspace_update([old_x.T @ old_x / n_old], f"k={d}")
    got = subspace_update([new_x.T @ new_x / n_new], "k=5", previous=[previous[0]], previous_weight=n_old / n_new)
    union = torch.cat([old_x, new_x])
    want = subspace_update([union.T @ union / n_new], "k=5")
    _same(got, want, eig_rtol=1e-6)


def test_previous_none_entries_and_fold():
    moments = _moments([10, 12], lower_garbage=False)
    (s,) = subspace_update([moments[0]], "k=10")
    torch.testing.assert_close(fold(s), moments[0], atol=1e-6 * float(moments[0].abs().max()), rtol=0)
    got = subspace_update([torch.zeros(10, 10), moments[1]], "k=4", previous=[s, None])
    _same(got, subspace_update(moments, "k=4"), eig_rtol=1e-6)


def test_reference_backend(monkeypatch):
    moments = _moments([9, 9, 4])
    got = subspace_update(moments, "energy=0.8")
    monkeypatch.setenv("NSRU_BACKEND", "reference")
    _same(subspace_update(moments, "energy=0.8"), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference():
    moments = _moments([16, 40, 16, 3])
    got = subspace_update([m.cuda().float() for m in moments], "energy=0.9")
    want = subspace_update_reference([m.float() for m in moments], "energy=0.9")
    for s in got:
        s.basis, s.eigenvalues = s.basis.cpu(), s.eigenvalues.cpu()
    _same(got, want, eig_rtol=1e-7)
