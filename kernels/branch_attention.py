"""Branch-local attention merged, in the same kernel, into incoming prefix states.

Math: branch b's query t (position `cache_len + t`) attends its own local keys j (position
`cache_len + j`), j in [0, T):
- `causal=True` (target verify): j <= t;
- `causal=False` (drafters): every j (bidirectional);
- `mask` (tree verify, with causal=False): bit `j % 32` of word `j // 32` of row t;
- `window_left = W >= 0` additionally requires `t - j <= W`.
The local state (base-2 online softmax, `s = q.k * sm_scale * log2(e)`) is then merged with the
incoming states `(o_s, lse_s)` (the prefix: one state from the caller, or the S partial states of
the split prefix pass): `m = max(m_local, lse_s...)`, weights `2^(lse_s - m)`, `o = acc / l`,
`lse = m + log2(l)`. A row with no visible local key comes out exactly as the prefix state (weight
1, o cast to the output dtype); a row with nothing anywhere is o = 0, lse = -inf.

Layouts: q [B, T, Hq, D]; k, v [B, T, Hkv, D] (D contiguous, other strides free); mask int32
[T, W] or [B, T, W], W = ceil(T / 32); prefix_o [B, T, Hq, D] (any float dtype), prefix_lse
[B, T, Hq] float32. Out: o [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32.

Kernel (`_branch_kernel`): grid (row tiles, branches, kv heads); the rows of one (branch, kv head)
pack the T tokens x the GQA group (`row = t * group + g`). With `HAS_LOCAL=False` it is the pure
merge of S states (prefix_attention's split merge); with states it is the second launch of
cascade_attention. All S incoming LSEs come in one [rows, MAX_KV_SPLITS] load and the state
tiles in small unrolled groups, because latency, not bandwidth, bounds this kernel at decode
sizes; S is a runtime argument (one compiled kernel for every split count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention import (
    LOG2E,
    attend_local,
    attention_ref,
    autotune_kept,
    call_op,
    check_head_dim,
    check_sm_scale,
    dot_precision,
    interpreting,
    merge_ref,
    merge_states,
    rows_bucket,
    unpack_mask,
)


# sizes and switches vary per call site: no per-value specialization (one compile per config),
# nor on the strides of per-row LSEs and mask words, whose divisibility follows Hq and T
@triton.jit(
    do_not_specialize=[
        "seq_len", "group", "num_states",
        "stride_mb", "stride_mt", "stride_sl_s", "stride_sl_b", "stride_sl_t", "stride_sl_h",
        "stride_lb", "stride_lt", "stride_lh",
        "window_left", "causal", "rows_bucket",
    ]
)  # fmt: skip
def _branch_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    state_o_ptr,
    state_lse_ptr,
    o_ptr,
    lse_ptr,
    # sizes
    seq_len,
    group,
    num_states,
    # strides (head_dim and mask words are contiguous)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_mb,
    stride_mt,
    stride_so_s,
    stride_so_b,
    stride_so_t,
    stride_so_h,
    stride_sl_s,
    stride_sl_b,
    stride_sl_t,
    stride_sl_h,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lt,
    stride_lh,
    # meta
    qk_scale,
    window_left,
    causal,
    rows_bucket,  # autotuning key only (rows_bucket() of seq_len * group)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    branch = tl.program_id(1)
    kv_head = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len * group
    t = rows // group
    head = kv_head * group + rows % group
    offs_d = tl.arange(0, HEAD_DIM)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LOCAL:
        q = tl.load(
            q_ptr
            + (branch * stride_qb + t * stride_qt + head * stride_qh)[:, None]
            + offs_d[None, :],
            mask=row_valid[:, None],
            other=0.0,
        )
        acc, m_i, l_i = attend_local(
            acc, m_i, l_i, q,
            k_ptr + branch * stride_kb + kv_head * stride_kh,
            v_ptr + branch * stride_vb + kv_head * stride_vh,
            stride_kt, stride_vt, mask_ptr, branch * stride_mb, stride_mt, t, row_valid,
            pid_m * BLOCK_M, group, seq_len, seq_len, causal, window_left, qk_scale,
            HAS_TREE_MASK=HAS_MASK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    state_o = state_o_ptr + (branch * stride_so_b + t * stride_so_t + head * stride_so_h)[:, None]
    state_lse = state_lse_ptr + branch * stride_sl_b + t * stride_sl_t + head * stride_sl_h
    o, lse = merge_states(
        acc, m_i, l_i, state_o + offs_d[None, :], state_lse, num_states,
        stride_so_s, stride_sl_s, row_valid,
        STATES_PER_STEP=(64 + BLOCK_M - 1) // BLOCK_M, CACHE="",
    )  # fmt: skip

    o_rows = branch * stride_ob + t * stride_ot + head * stride_oh
    tl.store(
        o_ptr + o_rows[:, None] + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )
    tl.store(lse_ptr + branch * stride_lb + t * stride_lt + head * stride_lh, lse, mask=row_valid)


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
        # all compile without register spills for head_dim 64 and 128 on sm_90; T = 64 takes two
        # 32-key tiles
        for bm, bn, w in ((16, 16, 4), (32, 16, 4), (32, 32, 4), (64, 32, 8))
    ]


# Tiny, latency-bound work (T keys, T * group rows per program): tile sizes follow head_dim, group,
# whether there is local attention at all and the rows per branch (an AR step has `group`, a verify
# T * group); never the prefix length.
_TUNING_KEY = ["HEAD_DIM", "group", "HAS_LOCAL", "HAS_MASK", "rows_bucket"]
_branch = autotune_kept(_configs(), _TUNING_KEY)(_branch_kernel)


def launch_branch(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    mask: torch.Tensor | None,
    causal: bool,
    state_o: torch.Tensor | None,
    state_lse: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    window_left: int,
    *,
    group: int,
) -> None:
    """Launch the branch kernel: local attention (if q is given) merged with S incoming states
    state_o [S, B, T, Hq, D] / state_lse [S, B, T, Hq] (None: no state) into o / lse."""
    batch, seq, num_q_heads, head_dim = o.shape
    num_kv_heads = num_q_heads // group
    if batch * seq * num_q_heads == 0:
        return
    has_local = q is not None
    if state_o is None:  # no state: point at the outputs with zero states (never read)
        num_states, state_o, state_lse = 0, o.unsqueeze(0), lse.unsqueeze(0)
    else:
        num_states = state_o.shape[0]
    local_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]) if has_local else (0,) * 9
    if mask is None:
        mask_strides = (0, 0)
    elif mask.dim() == 2:
        mask_strides = (0, mask.stride(0))
    else:
        mask_strides = mask.stride()[:2]

    def grid(meta):
        return (triton.cdiv(seq * group, meta["BLOCK_M"]), batch, num_kv_heads)

    _branch[grid](
        q, k, v, mask, state_o, state_lse, o, lse,
        seq, group, num_states,
        *local_strides, *mask_strides,
        *state_o.stride()[:4], *state_lse.stride(),
        *o.stride()[:3], *lse.stride(),
        sm_scale * LOG2E, window_left, int(causal), rows_bucket(seq * group),
        HEAD_DIM=head_dim, HAS_LOCAL=has_local, HAS_MASK=mask is not None,
        DOT_PRECISION=dot_precision(o.dtype if q is None else q.dtype),
    )  # fmt: skip


def check_local_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None
) -> None:
    """Shape/dtype/device checks shared with cascade_attention."""
    assert q.dim() == 4, f"q must be [B, T, Hq, D], got {tuple(q.shape)}"
    batch, seq, num_q_heads, head_dim = q.shape
    check_head_dim(head_dim)
    assert k.dim() == 4 and k.shape[:2] == (batch, seq) and k.shape[3] == head_dim, (
        f"local k must be [B, T, Hkv, D] = [{batch}, {seq}, Hkv, {head_dim}], got {tuple(k.shape)}"
    )
    assert v.shape == k.shape, f"local v {tuple(v.shape)} != k {tuple(k.shape)}"
    assert num_q_heads % k.shape[2] == 0, f"Hq={num_q_heads} not a multiple of Hkv={k.shape[2]}"
    assert k.dtype == v.dtype == q.dtype, f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1, f"{name}'s head_dim must be contiguous, strides {t.stride()}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
    if mask is not None:
        words = (seq + 31) // 32
        assert not causal, "a tree mask replaces causal: pass causal=False with mask"
        assert mask.dtype == torch.int32, f"mask must be packed int32, got {mask.dtype}"
        assert mask.shape in ((seq, words), (batch, seq, words)), (
            f"mask must be [T, W] or [B, T, W] with W = ceil(T/32) = {words}, got {tuple(mask.shape)}"
        )
        assert mask.stride(-1) == 1, f"mask words must be contiguous, strides {mask.stride()}"
        assert mask.device == q.device, f"mask on {mask.device}, q on {q.device}"


def _branch_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    prefix_o: torch.Tensor | None,
    prefix_lse: torch.Tensor | None,
    sm_scale: float,
    window_left: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    state_o = None if prefix_o is None else prefix_o.unsqueeze(0)
    state_lse = None if prefix_lse is None else prefix_lse.unsqueeze(0)
    group = q.shape[2] // k.shape[2]
    launch_branch(
        q, k, v, mask, causal, state_o, state_lse, o, lse, sm_scale, window_left, group=group
    )
    return o, lse


_branch_attention_op = torch.library.custom_op(
    "d2sd::branch_attention",
    _branch_attention_impl,
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool causal, Tensor? mask, Tensor? prefix_o, "
    "Tensor? prefix_lse, float sm_scale, int window_left) -> (Tensor, Tensor)",
)


@_branch_attention_op.register_fake
def _(q, k, v, causal, mask, prefix_o, prefix_lse, sm_scale, window_left):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=torch.float32
    )


def branch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    prefix_o: torch.Tensor | None = None,
    prefix_lse: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each branch's q [B, T, Hq, D] against its own local k, v [B, T, Hkv, D], merged into the
    optional prefix state (prefix_o [B, T, Hq, D], prefix_lse [B, T, Hq] float32).

    causal: local key j visible to query t iff j <= t; mask: packed int32 [T, W] / [B, T, W]
    (replaces causal). Returns o [B, T, Hq, D] in q.dtype (and lse [B, T, Hq] float32 if
    return_lse).
    """
    check_local_inputs(q, k, v, causal, mask)
    assert (prefix_o is None) == (prefix_lse is None), "pass prefix_o and prefix_lse together"
    if prefix_o is not None:
        assert prefix_o.shape == q.shape, f"prefix_o {tuple(prefix_o.shape)} != q {tuple(q.shape)}"
        assert prefix_lse.shape == q.shape[:3] and prefix_lse.dtype == torch.float32, (
            f"prefix_lse must be float32 [B, T, Hq], got {prefix_lse.dtype} {tuple(prefix_lse.shape)}"
        )
        assert prefix_o.stride(-1) == 1, (
            f"prefix_o's head_dim must be contiguous, {prefix_o.stride()}"
        )
        assert prefix_o.device == prefix_lse.device == q.device, "prefix state not on q's device"
    assert window_left >= -1, f"window_left must be -1 (none) or >= 0, got {window_left}"
    scale = check_sm_scale(sm_scale, q.shape[-1])
    o, lse = call_op(
        _branch_attention_op, _branch_attention_impl,
        q, k, v, bool(causal), mask, prefix_o, prefix_lse, scale, int(window_left),
    )  # fmt: skip
    return (o, lse) if return_lse else o


def local_visibility(
    seq_len: int,
    causal: bool,
    mask: torch.Tensor | None,
    window_left: int,
    device: torch.device | str,
) -> torch.Tensor:
    """bool [T, T] or [B, T, T]: may local query t see local key j?"""
    t = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= t
    if window_left >= 0:
        visible &= t - j <= window_left
    if mask is not None:
        visible = visible & unpack_mask(mask, seq_len)
    return visible


def branch_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    prefix_o: torch.Tensor | None = None,
    prefix_lse: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: dense local attention, then the LSE merge with the prefix state.
    Computes in `compute_dtype` (fp32 by default) and returns o in it (lse float32)."""
    scale = check_sm_scale(sm_scale, q.shape[-1])
    visible = local_visibility(q.shape[1], causal, mask, window_left, q.device)
    if visible.dim() == 2:
        visible = visible[None]
    o, lse = attention_ref(q, k, v, visible, scale, compute_dtype)
    if prefix_o is not None:
        o, lse = merge_ref(o, lse, prefix_o.to(compute_dtype), prefix_lse)
        o = o.to(compute_dtype)
    return (o, lse) if return_lse else o
