"""Commit the accepted path: copy its K/V rows of every layer (and its hidden states) in one launch.

```
commit(k_local, v_local [layers, R, Hkv, D], k_cache, v_cache [layers, max_len, Hkv, D],
       rows int32/int64 [T], cache_len int32 [1], num_new int32 [1],
       hidden_src=None [R, Hh], hidden_dst=None [T, Hh], advance=True) -> None
```
For d = 0 .. T-1 and every layer l:
    k_cache[l, cache_len + d] = k_local[l, rows[d]]     (same for v)
    hidden_dst[d]             = hidden_src[rows[d]]
then cache_len += num_new (with advance=False the caller advances it: the decode loop's
`kernels.emit` does, beside its other counters, which saves the add's launch).

* A fixed T rows are copied (`rows` = `Accept.path_rows`: the accepted path, then the rest of the
  chosen branch), so the launch has a static shape; rows d >= num_new land past the new cache_len,
  where nothing reads them, and the next commit overwrites them. Destination rows at or beyond
  max_len are skipped (never written), so a nearly full cache is safe.
* hidden_dst gets all T rows (the caller reads the first num_new: the hidden states of the
  committed tokens, which feed the next draft).
* Layout: the [Hkv, D] tail of each of the four K/V tensors must be contiguous (one row of a layer
  is Hkv * D contiguous elements); other strides are free. hidden tensors need a unit last stride.
* Ordering / no race: every copy program reads cache_len, so it is advanced AFTER the copy launch,
  by a separate in-place add on the same stream (`cache_len.add_(num_new)`), never inside it.
* One launch: grid (T, layers [+ 1 when hidden states are copied]); program (d, l < layers) copies
  layer l's K and V row, program (d, layers) copies hidden row d. Offsets are int64 (a cache of
  36 layers x 128k tokens x 1024 exceeds int32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _commit_kernel(
    # pointers
    k_local_ptr,  # [layers, R, Hkv, D]
    v_local_ptr,
    k_cache_ptr,  # [layers, max_len, Hkv, D]
    v_cache_ptr,
    rows_ptr,  # [T] int32/int64
    cache_len_ptr,  # [1] int32
    hidden_src_ptr,  # [R, Hh] (HAS_HIDDEN)
    hidden_dst_ptr,  # [T, Hh] (HAS_HIDDEN)
    # sizes
    num_layers,
    max_len,
    row_size,  # Hkv * D
    hidden_size,  # Hh
    # strides
    stride_kl_layer, stride_kl_row,
    stride_vl_layer, stride_vl_row,
    stride_kc_layer, stride_kc_row,
    stride_vc_layer, stride_vc_row,
    stride_hs_row,
    stride_hd_row,
    # meta
    HAS_HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    d = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    src_row = tl.load(rows_ptr + d).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if layer < num_layers:
        dst_row = tl.load(cache_len_ptr).to(tl.int64) + d
        k_src = k_local_ptr + layer * stride_kl_layer + src_row * stride_kl_row
        v_src = v_local_ptr + layer * stride_vl_layer + src_row * stride_vl_row
        k_dst = k_cache_ptr + layer * stride_kc_layer + dst_row * stride_kc_row
        v_dst = v_cache_ptr + layer * stride_vc_layer + dst_row * stride_vc_row
        # a destination past max_len copies nothing
        copy_size = tl.where(dst_row < max_len, row_size, 0)
        for start in range(0, row_size, BLOCK):
            mask = start + offs < copy_size
            tl.store(k_dst + start + offs, tl.load(k_src + start + offs, mask=mask), mask=mask)
            tl.store(v_dst + start + offs, tl.load(v_src + start + offs, mask=mask), mask=mask)
    elif HAS_HIDDEN:
        h_src = hidden_src_ptr + src_row * stride_hs_row
        h_dst = hidden_dst_ptr + d.to(tl.int64) * stride_hd_row
        for start in range(0, hidden_size, BLOCK):
            mask = start + offs < hidden_size
            tl.store(h_dst + start + offs, tl.load(h_src + start + offs, mask=mask), mask=mask)


_MAX_BLOCK = 2048


@torch.library.custom_op(
    "d2sd::commit", mutates_args=("k_cache", "v_cache", "cache_len", "hidden_dst")
)
def _commit_op(
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_len: torch.Tensor,
    num_new: torch.Tensor,
    hidden_src: torch.Tensor | None,
    hidden_dst: torch.Tensor | None,
    advance: bool,
) -> None:
    num_layers, max_len, num_kv_heads, head_dim = k_cache.shape
    row_size = num_kv_heads * head_dim
    has_hidden = hidden_src is not None
    hidden_size = hidden_src.shape[1] if has_hidden else 0
    hs = hidden_src if has_hidden else k_local  # unused pointers when HAS_HIDDEN is off
    hd = hidden_dst if has_hidden else k_local
    grid = (rows.shape[0], num_layers + int(has_hidden))
    _commit_kernel[grid](
        k_local, v_local, k_cache, v_cache, rows, cache_len, hs, hd,
        num_layers, max_len, row_size, hidden_size,
        k_local.stride(0), k_local.stride(1),
        v_local.stride(0), v_local.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        hs.stride(0), hd.stride(0),
        HAS_HIDDEN=has_hidden,
        BLOCK=min(_MAX_BLOCK, triton.next_power_of_2(max(row_size, hidden_size))),
        num_warps=4,
    )  # fmt: skip
    if advance:  # after the copy launch (same stream): the copy programs all read the old length
        cache_len.add_(num_new)


@_commit_op.register_fake
def _(
    k_local, v_local, k_cache, v_cache, rows, cache_len, num_new, hidden_src, hidden_dst, advance
):
    return None


def commit(
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_len: torch.Tensor,
    num_new: torch.Tensor,
    hidden_src: torch.Tensor | None = None,
    hidden_dst: torch.Tensor | None = None,
    *,
    advance: bool = True,
) -> None:
    """Copy local K/V rows `rows` [T] of every layer to cache rows cache_len .. cache_len + T - 1
    (skipping rows >= max_len), hidden_dst[d] = hidden_src[rows[d]], then cache_len += num_new
    (unless advance is False: the caller advances it, after this launch).

    k_local, v_local [layers, R, Hkv, D]; k_cache, v_cache [layers, max_len, Hkv, D] (one dtype);
    rows int32/int64 [T]; cache_len, num_new int32 [1]; hidden_src [R, Hh], hidden_dst [T, Hh].
    """
    assert k_local.dim() == 4 and k_local.shape == v_local.shape, "k/v_local: [layers, R, Hkv, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k/v_cache: [layers, L, Hkv, D]"
    assert k_local.shape[0] == k_cache.shape[0] and k_local.shape[2:] == k_cache.shape[2:]
    assert len({t.dtype for t in (k_local, v_local, k_cache, v_cache)}) == 1, "one K/V dtype"
    head_dim = k_cache.shape[3]
    for t in (k_local, v_local, k_cache, v_cache):
        assert t.stride(3) == 1 and t.stride(2) == head_dim, "[Hkv, D] tail must be contiguous"
        assert t.device == k_cache.device
    assert rows.dim() == 1 and rows.dtype in (torch.int32, torch.int64), "rows: [T] int32/int64"
    assert cache_len.shape == (1,) and cache_len.dtype == torch.int32, "cache_len: int32 [1]"
    assert num_new.shape == (1,) and num_new.dtype == torch.int32, "num_new: int32 [1]"
    assert (hidden_src is None) == (hidden_dst is None), "hidden_src and hidden_dst together"
    if hidden_src is not None:
        assert hidden_src.dim() == 2 and hidden_dst.shape == (rows.shape[0], hidden_src.shape[1])
        assert hidden_src.dtype == hidden_dst.dtype, "hidden_src / hidden_dst: one dtype"
        assert hidden_src.stride(1) == 1 and hidden_dst.stride(1) == 1, "hidden: unit last stride"
    _commit_op(
        k_local, v_local, k_cache, v_cache, rows, cache_len, num_new, hidden_src, hidden_dst,
        advance,
    )  # fmt: skip


def commit_ref(
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_len: torch.Tensor,
    num_new: torch.Tensor,
    hidden_src: torch.Tensor | None = None,
    hidden_dst: torch.Tensor | None = None,
    *,
    advance: bool = True,
) -> None:
    """Reference of `commit` in torch (no host sync, so it graph-captures as well)."""
    max_len = k_cache.shape[1]
    depth = rows.shape[0]
    rows = rows.long()
    dst = cache_len.long() + torch.arange(depth, device=rows.device)
    in_range = dst < max_len
    # Rows past max_len are redirected to the last cache row, every one carrying the value that row
    # must end with (the new row that lands there, if any, else its old value), so the scatter's
    # duplicate indices all write the same value.
    last = torch.full_like(dst[:1], max_len - 1)
    lands_last = (dst == max_len - 1).any()
    landing = (max_len - 1 - cache_len.long()).clamp(0, depth - 1)
    for local, cache in ((k_local, k_cache), (v_local, v_cache)):
        new = local.index_select(1, rows)
        last_value = torch.where(
            lands_last, new.index_select(1, landing), cache.index_select(1, last)
        )
        value = torch.where(in_range.view(1, -1, 1, 1), new, last_value)
        cache.index_copy_(1, torch.where(in_range, dst, last), value)
    if hidden_src is not None:
        hidden_dst.copy_(hidden_src[rows])
    if advance:
        cache_len.add_(num_new)
