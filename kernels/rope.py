"""Fused q/k RoPE (rotate-half) with the optional per-head RMSNorm of Qwen3, q and k in one launch.

```
rope_qk(q [..., T, Hq, D], k [..., T, Hkv, D], cos, sin [..., T, D / 2] float32,
        q_norm_weight=None [D], k_norm_weight=None [D], eps=1e-6)
    -> q_out [..., T, Hq, D], k_out [..., T, Hkv, D]     (new, contiguous, q's dtype)
rope_qk_store(q, k, v [..., T, Hkv, D], cos, sin, k_out, v_out [..., T, Hkv, D] (contiguous),
              q_norm_weight=None, k_norm_weight=None, eps=1e-6)
    -> q_out                                            (k_out <- rotated k, v_out <- v)
rope_tables(positions [...] int32/int64, inv_freq [D / 2] float32, attention_scaling=1.0)
    -> cos, sin [..., D / 2] float32 (new, contiguous)
```
`rope_tables` is the model's table step (`Rope.forward`) in one launch instead of torch's three
(multiply, cos, sin; five with a scaling): `f = float32(position) * inv_freq`, `cos(f) * scaling`,
`sin(f) * scaling`, each op rounded once in float32 as torch does it (Triton's cos/sin are
libdevice's cosf/sinf, which torch's CUDA kernels call too).
`rope_qk_store` is the decode loop's form: it writes the rotated keys and the values straight into
the cache's local rows, so that a decoder block spends no separate copy launches on them.
For every head vector x [D] of q and of k (its weight w the q or the k norm weight):

    if weights:  t = x.float();  t = t * rsqrt(mean(t * t) + eps);  x = w * t.to(dtype)
    c, s = cos.to(dtype), sin.to(dtype);  first, second = x[:D/2], x[D/2:]
    out = cat(first * c - second * s, second * c + first * s)

which is `rotate_half_ref(norm(x), cos, sin)` (the model's RoPE) with `norm` = HF's Qwen3RMSNorm.

Rounding: every step is rounded to x's dtype where torch rounds it in that dtype (the normed
value, its product with the weight, cos and sin, each product, the difference and the sum); the
arithmetic between roundings is float32, as torch's bf16/fp16 elementwise ops do it. A product of
two bf16/fp16 values is exact in float32, so each product rounds once, like torch's. FMA
contraction is switched off for the launch (`enable_fp_fusion=False`), so in float32 the rotation
matches torch's separate mul/sub/add bit for bit too. What can differ from torch is the norm's
mean of squares (a different summation order) and rsqrt (here 1 / sqrt, both correctly rounded,
as torch's CPU kernel; torch's CUDA rsqrt is approximate): a few float32 ulp before the rounding
to dtype, so a bf16/fp16 result differs from torch's only where that rounding falls the other way.

Layouts:
* q, k: the last two dims ([H, D]) contiguous; the leading dims [..., T] must flatten to N rows
  with one row stride (views only, no copies), which may exceed H * D: q and k may be column
  slices of one fused [..., T, (Hq + 2 Hkv) * D] projection output, `.unflatten`ed to heads.
* cos, sin: float32 with a unit last stride, leading dims flattenable to `cos_rows` rows. Their
  leading shape is q's leading shape [..., T], or a suffix of it after leading 1s (e.g. [1, T] or
  [T] for q [B, T, Hq, D]: the same positions for every batch row). Row n of q uses cos row
  n % cos_rows, which is exactly that broadcast.
* q may have no heads (Hq = 0): `d2sd.models.layers.write_kv` rotates and stores k and v alone.
* weights: [D] contiguous, q's dtype; both None (Llama, Qwen2) or both given (Qwen3).
* D: a power of two in [16, 256] (each half is one tl.arange block).

Launch: grid (N, Hq + Hkv [+ Hkv]); program (n, h) rotates head h of row n, of q for h < Hq, else
head h - Hq of k; with `rope_qk_store`, programs h >= Hq + Hkv copy head h - Hq - Hkv of v. Row
offsets are int64. Fixed config (launch-bound at decode sizes): one warp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._attention import call_op
from kernels.rms_norm import rms_norm_ref


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` and back: torch's rounding of an elementwise op's result."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_head(
    src,
    dst,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    eps,
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """[optional per-head RMSNorm +] rotate-half of one head vector src[:D] -> dst[:D]."""
    half = tl.arange(0, HEAD_DIM // 2)
    dtype = dst.dtype.element_ty
    first = tl.load(src + half).to(tl.float32)
    second = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)

    if HAS_NORM:
        # HF Qwen3RMSNorm: float32 statistics, the normed value rounded to dtype, then the weight
        mean_square = (tl.sum(first * first) + tl.sum(second * second)) * (1.0 / HEAD_DIM)
        inv_rms = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
        weight_first = tl.load(weight_ptr + half).to(tl.float32)
        weight_second = tl.load(weight_ptr + HEAD_DIM // 2 + half).to(tl.float32)
        first = _rounded(weight_first * _rounded(first * inv_rms, dtype), dtype)
        second = _rounded(weight_second * _rounded(second * inv_rms, dtype), dtype)

    cos = _rounded(tl.load(cos_ptr + half), dtype)
    sin = _rounded(tl.load(sin_ptr + half), dtype)
    out_first = _rounded(first * cos, dtype) - _rounded(second * sin, dtype)
    out_second = _rounded(second * cos, dtype) + _rounded(first * sin, dtype)
    tl.store(dst + half, out_first.to(dtype))
    tl.store(dst + HEAD_DIM // 2 + half, out_second.to(dtype))


# sizes vary between decode steps and families: one compiled variant per dtype / head_dim / norm
@triton.jit(do_not_specialize=["num_q_heads", "num_kv_heads", "cos_rows", "eps"])
def _rope_qk_kernel(
    # pointers
    q_ptr,  # [N, Hq, D], rows stride_q_row apart
    k_ptr,  # [N, Hkv, D], rows stride_k_row apart
    v_ptr,  # [N, Hkv, D], rows stride_v_row apart (HAS_V)
    cos_ptr,  # [cos_rows, D / 2] float32
    sin_ptr,
    q_weight_ptr,  # [D] (HAS_NORM)
    k_weight_ptr,
    q_out_ptr,  # [N, Hq, D] contiguous
    k_out_ptr,  # [N, Hkv, D] contiguous
    v_out_ptr,  # [N, Hkv, D] contiguous (HAS_V)
    # sizes
    num_q_heads,
    num_kv_heads,
    cos_rows,
    eps,
    # strides
    stride_q_row,
    stride_k_row,
    stride_v_row,
    stride_cos_row,
    stride_sin_row,
    # meta
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    # batch rows beyond cos's rows reuse them: cos broadcast over leading batch dims
    cos_row = row % cos_rows
    cos_ptr += cos_row * stride_cos_row
    sin_ptr += cos_row * stride_sin_row
    if head < num_q_heads:
        src = q_ptr + row * stride_q_row + head * HEAD_DIM
        dst = q_out_ptr + (row * num_q_heads + head) * HEAD_DIM
        _rope_head(src, dst, q_weight_ptr, cos_ptr, sin_ptr, eps, HEAD_DIM, HAS_NORM)
    elif head < num_q_heads + num_kv_heads:
        kv_head = head - num_q_heads
        src = k_ptr + row * stride_k_row + kv_head * HEAD_DIM
        dst = k_out_ptr + (row * num_kv_heads + kv_head) * HEAD_DIM
        _rope_head(src, dst, k_weight_ptr, cos_ptr, sin_ptr, eps, HEAD_DIM, HAS_NORM)
    elif HAS_V:
        v_head = head - num_q_heads - num_kv_heads
        full = tl.arange(0, HEAD_DIM)
        value = tl.load(v_ptr + row * stride_v_row + v_head * HEAD_DIM + full)
        tl.store(v_out_ptr + (row * num_kv_heads + v_head) * HEAD_DIM + full, value)


def _head_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., T, H, D] -> a view [N, H, D] (rows one stride apart, [H, D] contiguous)."""
    num_heads, head_dim = x.shape[-2:]
    assert x.stride(-1) == 1 and (num_heads == 1 or x.stride(-2) == head_dim), (
        f"{name}: the [H, D] tail must be contiguous, got strides {x.stride()}"
    )
    try:
        return x.view(math.prod(x.shape[:-2]), num_heads, head_dim)  # (-1 is ambiguous at H = 0)
    except RuntimeError as err:
        raise AssertionError(
            f"{name}: leading dims of {tuple(x.shape)} (strides {x.stride()}) must flatten to one "
            "row stride without a copy"
        ) from err


def _table_rows(table: torch.Tensor, leading: torch.Size, half_dim: int, name: str) -> torch.Tensor:
    """cos/sin [..., D / 2] -> a view [cos_rows, D / 2]; its leading shape must be `leading`
    (q's [..., T]) or a suffix of it after leading 1s (broadcast over the batch)."""
    assert table.dtype == torch.float32, f"{name} must be float32, got {table.dtype}"
    assert table.dim() >= 1 and table.shape[-1] == half_dim, (
        f"{name}: last dim must be D / 2 = {half_dim}, got shape {tuple(table.shape)}"
    )
    table_leading = list(table.shape[:-1])
    while table_leading and table_leading[0] == 1 and len(table_leading) > 1:
        table_leading.pop(0)
    suffix = list(leading[len(leading) - len(table_leading) :]) if table_leading else []
    assert len(table_leading) <= len(leading) and table_leading == suffix, (
        f"{name}: leading shape {tuple(table.shape[:-1])} must be q's {tuple(leading)} or a suffix "
        "of it after leading 1s"
    )
    assert table.stride(-1) == 1, f"{name}: unit last stride required, got {table.stride()}"
    try:
        return table.view(-1, half_dim)
    except RuntimeError as err:
        raise AssertionError(f"{name}: leading dims must flatten without a copy") from err


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_out: torch.Tensor,
    v: torch.Tensor | None = None,
    v_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check the inputs, launch the kernel, return the new q_out (k_out and v_out are written)."""
    assert q.dim() >= 3 and k.dim() == q.dim(), "q [..., T, Hq, D], k [..., T, Hkv, D]"
    assert q.shape[:-2] == k.shape[:-2] and q.shape[-1] == k.shape[-1], (
        f"q {tuple(q.shape)} and k {tuple(k.shape)} must share [..., T] and D"
    )
    head_dim = q.shape[-1]
    assert head_dim in (16, 32, 64, 128, 256), (
        f"head_dim must be a power of two in [16, 256], got {head_dim}"
    )
    assert q.dtype == k.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), (
        f"q, k: one float dtype (fp32/fp16/bf16), got {q.dtype} and {k.dtype}"
    )
    assert (q_norm_weight is None) == (k_norm_weight is None), "q/k norm weights: both or neither"
    has_norm = q_norm_weight is not None
    if has_norm:
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            assert w.shape == (head_dim,) and w.stride(0) == 1, f"{name} must be contiguous [D]"
            assert w.dtype == q.dtype, f"{name} must have q's dtype {q.dtype}, got {w.dtype}"
            assert w.device == q.device, f"{name} is on {w.device}, q on {q.device}"
    has_v = v is not None
    values = (("v", v),) if has_v else ()
    outputs = (("k_out", k_out), ("v_out", v_out)) if has_v else (("k_out", k_out),)
    for name, t in (*values, *outputs):
        assert t.shape == k.shape and t.dtype == q.dtype, (
            f"{name} must be {tuple(k.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}"
        )
    for name, t in outputs:
        assert t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}"
    for name, t in (("k", k), *values, ("cos", cos), ("sin", sin), *outputs):
        assert t.device == q.device, f"{name} is on {t.device}, q on {q.device}"
    q_rows, k_rows = _head_rows(q, "q"), _head_rows(k, "k")
    v_rows = _head_rows(v, "v") if has_v else k_rows
    cos_rows = _table_rows(cos, q.shape[:-2], head_dim // 2, "cos")
    sin_rows = _table_rows(sin, q.shape[:-2], head_dim // 2, "sin")
    assert cos_rows.shape == sin_rows.shape, f"cos {cos.shape} and sin {sin.shape} must match"

    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_rows, num_q_heads = q_rows.shape[:2]
    num_kv_heads = k_rows.shape[1]
    if num_rows == 0:
        return q_out
    grid = (num_rows, num_q_heads + (2 if has_v else 1) * num_kv_heads)
    _rope_qk_kernel[grid](
        q_rows, k_rows, v_rows, cos_rows, sin_rows,
        q_norm_weight if has_norm else q_rows, k_norm_weight if has_norm else q_rows,
        q_out, k_out, v_out if has_v else k_out,
        num_q_heads, num_kv_heads, cos_rows.shape[0], float(eps),
        q_rows.stride(0), k_rows.stride(0), v_rows.stride(0),
        cos_rows.stride(0), sin_rows.stride(0),
        HEAD_DIM=head_dim, HAS_NORM=has_norm, HAS_V=has_v,
        num_warps=1, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out


def _rope_qk_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    k_out = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    return _launch(q, k, cos, sin, q_norm_weight, k_norm_weight, eps, k_out), k_out


def _rope_qk_store_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    return _launch(q, k, cos, sin, q_norm_weight, k_norm_weight, eps, k_out, v, v_out)


_rope_qk_op = torch.library.custom_op(
    "d2sd::rope_qk",
    _rope_qk_impl,
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? q_norm_weight, "
        "Tensor? k_norm_weight, float eps) -> (Tensor, Tensor)"
    ),
)

_rope_qk_store_op = torch.library.custom_op(
    "d2sd::rope_qk_store",
    _rope_qk_store_impl,
    mutates_args=("k_out", "v_out"),
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_out, "
        "Tensor(b!) v_out, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps) -> Tensor"
    ),
)


@_rope_qk_op.register_fake
def _(q, k, cos, sin, q_norm_weight, k_norm_weight, eps):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=q.dtype, device=q.device
    )


@_rope_qk_store_op.register_fake
def _(q, k, v, cos, sin, k_out, v_out, q_norm_weight, k_norm_weight, eps):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) of q and k, after a per-head RMSNorm when the norm weights are given.

    q [..., T, Hq, D], k [..., T, Hkv, D]: one dtype, [H, D] contiguous, leading dims flattenable
    to rows one stride apart (column slices of a fused projection are fine); cos, sin
    [..., T, D / 2] float32 with q's leading shape or a suffix of it after leading 1s (batch
    broadcast); q_norm_weight, k_norm_weight [D] in q's dtype, both or neither.
    Returns new contiguous q_out [..., T, Hq, D] and k_out [..., T, Hkv, D] in q's dtype.
    """
    return call_op(_rope_qk_op, _rope_qk_impl, q, k, cos, sin, q_norm_weight, k_norm_weight, eps)


def rope_qk_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`rope_qk`, writing the rotated k into k_out and v into v_out (one launch in all).

    q, k, cos, sin, the norm weights: as `rope_qk`; v [..., T, Hkv, D] like k (may be a column
    slice of the same projection); k_out, v_out [..., T, Hkv, D] contiguous, q's dtype (a cache's
    local rows). Returns the new contiguous q_out [..., T, Hq, D].
    """
    return call_op(
        _rope_qk_store_op,
        _rope_qk_store_impl,
        q, k, v, cos, sin, k_out, v_out, q_norm_weight, k_norm_weight, eps,
    )  # fmt: skip


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, H, D] by cos/sin [..., T, D / 2] (rotate-half convention, in x's dtype:
    cos/sin cast first, every product and sum rounded as torch rounds it). The model's RoPE."""
    cos = cos[..., None, :].to(x.dtype)
    sin = sin[..., None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rope_qk_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `rope_qk` in torch (the model's path: HF's RMSNorm (`rms_norm_ref`), then
    `rotate_half_ref`, op for op, in q's dtype; no host sync). Same arguments and outputs."""
    assert (q_norm_weight is None) == (k_norm_weight is None), "q/k norm weights: both or neither"
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    return rotate_half_ref(q, cos, sin), rotate_half_ref(k, cos, sin)


def rope_qk_store_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reference of `rope_qk_store`: `rope_qk_ref`, then copies into k_out and v_out."""
    q_out, k_rotated = rope_qk_ref(q, k, cos, sin, q_norm_weight, k_norm_weight, eps)
    k_out.copy_(k_rotated)
    v_out.copy_(v)
    return q_out


# ----------------------------------------------------------------------------------------------
# The tables: positions -> (cos, sin)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_rows", "seq_len", "stride_pb", "stride_pt", "scaling"])
def _rope_tables_kernel(
    positions_ptr,  # [num_rows // seq_len, seq_len] int32/int64 (any strides)
    inv_freq_ptr,  # [half] float32
    cos_ptr,  # [num_rows, half] float32 out
    sin_ptr,
    num_rows,
    seq_len,
    stride_pb,
    stride_pt,
    scaling,
    HALF: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    cols = tl.arange(0, HALF)
    pos_offs = (rows // seq_len).to(tl.int64) * stride_pb + (rows % seq_len) * stride_pt
    position = tl.load(positions_ptr + pos_offs, mask=row_ok, other=0).to(tl.float32)
    freqs = position[:, None] * tl.load(inv_freq_ptr + cols)[None, :]
    cos = tl.cos(freqs)
    sin = tl.sin(freqs)
    if SCALED:
        cos = cos * scaling
        sin = sin * scaling
    out = rows[:, None].to(tl.int64) * HALF + cols[None, :]
    tl.store(cos_ptr + out, cos, mask=row_ok[:, None])
    tl.store(sin_ptr + out, sin, mask=row_ok[:, None])


def _rope_tables_impl(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # positions [rows, T] (rope_tables flattens other shapes): the kernel walks it by two strides
    half = inv_freq.shape[0]
    cos = torch.empty(*positions.shape, half, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    num_rows = positions.numel()
    if num_rows == 0:
        return cos, sin
    # a few elements per thread: libdevice's cosf/sinf are ~50 instructions each, and one warp
    # computing 64 x 32 of them took ~40 us on the H200 (2026-11-30) where torch's three launches
    # took ~8 us
    block_r = min(triton.next_power_of_2(num_rows), max(1, 128 // half))
    _rope_tables_kernel[(triton.cdiv(num_rows, block_r),)](
        positions, inv_freq, cos, sin,
        num_rows, positions.shape[1], *positions.stride(), float(attention_scaling),
        HALF=half, SCALED=attention_scaling != 1.0, BLOCK_R=block_r,
        num_warps=1, enable_fp_fusion=False,
    )  # fmt: skip
    return cos, sin


_rope_tables_op = torch.library.custom_op(
    "d2sd::rope_tables",
    _rope_tables_impl,
    mutates_args=(),
    schema="(Tensor positions, Tensor inv_freq, float attention_scaling) -> (Tensor, Tensor)",
)


@_rope_tables_op.register_fake
def _(positions, inv_freq, attention_scaling):
    shape = (*positions.shape, inv_freq.shape[0])
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(
        shape, dtype=torch.float32
    )


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables of `positions` [...] (int32/int64, any strides, e.g. an expanded [B, T]) for
    frequencies inv_freq [D / 2] float32 (D / 2 a power of two): cos, sin [..., D / 2] float32,
    new and contiguous, in one launch (module docstring)."""
    assert positions.dtype in (torch.int32, torch.int64), f"positions: int, got {positions.dtype}"
    assert inv_freq.dim() == 1 and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    half = inv_freq.shape[0]
    assert half >= 1 and half & (half - 1) == 0, f"D / 2 = {half} must be a power of two"
    assert inv_freq.device == positions.device, "positions and inv_freq on different devices"
    shape = (*positions.shape, half)
    # [rows, T], a view where it can be ([T] -> [1, T]; an expanded [B, T] as it is)
    positions = positions.reshape(1, -1) if positions.dim() < 2 else positions.flatten(0, -2)
    cos, sin = call_op(
        _rope_tables_op, _rope_tables_impl, positions, inv_freq, float(attention_scaling)
    )
    return cos.view(shape), sin.view(shape)


def rope_tables_ref(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `rope_tables` in torch ops (the three or five launches it replaces)."""
    freqs = positions[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling == 1.0:
        return cos, sin
    return cos * attention_scaling, sin * attention_scaling
