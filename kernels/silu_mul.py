"""SwiGLU activation of a concatenated [gate; up] projection in one launch: `silu_mul`.

```
silu_mul(gate_up [..., 2 * I]) -> out [..., I]
```
gate = gate_up[..., :I], up = gate_up[..., I:] (the layout of one fused gate_up projection), and

    act = round_dtype(g / (1 + exp(-g)))       g = float32(gate)
    out = round_dtype(float32(act) * float32(up))

which is HF's `act_fn(gate_proj(x)) * up_proj(x)` with the same two roundings: torch's silu on
bf16/fp16 computes in fp32 and rounds, then the bf16 * bf16 mul rounds again (the fp32 product of
two bf16 or fp16 values is exact, so rounding it once equals torch's mul). Only the last bit of the
fp32 exp can differ from torch's, so nearly every element equals HF's exactly (see
tests/test_silu_mul.py for the bounds). Very negative g: exp(-g) = inf, act = -0, as in torch.

Layouts: gate_up [..., 2 * I] with a unit last stride; its leading dims must flatten to rows without
a copy (one row stride; a slice of a wider buffer is fine). out is a new contiguous tensor.
0 rows: empty output, no launch.

Launch: grid (rows, cdiv(I, BLOCK)); a program reads BLOCK gate and BLOCK up elements of one row
and writes BLOCK outputs. Bandwidth-bound and tiny: one fixed config, no autotuning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention import call_op


@triton.jit
def _silu_mul_kernel(
    # pointers
    gate_up_ptr,  # [rows, 2 * I]
    out_ptr,  # [rows, I] contiguous
    # sizes
    inter_size,  # I
    # strides (the last dim is contiguous)
    stride_gu_row,
    # meta
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter_size
    gate_ptrs = gate_up_ptr + row * stride_gu_row + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter_size, mask=mask, other=0.0)
    # torch's silu formula (x / (1 + exp(-x))), rounded to the dtype before the mul as in HF
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inter_size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _silu_mul_impl(gate_up: torch.Tensor) -> torch.Tensor:
    inter_size = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter_size), dtype=gate_up.dtype, device=gate_up.device)
    try:
        rows = gate_up.view(-1, gate_up.shape[-1])
    except RuntimeError as err:  # a hidden copy would cost a launch: the caller decides
        raise AssertionError(
            f"gate_up: leading dims {tuple(gate_up.shape[:-1])} with strides "
            f"{gate_up.stride()[:-1]} do not flatten to rows without a copy; pass .contiguous()"
        ) from err
    num_rows = rows.shape[0]
    if num_rows == 0 or inter_size == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter_size))
    _silu_mul_kernel[(num_rows, triton.cdiv(inter_size, block))](
        rows, out, inter_size, rows.stride(0), BLOCK=block, num_warps=4
    )
    return out


_silu_mul_op = torch.library.custom_op(
    "d2sd::silu_mul", _silu_mul_impl, mutates_args=(), schema="(Tensor gate_up) -> Tensor"
)


@_silu_mul_op.register_fake
def _(gate_up):
    inter_size = gate_up.shape[-1] // 2
    return torch.empty(
        (*gate_up.shape[:-1], inter_size), dtype=gate_up.dtype, device=gate_up.device
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 * I] = [gate | up] along the last dim (HF's rounding order).

    gate_up: float, unit last stride, leading dims flattenable to rows without a copy.
    Returns out [..., I] (gate_up.dtype, contiguous).
    """
    assert gate_up.dim() >= 1 and gate_up.is_floating_point(), (
        f"gate_up: [..., 2 * I] float, got {gate_up.dtype}"
    )
    assert gate_up.shape[-1] % 2 == 0, f"gate_up: last dim must be even, got {gate_up.shape[-1]}"
    assert gate_up.stride(-1) == 1 or gate_up.shape[-1] <= 1, (
        f"gate_up: the last dim must be contiguous, got strides {gate_up.stride()}"
    )
    return call_op(_silu_mul_op, _silu_mul_impl, gate_up)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_mul` in torch: `F.silu(gate) * up` in gate_up's dtype (HF LlamaMLP's act_fn path).
    Same shapes as `silu_mul` (the output of the mul is contiguous)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
