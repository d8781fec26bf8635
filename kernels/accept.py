"""Target sampling and speculative acceptance, fused over the vocabulary, with no host sync.

```
sample_tokens(logits [R, V], uniforms [R] f32 | None, *, temperature=0.0, top_k=0, top_p=1.0)
    -> tokens [R] int64
accept(cand_tokens [B, T] int64, logits [R, V], *, row_of=None [B, T] int32, temperature=0.0,
       top_k=0, top_p=1.0, uniforms=None [T] f32)
    -> Accept(num_accepted int32 [1], bonus int64 [1], branch int32 [1], path_rows int32 [T],
              out_tokens int64 [T], target_tokens int64 [B, T])
```
`logits` may be float32, float16 or bfloat16 with any row stride (last stride 1); the math runs in
float32 (the conversion is exact).

The sampler (ONE definition, used by AR decoding and by verification alike)
--------------------------------------------------------------------------
Per row, x = logits[r]:
* `temperature == 0`: argmax x, ties to the smaller token id (top_k, top_p, uniforms ignored).
* `temperature > 0`:
  1. top-k (`0 < top_k < V`; 0 or >= V keeps all): keep every token with x_i >= v_k, v_k the k-th
     largest logit. Ties at the cut are ALL kept (more than k tokens may survive). Decided on the
     raw logits, which order the tokens exactly like x / temperature, without its rounding.
  2. weights w_i = exp((x_i - m) / temperature) on the kept set, m = max x (always kept).
  3. top-p (`top_p < 1`): order the kept tokens by logit, descending; keep the smallest prefix
     whose mass is >= top_p * sum(w), plus every token whose logit equals that prefix's last one
     (ties at the cut are all kept). Equivalently keep x_i >= x*, x* the largest logit value v
     with sum_{kept, x_i >= v} w_i >= top_p * sum_kept(w).
  4. inverse CDF in token-id order: the token is the first kept i whose cumulative weight
     sum_{kept j <= i} w_j exceeds u * W (W = the kept mass, u in [0, 1)). If rounding leaves
     none (u * W rounded up to W), the last token with w_i > 0.
  Logits of -inf are allowed (weight 0); NaN logits and rows that are all -inf are not.

How the kernels find it (no sort, no materialised vocabulary; every pass is over chunks of V):
* Order keys: the float32 bit pattern mapped to an int32 that orders like the value (-0 -> +0),
  shifted right by the bits the input dtype never sets (bf16 16, fp16 13, fp32 0). The top-k and
  top-p cuts are both "key >= threshold", found exactly by bisection on the key: top-k counts
  tokens, top-p sums weights; the passes then compare each logit with the float value of that key.
* A small top-k (0 < top_k <= _GROUPS_KEPT = 128), then top-p, takes two launches and no pass
  over V after the first: `_group_max_kernel` (grid (rows, chunks)) writes the maxima of groups
  of _GROUP = 64 tokens; `_grouped_top_k_kernel` (one program per row) bisects over them for a
  cut that at least k and at most G_k = max(32, next_pow2(k)) groups reach (their maxima are k
  tokens at or above it, so the row's whole top-k lies in those groups), gathers those groups (for
  G_k >= 64, raises the cut while k tokens stay above it until at most _CANDIDATES = 256 do and
  compacts those to one a thread), finds both cuts over them (exact at every key above the cut)
  and draws from them in token order. Rows whose ties leave no such cut, and the other warpers
  (top-p alone, a larger top-k), bisect with one pass over V per step (~16 for bf16 keys) in
  `_thresholds_kernel`, then:
* `_partials_kernel`, grid (rows, chunks of BLOCK tokens): each program writes its chunk's max m_c
  of the kept logits and, sampling, sum_c exp2((x - m_c) * log2(e) / temperature) over the kept
  tokens.
* `_select_kernel`, grid (rows,): greedy takes the first chunk holding the row max and that max's
  first id in it (one chunk re-read); sampling rescales the chunk masses to the row max, locates
  u * W in their inclusive prefix sum, and scans only that chunk (a block cumsum) for the token.
  The sampled BLOCK depends on V only, never on the number of rows, so a row gets bit-identical
  float sums (hence the same token for the same u) whether it is sampled alone (AR) or among the
  B * T verification rows: sampled speculative decoding is lossless by construction. (The same
  holds for the grouped top-k: its candidate set and sums depend on the row and V only.)

Acceptance (see ARCHITECTURE.md)
-------------------------------
Pair (b, t) reads logits row `row_of[b, t]` (default b * T + t) and, when sampling, the uniform
`uniforms[t]` (one per depth: branches alive at one depth share the node and its draw); its target
token is target_tokens[b, t]. Walking t = 0, 1, ...: s_t = target_tokens[f(t), t] with f(t) the
FIRST branch still alive; branches with cand_tokens[b, t + 1] != s_t die; when none survives, or
t = T - 1, s_t is the bonus. `cand_tokens[:, 0]` (the anchor) is never compared.
Outputs: num_accepted = a (drafts accepted), branch = f(a) (the chosen branch),
out_tokens[:a + 1] = s_0 .. s_a (= t_1 .. t_a, bonus) and -1 after, bonus = s_a,
path_rows[t] = row_of[branch, t] for every t < T (rows past a continue along the chosen branch, so
`commit` can copy a fixed T rows), target_tokens = every pair's target (debugging, tests).
Launches: [thresholds] + partials + select, or group maxima + grouped top-k, give target_tokens
(greedy too: when the one-program walk reduced the greedy chunk partials itself, greedy accept was
slower than sampled accept), then `_accept_scan_kernel` (one program) does the walk with no loop at
all: the branches alive at depth t are exactly those whose drafts 1..t equal f(t)'s, so every branch
b can check at once, at every depth, its draft against the target of the first branch sharing its
drafts so far; a branch's walk stops at its first mismatch, a is the deepest stop and f(a) the
smallest branch stopping there.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels._attention import interpreting

# ----------------------------------------------------------------------------------------------
# The sampling math, written once (jit helpers shared by every kernel below)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x, KEY_SHIFT: tl.constexpr):
    """int32 key that orders like the float32 value x (-0 and +0 equal); low zero bits dropped."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> KEY_SHIFT


@triton.jit
def _key_value(key, KEY_SHIFT: tl.constexpr):
    """The float32 value v with key >= `key` <=> x >= v (the inverse of _order_key): one float
    compare per token instead of computing its key."""
    bits = key << KEY_SHIFT  # (k >> s) >= key <=> k >= key << s
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _kept_logits(row_ptr, idx, vocab, threshold, HAS_THRESHOLD: tl.constexpr):
    """Logits of one block in float32, -inf outside the vocabulary and at tokens cut by top-k/p
    (those below the float32 `threshold`)."""
    x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
    if HAS_THRESHOLD:
        x = tl.where(x >= threshold, x, float("-inf"))
    return x


@triton.jit
def _weight(x, x_max, scale):
    """exp((x - x_max) / temperature) (scale = log2(e) / temperature), for a finite x_max: 0 at
    the -inf of _kept_logits, so no mask is needed."""
    return tl.exp2((x - x_max) * scale)


@triton.jit
def _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS: tl.constexpr):
    if HAS_ROWS:
        row = tl.load(rows_ptr + pair).to(tl.int64)
    else:
        row = pair.to(tl.int64)
    return logits_ptr + row * stride_row


@triton.jit
def _count_at_least(row_ptr, vocab, key_min, KEY_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Number of tokens with key >= key_min."""
    x_min = _key_value(key_min, KEY_SHIFT)
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        count += ((x >= x_min) & (idx < vocab)).to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit
def _mass_at_least(
    row_ptr, vocab, key_min, x_max, scale, KEY_SHIFT: tl.constexpr, BLOCK: tl.constexpr
):
    """sum of exp((x - x_max) / temperature) over the tokens with key >= key_min."""
    x_min = _key_value(key_min, KEY_SHIFT)
    offs = tl.arange(0, BLOCK)
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        mass += _weight(_kept_logits(row_ptr, start + offs, vocab, x_min, True), x_max, scale)
    return tl.sum(mass, axis=0)


@triton.jit
def _max_and_min(max_a, min_a, max_b, min_b):
    """Combine of a (max, min) pair reduction (`tl.reduce` over two tensors at once)."""
    return tl.maximum(max_a, max_b), tl.minimum(min_a, min_b)


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch (PDL): wait until the previous kernel's writes are
    visible, then let the next kernel launch early (it waits here too before touching memory)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_max_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] pair -> logits row (HAS_ROWS)
    group_max_ptr,  # [P, G] f32 out: the largest logit of each group of GROUP tokens
    # sizes
    vocab,
    num_groups,
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    PDL: tl.constexpr,
):
    """The first pass of a small top-k: the maxima of one chunk's groups of GROUP tokens."""
    _after_previous_kernel(PDL)
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    group = chunk * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
    idx = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf"))
    out = group_max_ptr + pair.to(tl.int64) * num_groups + group
    tl.store(out, tl.max(x, axis=1).to(tl.float32), mask=group < num_groups)


@triton.jit
def _scan_block(row_ptr, idx, vocab, threshold, HAS_THRESHOLD: tl.constexpr, x_max, scale, run,
                target, found, last_positive):  # fmt: skip
    """One block of the inverse-CDF scan in token order: (run, found, last_positive) updated
    with the block's weights (run: the weight before it; found: the first id whose cumulative
    weight exceeds target; last_positive: the last id of positive weight)."""
    w = _weight(_kept_logits(row_ptr, idx, vocab, threshold, HAS_THRESHOLD), x_max, scale)
    through = run + tl.cumsum(w, axis=0)
    found, last_positive = _inverse_cdf_step(w, through, idx, target, found, last_positive)
    return tl.max(through, axis=0), found, last_positive


@triton.jit
def _inverse_cdf_step(w, through, ids, target, found, last_positive):
    """(found, last_positive) updated with a run of tokens `ids` in token order, of weights w and
    inclusive cumulative weights `through`: found, the first id whose cumulative weight exceeds
    target; last_positive, the last id of positive weight."""
    found = tl.minimum(found, tl.min(tl.where(through > target, ids, 2147483647), axis=0))
    last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0.0, ids, -1), axis=0))
    return found, last_positive


@triton.jit
def _threshold_by_passes(
    row_ptr, vocab, top_k, top_p, scale, KEY_SHIFT: tl.constexpr, BLOCK: tl.constexpr
):
    """Both cuts' key (int64) by bisection with one pass over the row per step, and the row's
    largest logit."""
    offs = tl.arange(0, BLOCK)
    max_acc = tl.full([BLOCK], float("-inf"), tl.float32)
    key_lo_acc = tl.full([BLOCK], 2147483647, tl.int32)
    key_hi_acc = tl.full([BLOCK], -2147483648, tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        key = _order_key(x, KEY_SHIFT)
        max_acc = tl.maximum(max_acc, x)
        key_lo_acc = tl.minimum(key_lo_acc, tl.where(idx < vocab, key, 2147483647))
        key_hi_acc = tl.maximum(key_hi_acc, tl.where(idx < vocab, key, -2147483648))
    x_max = tl.max(max_acc, axis=0)
    # Invariant of both bisections: the cut holds at key `lo` and fails at key `hi`; int64 bounds
    # because hi - lo can exceed the int32 range (keys span it), midpoints always fit in int32.
    lo = tl.min(key_lo_acc, axis=0).to(tl.int64)
    key_end = tl.max(key_hi_acc, axis=0).to(tl.int64) + 1
    if top_k > 0:
        hi = key_end
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if _count_at_least(row_ptr, vocab, mid.to(tl.int32), KEY_SHIFT, BLOCK) >= top_k:
                lo = mid
            else:
                hi = mid
    if top_p < 1.0:
        target = top_p * _mass_at_least(
            row_ptr, vocab, lo.to(tl.int32), x_max, scale, KEY_SHIFT, BLOCK
        )
        hi = key_end
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            mass = _mass_at_least(row_ptr, vocab, mid.to(tl.int32), x_max, scale, KEY_SHIFT, BLOCK)
            if mass >= target:
                lo = mid
            else:
                hi = mid
    return lo, x_max


@triton.jit
def _thresholds_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] int32/int64, pair -> logits row (HAS_ROWS)
    threshold_ptr,  # [P] f32 out: keep tokens with logit >= threshold
    # sizes and scalars
    vocab,
    top_k,  # 0: no top-k cut
    top_p,  # 1.0: no top-p cut
    scale,  # log2(e) / temperature
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    _after_previous_kernel(PDL)
    pair = tl.program_id(0)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    lo, _row_max = _threshold_by_passes(row_ptr, vocab, top_k, top_p, scale, KEY_SHIFT, BLOCK)
    tl.store(threshold_ptr + pair, _key_value(lo.to(tl.int32), KEY_SHIFT))


@triton.jit
def _grouped_top_k_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] pair -> logits row (HAS_ROWS)
    group_max_ptr,  # [P, G] f32: _group_max_kernel's
    group_ids_ptr,  # [P, GROUPS_KEPT] int32 scratch
    candidate_x_ptr,  # [P, CANDIDATES] f32 scratch (COMPACT)
    candidate_tok_ptr,  # [P, CANDIDATES] int32 scratch (COMPACT)
    uniforms_ptr,  # [uniform_period] f32: pair p draws uniforms[p % uniform_period]
    tokens_ptr,  # [P] int64 out
    # sizes and scalars
    vocab,
    num_groups,
    uniform_period,
    top_k,  # 0 < top_k <= GROUPS_KEPT, < vocab
    top_p,
    scale,
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_KEPT: tl.constexpr,
    CANDIDATES: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPACT: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row's token under a small top-k (then top-p): both cuts and the draw in registers
    over the few groups that can hold the top-k, from the row's group maxima.

    A group key cut c with count(groups whose max >= c) >= k has k tokens >= c: every token of
    the row's top-k is >= c, so it lies in those groups. Gathering them (at most GROUPS_KEPT,
    found by bisection over the group maxima) gives a candidate set that holds every kept
    token and counts exactly at every key >= c, so the top-k bisection over it is exact, as is
    top-p on the kept set; the draw is the inverse CDF over the candidates in token order. A row
    of at most GROUPS_KEPT groups gathers them all. With COMPACT, the tokens above a raised cut
    that still keeps k of them, at most CANDIDATES, are then compacted to one per thread for the
    cuts and the draw; without, those run on the gathered tile. When ties leave no cut with few
    enough groups (or, with COMPACT, tokens), passes over the row do the same."""
    _after_previous_kernel(PDL)
    pair = tl.program_id(0)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    u = tl.load(uniforms_ptr + pair % uniform_period)
    gid = tl.arange(0, BLOCK_G)
    group_max = tl.load(
        group_max_ptr + pair.to(tl.int64) * num_groups + gid,
        mask=gid < num_groups,
        other=float("-inf"),
    )
    group_key = tl.where(gid < num_groups, _order_key(group_max, KEY_SHIFT), -2147483648)
    x_max, lo = tl.reduce(
        (group_max, tl.where(gid < num_groups, group_key, 2147483647)), 0, _max_and_min
    )  # one reduction for both
    lo = lo.to(tl.int64)
    key_end = _order_key(x_max, KEY_SHIFT).to(tl.int64) + 1  # past the largest key: no reduction
    hi = key_end
    num_kept = num_groups
    if num_groups <= GROUPS_KEPT:
        hi = lo + 1  # every group: the candidates are the whole row
    while hi - lo > 1:  # top_k <= GROUPS_KEPT < num_groups: the k-th largest group max exists
        mid = lo + (hi - lo) // 2
        count = tl.sum((group_key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        if count >= top_k:
            lo = mid
            num_kept = count
            if count <= GROUPS_KEPT:
                hi = mid + 1
        else:
            hi = mid
    num_candidates = tl.full((), CANDIDATES + 1, tl.int32)  # > CANDIDATES: none compacted
    # (without COMPACT) the gathered tile, flat; given a value first: Triton needs one on every path
    tile_x = tl.full([GROUPS_KEPT * GROUP], float("-inf"), tl.float32)
    tile_tok = tl.full([GROUPS_KEPT * GROUP], 2147483647, tl.int32)
    tile_ok = tl.full([GROUPS_KEPT * GROUP], False, tl.int1)
    if num_kept <= GROUPS_KEPT:
        # the kept groups' ids, in order, through a scratch row (registers cannot be compacted)
        kept_group = group_key >= lo.to(tl.int32)
        slot = tl.cumsum(kept_group.to(tl.int32), axis=0) - 1
        scratch = group_ids_ptr + pair.to(tl.int64) * GROUPS_KEPT
        tl.store(scratch + slot, gid, mask=kept_group)
        tl.debug_barrier()
        slots = tl.arange(0, GROUPS_KEPT)
        group_ids = tl.load(scratch + slots, mask=slots < num_kept, other=0)
        tok = group_ids[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # ascending token ids
        ok = (slots < num_kept)[:, None] & (tok < vocab)
        x = tl.load(row_ptr + tok, mask=ok, other=float("-inf")).to(tl.float32)
        # cuts as float compares (_key_value), no key per token: fewer live registers
        if num_groups <= GROUPS_KEPT:
            x_min = tl.min(tl.min(tl.where(ok, x, float("inf")), axis=1), axis=0)
            lo = _order_key(x_min, KEY_SHIFT).to(tl.int64)
        if COMPACT:
            # Raise the cut while at least k tokens stay above it until at most CANDIDATES do,
            # then compact those (in token order) to one per thread: the exact cuts and the draw
            # then reduce CANDIDATES values per step instead of GROUPS_KEPT * GROUP.
            hi = key_end
            at_lo = ok & (x >= _key_value(lo.to(tl.int32), KEY_SHIFT))
            num_candidates = tl.sum(tl.sum(at_lo.to(tl.int32), axis=1), axis=0)
            while (num_candidates > CANDIDATES) & (hi - lo > 1):
                mid = lo + (hi - lo) // 2
                at_mid = ok & (x >= _key_value(mid.to(tl.int32), KEY_SHIFT))
                count = tl.sum(tl.sum(at_mid.to(tl.int32), axis=1), axis=0)
                if count >= top_k:
                    lo = mid
                    num_candidates = count
                else:
                    hi = mid
            if num_candidates <= CANDIDATES:
                candidate = ok & (x >= _key_value(lo.to(tl.int32), KEY_SHIFT))
                group_count = tl.sum(candidate.to(tl.int32), axis=1)
                group_start = tl.cumsum(group_count, axis=0) - group_count
                to = group_start[:, None] + tl.cumsum(candidate.to(tl.int32), axis=1) - 1
                base = pair.to(tl.int64) * CANDIDATES
                tl.store(candidate_x_ptr + base + to, x, mask=candidate)
                tl.store(candidate_tok_ptr + base + to, tok, mask=candidate)
        else:  # the gathered tile, flat in token order, holds the candidates
            num_candidates = 0  # <= CANDIDATES: the cuts and the draw below, on the tile
            tile_x = tl.reshape(x, [GROUPS_KEPT * GROUP])
            tile_tok = tl.reshape(tl.where(ok, tok, 2147483647), [GROUPS_KEPT * GROUP])
            tile_ok = tl.reshape(ok, [GROUPS_KEPT * GROUP])
    if num_candidates <= CANDIDATES:
        if COMPACT:
            tl.debug_barrier()
            slots = tl.arange(0, CANDIDATES)
            base = pair.to(tl.int64) * CANDIDATES
            valid = slots < num_candidates
            x = tl.load(candidate_x_ptr + base + slots, mask=valid, other=float("-inf"))
            tok = tl.load(candidate_tok_ptr + base + slots, mask=valid, other=2147483647)
        else:
            x, tok, valid = tile_x, tile_tok, tile_ok
        key = tl.where(valid, _order_key(x, KEY_SHIFT), -2147483648)
        hi = key_end  # the row max is a candidate
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0) >= top_k:
                lo = mid
            else:
                hi = mid
        w = tl.where(key >= lo.to(tl.int32), _weight(x, x_max, scale), 0.0)
        if top_p < 1.0:
            target = top_p * tl.sum(w, axis=0)
            hi = key_end
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                if tl.sum(tl.where(key >= mid.to(tl.int32), w, 0.0), axis=0) >= target:
                    lo = mid
                else:
                    hi = mid
            w = tl.where(key >= lo.to(tl.int32), w, 0.0)
        # empty slots (after the candidates) get no id: their cumulative weight is the total
        through = tl.cumsum(w, axis=0)
        found, last_positive = _inverse_cdf_step(
            w, through, tok, u * tl.max(through, axis=0), 2147483647, -1
        )
    else:
        lo, x_max = _threshold_by_passes(row_ptr, vocab, top_k, top_p, scale, KEY_SHIFT, BLOCK)
        threshold = _key_value(lo.to(tl.int32), KEY_SHIFT)
        mass = _mass_at_least(row_ptr, vocab, lo.to(tl.int32), x_max, scale, KEY_SHIFT, BLOCK)
        offs = tl.arange(0, BLOCK)
        run = 0.0
        found = 2147483647
        last_positive = -1
        for start in range(0, vocab, BLOCK):
            run, found, last_positive = _scan_block(
                row_ptr, start + offs, vocab, threshold, True, x_max, scale, run, u * mass,
                found, last_positive,
            )  # fmt: skip
    token = tl.where(found < 2147483647, found, last_positive)
    tl.store(tokens_ptr + pair, token.to(tl.int64))


@triton.jit
def _partials_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] pair -> logits row (HAS_ROWS)
    threshold_ptr,  # [P] f32 (HAS_THRESHOLD)
    chunk_max_ptr,  # [P, S] f32 out: max kept logit of the chunk
    chunk_mass_ptr,  # [P, S] f32 out (not GREEDY): sum exp2((x - chunk max) * scale) over kept
    # sizes and scalars
    vocab,
    num_chunks,
    scale,
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    _after_previous_kernel(PDL)
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    threshold = float("-inf")
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + pair)
    x = _kept_logits(row_ptr, chunk * BLOCK + tl.arange(0, BLOCK), vocab, threshold, HAS_THRESHOLD)
    chunk_max = tl.max(x, axis=0)
    out = pair * num_chunks + chunk
    tl.store(chunk_max_ptr + out, chunk_max)
    if not GREEDY:  # greedy leaves the argmax to select: a (value, id) reduction here cost 30%
        # 0 while nothing is kept, so a chunk with nothing kept stays (-inf, 0) without -inf + inf
        ref_max = tl.where(chunk_max > float("-inf"), chunk_max, 0.0)
        tl.store(chunk_mass_ptr + out, tl.sum(_weight(x, ref_max, scale), axis=0))


@triton.jit
def _select_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] pair -> logits row (HAS_ROWS)
    threshold_ptr,  # [P] f32 (HAS_THRESHOLD)
    chunk_max_ptr,  # [P, S] f32
    chunk_mass_ptr,  # [P, S] f32 (not GREEDY)
    uniforms_ptr,  # [uniform_period] f32: pair p draws uniforms[p % uniform_period]
    tokens_ptr,  # [P] int64 out
    # sizes and scalars
    vocab,
    num_chunks,
    uniform_period,
    scale,
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    _after_previous_kernel(PDL)
    pair = tl.program_id(0)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    chunk_ids = tl.arange(0, BLOCK_S)
    valid = chunk_ids < num_chunks
    partial = pair * num_chunks + chunk_ids
    chunk_max = tl.load(chunk_max_ptr + partial, mask=valid, other=float("-inf"))
    x_max = tl.max(chunk_max, axis=0)
    if GREEDY:
        # the first chunk holding the row max, then the max's first id in it
        chunk = tl.min(tl.where(chunk_max == x_max, chunk_ids, BLOCK_S), axis=0)
        idx = chunk * BLOCK + tl.arange(0, BLOCK)
        x = _kept_logits(row_ptr, idx, vocab, float("-inf"), False)
        token = tl.min(tl.where(x == x_max, idx, 2147483647), axis=0)
    else:
        chunk_mass = tl.load(chunk_mass_ptr + partial, mask=valid, other=0.0)
        mass = tl.where(
            chunk_max > float("-inf"), chunk_mass * tl.exp2((chunk_max - x_max) * scale), 0.0
        )
        mass_through = tl.cumsum(mass, axis=0)
        target = tl.load(uniforms_ptr + pair % uniform_period) * tl.max(mass_through, axis=0)
        # the chunk whose inclusive prefix first exceeds the target; if rounding put the target
        # at the total, the last chunk with mass
        chunk = tl.min(tl.where(valid & (mass_through > target), chunk_ids, BLOCK_S), axis=0)
        last_with_mass = tl.max(tl.where(valid & (mass > 0.0), chunk_ids, -1), axis=0)
        chunk = tl.where(chunk == BLOCK_S, last_with_mass, chunk)
        local_target = target - tl.sum(tl.where(chunk_ids == chunk - 1, mass_through, 0.0), axis=0)
        threshold = float("-inf")
        if HAS_THRESHOLD:
            threshold = tl.load(threshold_ptr + pair)
        _, found, last_positive = _scan_block(
            row_ptr, chunk * BLOCK + tl.arange(0, BLOCK), vocab, threshold, HAS_THRESHOLD, x_max,
            scale, 0.0, local_target, 2147483647, -1,
        )  # fmt: skip
        token = tl.where(found < 2147483647, found, last_positive)
    tl.store(tokens_ptr + pair, token.to(tl.int64))


@triton.jit
def _accept_scan_kernel(
    # pointers
    cand_ptr,  # [B, T] int64, contiguous
    rows_ptr,  # [B, T] int32/int64, contiguous (HAS_ROWS)
    tokens_ptr,  # [B * T] int64 target tokens
    num_accepted_ptr,  # [1] int32 out
    bonus_ptr,  # [1] int64 out
    branch_ptr,  # [1] int32 out
    path_rows_ptr,  # [T] int32 out
    out_tokens_ptr,  # [T] int64 out
    target_tokens_ptr,  # [B, T] int64 out
    # sizes
    num_branches,
    depth,
    # meta
    HAS_ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    # Under PDL everything that reads only the drafts runs before the wait, overlapping the
    # select kernel: the drafts and rows come from kernels that finished before it started (each
    # of ours lets its successor launch only after its own wait).
    ob = tl.arange(0, BLOCK_B)
    ot = tl.arange(0, BLOCK_T)
    b_ok = ob < num_branches
    t_ok = ot < depth
    pair = ob[:, None] * depth + ot[None, :]
    pair_ok = b_ok[:, None] & t_ok[None, :]
    cand = tl.load(cand_ptr + pair, mask=pair_ok, other=-1)
    next_draft = tl.load(cand_ptr + pair + 1, mask=pair_ok & (ot + 1 < depth)[None, :], other=-1)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + pair, mask=pair_ok, other=0).to(tl.int32)
    else:
        rows = pair

    # Branches alive at depth t share their drafts 1..t (each matched s_0 .. s_{t-1}), and every
    # branch sharing them is alive: the alive set at depth t is the node of any member, and f(t)
    # its smallest branch. So, for every branch b at once: first(b, t) = the smallest branch
    # with b's drafts 1..t; b survives depth t iff cand[b, t + 1] == target[first(b, t), t]; b is
    # alive at depth t iff it survived every depth before. No walk over depths.
    # first_diff[f, b]: the first depth t >= 1 where the drafts of branches f and b differ (else T)
    differ = (cand[:, None, :] != cand[None, :, :]) & (ot >= 1)[None, None, :] & t_ok[None, None, :]
    first_diff = tl.min(tl.where(differ, ot[None, None, :], depth), axis=2)
    # first_of[b, t] = first(b, t): the smallest f with first_diff[f, b] > t
    shares = (first_diff[:, :, None] > ot[None, None, :]) & b_ok[:, None, None]
    first_of = tl.min(tl.where(shares, ob[:, None, None], BLOCK_B), axis=0)
    # node_target[b, t] = target[first(b, t), t], the target token at b's node of depth t: a
    # gather, so that nothing but loads waits for the previous kernel
    node_pair = first_of * depth + ot[None, :]
    _after_previous_kernel(PDL)
    target = tl.load(tokens_ptr + pair, mask=pair_ok, other=-1)
    node_target = tl.load(tokens_ptr + node_pair, mask=pair_ok, other=-1)
    tl.store(target_tokens_ptr + pair, target, mask=pair_ok)
    survives = (next_draft == node_target) & (ot + 1 < depth)[None, :]
    # reached[b]: the depth where b's walk stops (its first non-surviving depth); a = the deepest
    reached = tl.min(tl.where(survives | ~t_ok[None, :], BLOCK_T, ot[None, :]), axis=1)
    reached = tl.where(b_ok, reached, -1)
    num_accepted = tl.max(reached, axis=0)
    # the first alive branch at depth a: the smallest that reached it (all that did stop there)
    branch = tl.min(tl.where(reached == num_accepted, ob, BLOCK_B), axis=0)
    on_branch = ob[:, None] == branch
    sampled = tl.sum(tl.where(on_branch, node_target, 0), axis=0)  # s_t along the chosen branch
    bonus = tl.sum(tl.where(ot == num_accepted, sampled, 0), axis=0)
    path_rows = tl.sum(tl.where(on_branch, rows, 0), axis=0)
    tl.store(out_tokens_ptr + ot, tl.where(ot <= num_accepted, sampled, -1), mask=t_ok)
    tl.store(path_rows_ptr + ot, path_rows, mask=t_ok)
    tl.store(num_accepted_ptr, num_accepted)
    tl.store(bonus_ptr, bonus)
    tl.store(branch_ptr, branch)


# ----------------------------------------------------------------------------------------------
# Configuration: a function of V and the dtype only (never of the row count; see the docstring)
# ----------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
# Measured on the H200 (B = 5, T = 16 / 32, bf16, V = 151936 / 49152; bench.accept_chunks): one
# 8192-token chunk per program beat larger chunks, smaller ones and a few programs per SM looping
# over the chunks at V = 151936; at V = 49152 chunks of 4096 (12 a row, not 6) sampled 14-17%
# faster; 32 warps of 8192 were the fastest threshold passes. The sampled chunk sets the float
# sums' rounding: it depends on V only (AR and verification agree). Greedy's chunk changes nothing
# but the speed: 4096 beat 8192 and 16384 (select re-reads one chunk a row).
_BLOCK = 8192  # tokens per chunk (one partials program) when sampling, V >= _LARGE_VOCAB
_SMALL_VOCAB_BLOCK = 4096  # ... V < _LARGE_VOCAB
_LARGE_VOCAB = 131072  # between the two measured vocabularies
_GREEDY_BLOCK = 4096  # tokens per chunk for the argmax
_THRESHOLD_BLOCK = 8192
# Top-k 20 / top-p 0.95 (bench.accept_chunks, session 9): group maxima on 2 warps, the grouped
# top-k on 4 over a tile of 32 groups, uncompacted, beat 4 + 4 warps over 128 compacted groups by
# 2.4 to 4.4 us; 8 warps were faster at V = 151936, T = 16 only. Fixed, never chosen per row
# count: the candidates' sums (their reduction order) must not depend on it (AR = verification).
_NUM_WARPS = {
    "thresholds": 32, "group_max": 2, "grouped_top_k": 4, "partials": 4, "select": 8, "scan": 4,
}  # fmt: skip
# 0 < top_k <= _GROUPS_KEPT: the maxima of groups of _GROUP tokens, then both cuts and the draw
# in registers over the (at most _GROUPS_KEPT) groups that can hold the top-k
_GROUP = 64
_GROUPS_KEPT = 128
# ... gathering max(_MIN_GROUPS_KEPT, next_pow2(top_k)) of them: a function of top_k, never of the
# row count (the candidates' sums depend on it)
_MIN_GROUPS_KEPT = 32
# ... whose tokens above a raised cut are compacted when it gathers at least this many groups
# (the 2-D cumsum and scatter cost more than the cuts save on a tile of 32 groups)
_COMPACT_FROM_GROUPS = 64
# ... compacted to the at most _CANDIDATES tokens above a cut that keeps at least k (one a thread)
_CANDIDATES = 256
# the grouped kernel's passes over rows of heavy ties: a smaller block than the threshold
# kernel's, so that those rare passes do not crowd the common path's registers
_TIED_ROW_BLOCK = 4096
# Programmatic dependent launch for partials, select and the walk on sm_90+: each kernel launches
# while its predecessor drains and waits (griddepcontrol.wait) before touching memory.
_PDL = True


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and not interpreting()
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _pdl(device: torch.device) -> dict:
    """Launch keywords and the PDL meta-parameter for the kernels that wait on their predecessor."""
    on = _PDL and _pdl_supported(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


def _chunking(vocab: int, greedy: bool) -> tuple[int, int]:
    """(BLOCK, num_chunks) of the partials pass over a vocabulary of `vocab` tokens: a function
    of V only (the sampled sums' rounding depends on it)."""
    if greedy:
        block = _GREEDY_BLOCK
    else:
        block = _BLOCK if vocab >= _LARGE_VOCAB else _SMALL_VOCAB_BLOCK
    block = min(block, triton.next_power_of_2(vocab))
    return block, triton.cdiv(vocab, block)


def _sample_pairs(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    num_pairs: int,
    uniforms: torch.Tensor | None,
    uniform_period: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Launch the sampler on `num_pairs` pairs -> tokens [P] int64; pair p reads logits row rows[p]
    (default p) and uniforms[p % uniform_period]."""
    vocab = logits.shape[1]
    key_shift = _KEY_SHIFT[logits.dtype]
    greedy = temperature == 0.0
    scale = 0.0 if greedy else _LOG2E / temperature
    top_k = top_k if (not greedy and 0 < top_k < vocab) else 0
    top_p = top_p if not greedy else 1.0
    has_threshold = top_k > 0 or top_p < 1.0
    has_rows = rows is not None
    device = logits.device
    rows_arg = rows if has_rows else logits  # unused pointer when HAS_ROWS is off
    if 0 < top_k <= _GROUPS_KEPT:
        # a small top-k (then top-p): group maxima over (rows, chunks), then one program per row
        # finds both cuts and draws, in registers over the groups that can hold the top-k
        block, _ = _chunking(vocab, greedy=False)
        group = min(_GROUP, block)
        num_groups = triton.cdiv(vocab, group)
        group_max = torch.empty(num_pairs, num_groups, dtype=torch.float32, device=device)
        _group_max_kernel[(num_pairs, triton.cdiv(vocab, block))](
            logits, rows_arg, group_max,
            vocab, num_groups,
            logits.stride(0),
            HAS_ROWS=has_rows, BLOCK=block, GROUP=group,
            num_warps=_NUM_WARPS["group_max"], **_pdl(device),
        )  # fmt: skip
        groups_kept = max(_MIN_GROUPS_KEPT, triton.next_power_of_2(top_k))
        group_ids = torch.empty(num_pairs, groups_kept, dtype=torch.int32, device=device)
        compact = groups_kept >= _COMPACT_FROM_GROUPS
        candidate_x, candidate_tok = group_max, group_ids  # of their dtypes, unused uncompacted
        if compact:
            candidate_x = torch.empty(num_pairs, _CANDIDATES, dtype=torch.float32, device=device)
            candidate_tok = torch.empty(num_pairs, _CANDIDATES, dtype=torch.int32, device=device)
        tokens = torch.empty(num_pairs, dtype=torch.int64, device=device)
        _grouped_top_k_kernel[(num_pairs,)](
            logits, rows_arg, group_max, group_ids, candidate_x, candidate_tok, uniforms, tokens,
            vocab, num_groups, uniform_period, top_k, top_p, scale,
            logits.stride(0),
            HAS_ROWS=has_rows, KEY_SHIFT=key_shift, GROUP=group, GROUPS_KEPT=groups_kept,
            CANDIDATES=_CANDIDATES, BLOCK_G=triton.next_power_of_2(num_groups),
            BLOCK=min(_TIED_ROW_BLOCK, triton.next_power_of_2(vocab)),
            COMPACT=compact,
            num_warps=_NUM_WARPS["grouped_top_k"], **_pdl(device),
        )  # fmt: skip
        return tokens
    block, num_chunks = _chunking(vocab, greedy)
    chunk_max = torch.empty(num_pairs, num_chunks, dtype=torch.float32, device=device)
    chunk_mass = chunk_max if greedy else torch.empty_like(chunk_max)
    threshold = chunk_max
    if has_threshold:
        threshold = torch.empty(num_pairs, dtype=torch.float32, device=device)
        _thresholds_kernel[(num_pairs,)](
            logits, rows_arg, threshold,
            vocab, top_k, top_p, scale,
            logits.stride(0),
            HAS_ROWS=has_rows, KEY_SHIFT=key_shift,
            BLOCK=min(_THRESHOLD_BLOCK, triton.next_power_of_2(vocab)),
            num_warps=_NUM_WARPS["thresholds"], **_pdl(device),
        )  # fmt: skip
    _partials_kernel[(num_pairs, num_chunks)](
        logits, rows_arg, threshold, chunk_max, chunk_mass,
        vocab, num_chunks, scale,
        logits.stride(0),
        HAS_ROWS=has_rows, HAS_THRESHOLD=has_threshold, GREEDY=greedy, BLOCK=block,
        num_warps=_NUM_WARPS["partials"], **_pdl(device),
    )  # fmt: skip
    tokens = torch.empty(num_pairs, dtype=torch.int64, device=device)
    _select_kernel[(num_pairs,)](
        logits, rows_arg, threshold, chunk_max, chunk_mass,
        uniforms if uniforms is not None else chunk_max, tokens,
        vocab, num_chunks, uniform_period, scale,
        logits.stride(0),
        HAS_ROWS=has_rows, HAS_THRESHOLD=has_threshold, GREEDY=greedy,
        BLOCK=block, BLOCK_S=triton.next_power_of_2(num_chunks),
        num_warps=_NUM_WARPS["select"], **_pdl(device),
    )  # fmt: skip
    return tokens


def _check_sampling(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    num_uniforms: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits: [R, V], last stride 1"
    assert logits.dtype in _KEY_SHIFT, f"logits dtype {logits.dtype} (fp32, fp16 or bf16)"
    assert temperature >= 0.0 and math.isfinite(temperature), "temperature >= 0"
    assert top_k >= 0 and 0.0 < top_p <= 1.0, "top_k >= 0 and 0 < top_p <= 1"
    if temperature > 0.0:
        assert uniforms is not None, "sampling (temperature > 0) needs uniforms"
        assert uniforms.shape == (num_uniforms,) and uniforms.dtype == torch.float32, (
            f"uniforms: [{num_uniforms}] float32"
        )
        assert uniforms.device == logits.device


# ----------------------------------------------------------------------------------------------
# Public launchers (registered as torch.library custom ops: torch.compile and CUDA graphs)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("d2sd::sample_tokens", mutates_args=())
def _sample_tokens_op(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    num_rows = logits.shape[0]
    return _sample_pairs(logits, None, num_rows, uniforms, num_rows, temperature, top_k, top_p)


@_sample_tokens_op.register_fake
def _(logits, uniforms, temperature, top_k, top_p):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample one token per row of `logits` [R, V] (fp32/fp16/bf16) -> [R] int64.

    temperature == 0: argmax, ties to the smaller id (uniforms may be None). Otherwise the inverse
    CDF of the warped distribution (module docstring) at `uniforms` [R] float32 in [0, 1).
    """
    _check_sampling(logits, uniforms, logits.shape[0], temperature, top_k, top_p)
    return _sample_tokens_op(logits, uniforms, float(temperature), int(top_k), float(top_p))


class Accept(NamedTuple):
    """Result of `accept`; every field is a device tensor (no host sync)."""

    num_accepted: torch.Tensor  # int32 [1]: a, drafts accepted
    bonus: torch.Tensor  # int64 [1]: s_a, the next anchor
    branch: torch.Tensor  # int32 [1]: the chosen branch
    path_rows: torch.Tensor  # int32 [T]: logits/local rows of anchor .. t_a, then the branch's rest
    out_tokens: torch.Tensor  # int64 [T]: t_1 .. t_a, bonus, then -1
    target_tokens: torch.Tensor  # int64 [B, T]: the target token of every (branch, depth)


@torch.library.custom_op("d2sd::accept", mutates_args=())
def _accept_op(
    cand_tokens: torch.Tensor,
    logits: torch.Tensor,
    row_of: torch.Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_branches, depth = cand_tokens.shape
    num_pairs = num_branches * depth
    tokens = _sample_pairs(logits, row_of, num_pairs, uniforms, depth, temperature, top_k, top_p)
    device = logits.device
    num_accepted = torch.empty(1, dtype=torch.int32, device=device)
    bonus = torch.empty(1, dtype=torch.int64, device=device)
    branch = torch.empty(1, dtype=torch.int32, device=device)
    path_rows = torch.empty(depth, dtype=torch.int32, device=device)
    out_tokens = torch.empty(depth, dtype=torch.int64, device=device)
    target_tokens = torch.empty(num_branches, depth, dtype=torch.int64, device=device)
    _accept_scan_kernel[(1,)](
        cand_tokens, row_of if row_of is not None else cand_tokens, tokens,
        num_accepted, bonus, branch, path_rows, out_tokens, target_tokens,
        num_branches, depth,
        HAS_ROWS=row_of is not None,
        BLOCK_B=triton.next_power_of_2(num_branches), BLOCK_T=triton.next_power_of_2(depth),
        num_warps=_NUM_WARPS["scan"], **_pdl(device),
    )  # fmt: skip
    return num_accepted, bonus, branch, path_rows, out_tokens, target_tokens


@_accept_op.register_fake
def _(cand_tokens, logits, row_of, temperature, top_k, top_p, uniforms):
    num_branches, depth = cand_tokens.shape
    return (
        logits.new_empty(1, dtype=torch.int32),
        logits.new_empty(1, dtype=torch.int64),
        logits.new_empty(1, dtype=torch.int32),
        logits.new_empty(depth, dtype=torch.int32),
        logits.new_empty(depth, dtype=torch.int64),
        logits.new_empty(num_branches, depth, dtype=torch.int64),
    )


def accept(
    cand_tokens: torch.Tensor,
    logits: torch.Tensor,
    *,
    row_of: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> Accept:
    """Target tokens of every candidate position and the longest accepted path (module docstring).

    cand_tokens [B, T] int64 (contiguous; column 0 the anchor); logits [R, V] (fp32/fp16/bf16);
    row_of [B, T] int32/int64 contiguous, the logits row of each (b, t) (default b * T + t);
    uniforms [T] float32, one per depth, when temperature > 0.
    """
    assert cand_tokens.dim() == 2 and cand_tokens.dtype == torch.int64, "cand_tokens: [B, T] int64"
    assert cand_tokens.is_contiguous() and cand_tokens.device == logits.device
    num_branches, depth = cand_tokens.shape
    _check_sampling(logits, uniforms, depth, temperature, top_k, top_p)
    if row_of is None:
        assert logits.shape[0] >= num_branches * depth, "logits: [B * T, V] without row_of"
    else:
        assert row_of.shape == cand_tokens.shape and row_of.is_contiguous(), "row_of: [B, T]"
        assert row_of.dtype in (torch.int32, torch.int64) and row_of.device == logits.device
    outs = _accept_op(
        cand_tokens, logits, row_of, float(temperature), int(top_k), float(top_p), uniforms
    )
    return Accept(*outs)


# ----------------------------------------------------------------------------------------------
# fp32 torch references (same definitions; sort-based; no host sync, so they graph-capture too)
# ----------------------------------------------------------------------------------------------


def sample_tokens_ref(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Reference of `sample_tokens`: [R, V] logits -> [R] int64, float32 math with a sort."""
    x = logits.float()
    if temperature == 0.0:
        return x.argmax(dim=-1)  # first maximal index: ties to the smaller id
    vocab = x.shape[1]
    kept = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < vocab:
        kept = x >= x.topk(top_k, dim=-1).values[:, -1:]
    x_max = x.max(dim=-1, keepdim=True).values
    w = torch.where(kept, torch.exp((x - x_max) / temperature), 0.0)
    if top_p < 1.0:
        x_sorted, order = torch.where(kept, x, float("-inf")).sort(
            dim=-1, descending=True, stable=True
        )
        mass_through = w.gather(-1, order).cumsum(dim=-1)
        cut = torch.searchsorted(mass_through, top_p * mass_through[:, -1:], right=False)
        x_cut = x_sorted.gather(-1, cut.clamp(max=vocab - 1))
        kept = kept & (x >= x_cut)
        w = torch.where(kept, w, 0.0)
    w_through = w.cumsum(dim=-1)
    token = torch.searchsorted(w_through, uniforms.float()[:, None] * w_through[:, -1:], right=True)
    ids = torch.arange(vocab, device=x.device)
    last_positive = torch.where(w > 0, ids, -1).amax(dim=-1, keepdim=True)
    return torch.where(token < vocab, token, last_positive).squeeze(-1)


def accept_ref(
    cand_tokens: torch.Tensor,
    logits: torch.Tensor,
    *,
    row_of: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> Accept:
    """Reference of `accept`: per-pair `sample_tokens_ref`, then the walk depth by depth."""
    num_branches, depth = cand_tokens.shape
    device = cand_tokens.device
    if row_of is None:
        row_of = torch.arange(num_branches * depth, device=device).view(num_branches, depth)
    pair_uniforms = uniforms.repeat(num_branches) if temperature > 0.0 else None
    target = sample_tokens_ref(
        logits[row_of.reshape(-1).long()],
        pair_uniforms,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    ).view(num_branches, depth)

    alive = torch.ones(num_branches, dtype=torch.bool, device=device)
    done = torch.zeros((), dtype=torch.bool, device=device)
    num_accepted = torch.zeros((), dtype=torch.int64, device=device)
    branch = torch.zeros((), dtype=torch.int64, device=device)
    bonus = torch.zeros((), dtype=torch.int64, device=device)
    out_tokens = torch.full((depth,), -1, dtype=torch.int64, device=device)
    for t in range(depth):
        first = alive.int().argmax().view(1)  # the first alive branch (index ops: no host sync)
        s_t = target[:, t].index_select(0, first).squeeze(0)
        active = ~done
        out_tokens[t] = torch.where(active, s_t, out_tokens[t])
        if t + 1 < depth:
            survivors = alive & (cand_tokens[:, t + 1] == s_t)
        else:
            survivors = torch.zeros_like(alive)
        ends = active & ~survivors.any()
        num_accepted = torch.where(ends, t, num_accepted)
        branch = torch.where(ends, first.squeeze(0), branch)
        bonus = torch.where(ends, s_t, bonus)
        done = done | ends
        alive = torch.where(active, survivors, alive)
    return Accept(
        num_accepted=num_accepted.to(torch.int32).view(1),
        bonus=bonus.view(1),
        branch=branch.to(torch.int32).view(1),
        path_rows=row_of.index_select(0, branch.view(1)).view(depth).to(torch.int32),
        out_tokens=out_tokens,
        target_tokens=target,
    )
