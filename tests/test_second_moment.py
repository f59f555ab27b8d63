"""``second_moment_`` against its torch reference: every dtype pair, masks, widths 1..4096 in one
call, degenerate batches, the op contract (opcheck) and the errors at the door."""

import pytest
import torch

from nsru.ops import second_moment_, second_moment_reference_, symmetrize
from nsru.ops.backend import extension_available

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MOMENT_DTYPES = [torch.float32, torch.float64]
# Relative to the largest entry: fp32 accumulation over a few hundred rows in another order.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}

needs_extension = pytest.mark.skipif(not extension_available(), reason="nsru._C is not built")


def _upper_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(float(want.abs().max()), 1.0)
    diff = float((torch.triu(got) - torch.triu(want)).abs().max()) if got.numel() else 0.0
    assert diff <= RTOL[dtype] * scale, f"max upper-triangle error {diff:.3g} (scale {scale:.3g})"


def _case(widths, dtype, rows=(3, 37), masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*rows, d, generator=g).to(dtype) for d in widths]
    masks = [torch.rand(*rows, generator=g) > 0.4 for _ in widths] if masked else None
    return inputs, masks


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("moment_dtype", MOMENT_DTYPES, ids=str)
@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
def test_matches_reference_every_dtype_pair(input_dtype, moment_dtype, masked):
    widths = [1, 5, 64, 300, 520]
    inputs, masks = _case(widths, input_dtype, masked=masked)
    start = [torch.randn(d, d, dtype=moment_dtype) for d in widths]
    got = [c.clone() for c in start]
    want = [c.clone() for c in start]
    second_moment_(got, inputs, masks)
    second_moment_reference_(want, inputs, masks)
    for g, w in zip(got, want):
        _upper_close(g, w, moment_dtype)


def test_widths_1_to_4096_in_one_call():
    widths = [1, 2, 3, 17, 255, 256, 257, 511, 513, 1024, 4096]
    inputs, masks = _case(widths, torch.bfloat16, rows=(2, 9), masked=True)
    masks[0] = None
    got = [torch.zeros(d, d) for d in widths]
    want = [torch.zeros(d, d, dtype=torch.float64) for d in widths]
    second_moment_(got, inputs, masks)
    second_moment_reference_(want, inputs, masks)
    for g, w in zip(got, want):
        _upper_close(g.double(), w, torch.float32)


def test_accumulates_and_symmetrize_gives_full_matrix():
    inputs, _ = _case([700], torch.float32, rows=(64,))
    c = torch.zeros(700, 700, dtype=torch.float64)
    second_moment_([c], inputs)
    second_moment_([c], inputs)
    x = inputs[0].double()
    _upper_close(symmetrize(c), 2 * x.T @ x, torch.float64)
    torch.testing.assert_close(symmetrize(c), symmetrize(c).T)


def test_many_small_modules_and_long_masked_inputs():
    # Many tiny modules share the threads; two long masked ones need several converted chunks.
    widths = [8] * 40 + [96, 200]
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(5, d, generator=g) for d in widths[:-2]]
    inputs += [torch.randn(3000, d, generator=g).half() for d in widths[-2:]]
    masks = [None] * 40 + [torch.rand(3000, generator=g) > 0.5 for _ in range(2)]
    got = [torch.zeros(d, d) for d in widths]
    want = [torch.zeros(d, d) for d in widths]
    second_moment_(got, inputs, masks)
    second_moment_reference_(want, inputs, masks)
    for gm, w in zip(got, want):
        _upper_close(gm, w, torch.float32)


def test_masked_modules_over_several_passes():
    # 5 x ~1800 kept rows x 1024 fp64 conversions > the 32 MiB a pass holds: at least two passes.
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2000, 1024, generator=g) for _ in range(5)]
    masks = [torch.rand(2000, generator=g) > 0.1 for _ in range(5)]
    got = [torch.zeros(1024, 1024, dtype=torch.float64) for _ in range(5)]
    want = [torch.zeros(1024, 1024, dtype=torch.float64) for _ in range(5)]
    second_moment_(got, inputs, masks)
    second_moment_reference_(want, inputs, masks)
    for gm, w in zip(got, want):
        _upper_close(gm, w, torch.float64)


@pytest.mark.parametrize(
    "mask_of",
    [lambda m: m, lambda m: m.long(), lambda m: m.float(), lambda m: m.reshape(-1)],
    ids=["bool", "long", "float", "flat"],
)
def test_mask_forms(mask_of):
    inputs, masks = _case([33], torch.float32, rows=(4, 10), masked=True)
    got, want = [torch.zeros(33, 33)], [torch.zeros(33, 33)]
    second_moment_(got, inputs, [mask_of(masks[0])])
    second_moment_reference_(want, inputs, masks)
    _upper_close(got[0], want[0], torch.float32)


def test_strided_inputs():
    base = torch.randn(40, 2 * 300)
    inputs = [base[:, ::2], base.T[:300].T.contiguous()[:, :250], base[::3, :300]]
    widths = [300, 250, 300]
    got = [torch.zeros(d, d) for d in widths]
    want = [torch.zeros(d, d) for d in widths]
    second_moment_(got, inputs)
    second_moment_reference_(want, inputs)
    for g, w in zip(got, want):
        _upper_close(g, w, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_and_all_masked_batches_change_nothing(dtype):
    widths = [16, 300]
    start = [torch.randn(d, d) for d in widths]
    moments = [c.clone() for c in start]
    second_moment_(moments, [torch.empty(0, d, dtype=dtype) for d in widths])
    second_moment_(moments, [torch.empty(2, 0, d, dtype=dtype) for d in widths], [torch.ones(2, 0) for _ in widths])
    x = [torch.randn(3, 7, d).to(dtype) for d in widths]
    second_moment_(moments, x, [torch.zeros(3, 7, dtype=torch.bool) for _ in widths])
    second_moment_([], [])
    for c, s in zip(moments, start):
        assert torch.equal(c, s)


def test_zero_width_module():
    moments = [torch.zeros(0, 0), torch.zeros(3, 3)]
    second_moment_(moments, [torch.empty(5, 0), torch.ones(5, 3)])
    assert torch.equal(torch.triu(moments[1]), torch.triu(torch.full((3, 3), 5.0)))


def test_reference_backend_gives_the_same(monkeypatch):
    inputs, masks = _case([130, 7], torch.bfloat16, masked=True)
    got = [torch.zeros(d, d) for d in (130, 7)]
    second_moment_(got, inputs, masks)
    monkeypatch.setenv("NSRU_BACKEND", "reference")
    want = [torch.zeros(d, d) for d in (130, 7)]
    second_moment_(want, inputs, masks)
    for g, w in zip(got, want):
        _upper_close(g, w, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_reference(input_dtype, masked):
    widths = [1, 7, 300, 1025, 2100]
    inputs, masks = _case(widths, input_dtype, rows=(2, 65), masked=masked)
    for moment_dtype in MOMENT_DTYPES:
        got = [torch.zeros(d, d, dtype=moment_dtype, device="cuda") for d in widths]
        want = [torch.zeros(d, d, dtype=torch.float64) for d in widths]
        cuda_masks = [m.cuda() for m in masks] if masks else None
        second_moment_(got, [x.cuda() for x in inputs], cuda_masks)
        second_moment_reference_(want, inputs, masks)
        for g, w in zip(got, want):
            _upper_close(g.cpu().double(), w, moment_dtype)


@needs_extension
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_opcheck(masked):
    inputs, masks = _case([4, 300], torch.bfloat16, rows=(6,), masked=masked)
    moments = [torch.zeros(4, 4), torch.zeros(300, 300, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.nsru.second_moment_.default, (moments, inputs, masks or []))


# Errors: the Python face raises ValueError/TypeError, the raw op a RuntimeError with the same story.
BAD = [
    ("width", lambda: ([torch.zeros(4, 4)], [torch.zeros(2, 5)], None), ValueError, "width|last dimension"),
    ("not square", lambda: ([torch.zeros(4, 5)], [torch.zeros(2, 4)], None), ValueError, "square"),
    ("not contiguous", lambda: ([torch.zeros(8, 8)[::2, ::2]], [torch.zeros(2, 4)], None), ValueError, "contiguous"),
    ("moment dtype", lambda: ([torch.zeros(4, 4, dtype=torch.half)], [torch.zeros(2, 4)], None), TypeError, "float32 or float64"),
    ("input dtype", lambda: ([torch.zeros(4, 4)], [torch.zeros(2, 4, dtype=torch.int32)], None), TypeError, "floating point|float32, float64"),
    ("counts", lambda: ([torch.zeros(4, 4)], [], None), ValueError, "1 moments and 0 inputs"),
    ("mask count", lambda: ([torch.zeros(4, 4)], [torch.zeros(2, 4)], [None, None]), ValueError, "masks"),
    ("mask rows", lambda: ([torch.zeros(4, 4)], [torch.zeros(2, 4)], [torch.ones(3)]), ValueError, "entries"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_errors(make, error, match):
    moments, inputs, masks = make()
    with pytest.raises(error, match=match):
        second_moment_(moments, inputs, masks)


@needs_extension
@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_errors_of_the_raw_op(make, error, match):
    moments, inputs, masks = make()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nsru.second_moment_(moments, inputs, masks or [])
