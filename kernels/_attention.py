"""Shared pieces of the attention kernels: the online-softmax loop, the state merge, host helpers.

Every attention kernel in this package is built from three device helpers, so the cascade sequence
(shared prefix -> branch-local keys -> merge by log-sum-exp) is written once:

- `attend_range`: the flash-attention inner loop over KV tiles `[lo, hi)` of one kv head for a block
  of query rows, updating the running state `(acc, m, l)`; a `MASKED` variant applies per-row key
  bounds (window, causal) and an optional packed tree mask.
- `merge_states`: folds any number of finished attention states `(o_s, lse_s)` (the prefix splits,
  or a caller's prefix state) into a running state and returns the final `(o, lse)`.
- `merge_two`: the two-state weights of `lse_merge`.

Conventions (ARCHITECTURE.md): scores are kept in base-2 units, `s = q.k * sm_scale * log2(e)`, so
`lse = log2(sum_j 2^s_j)` is FlashInfer's base-2 LSE and the exponentials are `exp2`. A running state
is `acc = sum_j 2^(s_j - m) v_j`, `l = sum_j 2^(s_j - m)`, `m = max_j s_j`; a finished state is
`o = acc / l`, `lse = m + log2(l)`. A row that saw no key has `m = -inf`, `l = 0` and finishes as
`o = 0`, `lse = -inf`; merging such a state into another leaves the other bit-for-bit unchanged
(its weight is exactly 1, the empty one's exactly 0 and its `o` is never loaded).

Query rows of a kv head are packed as `row = token * group + g` (query head `kv_head * group + g`),
so one tile of rows carries several tokens times the GQA group and every K/V tile is loaded once
for all of them.

The host helpers pick the number of KV splits (`num_kv_splits`), the dot precision, and route a
launcher through its registered `torch.library` op only while torch.compile traces (`call_op`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Stand-in for "no bound" in the int32 per-row key bounds.
NO_KEY_BOUND = tl.constexpr(1 << 30)
# Most KV splits (= states merged by `merge_states`). The merge reads all LSEs in one tile of this
# width whatever the count (masked lanes fetch nothing), so one compiled kernel serves every count.
MAX_KV_SPLITS = 32
_STATE_TILE = tl.constexpr(MAX_KV_SPLITS)  # the same, visible inside @triton.jit code


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def attend_range(
    acc,
    m_i,
    l_i,
    q,
    # K/V of one kv head: key j at k_ptr + j * stride_kn (head_dim contiguous)
    k_ptr,
    v_ptr,
    stride_kn,
    stride_vn,
    # visit keys [key_lo, key_hi) in tiles of BLOCK_N starting at key_lo; keys >= key_end are
    # never read (MASKED only: an unmasked range must consist of whole in-bounds tiles)
    key_lo,
    key_hi,
    key_end,
    qk_scale,
    # MASKED only: per row, key j is visible iff row_min_key <= j <= row_max_key (and, with a tree
    # mask, bit j % 32 of word mask_rows[row] + j // 32 is set)
    row_min_key,
    row_max_key,
    mask_rows,
    MASKED: tl.constexpr,
    HAS_TREE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the rows of `q` [BLOCK_M, HEAD_DIM] over a range of keys.

    State in/out: acc [BLOCK_M, HEAD_DIM] f32, m_i [BLOCK_M] f32 (base-2 running max, -inf before
    any visible key), l_i [BLOCK_M] f32. Returns the updated (acc, m_i, l_i).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + offs_n
        k_ptrs = k_ptr + keys[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_ptr + keys[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            in_bounds = keys < key_end
            k = tl.load(k_ptrs, mask=in_bounds[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_bounds[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            visible = (
                in_bounds[None, :]
                & (keys[None, :] >= row_min_key[:, None])
                & (keys[None, :] <= row_max_key[:, None])
            )
            if HAS_TREE_MASK:
                words = tl.load(mask_rows[:, None] + (keys // 32)[None, :], mask=visible, other=0)
                visible = visible & (((words >> (keys % 32)[None, :]) & 1) != 0)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row with no visible key so far keeps m = -inf; shift by 0 instead to avoid inf - inf
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_shift = m_new
        p = tl.exp2(qk * qk_scale - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attend_local(
    acc,
    m_i,
    l_i,
    q,
    # the local K/V of one kv head, branches packed back to back: branch b's key j at
    # k_ptr + (b * seq_len + j) * stride_kt
    k_ptr,
    v_ptr,
    stride_kt,
    stride_vt,
    # HAS_TREE_MASK: the packed mask, token t's words at mask_ptr + mask_offset + t * stride_mt
    mask_ptr,
    mask_offset,
    stride_mt,
    token,  # [BLOCK_M] each row's token b * seq_len + t (row = tile_first_row + i = token * group + g)
    row_valid,
    tile_first_row,
    group,
    seq_len,
    num_tokens,  # B * seq_len: the tile's rows may span branches (not with a tree mask)
    causal,
    window_left,
    qk_scale,
    HAS_TREE_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`attend_range` over each row's own branch's T keys (causal, a packed tree mask, or all; a
    window). Rows see only keys of their own branch, so one tile may hold tokens of several."""
    t = token % seq_len
    branch_lo = token - t
    row_min_key = branch_lo + tl.where(window_left >= 0, tl.maximum(t - window_left, 0), 0)
    row_max_key = tl.where(row_valid, branch_lo + tl.where(causal != 0, t, seq_len - 1), -1)
    # only the keys of the branches this tile touches, and causally none past its last token
    first_token = tile_first_row // group
    last_token = tl.minimum((tile_first_row + BLOCK_M - 1) // group, num_tokens - 1)
    key_lo = first_token - first_token % seq_len
    key_hi = tl.where(causal != 0, last_token + 1, last_token - last_token % seq_len + seq_len)
    if HAS_TREE_MASK:
        mask_rows = mask_ptr + mask_offset + t * stride_mt
    else:
        mask_rows = None
    return attend_range(
        acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt,
        key_lo, key_hi, num_tokens, qk_scale, row_min_key, row_max_key, mask_rows,
        MASKED=True, HAS_TREE_MASK=HAS_TREE_MASK,
        BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def finish_state(acc, m_i, l_i):
    """Running state -> (o [BLOCK_M, D] f32, lse [BLOCK_M] f32); rows with l = 0 give (0, -inf)."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    return o, lse


@triton.jit
def merge_states(
    acc,
    m_i,
    l_i,
    # finished states s = 0 .. num_states-1: o at state_o + s * stride_state_o ([BLOCK_M, D]
    # pointers), lse at state_lse + s * stride_state_lse ([BLOCK_M] pointers)
    state_o,
    state_lse,
    num_states,
    stride_state_o,
    stride_state_lse,
    row_valid,
    STATES_PER_STEP: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Fold finished states into the running state (acc, m_i, l_i); return the final (o, lse).

    num_states <= MAX_KV_SPLITS. All LSEs arrive in one [BLOCK_M, MAX_KV_SPLITS] load;
    the o loads depend only on it and are issued STATES_PER_STEP at a time (a small unroll: the
    whole unroll would hold every state's tile in registers), so the merge costs about
    1 + num_states / STATES_PER_STEP memory round trips. A state's `o` is only read where its
    weight is nonzero, so an empty state (lse = -inf) may hold anything in `o` (idle KV splits
    leave it unwritten). CACHE: the loads' cache modifier (".cg": states that other programs of
    the same launch wrote, read through L2).
    """
    states = tl.arange(0, _STATE_TILE)
    lse_s = tl.load(
        state_lse[:, None] + states[None, :] * stride_state_lse,
        mask=row_valid[:, None] & (states < num_states)[None, :],
        other=float("-inf"),
        cache_modifier=CACHE,
    )
    m = tl.maximum(m_i, tl.max(lse_s, 1))
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    alpha = tl.exp2(m_i - m_shift)
    w = tl.exp2(lse_s - m_shift[:, None])  # [BLOCK_M, MAX_KV_SPLITS], 0 for empty states
    acc = acc * alpha[:, None]
    l_i = l_i * alpha + tl.sum(w, 1)
    for first in range(0, num_states, STATES_PER_STEP):
        for i in tl.static_range(STATES_PER_STEP):
            # the same weight as column s of `w`, from an L1-hot reload (extracting the column
            # would be a cross-warp reduction)
            lse_i = tl.load(
                state_lse + (first + i) * stride_state_lse,
                mask=tl.where(first + i < num_states, row_valid, False),
                other=float("-inf"),
                cache_modifier=CACHE,
            )
            w_s = tl.exp2(lse_i - m_shift)
            o_s = tl.load(
                state_o + (first + i) * stride_state_o,
                mask=(w_s > 0)[:, None],
                other=0.0,
                cache_modifier=CACHE,
            )
            acc += w_s[:, None] * o_s.to(tl.float32)
    return finish_state(acc, m_shift, l_i)


@triton.jit
def merge_two(lse_a, lse_b):
    """Weights of two finished states: (w_a, w_b, lse) with w_a + w_b = 1 unless both are empty.

    One side empty (lse = -inf) gives exactly (1, 0, lse_other); both empty give (0, 0, -inf).
    """
    m = tl.maximum(lse_a, lse_b)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    e_a = tl.exp2(lse_a - m_shift)
    e_b = tl.exp2(lse_b - m_shift)
    total = e_a + e_b
    seen = total > 0
    total_safe = tl.where(seen, total, 1.0)
    lse = tl.where(seen, m_shift + tl.log2(total_safe), float("-inf"))
    return e_a / total_safe, e_b / total_safe, lse


# ----------------------------------------------------------------------------- host helpers


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (TF32 would cost ~1e-3); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few "SMs" so that small test caches take the multi-split path


def min_split_keys(device: torch.device) -> int:
    """Fewest prefix keys worth a split of their own (each split costs a partial state round trip)."""
    return 128 if device.type == "cuda" else 16


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """>= `count` int32 counters on `device`, zero between launches: a kernel whose last program
    to arrive finishes the work (an atomic counter per output tile) sets its counter back to 0.

    One buffer per device, allocated once and kept (a captured graph replays with it; allocate it
    outside capture: the warm-up does). A larger request allocates a larger buffer but keeps the
    old ones alive, since graphs captured earlier still use them. Such kernels must not run at the
    same time on two streams of one device."""
    buffers = _ARRIVALS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def autotune_kept(configs: list[triton.Config], key: list[str]) -> Callable:
    """`triton.autotune` whose choice Triton keeps in its on-disk cache (`cache_results`).

    The configurations round differently (key tiles of other sizes), so a choice made anew by
    timing in every process changed the triton backend's greedy text between two runs of one
    commit (bench/results/smollm2-run-triton-repro-*). With the cache, every later process on the
    machine takes the first one's choice, and its text."""
    return triton.autotune(configs=configs, key=key, cache_results=True)


def rows_bucket(num_rows: int) -> int:
    """The autotuning key for a kernel's number of query rows: the next power of two, at most
    1024, so a few tunings cover every shape (prefill chunks of any length included)."""
    return min(triton.next_power_of_2(max(num_rows, 1)), 1024)


@functools.cache
def num_kv_splits(
    max_len: int, num_kv_heads: int, num_rows: int, head_dim: int, device: torch.device
) -> int:
    """How many KV splits the prefix pass launches: a host constant per call site (graph-safe).

    num_rows = B * T * Hq query rows. The grid is (row tiles, splits, kv heads) with row tiles of
    up to 128 rows. Measured on the H200 (bench/prefix_splits.py: every S forced, both launches
    timed; bench/results/prefix_splits-NVIDIA-H200-2026-11-29.json) the fastest S fills the GPU
    about once, ceil(SMs / programs per split): a second wave buys nothing while the merge pass
    pays ~0.5-1 us per extra split (Qwen3-8B heads, 5 x 16 queries: S = 6 beat the 11 that a
    balanced-waves rule took by 28% at L = 2048-8192). And a split should own at least
    2 x `min_split_keys` keys of max_len: below that its partial-state round trip costs more than
    it saves (at L = 511 the best S was 2-4). At most MAX_KV_SPLITS, and at most ~16 MB of
    float32 partial states (L2-resident).
    """
    programs_per_split = num_kv_heads * math.ceil(num_rows / num_kv_heads / 128)
    one_wave = math.ceil(_num_sms(device) / programs_per_split)
    by_length = math.ceil(max_len / (2 * min_split_keys(device)))
    by_state = (16 << 20) // (num_rows * head_dim * 4)
    return max(1, min(MAX_KV_SPLITS, one_wave, by_length, by_state))


def call_op(op: Callable, impl: Callable, *args: object) -> object:
    """Run `impl` directly in eager mode (no dispatcher overhead on the decode path); go through
    the registered custom op `op` while torch.compile traces, so the graph sees one opaque op."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def check_head_dim(head_dim: int) -> None:
    assert head_dim in (16, 32, 64, 128, 256), (
        f"head_dim must be a power of two in [16, 256] (tl.dot tiles), got {head_dim}"
    )


def check_sm_scale(sm_scale: float | None, head_dim: int) -> float:
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    assert scale > 0, f"sm_scale must be positive, got {scale}"
    return scale


# ----------------------------------------------------------------------------- torch reference


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    sm_scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with an explicit visibility mask, the base of every `<op>_ref`.

    q [B, T, Hq, D]; k, v [B, S, Hkv, D] (or [1, S, ...], shared); visible bool broadcastable to
    [B, T, S]. Computes in `compute_dtype` (float32 for the reference; the low dtype to measure
    what torch itself loses in that dtype). Returns o [B, T, Hq, D] (compute_dtype) and lse
    [B, T, Hq] float32 (base 2); rows that see no key give o = 0, lse = -inf.
    """
    group = q.shape[2] // k.shape[2]
    qc = q.to(compute_dtype).transpose(1, 2)  # [B, Hq, T, D]
    kc = k.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qc @ kc.transpose(-1, -2)) * sm_scale  # natural-log units
    vis = visible.to(torch.bool)
    vis = vis.reshape(vis.shape[0], 1, *vis.shape[1:])  # broadcast over heads
    scores = scores.masked_fill(~vis, float("-inf"))
    lse_e = torch.logsumexp(scores, dim=-1, keepdim=True)
    seen = lse_e > float("-inf")
    p = torch.where(seen, torch.exp(scores - torch.where(seen, lse_e, 0)), 0)
    o = (p @ vc).transpose(1, 2)
    lse = (lse_e.squeeze(-1).float() * LOG2E).transpose(1, 2)
    return o.contiguous(), lse.contiguous()


def merge_ref(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states in torch (o in o_a's dtype or wider, lse float32, base 2)."""
    dtype = torch.promote_types(o_a.dtype, o_b.dtype)
    m = torch.maximum(lse_a, lse_b)
    m_shift = torch.where(m == float("-inf"), 0, m)
    e_a, e_b = torch.exp2(lse_a - m_shift), torch.exp2(lse_b - m_shift)
    total = e_a + e_b
    seen = total > 0
    total_safe = torch.where(seen, total, 1)
    w_a, w_b = (e_a / total_safe).unsqueeze(-1), (e_b / total_safe).unsqueeze(-1)
    o = torch.where(w_a > 0, w_a.to(dtype) * o_a.to(dtype), 0) + torch.where(
        w_b > 0, w_b.to(dtype) * o_b.to(dtype), 0
    )
    lse = torch.where(seen, m_shift + torch.log2(total_safe), float("-inf"))
    return o, lse.float()


def unpack_mask(mask: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Packed int32 tree mask [..., T, W] -> bool [..., T, num_keys] (bit j % 32 of word j // 32)."""
    keys = torch.arange(num_keys, device=mask.device)
    words = mask[..., keys // 32].to(torch.int64)
    return ((words >> (keys % 32)) & 1).to(torch.bool)


def pack_mask(visible: torch.Tensor) -> torch.Tensor:
    """bool [..., T, N] -> bit-packed int32 [..., T, ceil(N / 32)] (inverse of `unpack_mask`)."""
    num_keys = visible.shape[-1]
    num_words = (num_keys + 31) // 32
    padded = torch.zeros(
        *visible.shape[:-1], num_words * 32, dtype=torch.int64, device=visible.device
    )
    padded[..., :num_keys] = visible.to(torch.int64)
    bits = padded.view(*visible.shape[:-1], num_words, 32) << torch.arange(
        32, device=visible.device
    )
    words = bits.sum(-1)  # < 2^32
    # two's complement wrap of bit 31 into int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
