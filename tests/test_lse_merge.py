"""lse_merge / lse_merge_ against the fp32 torch reference (CPU interpreter and GPU) and FlashInfer."""

import pytest
import torch

from kernels._attention import merge_ref
from kernels.lse_merge import lse_merge, lse_merge_, lse_merge_ref
from tests._attention_cases import DEVICE, LOW_DTYPES, assert_close_by_dtype, assert_lse_close

NEG_INF = float("-inf")


def _states(shape, dtype_a, dtype_b=None, *, empty_frac=0.25, device=DEVICE):
    """Two states over `shape` = [..., H, D]; some rows empty on one side, some on both sides.

    Empty rows carry NaN in o: the merge must never read an empty side's o.
    """
    dtype_b = dtype_b or dtype_a
    o_a = torch.randn(shape, device=device).to(dtype_a)
    o_b = torch.randn(shape, device=device).to(dtype_b)
    lse_a = torch.randn(shape[:-1], device=device) * 4
    lse_b = torch.randn(shape[:-1], device=device) * 4
    empty_a = torch.rand(shape[:-1], device=device) < empty_frac
    empty_b = torch.rand(shape[:-1], device=device) < empty_frac
    if empty_frac > 0:  # at least one row empty on both sides
        empty_b.view(-1)[:3] = True
        empty_a.view(-1)[:3] = True
    lse_a[empty_a] = NEG_INF
    lse_b[empty_b] = NEG_INF
    o_a[empty_a] = float("nan")
    o_b[empty_b] = float("nan")
    return o_a, lse_a, o_b, lse_b


def _check(o, lse, o_a, lse_a, o_b, lse_b):
    """Reference comparison plus the exact empty-side rules."""
    dtype = o_a.dtype
    o_ref, lse_ref = lse_merge_ref(o_a, lse_a, o_b, lse_b)
    o_low, _ = merge_ref(o_a, lse_a, o_b.to(dtype), lse_b)
    assert o.dtype == dtype and o.shape == o_a.shape
    assert_close_by_dtype(o, o_ref, o_low, dtype)
    assert_lse_close(lse, lse_ref)
    only_a = (lse_b == NEG_INF) & (lse_a > NEG_INF)
    only_b = (lse_a == NEG_INF) & (lse_b > NEG_INF)
    neither = (lse_a == NEG_INF) & (lse_b == NEG_INF)
    assert torch.equal(o[only_a], o_a[only_a]), "empty b must leave o_a bit for bit"
    assert torch.equal(lse[only_a], lse_a[only_a])
    if o_b.dtype == dtype:
        assert torch.equal(o[only_b], o_b[only_b]), "empty a must leave o_b bit for bit"
    assert torch.equal(lse[only_b], lse_b[only_b])
    assert (o[neither] == 0).all() and (lse[neither] == NEG_INF).all()


# shapes: [tokens, heads, head_dim]; extra leading dims ([B, T, H, D]); head_dim not a power of 2
SHAPES = [(7, 3, 64), (2, 5, 4, 128), (33, 1, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES])
@pytest.mark.parametrize("inplace", [False, True])
def test_lse_merge_matches_reference(shape, dtype, inplace):
    o_a, lse_a, o_b, lse_b = _states(shape, dtype)
    inputs = [t.clone() for t in (o_a, lse_a, o_b, lse_b)]
    if inplace:
        o_io, lse_io = o_a.clone(), lse_a.clone()
        assert lse_merge_(o_io, lse_io, o_b, lse_b) is None
        o, lse = o_io, lse_io
    else:
        o, lse = lse_merge(o_a, lse_a, o_b, lse_b)
    for before, after in zip(inputs, (o_a, lse_a, o_b, lse_b)):  # inputs untouched
        assert torch.equal(before.nan_to_num(), after.nan_to_num())
    _check(o, lse, o_a, lse_a, o_b, lse_b)


def test_lse_merge_mixed_dtypes():
    # fp32 prefix state merged into a 16-bit branch state: computed in fp32, stored in o_a's dtype
    low = LOW_DTYPES[0]
    o_a, lse_a, o_b, lse_b = _states((9, 4, 64), low, torch.float32)
    o, lse = lse_merge(o_a, lse_a, o_b, lse_b)
    _check(o, lse, o_a, lse_a, o_b, lse_b)


def test_lse_merge_strided_views():
    # in-place through a strided view (every other token of a larger buffer), other side strided too
    big_o = torch.randn(10, 4, 64, device=DEVICE)
    big_lse = torch.randn(10, 4, device=DEVICE)
    o_a, lse_a = big_o[::2], big_lse[::2]
    o_b = torch.randn(4, 5, 64, device=DEVICE).transpose(0, 1)  # [5, 4, 64], token stride 64
    lse_b = torch.randn(5, 4, device=DEVICE)
    expect_o, expect_lse = lse_merge_ref(o_a, lse_a, o_b, lse_b)
    untouched = big_o[1::2].clone()
    lse_merge_(o_a, lse_a, o_b, lse_b)
    assert_close_by_dtype(big_o[::2], expect_o, None, torch.float32)
    assert_lse_close(big_lse[::2], expect_lse)
    assert torch.equal(big_o[1::2], untouched)


def test_lse_merge_opcheck():
    # the torch.library registrations (schema, fake impl, mutation) are consistent
    o_a, lse_a, o_b, lse_b = _states((3, 2, 16), torch.float32, empty_frac=0.0)
    o_a, o_b = o_a.nan_to_num(), o_b.nan_to_num()
    lse_a, lse_b = lse_a.clamp_min(-50), lse_b.clamp_min(-50)
    torch.library.opcheck(torch.ops.d2sd.lse_merge.default, (o_a, lse_a, o_b, lse_b))
    torch.library.opcheck(
        torch.ops.d2sd.lse_merge_.default, (o_a.clone(), lse_a.clone(), o_b, lse_b)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(80, 32, 128), (80, 9, 64)])
def test_lse_merge_matches_flashinfer(shape):
    flashinfer = pytest.importorskip("flashinfer")
    o_a, lse_a, o_b, lse_b = _states(shape, torch.bfloat16, device="cuda", empty_frac=0.0)
    o, lse = lse_merge(o_a, lse_a, o_b, lse_b)
    o_fi, lse_fi = flashinfer.merge_state(o_a, lse_a, o_b, lse_b)
    o_ref, lse_ref = lse_merge_ref(o_a, lse_a, o_b, lse_b)
    assert_close_by_dtype(o, o_ref, o_fi, torch.bfloat16, "o vs FlashInfer-bounded")
    assert_lse_close(lse, lse_fi, "lse vs FlashInfer")
    assert_lse_close(lse, lse_ref)
