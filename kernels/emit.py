"""A cycle's bookkeeping after its K/V rows are copied, in one launch: `emit`.

```
emit(tokens int64 [L], num_new int32 [1], out_tokens int64 [C], out_len int32 [1],
     cycle int32 [1], report int64 [>= 1 + L], anchor int64 [1],
     cache_len=None int32 [1], ctx_positions=None int64 [P], ctx_num_valid=None int32 [1]) -> None
```
    out_tokens[out_len + i] = tokens[i]      for every i < L with out_len + i < C
    out_len += num_new;  cycle += 1
    report[0] = num_new;  report[1 + i] = tokens[i]
    anchor = tokens[num_new - 1]             (the last emitted token: the next step's input)
    with cache_len (the target cache's length, which `commit(advance=False)` left as it was):
        ctx_positions[i] = cache_len + i     (the positions of the rows just committed)
        ctx_num_valid = num_new;  cache_len += num_new

All L tokens are written: those past num_new are scratch that the next cycle overwrites (the
launch has a static shape). The decode loop spends one launch here instead of the torch ops of
`emit_ref` (up to twelve: a graphed decode step is launch-bound, SmolLM2's AR step is ~300
launches). One program; every counter is read before it is advanced, in the same program, and
after the commit launch that read cache_len (same stream).
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
    anchor_ptr,  # [1] int64
    cache_len_ptr,  # [1] int32 (HAS_CACHE)
    ctx_positions_ptr,  # [P] int64 (HAS_CONTEXT)
    ctx_num_valid_ptr,  # [1] int32 (HAS_CONTEXT)
    length,
    capacity,
    num_positions,
    HAS_CACHE: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
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
    tl.store(anchor_ptr, tl.sum(tl.where(offs == num_new - 1, tokens, 0), axis=0))
    tl.store(out_len_ptr, start + num_new)
    tl.store(cycle_ptr, tl.load(cycle_ptr) + 1)
    if HAS_CACHE:
        cache_len = tl.load(cache_len_ptr)
        if HAS_CONTEXT:
            offs_p = tl.arange(0, BLOCK_P)
            positions = cache_len.to(tl.int64) + offs_p
            tl.store(ctx_positions_ptr + offs_p, positions, mask=offs_p < num_positions)
            tl.store(ctx_num_valid_ptr, num_new)
        tl.store(cache_len_ptr, cache_len + num_new)


def emit(
    tokens: torch.Tensor,
    num_new: torch.Tensor,
    out_tokens: torch.Tensor,
    out_len: torch.Tensor,
    cycle: torch.Tensor,
    report: torch.Tensor,
    anchor: torch.Tensor,
    cache_len: torch.Tensor | None = None,
    ctx_positions: torch.Tensor | None = None,
    ctx_num_valid: torch.Tensor | None = None,
) -> None:
    """Append tokens [L] int64 at out_len in out_tokens [C] int64, advance out_len (int32 [1]) by
    num_new (int32 [1], 1 <= num_new <= L) and cycle (int32 [1]) by one, write [num_new,
    tokens...] into report (int64 [>= 1 + L]) and tokens[num_new - 1] into anchor (int64 [1]);
    with cache_len (int32 [1]) also write ctx_positions [P] int64 = cache_len + [0, P) and
    ctx_num_valid (int32 [1]) = num_new when given, and advance cache_len by num_new. All on the
    device, one launch (see the module docstring)."""
    length = tokens.shape[0]
    assert tokens.dim() == 1 and tokens.dtype == out_tokens.dtype == report.dtype == torch.int64
    assert anchor.shape == (1,) and anchor.dtype == torch.int64
    assert num_new.dtype == out_len.dtype == cycle.dtype == torch.int32
    assert report.numel() >= 1 + length, f"report holds {report.numel()}, needs {1 + length}"
    assert (ctx_positions is None) == (ctx_num_valid is None), "ctx_positions with ctx_num_valid"
    assert cache_len is not None or ctx_positions is None, "the context rows need cache_len"
    counters = [t for t in (cache_len, ctx_num_valid) if t is not None]
    assert all(t.shape == (1,) and t.dtype == torch.int32 for t in counters)
    assert ctx_positions is None or (
        ctx_positions.dim() == 1 and ctx_positions.dtype == torch.int64
    )
    tensors = (tokens, num_new, out_tokens, out_len, cycle, report, anchor, *counters)
    for t in (*tensors, *([ctx_positions] if ctx_positions is not None else [])):
        assert t.is_contiguous() and t.device == tokens.device
    num_positions = ctx_positions.shape[0] if ctx_positions is not None else 0
    _emit_kernel[(1,)](
        tokens, num_new, out_tokens, out_len, cycle, report, anchor,
        cache_len if cache_len is not None else num_new,  # unused pointers without them
        ctx_positions if ctx_positions is not None else tokens,
        ctx_num_valid if ctx_num_valid is not None else num_new,
        length, out_tokens.shape[0], num_positions,
        HAS_CACHE=cache_len is not None, HAS_CONTEXT=ctx_positions is not None,
        BLOCK=triton.next_power_of_2(max(length, 1)),
        BLOCK_P=triton.next_power_of_2(max(num_positions, 1)), num_warps=1,
    )  # fmt: skip


def emit_ref(
    tokens: torch.Tensor,
    num_new: torch.Tensor,
    out_tokens: torch.Tensor,
    out_len: torch.Tensor,
    cycle: torch.Tensor,
    report: torch.Tensor,
    anchor: torch.Tensor,
    cache_len: torch.Tensor | None = None,
    ctx_positions: torch.Tensor | None = None,
    ctx_num_valid: torch.Tensor | None = None,
) -> None:
    """Reference of `emit` in torch ops (no host sync; out_len + L must fit in out_tokens)."""
    length = tokens.shape[0]
    offsets = torch.arange(length, device=tokens.device)
    out_tokens.index_copy_(0, out_len.to(torch.int64) + offsets, tokens)
    anchor.copy_(tokens.index_select(0, num_new.to(torch.int64) - 1))
    out_len.add_(num_new)
    cycle.add_(1)
    report[:1].copy_(num_new)
    report[1 : 1 + length].copy_(tokens)
    if cache_len is None:
        return
    if ctx_positions is not None:
        positions = torch.arange(ctx_positions.shape[0], device=tokens.device)
        ctx_positions.copy_(cache_len.to(torch.int64) + positions)
        ctx_num_valid.copy_(num_new)
    cache_len.add_(num_new)
