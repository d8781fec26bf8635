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
  top-p cuts are both "key >= threshold": the largest key where the cut still holds (top-k counts
  tokens, top-p sums weights). `_cut_level_kernel` finds it by a 16-ary search over the key range,
  4 bits per level (4 levels for bf16, 5 for fp16, 8 for fp32 per cut), each level one launch over
  all (row, chunk) programs: every program counts / sums its chunk at 16 probe keys, and the last
  program of a row (arrival counter) adds the chunks in order and narrows the row's interval.
  Runs only when top_k / top_p are set.
* `_sample_kernel`, grid (rows, chunks of CHUNK = BLOCK * CHUNK_BLOCKS tokens), ONE launch:
  1. every program reduces its chunk: greedy, the chunk's max and first argmax; sampling, the max
     m_c of the kept logits and sum_c exp2((x - m_c) * log2(e) / temperature) over kept tokens;
  2. the last program of a row to finish (an atomic arrival counter per row) selects the row's
     token: greedy reduces the chunk partials (ties to the first chunk); sampling rescales the
     chunk masses to the row max, locates u * W in their inclusive prefix sum, and scans only that
     chunk (block cumsums) for the token;
  3. (`accept`) the last row to be selected (a second counter) does the walk below.
  The counters live in one per-device buffer that every launch leaves zeroed (graph replays).
  BLOCK and CHUNK depend on V only, never on the number of rows, so a row gets bit-identical
  float sums (hence the same token for the same u) whether it is sampled alone (AR) or among the
  B * T verification rows: sampled speculative decoding is lossless by construction.

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
Launches: [cut levels] + the sampler, whose last program does the walk without a loop over depths:
alive branches at depth t are exactly those agreeing with f(t) on drafts 1..t, so it tabulates,
for every possible (f, t), the next first-alive branch, then jumps from one first-alive branch to
the next (at most B jumps, all in registers).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

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
def _kept_logits(
    row_ptr, idx, vocab, threshold, HAS_THRESHOLD: tl.constexpr, KEY_SHIFT: tl.constexpr
):
    """Logits of one block in float32, -inf outside the vocabulary and at tokens cut by top-k/p."""
    x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
    kept = idx < vocab
    if HAS_THRESHOLD:
        kept = kept & (_order_key(x, KEY_SHIFT) >= threshold)
    return tl.where(kept, x, float("-inf")), kept


@triton.jit
def _weight(x, kept, x_max, scale):
    """exp((x - x_max) / temperature) on kept tokens, 0 elsewhere (scale = log2(e) / temperature)."""
    return tl.where(kept, tl.exp2((x - x_max) * scale), 0.0)


@triton.jit
def _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS: tl.constexpr):
    if HAS_ROWS:
        row = tl.load(rows_ptr + pair).to(tl.int64)
    else:
        row = pair.to(tl.int64)
    return logits_ptr + row * stride_row


@triton.jit
def _argmax_from_partials(chunk_max, chunk_argmax, chunk_ids, valid, NONE: tl.constexpr):
    """Reduce per-chunk (max, first argmax): the largest value, ties to the first chunk."""
    best = tl.max(chunk_max, axis=0)
    winner = tl.min(tl.where(valid & (chunk_max == best), chunk_ids, NONE), axis=0)
    return tl.sum(tl.where(chunk_ids == winner, chunk_argmax, 0), axis=0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cut_level_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] pair -> logits row (HAS_ROWS)
    lo_ptr,  # [P] int64 state: the cut holds at key lo ...
    hi_ptr,  # [P] int64 state: ... and fails at key hi
    target_ptr,  # [P] f32 state (MASS): top_p * the kept mass
    threshold_ptr,  # [P] int32 out: lo after this level
    probe_ptr,  # [P, S, PROBES] f32 scratch: per chunk, count / mass of keys >= each probe
    chunk_max_ptr,  # [P, S] f32 scratch (MASS): the chunk's max logit
    arrivals_ptr,  # [>= P] int32, zero on entry and on exit
    # sizes and scalars
    vocab,
    num_chunks,
    top_k,
    top_p,
    scale,  # log2(e) / temperature
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    MASS: tl.constexpr,  # top-p (sums weights) instead of top-k (counts tokens)
    FRESH_LO: tl.constexpr,  # lo = KEY_LO instead of the state's
    FRESH_HI: tl.constexpr,  # hi = KEY_END instead of the state's (the first top-p level)
    KEY_SHIFT: tl.constexpr,
    KEY_LO: tl.constexpr,
    KEY_END: tl.constexpr,
    PROBES: tl.constexpr,
    SUB: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One level of the PROBES-ary search for a cut key: grid (P, S chunks of CHUNK tokens)."""
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    if FRESH_LO:
        lo = tl.full([], KEY_LO, tl.int64)
    else:
        lo = tl.load(lo_ptr + pair)
    if FRESH_HI:
        hi = tl.full([], KEY_END, tl.int64)
    else:
        hi = tl.load(hi_ptr + pair)
    # probe 0 is lo itself (its total is the kept mass on the first top-p level)
    probe_ids = tl.arange(0, PROBES)
    probes = lo + (probe_ids.to(tl.int64) * (hi - lo)) // PROBES
    offs = tl.arange(0, SUB)
    totals = tl.zeros([PROBES], tl.float32)
    run_max = float("-inf")
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, SUB):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        at_least = (_order_key(x, KEY_SHIFT)[None, :] >= probes[:, None]) & (idx < vocab)[None, :]
        if MASS:
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            ref_max = tl.where(new_max > float("-inf"), new_max, 0.0)
            totals = totals * tl.exp2((run_max - ref_max) * scale)
            w = tl.exp2((x - ref_max) * scale)
            totals += tl.sum(tl.where(at_least, w[None, :], 0.0), axis=1)
            run_max = new_max
        else:
            totals += tl.sum(at_least.to(tl.float32), axis=1)
    partial = pair * num_chunks + chunk
    tl.store(probe_ptr + partial * PROBES + probe_ids, totals)
    if MASS:
        tl.store(chunk_max_ptr + partial, run_max)
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + pair, 1)
    if arrived == num_chunks - 1:
        # the last chunk of the row: sum the partials in chunk order (deterministic, unlike
        # float atomics: AR and verification must cut a row identically), keep the last probe
        # where the cut holds and the first where it fails
        tl.store(arrivals_ptr + pair, 0)
        chunk_ids = tl.arange(0, BLOCK_S)
        valid = chunk_ids < num_chunks
        rows = pair * num_chunks + chunk_ids
        parts = tl.load(
            probe_ptr + rows[:, None] * PROBES + probe_ids[None, :],
            mask=valid[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        if MASS:
            chunk_max = tl.load(
                chunk_max_ptr + rows, mask=valid, other=float("-inf"), cache_modifier=".cg"
            )
            x_max = tl.max(chunk_max, axis=0)
            rescale = tl.where(chunk_max > float("-inf"), tl.exp2((chunk_max - x_max) * scale), 0.0)
            sums = tl.sum(parts * rescale[:, None], axis=0)
            if FRESH_HI:
                need = top_p * tl.sum(tl.where(probe_ids == 0, sums, 0.0), axis=0)
                tl.store(target_ptr + pair, need)
            else:
                need = tl.load(target_ptr + pair)
        else:
            sums = tl.sum(parts, axis=0)
            need = top_k + 0.0
        holds = sums >= need
        new_lo = tl.max(tl.where(holds, probes, lo), axis=0)
        new_hi = tl.min(tl.where(holds, hi, probes), axis=0)
        tl.store(lo_ptr + pair, new_lo)
        tl.store(hi_ptr + pair, new_hi)
        tl.store(threshold_ptr + pair, new_lo.to(tl.int32))


@triton.jit
def _chunk_partial(
    logits_ptr, rows_ptr, threshold_ptr, chunk_max_ptr, chunk_argmax_ptr, chunk_mass_ptr,
    pair, chunk, vocab, num_chunks, scale, stride_row,
    HAS_ROWS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, GREEDY: tl.constexpr,
    KEY_SHIFT: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
):  # fmt: skip
    """Store chunk `chunk` of pair `pair`'s row: its max kept logit and (greedy) its first argmax,
    or (sampling) sum exp2((x - chunk max) * scale) over its kept tokens."""
    row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
    threshold = 0
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + pair)
    offs = tl.arange(0, BLOCK)
    first = chunk * (BLOCK * CHUNK_BLOCKS)
    run_max = float("-inf")
    run_argmax = first
    run_mass = 0.0
    for i in tl.static_range(CHUNK_BLOCKS):
        idx = first + i * BLOCK + offs
        x, kept = _kept_logits(row_ptr, idx, vocab, threshold, HAS_THRESHOLD, KEY_SHIFT)
        block_max = tl.max(x, axis=0)
        if GREEDY:
            block_argmax = first + i * BLOCK + tl.argmax(x, axis=0, tie_break_left=True)
            # strict: an earlier block keeps a tie
            run_argmax = tl.where(block_max > run_max, block_argmax, run_argmax)
            run_max = tl.maximum(run_max, block_max)
        else:
            new_max = tl.maximum(run_max, block_max)
            # 0 while nothing is kept, so a chunk with nothing kept stays (-inf, 0) without -inf + inf
            ref_max = tl.where(new_max > float("-inf"), new_max, 0.0)
            run_mass = run_mass * tl.exp2((run_max - ref_max) * scale)
            run_mass += tl.sum(_weight(x, kept, ref_max, scale), axis=0)
            run_max = new_max
    out = pair * num_chunks + chunk
    tl.store(chunk_max_ptr + out, run_max)
    if GREEDY:
        tl.store(chunk_argmax_ptr + out, run_argmax)
    else:
        tl.store(chunk_mass_ptr + out, run_mass)


@triton.jit
def _select_token(
    logits_ptr, rows_ptr, threshold_ptr, chunk_max_ptr, chunk_argmax_ptr, chunk_mass_ptr,
    uniforms_ptr, pair, vocab, num_chunks, uniform_period, scale, stride_row,
    HAS_ROWS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, GREEDY: tl.constexpr,
    KEY_SHIFT: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Pair `pair`'s token from its chunk partials (written by other programs: read through L2)."""
    chunk_ids = tl.arange(0, BLOCK_S)
    valid = chunk_ids < num_chunks
    partial = pair * num_chunks + chunk_ids
    chunk_max = tl.load(
        chunk_max_ptr + partial, mask=valid, other=float("-inf"), cache_modifier=".cg"
    )
    if GREEDY:
        chunk_argmax = tl.load(
            chunk_argmax_ptr + partial, mask=valid, other=0, cache_modifier=".cg"
        )
        token = _argmax_from_partials(chunk_max, chunk_argmax, chunk_ids, valid, BLOCK_S)
    else:
        x_max = tl.max(chunk_max, axis=0)
        chunk_mass = tl.load(chunk_mass_ptr + partial, mask=valid, other=0.0, cache_modifier=".cg")
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

        row_ptr = _pair_row_ptr(logits_ptr, rows_ptr, pair, stride_row, HAS_ROWS)
        threshold = 0
        if HAS_THRESHOLD:
            threshold = tl.load(threshold_ptr + pair)
        offs = tl.arange(0, BLOCK)
        first = chunk * (BLOCK * CHUNK_BLOCKS)
        run = 0.0
        found = 2147483647
        last_positive = -1
        for i in tl.static_range(CHUNK_BLOCKS):
            idx = first + i * BLOCK + offs
            x, kept = _kept_logits(row_ptr, idx, vocab, threshold, HAS_THRESHOLD, KEY_SHIFT)
            w = _weight(x, kept, x_max, scale)
            through = run + tl.cumsum(w, axis=0)
            found = tl.minimum(
                found, tl.min(tl.where(through > local_target, idx, 2147483647), axis=0)
            )
            last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0.0, idx, -1), axis=0))
            run = tl.max(through, axis=0)
        token = tl.where(found < 2147483647, found, last_positive)
    return token


@triton.jit
def _accept_scan(
    cand_ptr, rows_ptr, tokens_ptr, num_accepted_ptr, bonus_ptr, branch_ptr, path_rows_ptr,
    out_tokens_ptr, target_tokens_ptr, num_branches, depth,
    HAS_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """The walk over depths (module docstring), from every pair's target token in tokens_ptr."""
    ob = tl.arange(0, BLOCK_B)
    ot = tl.arange(0, BLOCK_T)
    b_ok = ob < num_branches
    t_ok = ot < depth
    pair = ob[:, None] * depth + ot[None, :]
    pair_ok = b_ok[:, None] & t_ok[None, :]
    # every global load up front: the walk below is a chain of dependent reductions
    cand = tl.load(cand_ptr + pair, mask=pair_ok, other=-1)
    # written by the other programs' selections: read through L2
    target = tl.load(tokens_ptr + pair, mask=pair_ok, other=-1, cache_modifier=".cg")
    next_ok = b_ok[None, :] & (ot + 1 < depth)[:, None]
    next_draft = tl.load(cand_ptr + ob[None, :] * depth + ot[:, None] + 1, mask=next_ok, other=-1)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + pair, mask=pair_ok, other=0).to(tl.int32)
    else:
        rows = pair
    tl.store(target_tokens_ptr + pair, target, mask=pair_ok)

    # first_diff[f, b]: first depth t >= 1 where the drafts of branches f and b differ (else T).
    # When f is the first alive branch at depth t, b is alive iff first_diff[f, b] > t.
    differ = (cand[:, None, :] != cand[None, :, :]) & (ot >= 1)[None, None, :] & t_ok[None, None, :]
    first_diff = tl.min(tl.where(differ, ot[None, None, :], depth), axis=2)
    # next_draft[t, b] = cand_tokens[b, t + 1] (loaded above)
    # next_first[f, t]: the first branch alive at depth t + 1 if f is the first alive at depth t
    # (BLOCK_B: none, s_t is the bonus). Survivors of depth t are the alive b >= f whose draft
    # t + 1 equals f's target at depth t.
    follows = (
        (ob[None, None, :] >= ob[:, None, None])
        & (first_diff[:, None, :] > ot[None, :, None])
        & (next_draft[None, :, :] == target[:, :, None])
        & next_ok[None, :, :]
    )
    next_first = tl.min(tl.where(follows, ob[None, None, :], BLOCK_B), axis=2)

    # Jump from one first-alive branch to the next: f only grows, so at most B jumps.
    first = 0
    from_depth = 0
    num_accepted = 0
    branch = 0
    done = 0
    first_at = tl.zeros([BLOCK_T], tl.int32)  # f(t)
    for _ in range(num_branches):
        next_of_first = tl.sum(tl.where(ob[:, None] == first, next_first, 0), axis=0)
        stop_depth = tl.min(
            tl.where(t_ok & (ot >= from_depth) & (next_of_first != first), ot, BLOCK_T), axis=0
        )
        successor = tl.sum(tl.where(ot == stop_depth, next_of_first, 0), axis=0)
        active = done == 0
        first_at = tl.where(active & (ot >= from_depth) & (ot <= stop_depth), first, first_at)
        ends = active & (successor == BLOCK_B)
        moves = active & (successor != BLOCK_B)
        num_accepted = tl.where(ends, stop_depth, num_accepted)
        branch = tl.where(ends, first, branch)
        done = tl.where(ends, 1, done)
        first = tl.where(moves, successor, first)
        from_depth = tl.where(moves, stop_depth + 1, from_depth)

    sampled = tl.sum(tl.where(ob[:, None] == first_at[None, :], target, 0), axis=0)  # s_t
    bonus = tl.sum(tl.where(ot == num_accepted, sampled, 0), axis=0)
    path_rows = tl.sum(tl.where(ob[:, None] == branch, rows, 0), axis=0)
    tl.store(out_tokens_ptr + ot, tl.where(ot <= num_accepted, sampled, -1), mask=t_ok)
    tl.store(path_rows_ptr + ot, path_rows, mask=t_ok)
    tl.store(num_accepted_ptr, num_accepted)
    tl.store(bonus_ptr, bonus)
    tl.store(branch_ptr, branch)


@triton.jit
def _sample_kernel(
    # pointers
    logits_ptr,  # [*, V]
    rows_ptr,  # [P] int32/int64, pair -> logits row (HAS_ROWS)
    threshold_ptr,  # [P] int32 (HAS_THRESHOLD)
    chunk_max_ptr,  # [P, S] f32 scratch: max kept logit of each chunk
    chunk_argmax_ptr,  # [P, S] int32 scratch (GREEDY): its first token id
    chunk_mass_ptr,  # [P, S] f32 scratch (not GREEDY): sum exp2((x - chunk max) * scale), kept
    uniforms_ptr,  # [uniform_period] f32: pair p draws uniforms[p % uniform_period]
    tokens_ptr,  # [P] int64 out
    arrivals_ptr,  # [>= P + 1] int32, zero on entry and on exit: chunks done per pair, pairs done
    cand_ptr,  # [B, T] int64 (SCAN), P = B * T
    num_accepted_ptr,  # [1] int32 out (SCAN)
    bonus_ptr,  # [1] int64 out (SCAN)
    branch_ptr,  # [1] int32 out (SCAN)
    path_rows_ptr,  # [T] int32 out (SCAN)
    out_tokens_ptr,  # [T] int64 out (SCAN)
    target_tokens_ptr,  # [B, T] int64 out (SCAN)
    # sizes and scalars
    vocab,
    num_chunks,
    uniform_period,
    scale,
    num_pairs,
    num_branches,
    depth,
    # strides
    stride_row,
    # meta
    HAS_ROWS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    GREEDY: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    _chunk_partial(
        logits_ptr, rows_ptr, threshold_ptr, chunk_max_ptr, chunk_argmax_ptr, chunk_mass_ptr,
        pair, chunk, vocab, num_chunks, scale, stride_row,
        HAS_ROWS, HAS_THRESHOLD, GREEDY, KEY_SHIFT, BLOCK, CHUNK_BLOCKS,
    )  # fmt: skip
    # The last chunk program of a pair to arrive selects its token, and (SCAN) the last pair's
    # selecting program walks the candidates: one launch instead of three (each launch costs a few
    # us of latency in a graph, as much as the whole selection). The barrier puts every thread's
    # stores before the atomic's release; the atomics are acq_rel at GPU scope.
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + pair, 1)
    if arrived == num_chunks - 1:
        tl.store(arrivals_ptr + pair, 0)  # ready for the next launch (graph replays)
        token = _select_token(
            logits_ptr, rows_ptr, threshold_ptr, chunk_max_ptr, chunk_argmax_ptr, chunk_mass_ptr,
            uniforms_ptr, pair, vocab, num_chunks, uniform_period, scale, stride_row,
            HAS_ROWS, HAS_THRESHOLD, GREEDY, KEY_SHIFT, BLOCK, CHUNK_BLOCKS, BLOCK_S,
        )  # fmt: skip
        tl.store(tokens_ptr + pair, token.to(tl.int64))
        if SCAN:
            tl.debug_barrier()
            pairs_done = tl.atomic_add(arrivals_ptr + num_pairs, 1)
            if pairs_done == num_pairs - 1:
                tl.store(arrivals_ptr + num_pairs, 0)
                _accept_scan(
                    cand_ptr, rows_ptr, tokens_ptr, num_accepted_ptr, bonus_ptr, branch_ptr,
                    path_rows_ptr, out_tokens_ptr, target_tokens_ptr, num_branches, depth,
                    HAS_ROWS, BLOCK_B, BLOCK_T,
                )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Configuration: a function of V and the dtype only (never of the row count; see the docstring)
# ----------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
# Measured on the H200 (B = 5, T = 16, bf16, V = 151936 / 49152): one 8192-token block per chunk
# with 8 warps beat 2048 x 4 x 4 warps (greedy partials 9.2 / 4.2 us vs 10.8 / 5.6 us); 32 warps
# of 8192 were the fastest threshold passes; a 1-warp scan spills. Changing BLOCK / CHUNK changes
# the sampled rounding (consistently for AR and verification: they depend on V only).
_BLOCK = 8192  # tokens per block of the partial/select kernels
_CHUNK_BLOCKS = 1  # blocks per chunk: one partials program reads CHUNK = 8192 tokens of a row
_NUM_WARPS = {"cut": 8, "sample": 8}
# The cut search: PROBES-ary, so log2(PROBES) bits of the key per level (a launch each); keys have
# 32 - KEY_SHIFT bits: 4 levels for bf16, 5 for fp16, 8 for fp32 per cut. SUB tokens per step.
_PROBES = 16
_CUT_SUB = 512


def _chunking(vocab: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK_BLOCKS, num_chunks) for a vocabulary of `vocab` tokens."""
    block = min(_BLOCK, triton.next_power_of_2(vocab))
    chunk_blocks = min(_CHUNK_BLOCKS, triton.cdiv(vocab, block))
    return block, chunk_blocks, triton.cdiv(vocab, block * chunk_blocks)


class _Scan(NamedTuple):
    """What `accept` adds to the sampler's launch: the candidates and the walk's outputs."""

    cand_tokens: torch.Tensor
    num_accepted: torch.Tensor
    bonus: torch.Tensor
    branch: torch.Tensor
    path_rows: torch.Tensor
    out_tokens: torch.Tensor
    target_tokens: torch.Tensor


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, num_pairs: int) -> torch.Tensor:
    """The sampler's arrival counters on `device` (>= num_pairs + 1, zero between launches).

    One buffer per device, allocated once (a graph replays with it): every launch leaves it zeroed
    again. Two samplers must therefore not run at the same time on two streams of one device."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < num_pairs + 1:
        counters = torch.zeros(max(num_pairs + 1, 1024), dtype=torch.int32, device=device)
        _ARRIVALS[device] = counters
    return counters


def _cut_thresholds(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    num_pairs: int,
    scale: float,
    top_k: int,
    top_p: float,
    chunk: int,
    num_chunks: int,
) -> torch.Tensor:
    """Per pair, the key threshold of the top-k then top-p cut ([P] int32): the top-k cut is the
    largest key v with count(key >= v) >= top_k; the top-p cut the largest v >= that with
    mass(key >= v) >= top_p * mass(key >= the top-k cut). Each is a PROBES-ary search over the key
    range, one launch per level, every level over all (pair, chunk) programs at once."""
    device = logits.device
    key_bits = 32 - _KEY_SHIFT[logits.dtype]
    levels = math.ceil(key_bits / math.log2(_PROBES))
    lo = torch.empty(num_pairs, dtype=torch.int64, device=device)
    hi = torch.empty_like(lo)
    target = torch.empty(num_pairs, dtype=torch.float32, device=device)
    threshold = torch.empty(num_pairs, dtype=torch.int32, device=device)
    probe_sums = torch.empty(num_pairs, num_chunks, _PROBES, dtype=torch.float32, device=device)
    chunk_max = torch.empty(num_pairs, num_chunks, dtype=torch.float32, device=device)
    arrivals = _arrivals(device, num_pairs)
    searches = ([False] if top_k > 0 else []) + ([True] if top_p < 1.0 else [])
    for search, mass in enumerate(searches):
        for level in range(levels):
            _cut_level_kernel[(num_pairs, num_chunks)](
                logits, rows if rows is not None else lo, lo, hi, target, threshold,
                probe_sums, chunk_max, arrivals,
                logits.shape[1], num_chunks, top_k, top_p, scale,
                logits.stride(0),
                HAS_ROWS=rows is not None, MASS=mass,
                FRESH_LO=search == 0 and level == 0, FRESH_HI=level == 0,
                KEY_SHIFT=_KEY_SHIFT[logits.dtype],
                KEY_LO=-(1 << (key_bits - 1)), KEY_END=1 << (key_bits - 1),
                PROBES=_PROBES, SUB=min(_CUT_SUB, chunk), CHUNK=chunk,
                BLOCK_S=triton.next_power_of_2(num_chunks),
                num_warps=_NUM_WARPS["cut"],
            )  # fmt: skip
    return threshold


def _sample_pairs(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    num_pairs: int,
    uniforms: torch.Tensor | None,
    uniform_period: int,
    temperature: float,
    top_k: int,
    top_p: float,
    scan: _Scan | None = None,
) -> torch.Tensor:
    """Launch the sampler on `num_pairs` pairs -> tokens [P] int64; pair p reads logits row rows[p]
    (default p) and uniforms[p % uniform_period]. With `scan`, the same launch also walks the
    candidates (`accept`) and writes the walk's outputs into its tensors."""
    vocab = logits.shape[1]
    block, chunk_blocks, num_chunks = _chunking(vocab)
    key_shift = _KEY_SHIFT[logits.dtype]
    greedy = temperature == 0.0
    scale = 0.0 if greedy else _LOG2E / temperature
    top_k = top_k if (not greedy and 0 < top_k < vocab) else 0
    top_p = top_p if not greedy else 1.0
    has_threshold = top_k > 0 or top_p < 1.0
    has_rows = rows is not None
    device = logits.device
    tokens = torch.empty(num_pairs, dtype=torch.int64, device=device)
    if num_pairs == 0:
        return tokens
    chunk_max = torch.empty(num_pairs, num_chunks, dtype=torch.float32, device=device)
    chunk_val = torch.empty(
        num_pairs, num_chunks, dtype=torch.int32 if greedy else torch.float32, device=device
    )
    rows_arg = rows if has_rows else chunk_max  # unused pointer when HAS_ROWS is off
    threshold = chunk_max
    if has_threshold:
        threshold = _cut_thresholds(
            logits, rows, num_pairs, scale, top_k, top_p, block * chunk_blocks, num_chunks
        )
    scan_args = scan if scan is not None else (tokens,) * len(_Scan._fields)
    num_branches, depth = scan.cand_tokens.shape if scan is not None else (1, 1)
    _sample_kernel[(num_pairs, num_chunks)](
        logits, rows_arg, threshold, chunk_max, chunk_val, chunk_val,
        uniforms if uniforms is not None else chunk_max, tokens, _arrivals(device, num_pairs),
        *scan_args,
        vocab, num_chunks, uniform_period, scale, num_pairs, num_branches, depth,
        logits.stride(0),
        HAS_ROWS=has_rows, HAS_THRESHOLD=has_threshold, GREEDY=greedy, KEY_SHIFT=key_shift,
        BLOCK=block, CHUNK_BLOCKS=chunk_blocks, BLOCK_S=triton.next_power_of_2(num_chunks),
        SCAN=scan is not None,
        BLOCK_B=triton.next_power_of_2(num_branches), BLOCK_T=triton.next_power_of_2(depth),
        num_warps=_NUM_WARPS["sample"],
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
    device = logits.device
    scan = _Scan(
        cand_tokens,
        num_accepted=torch.empty(1, dtype=torch.int32, device=device),
        bonus=torch.empty(1, dtype=torch.int64, device=device),
        branch=torch.empty(1, dtype=torch.int32, device=device),
        path_rows=torch.empty(depth, dtype=torch.int32, device=device),
        out_tokens=torch.empty(depth, dtype=torch.int64, device=device),
        target_tokens=torch.empty(num_branches, depth, dtype=torch.int64, device=device),
    )
    num_pairs = num_branches * depth
    _sample_pairs(logits, row_of, num_pairs, uniforms, depth, temperature, top_k, top_p, scan)
    num_accepted, bonus, branch, path_rows, out_tokens, target_tokens = scan[1:]
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
