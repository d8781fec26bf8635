"""Attention of all B*T queries to the shared prefix (one layer's KV cache), split over the keys.

Math: query (b, t) sits at position `cache_len + t`, prefix key j at j, so every prefix key is in
the past; with a window (`window_left = W >= 0`) key j is visible iff `cache_len + t - j <= W`.
Scores `s_j = q.k_j * sm_scale * log2(e)` (base 2); `o = sum_j 2^(s_j - lse) v_j`,
`lse = log2(sum_j 2^s_j)` over the visible keys. A row that sees no key (cache_len = 0, or a
window that ends before the prefix) gives o = 0, lse = -inf.

Layouts: q [B, T, Hq, D] (D contiguous, any other strides); k_cache, v_cache [max_len, Hkv, D]
(rows [0, cache_len) valid); cache_len int32 [1] on the device. Out: o [B, T, Hq, D] float32 and
lse [B, T, Hq] float32. GQA: query head h reads kv head h // (Hq // Hkv).

Kernel (`_prefix_split_kernel`): grid (row tiles, KV splits, kv heads). The rows of one kv head
pack all B*T tokens x its GQA group (`row = token * group + g`), so each K/V tile of the prefix is
streamed once per row tile for every branch at once (row tiles of one (split, kv head) are
adjacent in launch order and share the tiles through L2). The number of splits is a host constant
chosen from max_len and the GPU size (`num_kv_splits`), never from the current length, so the grid
is fixed and the launch is CUDA-graph capturable; inside the kernel the visible key range
`[max(0, cache_len - W), cache_len)` is cut into equal chunks (multiples of BLOCK_N, at least
`min_split_keys`), so at a short prefix only the first splits get keys and the rest store an empty
state (lse = -inf, o left unwritten) and exit. Each split runs up to three loops of the shared
online-softmax step: masked tiles at the window's edge, unmasked full tiles, a masked tail tile.
With one split the kernel writes the final (o, lse); with several it writes partial states
[S, B, T, Hq, ...] that one pass of the branch kernel (with no local keys) merges.
`FUSED` (cascade_attention): split 0 also attends each row's own branch's local keys, and the
last split of each (row tile, kv head) to finish (atomic arrival counter) merges the S states into
the final o / lse, so the whole cascade is this one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention import (
    LOG2E,
    NO_KEY_BOUND,
    arrival_counters,
    attend_local,
    attend_range,
    attention_ref,
    autotune_kept,
    call_op,
    check_head_dim,
    check_sm_scale,
    dot_precision,
    finish_state,
    interpreting,
    merge_states,
    min_split_keys,
    num_kv_splits,
    rows_bucket,
)


# sizes and switches vary per call site: no per-value specialization (one compile per config)
# (nor on the strides of the per-row LSE, whose divisibility follows Hq and buys nothing)
@triton.jit(
    do_not_specialize=[
        "num_rows", "seq_len", "group", "max_len", "num_splits", "split_min_keys",
        "stride_ls", "stride_lb", "stride_lt", "stride_lh",
        "window_left", "store_empty_o", "rows_bucket",
        "stride_mt", "stride_lse_b", "stride_lse_t", "stride_lse_h", "causal",
    ]
)  # fmt: skip
def _prefix_split_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    cache_len_ptr,
    part_o_ptr,
    part_lse_ptr,
    # FUSED only: the branches' local keys (packed back to back), the tree mask (B = 1 only),
    # the outputs, the arrival counters
    k_local_ptr,
    v_local_ptr,
    mask_ptr,
    o_ptr,
    lse_ptr,
    arrivals_ptr,
    # sizes
    num_rows,
    seq_len,
    group,
    max_len,
    num_splits,
    split_min_keys,
    # strides (head_dim is contiguous everywhere)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_os,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_lkt,
    stride_lkh,
    stride_lvt,
    stride_lvh,
    stride_mt,
    stride_o_b,
    stride_o_t,
    stride_o_h,
    stride_lse_b,
    stride_lse_t,
    stride_lse_h,
    # meta
    qk_scale,
    window_left,
    store_empty_o,
    causal,
    rows_bucket,  # autotuning key only (rows_bucket() of num_rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    token = rows // group
    head = kv_head * group + rows % group
    batch = token // seq_len
    t = token % seq_len
    offs_d = tl.arange(0, HEAD_DIM)

    # this split's keys: an equal share of the visible range [lo, prefix_len)
    prefix_len = tl.minimum(tl.load(cache_len_ptr), max_len)
    windowed = window_left >= 0
    lo = tl.where(windowed, tl.maximum(prefix_len - window_left, 0), 0)
    chunk = tl.maximum(tl.cdiv(prefix_len - lo, num_splits), split_min_keys)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    split_lo = lo + split * chunk
    split_hi = tl.maximum(tl.minimum(split_lo + chunk, prefix_len), split_lo)
    has_keys = split_hi > split_lo

    # keys >= all_visible_from are inside every row's window (the last token's is the tightest)
    all_visible_from = tl.where(windowed, prefix_len + seq_len - 1 - window_left, 0)
    edge_end = tl.minimum(tl.maximum(all_visible_from, split_lo), split_hi)
    full_lo = tl.minimum(split_lo + tl.cdiv(edge_end - split_lo, BLOCK_N) * BLOCK_N, split_hi)
    full_hi = full_lo + (split_hi - full_lo) // BLOCK_N * BLOCK_N
    row_min_key = tl.where(windowed, prefix_len + t - window_left, -NO_KEY_BOUND)
    row_max_key = tl.where(row_valid, NO_KEY_BOUND, -1)

    # FUSED: split 0 also attends the local keys, so it needs q even without prefix keys
    if FUSED:
        local_here = split == 0
    else:
        local_here = False
    q = tl.load(
        q_ptr + (batch * stride_qb + t * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
        mask=(rows < tl.where(has_keys | local_here, num_rows, 0))[:, None],
        other=0.0,
    )
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # window edge: per-row lower bounds
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn,
        split_lo, full_lo, split_hi, qk_scale, row_min_key, row_max_key, None,
        MASKED=True, HAS_TREE_MASK=False,
        BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    # the bulk: whole tiles every row sees
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn,
        full_lo, full_hi, split_hi, qk_scale, row_min_key, row_max_key, None,
        MASKED=False, HAS_TREE_MASK=False,
        BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    # the partial last tile
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn,
        full_hi, split_hi, split_hi, qk_scale, row_min_key, row_max_key, None,
        MASKED=True, HAS_TREE_MASK=False,
        BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    # two ifs: the outer one is compile-time, so without FUSED the local code is never compiled
    if FUSED:  # noqa: SIM102
        if split == 0:
            acc, m_i, l_i = attend_local(
                acc, m_i, l_i, q,
                k_local_ptr + kv_head * stride_lkh, v_local_ptr + kv_head * stride_lvh,
                stride_lkt, stride_lvt, mask_ptr, 0, stride_mt, token, row_valid,
                pid_m * BLOCK_M, group, seq_len, num_rows // group, causal, window_left, qk_scale,
                HAS_TREE_MASK=HAS_MASK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                DOT_PRECISION=DOT_PRECISION,
            )  # fmt: skip
    o, lse = finish_state(acc, m_i, l_i)

    part_rows = batch * stride_ob + t * stride_ot + head * stride_oh
    tl.store(
        part_o_ptr + split * stride_os + part_rows[:, None] + offs_d[None, :],
        o,
        mask=(rows < tl.where(has_keys | local_here | (store_empty_o != 0), num_rows, 0))[:, None],
    )
    lse_rows = batch * stride_lb + t * stride_lt + head * stride_lh
    tl.store(part_lse_ptr + split * stride_ls + lse_rows, lse, mask=row_valid)

    if FUSED:
        # The last split of this (row tile, kv head) to finish merges the S states: one launch
        # instead of two (a graphed decode step is launch-bound). The barrier orders every
        # thread's stores before the atomic's release; the atomic is acq_rel at GPU scope.
        tl.debug_barrier()
        counter = arrivals_ptr + pid_m * tl.num_programs(2) + kv_head
        if tl.atomic_add(counter, 1) == num_splits - 1:
            tl.store(counter, 0)  # ready for the next launch (graph replays)
            o, lse = merge_states(
                tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),
                tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
                tl.zeros([BLOCK_M], dtype=tl.float32),
                part_o_ptr + part_rows[:, None] + offs_d[None, :],
                part_lse_ptr + lse_rows,
                num_splits,
                stride_os,
                stride_ls,
                row_valid,
                STATES_PER_STEP=(64 + BLOCK_M - 1) // BLOCK_M,
                CACHE=".cg",
            )
            out_rows = batch * stride_o_b + t * stride_o_t + head * stride_o_h
            tl.store(
                o_ptr + out_rows[:, None] + offs_d[None, :],
                o.to(o_ptr.dtype.element_ty),
                mask=row_valid[:, None],
            )
            out_lse_rows = batch * stride_lse_b + t * stride_lse_t + head * stride_lse_h
            tl.store(lse_ptr + out_lse_rows, lse, mask=row_valid)


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        # all compile without register spills for head_dim 64 and 128 on sm_90
        for bm, bn, w, s in (
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 32, 8, 4),
            (64, 64, 4, 3),
            (64, 32, 4, 4),
            # a decode step's few rows (SmolLM2's AR step: 3 per kv head): less idle MMA work, and
            # the fused merge loads 4 states per round trip instead of 1
            (16, 64, 4, 3),
        )
    ]


# The winner depends on the tile shapes (head_dim, GQA group), the parallelism (splits) and the
# number of query rows (an AR step has `group` rows, a verify B*T*group: H200 bench of one config
# for all, 2026-11-29: B=5 T=16 took 24.8 us at L=2048 where B=9 T=16 took 21.6); not on the prefix
# length, which changes every step.
_TUNING_KEY = ["HEAD_DIM", "group", "num_splits", "rows_bucket", "FUSED"]
_prefix_split = autotune_kept(_configs(), _TUNING_KEY)(_prefix_split_kernel)


def check_prefix_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor
) -> None:
    """Shape/dtype/device checks shared with cascade_attention."""
    assert q.dim() == 4, f"q must be [B, T, Hq, D], got {tuple(q.shape)}"
    assert k_cache.dim() == 3, f"k_cache must be [max_len, Hkv, D], got {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape, (
        f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    )
    num_q_heads, head_dim = q.shape[2:]
    num_kv_heads = k_cache.shape[1]
    check_head_dim(head_dim)
    assert k_cache.shape[2] == head_dim, f"k_cache head_dim {k_cache.shape[2]} != q's {head_dim}"
    assert num_q_heads % num_kv_heads == 0, f"Hq={num_q_heads} not a multiple of Hkv={num_kv_heads}"
    assert k_cache.dtype == v_cache.dtype == q.dtype, (
        f"dtypes differ: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
    )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name}'s head_dim must be contiguous, strides {t.stride()}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
    assert cache_len.dtype == torch.int32 and cache_len.numel() == 1, (
        f"cache_len must be a device int32 [1], got {cache_len.dtype} {tuple(cache_len.shape)}"
    )
    assert cache_len.device == q.device, f"cache_len on {cache_len.device}, q on {q.device}"


def prefix_splits(q: torch.Tensor, k_cache: torch.Tensor) -> int:
    """The KV split count of this call site (host constant: depends on shapes only)."""
    batch, seq, num_q_heads, head_dim = q.shape
    return num_kv_splits(
        k_cache.shape[0], k_cache.shape[1], batch * seq * num_q_heads, head_dim, q.device
    )


def fuses_local(k_local: torch.Tensor, v_local: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Can the split pass also attend these local keys [B, T, Hkv, D]? It indexes them as one run
    of B * T rows (branch b's key j at row b * T + j), and the tree mask's bits by j, so a tile may
    span branches only without a mask."""
    batch, seq = k_local.shape[:2]
    packed = all(x.stride(0) == seq * x.stride(1) or batch == 1 for x in (k_local, v_local))
    return packed and (mask is None or batch == 1)


def launch_prefix_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    sm_scale: float,
    window_left: int,
    *,
    store_empty_o: bool,
    local: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the split pass into part_o [S, B, T, Hq, D] / part_lse [S, B, T, Hq] (S = splits).

    With `local` = (k_local, v_local [B, T, Hkv, D], mask [T, W] | None, causal) and `out` =
    (o [B, T, Hq, D], lse [B, T, Hq]), the same launch also attends the local keys and merges
    every state into o / lse: the whole cascade in one launch. It needs `fuses_local` true."""
    batch, seq, num_q_heads, head_dim = q.shape
    max_len, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    num_rows = batch * seq * group
    num_splits = part_o.shape[0]
    if num_rows == 0:
        return
    fused = local is not None
    if fused:
        k_local, v_local, mask, causal = local
        assert out is not None and fuses_local(k_local, v_local, mask), (
            "the fused cascade takes its outputs, and branches packed back to back (a tree mask "
            "only with one branch)"
        )
        o, lse = out
        arrivals = arrival_counters(q.device, triton.cdiv(num_rows, 16) * num_kv_heads)
        local_args = (k_local, v_local, mask, o, lse, arrivals)
        local_strides = (*k_local.stride()[1:3], *v_local.stride()[1:3])
        local_strides += (mask.stride(-2) if mask is not None else 0, *o.stride()[:3])
        local_strides += tuple(lse.stride())
    else:
        causal, mask = False, None
        local_args = (part_o,) * 6  # never read
        local_strides = (0,) * 11

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]), num_splits, num_kv_heads)

    _prefix_split[grid](
        q, k_cache, v_cache, cache_len, part_o, part_lse, *local_args,
        num_rows, seq, group, max_len, num_splits, min_split_keys(q.device),
        *q.stride()[:3], *k_cache.stride()[:2], *v_cache.stride()[:2],
        *part_o.stride()[:4], *part_lse.stride(), *local_strides,
        sm_scale * LOG2E, window_left, int(store_empty_o), int(causal), rows_bucket(num_rows),
        HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(q.dtype),
        FUSED=fused, HAS_MASK=mask is not None,
    )  # fmt: skip


def _prefix_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    sm_scale: float,
    window_left: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.branch_attention import launch_branch  # the split merge is the branch kernel

    batch, seq, num_q_heads, head_dim = q.shape
    out_shape = (batch, seq, num_q_heads)
    o = torch.empty(*out_shape, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    num_splits = prefix_splits(q, k_cache)
    if num_splits == 1:
        launch_prefix_split(
            q, k_cache, v_cache, cache_len, o.unsqueeze(0), lse.unsqueeze(0),
            sm_scale, window_left, store_empty_o=True,
        )  # fmt: skip
        return o, lse
    part_o = torch.empty(num_splits, *out_shape, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_splits, *out_shape, dtype=torch.float32, device=q.device)
    launch_prefix_split(
        q, k_cache, v_cache, cache_len, part_o, part_lse, sm_scale, window_left,
        store_empty_o=False,
    )  # fmt: skip
    launch_branch(
        None, None, None, None, False, part_o, part_lse, o, lse, sm_scale, -1,
        group=num_q_heads // k_cache.shape[1],
    )  # fmt: skip
    return o, lse


_prefix_attention_op = torch.library.custom_op(
    "d2sd::prefix_attention",
    _prefix_attention_impl,
    mutates_args=(),
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_len, float sm_scale, "
    "int window_left) -> (Tensor, Tensor)",
)


@_prefix_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len, sm_scale, window_left):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32)


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
    window_left: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, T, Hq, D] to the prefix k_cache/v_cache [max_len, Hkv, D][:cache_len].

    cache_len: device int32 [1] (read in the kernel: no host sync, graph-capturable).
    sm_scale defaults to D ** -0.5; window_left = -1 means no window.
    Returns o [B, T, Hq, D] float32 and lse [B, T, Hq] float32 (base 2).
    """
    check_prefix_inputs(q, k_cache, v_cache, cache_len)
    assert window_left >= -1, f"window_left must be -1 (none) or >= 0, got {window_left}"
    scale = check_sm_scale(sm_scale, q.shape[-1])
    return call_op(
        _prefix_attention_op, _prefix_attention_impl,
        q, k_cache, v_cache, cache_len, scale, int(window_left),
    )  # fmt: skip


def prefix_visibility(
    prefix_len: int, seq_len: int, window_left: int, device: torch.device | str
) -> torch.Tensor:
    """bool [T, prefix_len]: may query t (at prefix_len + t) see prefix key j (at j)?"""
    t = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(prefix_len, device=device)[None, :]
    visible = torch.ones(seq_len, prefix_len, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= (prefix_len + t) - j <= window_left
    return visible


def prefix_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
    window_left: int = -1,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (fp32 by default; host-syncs on cache_len). Returns (o, lse) like the kernel."""
    prefix_len = int(cache_len.item())
    scale = check_sm_scale(sm_scale, q.shape[-1])
    visible = prefix_visibility(prefix_len, q.shape[1], window_left, q.device)
    return attention_ref(
        q,
        k_cache[None, :prefix_len],
        v_cache[None, :prefix_len],
        visible[None],
        scale,
        compute_dtype,
    )
