"""Cascade attention: one layer's whole attention for B branches over a shared prefix, in one
launch (two when a tree mask comes with several branches).

Math: query (b, t) at position `cache_len + t` attends the shared prefix keys j < cache_len (at j;
all in the past) and its own branch's local keys j < T (at `cache_len + j`; causal: j <= t, or a
packed tree mask, or all), each only if `q_pos - k_pos <= window_left` when a window is set. One
softmax over both key sets, base-2 LSE (`s = q.k * sm_scale * log2(e)`):
`o = sum_j 2^(s_j - lse) v_j`, `lse = log2(sum_j 2^s_j)`. It equals the LSE merge of the prefix
state and the local state, which is how it is computed. A row with no visible key: o = 0,
lse = -inf; a row whose local keys are all masked: exactly the prefix state (o rounded to q.dtype).

Layouts: q [B, T, Hq, D]; k_cache, v_cache [max_len, Hkv, D] with cache_len int32 [1] on the
device; k_local, v_local [B, T, Hkv, D]; mask int32 [T, W] or [B, T, W], W = ceil(T / 32).
Out: o [B, T, Hq, D] in q.dtype (and lse [B, T, Hq] float32).

Design: `prefix_attention`'s split pass, grid (row tiles, KV splits, kv heads). A row tile packs
B*T tokens x the GQA group of one kv head (Qwen3-8B: 80 tokens x 4 heads = 320 rows), so every
prefix K/V tile is read once for all branches and multiplied with tl.dot at full tile width; the
prefix is cut into S equal splits (S from max_len and the SM count, a host constant: the grid never
depends on cache_len) that write partial states [S, B, T, Hq, D] float32 (L2-sized). Split 0 also
attends the local keys of its rows (each row only its own branch's: the local rows lie back to back,
branch b's key j at row b * T + j, so a tile spanning branches reads one contiguous key range), and
the last split of each (row tile, kv head) to finish, found by an atomic arrival counter, merges
the S states and writes o and lse. A graphed decode step is launch-bound (SmolLM2: ~3.6 us per
launch, 30 layers), so one launch per layer instead of two is worth the serial merge at the end.
Long prefixes are compute-bound in the split pass (tl.dot tiles up to 128x128, autotuned per
head_dim/group/splits/rows). The two-launch form remains for per-branch tree masks with B > 1
(mask bits are indexed within a branch) and local keys not packed back to back: the split pass
without local keys, then `branch_attention`'s kernel, grid (row tiles, branches, kv heads), which
attends each branch's local keys and merges them with the S partial states in registers.
"""

from __future__ import annotations

import torch

from kernels._attention import attention_ref, call_op, check_sm_scale
from kernels.branch_attention import check_local_inputs, launch_branch, local_visibility
from kernels.prefix_attention import (
    check_prefix_inputs,
    fuses_local,
    launch_prefix_split,
    prefix_splits,
    prefix_visibility,
)


def _cascade_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    sm_scale: float,
    window_left: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, num_q_heads, head_dim = q.shape
    num_splits = prefix_splits(q, k_cache)
    part_o = torch.empty(
        num_splits, batch, seq, num_q_heads, head_dim, dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty(
        num_splits, batch, seq, num_q_heads, dtype=torch.float32, device=q.device
    )
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if fuses_local(k_local, v_local, mask):  # every call of the decoder: one launch
        launch_prefix_split(
            q, k_cache, v_cache, cache_len, part_o, part_lse, sm_scale, window_left,
            store_empty_o=False, local=(k_local, v_local, mask, causal), out=(o, lse),
        )  # fmt: skip
        return o, lse
    launch_prefix_split(
        q, k_cache, v_cache, cache_len, part_o, part_lse, sm_scale, window_left,
        store_empty_o=False,
    )  # fmt: skip
    launch_branch(
        q, k_local, v_local, mask, causal, part_o, part_lse, o, lse, sm_scale, window_left,
        group=num_q_heads // k_cache.shape[1],
    )  # fmt: skip
    return o, lse


_cascade_attention_op = torch.library.custom_op(
    "d2sd::cascade_attention",
    _cascade_attention_impl,
    mutates_args=(),
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_len, Tensor k_local, "
    "Tensor v_local, bool causal, Tensor? mask, float sm_scale, int window_left) "
    "-> (Tensor, Tensor)",
)


@_cascade_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len, k_local, v_local, causal, mask, sm_scale, window_left):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=torch.float32
    )


def cascade_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, D] against the shared prefix k_cache/v_cache [max_len, Hkv, D][:cache_len]
    and each branch's local k_local/v_local [B, T, Hkv, D], as one softmax.

    cache_len: device int32 [1] (no host sync; capturable in a CUDA graph and replayable after
    cache_len changes). causal / mask (packed int32 [T, W] or [B, T, W], with causal=False) apply
    to the local keys; the prefix is fully visible up to window_left. Returns o [B, T, Hq, D] in
    q.dtype (and lse [B, T, Hq] float32, base 2, if return_lse).
    """
    check_prefix_inputs(q, k_cache, v_cache, cache_len)
    check_local_inputs(q, k_local, v_local, causal, mask)
    assert k_local.shape[2] == k_cache.shape[1], (
        f"local Hkv {k_local.shape[2]} != cache Hkv {k_cache.shape[1]}"
    )
    assert window_left >= -1, f"window_left must be -1 (none) or >= 0, got {window_left}"
    scale = check_sm_scale(sm_scale, q.shape[-1])
    o, lse = call_op(
        _cascade_attention_op, _cascade_attention_impl,
        q, k_cache, v_cache, cache_len, k_local, v_local, bool(causal), mask, scale,
        int(window_left),
    )  # fmt: skip
    return (o, lse) if return_lse else o


def cascade_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: one dense softmax per branch over [prefix keys | local keys] with the
    combined visibility (independent of the merge math). fp32 by default; host-syncs on
    cache_len. Returns o in compute_dtype (and lse float32)."""
    batch, seq = q.shape[:2]
    prefix_len = int(cache_len.item())
    scale = check_sm_scale(sm_scale, q.shape[-1])
    k = torch.cat([k_cache[:prefix_len].expand(batch, -1, -1, -1), k_local], dim=1)
    v = torch.cat([v_cache[:prefix_len].expand(batch, -1, -1, -1), v_local], dim=1)
    prefix_vis = prefix_visibility(prefix_len, seq, window_left, q.device).expand(batch, -1, -1)
    local_vis = local_visibility(seq, causal, mask, window_left, q.device).expand(batch, -1, -1)
    visible = torch.cat([prefix_vis, local_vis], dim=-1)
    o, lse = attention_ref(q, k, v, visible, scale, compute_dtype)
    return (o, lse) if return_lse else o
