"""Fused top-k confidence selection: first-draft logits -> draft tokens, r(i), top-K branch points.

Input: the first drafter's logits `[G, V]` for draft positions 1..G (G = γ - 1), any of fp32 /
fp16 / bf16; all arithmetic is fp32. Row `g` is draft position `k = g + 1`.

    t_k   = argmax_v logits[k-1, v]                  ties -> the smaller token id
    c_k   = max_v softmax(logits[k-1])_v = 1 / sum_v exp(l_v - max l)   (never materialised)
    r(i)  = prod_{1<=k<=i} c_k * (1 - c_{i+1})      i = 0..G-1, the probability that exactly i
                                                     drafts are accepted
    branch_len[j] = the j-th largest r(i)            ties -> the smaller i
    vp_input_ids[j] = [anchor, t_1 .. t_i, MASK, ..., MASK]   (gamma2 entries, i = branch_len[j])

Two launches, no host sync:
1. `_partials_kernel`, grid (G, chunks): each program scans `tiles_per_program` tiles of BLOCK_V
   contiguous logits of one row and writes the chunk's (max, first argmax, sum of exp(l - max)).
   The logits are read exactly once.
2. `_select_kernel`, one program: merges the chunk partials of every row (online softmax merge),
   then computes c, r, the ranks of r, branch_len and vp_input_ids in registers.

Rounding contract (so that the kernel and `topk_confidence_ref` pick the same branches):
- c_k = 1 / s_k is a correctly rounded fp32 division (`div_rn`); s_k differs from the reference's
  fp32 sum only by summation order and exp rounding (a few ulp).
- r is built from c with the same fp32 operations in the same order in both: P_i = c_1 ... c_i as
  a fixed pairwise tree ((c_1 c_2)(c_3 c_4))..., padded with exact 1s, each step one product of
  two numbers (so no reduction order is left to the compiler), then r(i) = P_i * (1 - c_{i+1}).
  Given the same c the kernel's r is bit-identical to the reference's, and
  `select_branches_ref(confidence)` on the kernel's own confidences reproduces its `branch_len`.
  Stage 2 is compiled without fma contraction so that every lane holding a copy of a row's
  confidence holds the same bits.
- With exactly representable confidences (c = 1/n from n tied maxima, every other logit far enough
  below that exp underflows to 0) the kernel and the reference agree bit for bit, ties included.

K > G (more branches than branch points; the decoder rejects it, but the kernel stays defined):
slot j takes the (j mod G)-th ranked branch point, i.e. the ranking repeats cyclically, so every
row of `vp_input_ids` is a valid VP input and the duplicated branches dedup in `tree_mask`.

A row must hold at least one finite logit (an all -inf row gives c = inf). Fully -inf chunks are
fine: their partial sum is 0 and their weight in the merge is 0. NaN logits are not handled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# stage 2 is one program; 1, 2 and 4 warps measured within 0.5 us of each other on the H200
_SELECT_WARPS = 4
# (smallest vocabulary, BLOCK_V) for the default launch, largest first
_BLOCK_V_BY_VOCAB = ((131072, 8192), (32768, 4096), (8192, 2048), (0, 1024))
# Stage 2 merges at most this many chunk partials per row; larger vocabularies loop inside stage 1.
MAX_CHUNKS = 64


@triton.jit
def _partials_kernel(
    # pointers
    logits_ptr,
    part_max_ptr,
    part_arg_ptr,
    part_sum_ptr,
    # sizes
    vocab_size,
    num_chunks,
    tiles_per_program,
    # strides
    stride_logits_row,
    # meta
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK_V)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_logits_row
    run_max = tl.full([], -float("inf"), tl.float32)
    run_arg = tl.full([], 0, tl.int32)
    run_sum = tl.full([], 0.0, tl.float32)
    chunk_start = chunk * tiles_per_program * BLOCK_V
    for tile in range(tiles_per_program):
        cols = chunk_start + tile * BLOCK_V + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=-float("inf")).to(tl.float32)
        tile_max = tl.max(x, axis=0)
        # first occurrence of the maximum: the smaller token id wins ties
        tile_arg = tl.min(tl.where(x == tile_max, cols, 2147483647), axis=0)
        # an all -inf tile would make x - max = nan: shift by 0 instead, exp(-inf) = 0
        tile_shift = tl.where(tile_max == -float("inf"), 0.0, tile_max)
        tile_sum = tl.sum(tl.exp2((x - tile_shift) * LOG2E), axis=0)
        new_max = tl.maximum(run_max, tile_max)
        new_shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2((run_max - new_shift) * LOG2E) + tile_sum * tl.exp2(
            (tile_shift - new_shift) * LOG2E
        )
        # tiles ascend, so an equal later maximum keeps the earlier (smaller) token id
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        run_max = new_max
    out = row * num_chunks + chunk
    tl.store(part_max_ptr + out, run_max)
    tl.store(part_arg_ptr + out, run_arg)
    tl.store(part_sum_ptr + out, run_sum)


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _tree_product(x, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """Row products of x [BLOCK, BLOCK] as a fixed pairwise tree: (x0 x1)(x2 x3).., then pairs of
    those. Every step multiplies exactly two numbers, so the rounding cannot depend on how the
    compiler orders a reduction, and `_tree_product_ref` reproduces it bit for bit."""
    for level in tl.static_range(LOG2_BLOCK):
        x = tl.reduce(tl.reshape(x, [BLOCK, BLOCK >> (level + 1), 2]), 2, _multiply)
    return tl.reshape(x, [BLOCK])


@triton.jit
def _select_kernel(
    # pointers
    part_max_ptr,
    part_arg_ptr,
    part_sum_ptr,
    anchor_ptr,
    draft_tokens_ptr,
    confidence_ptr,
    r_ptr,
    branch_len_ptr,
    vp_input_ids_ptr,
    # sizes
    num_rows,
    num_chunks,
    num_branches,
    gamma2,
    mask_token_id,
    # meta
    BLOCK_G: tl.constexpr,
    LOG2_BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T2: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_G)
    chunks = tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    part_ok = row_ok[:, None] & (chunks[None, :] < num_chunks)
    part = rows[:, None] * num_chunks + chunks[None, :]
    p_max = tl.load(part_max_ptr + part, mask=part_ok, other=-float("inf"))
    p_arg = tl.load(part_arg_ptr + part, mask=part_ok, other=2147483647)
    p_sum = tl.load(part_sum_ptr + part, mask=part_ok, other=0.0)

    # merge the chunk partials of each row: online softmax combine, first argmax
    row_max = tl.max(p_max, axis=1)
    row_shift = tl.where(row_max == -float("inf"), 0.0, row_max)
    weight = tl.where(p_max == -float("inf"), 0.0, tl.exp2((p_max - row_shift[:, None]) * LOG2E))
    sum_exp = tl.where(row_ok, tl.sum(p_sum * weight, axis=1), 1.0)
    token = tl.min(tl.where(p_max == row_max[:, None], p_arg, 2147483647), axis=1)
    conf = tl.math.div_rn(tl.full([BLOCK_G], 1.0, tl.float32), sum_exp)
    tl.store(draft_tokens_ptr + rows, token.to(tl.int64), mask=row_ok)
    tl.store(confidence_ptr + rows, conf, mask=row_ok)

    # r(i) = P_i * (1 - c_{i+1}), P_i = c_1 * ... * c_i as a pairwise tree over k (see _tree_product)
    conf = tl.where(row_ok, conf, 0.0)
    factors = tl.where(rows[None, :] < rows[:, None], conf[None, :], 1.0)
    prefix = _tree_product(factors, BLOCK_G, LOG2_BLOCK_G)
    r = prefix * (1.0 - conf)
    tl.store(r_ptr + rows, r, mask=row_ok)

    # rank(i) = #{j : r_j > r_i, or r_j == r_i and j < i}: a strict order, ties to the smaller i
    r_i = r[:, None]
    r_j = r[None, :]
    j_idx = rows[None, :]
    beats = (r_j > r_i) | ((r_j == r_i) & (j_idx < rows[:, None]))
    rank = tl.sum((beats & (j_idx < num_rows)).to(tl.int32), axis=1)

    # slot s holds the branch point of rank s mod G (K > G repeats the ranking cyclically)
    slots = tl.arange(0, BLOCK_K)
    want = slots % num_rows
    hit = (rank[None, :] == want[:, None]) & row_ok[None, :]
    branch_len = tl.sum(tl.where(hit, rows[None, :], 0), axis=1)
    tl.store(branch_len_ptr + slots, branch_len, mask=slots < num_branches)

    # vp_input_ids[s, p] = anchor (p = 0), t_p (1 <= p <= branch_len[s]), MASK otherwise
    pos = tl.arange(0, BLOCK_T2)
    pos_token = tl.sum(tl.where(rows[None, :] == pos[:, None] - 1, token[None, :], 0), axis=1)
    anchor = tl.load(anchor_ptr)
    ids = tl.where(
        pos[None, :] <= branch_len[:, None], pos_token[None, :].to(tl.int64), mask_token_id
    )
    ids = tl.where(pos[None, :] == 0, anchor, ids)
    out_ok = (slots[:, None] < num_branches) & (pos[None, :] < gamma2)
    tl.store(vp_input_ids_ptr + slots[:, None] * gamma2 + pos[None, :], ids, mask=out_ok)


def _launch_config(vocab_size: int, block_v: int, tiles_per_program: int) -> tuple[int, int, int]:
    """(BLOCK_V, tiles per program, chunks per row); 0 picks the default for this vocabulary."""
    if block_v <= 0:
        # a 1-5 MB read is latency-bound: one wave of programs, and few chunks for stage 2 to
        # merge (measured on the H200: 8192 at V = 151936, 4096 at V = 49152)
        block_v = next(b for v, b in _BLOCK_V_BY_VOCAB if vocab_size >= v)
    if tiles_per_program <= 0:
        tiles_per_program = triton.cdiv(triton.cdiv(vocab_size, block_v), MAX_CHUNKS)
    return block_v, tiles_per_program, triton.cdiv(vocab_size, block_v * tiles_per_program)


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("d2sd::topk_confidence", mutates_args=())
def _topk_confidence_op(
    logits: torch.Tensor,
    anchor: torch.Tensor,
    num_branches: int,
    gamma2: int,
    mask_token_id: int,
    block_v: int,
    tiles_per_program: int,
) -> Outputs:
    num_rows, vocab_size = logits.shape
    block_v, tiles, chunks = _launch_config(vocab_size, block_v, tiles_per_program)
    assert chunks <= MAX_CHUNKS, "tiles_per_program too small for this vocabulary"
    dev = logits.device
    part_max = torch.empty(num_rows, chunks, device=dev, dtype=torch.float32)
    part_arg = torch.empty(num_rows, chunks, device=dev, dtype=torch.int32)
    part_sum = torch.empty(num_rows, chunks, device=dev, dtype=torch.float32)
    draft_tokens = torch.empty(num_rows, device=dev, dtype=torch.int64)
    confidence = torch.empty(num_rows, device=dev, dtype=torch.float32)
    r = torch.empty(num_rows, device=dev, dtype=torch.float32)
    branch_len = torch.empty(num_branches, device=dev, dtype=torch.int32)
    vp_input_ids = torch.empty(num_branches, gamma2, device=dev, dtype=torch.int64)
    _partials_kernel[(num_rows, chunks)](
        logits,
        part_max,
        part_arg,
        part_sum,
        vocab_size,
        chunks,
        tiles,
        logits.stride(0),
        BLOCK_V=block_v,
        num_warps=4 if block_v <= 2048 else 8 if block_v <= 8192 else 16,
    )
    block_g = max(16, triton.next_power_of_2(num_rows))
    _select_kernel[(1,)](
        part_max,
        part_arg,
        part_sum,
        anchor,
        draft_tokens,
        confidence,
        r,
        branch_len,
        vp_input_ids,
        num_rows,
        chunks,
        num_branches,
        gamma2,
        mask_token_id,
        BLOCK_G=block_g,
        LOG2_BLOCK_G=block_g.bit_length() - 1,
        BLOCK_C=max(16, triton.next_power_of_2(chunks)),
        BLOCK_K=max(8, triton.next_power_of_2(num_branches)),
        BLOCK_T2=max(16, triton.next_power_of_2(gamma2)),
        num_warps=_SELECT_WARPS,
        # no fma contraction: a product fused into a cross-lane sum would make the lanes that hold
        # copies of one row's sum disagree in the last bit (seen on the H200)
        enable_fp_fusion=False,
    )
    return draft_tokens, confidence, r, branch_len, vp_input_ids


@_topk_confidence_op.register_fake
def _(logits, anchor, num_branches, gamma2, mask_token_id, block_v, tiles_per_program):
    num_rows = logits.shape[0]
    new = logits.new_empty
    return (
        new(num_rows, dtype=torch.int64),
        new(num_rows, dtype=torch.float32),
        new(num_rows, dtype=torch.float32),
        new(num_branches, dtype=torch.int32),
        new(num_branches, gamma2, dtype=torch.int64),
    )


def topk_confidence(
    logits: torch.Tensor,
    anchor: torch.Tensor,
    num_branches: int,
    gamma2: int,
    mask_token_id: int,
    *,
    block_v: int = 0,
    tiles_per_program: int = 0,
) -> Outputs:
    """Draft tokens, confidences, r and the top-K branch points with their VP-drafter inputs.

    Args:
        logits: [G, V] fp32 / fp16 / bf16, unit stride along V; row g is draft position g + 1.
        anchor: int64 [1] on the logits' device, the block's first token.
        num_branches: K >= 1 (K > G repeats the ranking cyclically, see the module docstring).
        gamma2: length of the VP-drafter block, >= G + 1.
        mask_token_id: the token that fills the masked VP positions.
        block_v, tiles_per_program: launch tuning for tests and benchmarks; 0 = default.

    Returns:
        draft_tokens int64 [G], confidence f32 [G], r f32 [G], branch_len int32 [K] (r descending,
        ties to the smaller i), vp_input_ids int64 [K, gamma2].
    """
    assert logits.ndim == 2 and logits.shape[0] >= 1 and logits.shape[1] >= 1, logits.shape
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), logits.dtype
    assert logits.stride(1) == 1, "logits must be contiguous along the vocabulary"
    assert logits.shape[1] < 2**31 - 1
    assert anchor.shape == (1,) and anchor.dtype == torch.int64, (anchor.shape, anchor.dtype)
    assert anchor.device == logits.device
    assert num_branches >= 1, num_branches
    assert gamma2 >= logits.shape[0] + 1, (gamma2, logits.shape[0])
    return _topk_confidence_op(
        logits, anchor, num_branches, gamma2, mask_token_id, block_v, tiles_per_program
    )


def _tree_product_ref(x: torch.Tensor) -> torch.Tensor:
    """Row products of x [G, G] in `_tree_product`'s pairwise order (padding with 1 is exact)."""
    width = triton.next_power_of_2(x.shape[1])
    x = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=1.0)
    while x.shape[1] > 1:
        x = x[:, 0::2] * x[:, 1::2]
    return x[:, 0]


def select_branches_ref(confidence: torch.Tensor, num_branches: int) -> tuple[torch.Tensor, ...]:
    """(r f32 [G], branch_len int32 [K]) from confidences f32 [G], in the kernel's fp32 order."""
    conf = confidence.float()
    num_rows = conf.shape[0]
    ids = torch.arange(num_rows, device=conf.device)
    factors = torch.where(ids[None, :] < ids[:, None], conf[None, :], 1.0)
    r = _tree_product_ref(factors) * (1.0 - conf)
    order = torch.sort(r, descending=True, stable=True).indices  # stable: ties to the smaller i
    slots = torch.arange(num_branches, device=conf.device) % num_rows
    return r, order[slots].to(torch.int32)


def topk_confidence_ref(
    logits: torch.Tensor,
    anchor: torch.Tensor,
    num_branches: int,
    gamma2: int,
    mask_token_id: int,
) -> Outputs:
    """fp32 torch reference of `topk_confidence` (same arguments, same outputs)."""
    x = logits.float()
    vocab_size = x.shape[1]
    row_max = x.max(dim=1, keepdim=True).values
    ids = torch.arange(vocab_size, device=x.device)
    draft_tokens = torch.where(x == row_max, ids, vocab_size).min(dim=1).values
    confidence = 1.0 / torch.exp(x - row_max).sum(dim=1)
    r, branch_len = select_branches_ref(confidence, num_branches)
    pos = torch.arange(gamma2, device=x.device)
    shifted = torch.cat([anchor.to(torch.int64), draft_tokens, draft_tokens.new_zeros(gamma2)])
    vp_input_ids = torch.where(
        pos[None, :] <= branch_len[:, None].long(), shifted[:gamma2][None, :], mask_token_id
    )
    return draft_tokens, confidence, r, branch_len, vp_input_ids
