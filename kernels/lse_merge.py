"""Merge two attention states by their log-sum-exp: `lse_merge` (out of place), `lse_merge_`.

Math (base-2 LSE, like FlashInfer's `merge_state`): two states over disjoint key sets A and B,
`o_x = sum_{j in X} 2^(s_j - lse_x) v_j`, `lse_x = log2(sum_{j in X} 2^s_j)`, merge into the state
over A + B:

    m   = max(lse_a, lse_b)
    w_x = 2^(lse_x - m) / (2^(lse_a - m) + 2^(lse_b - m))
    o   = w_a * o_a + w_b * o_b            (float32 arithmetic, stored in o_a's dtype)
    lse = m + log2(2^(lse_a - m) + 2^(lse_b - m))

Layouts: o_* [..., H, D] (any float dtype each; D contiguous), lse_* [..., H] float32. The leading
dims must be flattenable to one (views only, no copies: the in-place form writes through them).
Empty sides: a row with lse = -inf (no key seen) has weight exactly 0 and its `o` is never read, so
the other side comes out unchanged: lse bit for bit, o bit for bit when it has o_a's dtype. Both
empty: o = 0, lse = -inf (no NaN).

Launch: one program per BLOCK_R (token, head) rows x the whole head_dim. Bandwidth-bound and tiny,
so one fixed config on every device (autotuning an in-place op would also apply it repeatedly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention import call_op, merge_ref, merge_two


@triton.jit(
    do_not_specialize=[
        "num_rows", "num_heads", "head_dim",
        "stride_la_t", "stride_la_h", "stride_lb_t", "stride_lb_h", "stride_l_t", "stride_l_h",
    ]
)  # fmt: skip
def _lse_merge_kernel(
    # pointers
    o_a_ptr,
    lse_a_ptr,
    o_b_ptr,
    lse_b_ptr,
    o_ptr,
    lse_ptr,
    # sizes
    num_rows,
    num_heads,
    head_dim,
    # strides (row = token * num_heads + head; head_dim is contiguous)
    stride_oa_t,
    stride_oa_h,
    stride_la_t,
    stride_la_h,
    stride_ob_t,
    stride_ob_h,
    stride_lb_t,
    stride_lb_h,
    stride_o_t,
    stride_o_h,
    stride_l_t,
    stride_l_h,
    # meta
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    token = rows // num_heads
    head = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    lse_a = tl.load(lse_a_ptr + token * stride_la_t + head * stride_la_h, mask=row_valid)
    lse_b = tl.load(lse_b_ptr + token * stride_lb_t + head * stride_lb_h, mask=row_valid)
    w_a, w_b, lse = merge_two(lse_a, lse_b)

    # an empty side's o is never read: it may hold anything (0 by convention, garbage in practice)
    use_a = (row_valid & (w_a > 0))[:, None] & d_valid[None, :]
    use_b = (row_valid & (w_b > 0))[:, None] & d_valid[None, :]
    o_a = tl.load(
        o_a_ptr + (token * stride_oa_t + head * stride_oa_h)[:, None] + offs_d[None, :],
        mask=use_a,
        other=0.0,
    )
    o_b = tl.load(
        o_b_ptr + (token * stride_ob_t + head * stride_ob_h)[:, None] + offs_d[None, :],
        mask=use_b,
        other=0.0,
    )
    o = w_a[:, None] * o_a.to(tl.float32) + w_b[:, None] * o_b.to(tl.float32)

    tl.store(
        o_ptr + (token * stride_o_t + head * stride_o_h)[:, None] + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )
    tl.store(lse_ptr + token * stride_l_t + head * stride_l_h, lse, mask=row_valid)


def _rows(o: torch.Tensor, lse: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., H, D] / [..., H] -> views [N, H, D] / [N, H] (never copies: in-place writes go through)."""
    assert o.dim() >= 2 and lse.shape == o.shape[:-1], (
        f"{name}: o must be [..., H, D] and lse [..., H], got {tuple(o.shape)} and {tuple(lse.shape)}"
    )
    assert lse.dtype == torch.float32, f"{name}: lse must be float32, got {lse.dtype}"
    assert o.stride(-1) == 1, f"{name}: o's head_dim must be contiguous, got strides {o.stride()}"
    try:
        return o.view(-1, *o.shape[-2:]), lse.view(-1, lse.shape[-1])
    except RuntimeError as err:
        raise AssertionError(f"{name}: leading dims must be flattenable without a copy") from err


def _launch(o_a, lse_a, o_b, lse_b, o, lse) -> None:
    for name, t in (("o_b", o_b), ("lse_a", lse_a), ("lse_b", lse_b), ("o", o), ("lse", lse)):
        assert t.device == o_a.device, f"{name} is on {t.device}, o_a on {o_a.device}"
    assert o_b.shape == o_a.shape, f"o_b {tuple(o_b.shape)} != o_a {tuple(o_a.shape)}"
    oa, la = _rows(o_a, lse_a, "a")
    ob, lb = _rows(o_b, lse_b, "b")
    oo, lo = _rows(o, lse, "out")
    num_tokens, num_heads, head_dim = oa.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, min(64, 4096 // block_d, triton.next_power_of_2(num_rows)))
    _lse_merge_kernel[(triton.cdiv(num_rows, block_r),)](
        oa, la, ob, lb, oo, lo,
        num_rows, num_heads, head_dim,
        *oa.stride()[:2], *la.stride(),
        *ob.stride()[:2], *lb.stride(),
        *oo.stride()[:2], *lo.stride(),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def _lse_merge_impl(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=o_a.device)
    _launch(o_a, lse_a, o_b, lse_b, o, lse)
    return o, lse


def _lse_merge_inplace_impl(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    _launch(o_a, lse_a, o_b, lse_b, o_a, lse_a)


_lse_merge_op = torch.library.custom_op(
    "d2sd::lse_merge",
    _lse_merge_impl,
    mutates_args=(),
    schema="(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor, Tensor)",
)
_lse_merge_inplace_op = torch.library.custom_op(
    "d2sd::lse_merge_",
    _lse_merge_inplace_impl,
    mutates_args=("o_a", "lse_a"),
    schema="(Tensor(a!) o_a, Tensor(b!) lse_a, Tensor o_b, Tensor lse_b) -> ()",
)


@_lse_merge_op.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device), torch.empty(
        lse_a.shape, dtype=torch.float32, device=o_a.device
    )


@_lse_merge_inplace_op.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return None


def lse_merge(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge states (o_a, lse_a) and (o_b, lse_b) into a new (o, lse).

    o_a, o_b: [..., H, D] (o in o_a's dtype); lse_a, lse_b: [..., H] float32, base 2.
    Returns o [..., H, D] (o_a.dtype, contiguous) and lse [..., H] float32.
    """
    return call_op(_lse_merge_op, _lse_merge_impl, o_a, lse_a, o_b, lse_b)


def lse_merge_(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    """In-place `lse_merge`: (o_a, lse_a) <- merge((o_a, lse_a), (o_b, lse_b))."""
    call_op(_lse_merge_inplace_op, _lse_merge_inplace_impl, o_a, lse_a, o_b, lse_b)


def lse_merge_ref(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch reference: (o float32 [..., H, D], lse float32 [..., H])."""
    return merge_ref(o_a.float(), lse_a.float(), o_b.float(), lse_b.float())
