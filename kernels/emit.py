"""Emit a cycle's tokens into the output buffer and the host report, in one launch: `emit`.

```
emit(tokens int64 [L], num_new int32 [1], out_tokens int64 [C], out_len int32 [1],
     cycle int32 [1], report int64 [>= 1 + L]) -> None
```
    out_tokens[out_len + i] = tokens[i]      for every i < L with out_len + i < C
    out_len += num_new;  cycle += 1
    report[0] = num_new;  report[1 + i] = tokens[i]

All L tokens are written: those past num_new are scratch that the next cycle overwrites (the
launch has a static shape). The decode loop spends one launch here instead of the eight torch ops
of `emit_ref` (a graphed decode step is launch-bound: SmolLM2's AR step is ~300 launches).
One program; out_len is read before it is advanced, in the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _emit_kernel(
    tokens_ptr,  # [L] int64
    num_new_ptr,  # [1] int32
    out_tokens_ptr,  # [C] int64
    out_len_ptr,  # [1] int32
    cycle_ptr,  # [1] int32
    report_ptr,  # [>= 1 + L] int64
    length,
    capacity,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    in_range = offs < length
    tokens = tl.load(tokens_ptr + offs, mask=in_range)
    num_new = tl.load(num_new_ptr)
    start = tl.load(out_len_ptr)
    dst = start.to(tl.int64) + offs
    tl.store(out_tokens_ptr + dst, tokens, mask=in_range & (dst < capacity))
    tl.store(report_ptr + 1 + offs, tokens, mask=in_range)
    tl.store(report_ptr, num_new.to(tl.int64))
    tl.store(out_len_ptr, start + num_new)
    tl.store(cycle_ptr, tl.load(cycle_ptr) + 1)


def emit(
    tokens: torch.Tensor,
    num_new: torch.Tensor,
    out_tokens: torch.Tensor,
    out_len: torch.Tensor,
    cycle: torch.Tensor,
    report: torch.Tensor,
) -> None:
    """Append tokens [L] int64 at out_len in out_tokens [C] int64, advance out_len (int32 [1]) by
    num_new (int32 [1]) and cycle (int32 [1]) by one, and write [num_new, tokens...] into report
    (int64 [>= 1 + L]); all on the device, one launch (see the module docstring)."""
    length = tokens.shape[0]
    assert tokens.dim() == 1 and tokens.dtype == out_tokens.dtype == report.dtype == torch.int64
    assert num_new.dtype == out_len.dtype == cycle.dtype == torch.int32
    assert report.numel() >= 1 + length, f"report holds {report.numel()}, needs {1 + length}"
    for t in (tokens, num_new, out_tokens, out_len, cycle, report):
        assert t.is_contiguous() and t.device == tokens.device
    _emit_kernel[(1,)](
        tokens, num_new, out_tokens, out_len, cycle, report,
        length, out_tokens.shape[0],
        BLOCK=triton.next_power_of_2(max(length, 1)), num_warps=1,
    )  # fmt: skip


def emit_ref(
    tokens: torch.Tensor,
    num_new: torch.Tensor,
    out_tokens: torch.Tensor,
    out_len: torch.Tensor,
    cycle: torch.Tensor,
    report: torch.Tensor,
) -> None:
    """Reference of `emit` in torch ops (no host sync; out_len + L must fit in out_tokens)."""
    length = tokens.shape[0]
    offsets = torch.arange(length, device=tokens.device)
    out_tokens.index_copy_(0, out_len.to(torch.int64) + offsets, tokens)
    out_len.add_(num_new)
    cycle.add_(1)
    report[:1].copy_(num_new)
    report[1 : 1 + length].copy_(tokens)
