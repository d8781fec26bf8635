"""RMSNorm of rows, optionally after a residual add, in one launch: `rms_norm`.

```
rms_norm(x [..., H], weight [H], eps, residual=None [..., H])
    -> out [..., H]                       (residual None)
    -> (out [..., H], s [..., H])         (residual given)
```
Math, in the order HF's LlamaRMSNorm / Qwen3RMSNorm round (it matters for bf16 equality):

    s      = round_dtype(x + residual)              (or s = x; the add in fp32, rounded once)
    t      = float32(s)
    normed = round_dtype(t * rsqrt(mean(t * t) + eps))      (mean over the last dim, in fp32)
    out    = round_dtype(float32(weight) * float32(normed))

The last product of two bf16 (or fp16) values is exact in fp32 (8 + 8, resp. 11 + 11 significand
bits <= 24), so rounding it once equals torch's bf16 * bf16. The only differences from torch are the
order of the fp32 sum in the mean and the rsqrt's last bit, so after the rounding to bf16/fp16
nearly every element equals HF's exactly (see tests/test_rms_norm.py for the bounds).

Layouts: x, residual [..., H] with a unit last stride; their leading dims must flatten to rows
without a copy (one row stride; a slice like `big[:, :H]` is fine). weight [H] contiguous, x's
dtype. Outputs are new contiguous tensors. 0 rows: empty outputs, no launch.

Launch: grid (cdiv(rows, BLOCK_R),); a program normalizes BLOCK_R whole rows (BLOCK_H =
next_power_of_2(H) >= H, so the row is in registers and x is read once). H > 8192 raises a
ValueError (a row would no longer fit one program's registers; every model we run has H <= 8192).
Small H (per-head q/k norms, H = 64 / 128) packs several rows per program. Bandwidth-bound and
tiny: one fixed config, no autotuning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention import call_op

MAX_HIDDEN = 8192


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    # pointers
    x_ptr,  # [rows, H]
    residual_ptr,  # [rows, H] (HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [rows, H] contiguous
    sum_ptr,  # [rows, H] contiguous (HAS_RESIDUAL): s = x + residual
    # sizes
    num_rows,
    hidden_size,
    eps,
    # strides (the last dim is contiguous)
    stride_x_row,
    stride_r_row,
    # meta
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    col_valid = cols < hidden_size
    mask = (rows < num_rows)[:, None] & col_valid[None, :]
    rows = rows.to(tl.int64)

    s = tl.load(x_ptr + (rows * stride_x_row)[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + (rows * stride_r_row)[:, None] + cols[None, :], mask=mask, other=0.0
        )
        # rounded to the input dtype before the norm reads it, as `h = x + attn_out` is in torch
        s = (s.to(tl.float32) + residual.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + (rows * hidden_size)[:, None] + cols[None, :], s, mask=mask)

    t = s.to(tl.float32)
    # padding columns load 0 and add nothing; divide by the true H
    variance = tl.sum(t * t, axis=1) / hidden_size
    # HF rounds the normalized row to the input dtype BEFORE the weight multiply
    normed = (t * tl.rsqrt(variance + eps)[:, None]).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=col_valid, other=0.0)
    out = weight.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(
        out_ptr + (rows * hidden_size)[:, None] + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., H] -> a view [rows, H] (never a copy: a hidden copy would cost a launch)."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, (
        f"{name}: the last dim must be contiguous, got strides {t.stride()}"
    )
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError as err:
        raise AssertionError(
            f"{name}: leading dims {tuple(t.shape[:-1])} with strides {t.stride()[:-1]} do not "
            "flatten to rows without a copy; pass .contiguous()"
        ) from err


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    s: torch.Tensor | None,
) -> None:
    x_rows = _as_rows(x, "x")
    num_rows, hidden_size = x_rows.shape
    if num_rows == 0:
        return
    has_residual = residual is not None
    r_rows = _as_rows(residual, "residual") if has_residual else x_rows
    block_h = triton.next_power_of_2(hidden_size)
    # ~4k elements per program: a whole row for H >= 4096, several short rows otherwise
    block_r = max(1, min(4096 // block_h, triton.next_power_of_2(num_rows)))
    num_warps = 4 if block_r * block_h <= 4096 else 8
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x_rows, r_rows, weight, out, s if has_residual else out,
        num_rows, hidden_size, eps,
        x_rows.stride(0), r_rows.stride(0),
        HAS_RESIDUAL=has_residual, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def _add_rms_norm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, s)
    return out, s


# two ops: a custom op has one return type, and the residual form returns two tensors
_rms_norm_op = torch.library.custom_op(
    "d2sd::rms_norm",
    _rms_norm_impl,
    mutates_args=(),
    schema="(Tensor x, Tensor weight, float eps) -> Tensor",
)
_add_rms_norm_op = torch.library.custom_op(
    "d2sd::add_rms_norm",
    _add_rms_norm_impl,
    mutates_args=(),
    schema="(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm / Qwen3RMSNorm of x's rows, or of s = x + residual (one launch).

    x [..., H] (unit last stride, leading dims flattenable to rows without a copy, H <= 8192);
    weight [H] contiguous, x.dtype; residual None or [..., H] like x (same shape and dtype).
    Returns out [..., H] (x.dtype, contiguous) when residual is None, else (out, s) with
    s = (x + residual) rounded to x.dtype and out = rms_norm(s).
    Raises ValueError when H > 8192 (one row per program; no chunked path).
    """
    assert x.dim() >= 1 and x.is_floating_point(), f"x: [..., H] float, got {x.dtype}"
    hidden_size = x.shape[-1]
    if hidden_size > MAX_HIDDEN:
        raise ValueError(f"rms_norm: H = {hidden_size} > {MAX_HIDDEN} (one row per program)")
    assert weight.shape == (hidden_size,) and weight.is_contiguous(), (
        f"weight: contiguous [{hidden_size}], got {tuple(weight.shape)} strides {weight.stride()}"
    )
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"
    if residual is None:
        return call_op(_rms_norm_op, _rms_norm_impl, x, weight, float(eps))
    assert residual.shape == x.shape and residual.dtype == x.dtype, (
        f"residual {tuple(residual.shape)} {residual.dtype} != x {tuple(x.shape)} {x.dtype}"
    )
    assert residual.device == x.device, f"residual on {residual.device}, x on {x.device}"
    return call_op(_add_rms_norm_op, _add_rms_norm_impl, x, residual, weight, float(eps))


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` in torch: HF LlamaRMSNorm.forward op for op (bit-equal to the module in any
    dtype), after `s = x + residual` in x's dtype. Same shapes and returns as `rms_norm`."""
    s = x if residual is None else x + residual
    input_dtype = s.dtype
    hidden_states = s.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    out = weight * hidden_states.to(input_dtype)
    return out if residual is None else (out, s)
