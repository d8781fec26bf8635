"""The decode loop's small pure steps: draft, select, draft2, candidates, verify, accept, commit.

A cycle starts with `L` committed tokens in the target cache and the anchor (the last emitted token,
not yet in the cache) at position `L`:

1. `extend_context`: the drafter reads the tapped target hidden states of the rows committed by the
   previous cycle (a fixed `[T, n_taps * H]` buffer and a device count) into its own cache.
2. `draft`: DFlash fills the block `[anchor, MASK x (gamma-1)]` at positions `L .. L+gamma-1`;
   draft token `t_k = argmax logits[k]` for `k = 1 .. gamma-1`.
3. `select`: top-K prefix lengths `i_k` by r(i) (kernels.topk_confidence) and the VP inputs
   `[anchor, t_1 .. t_i, MASK ...]` of length gamma2.
4. `draft2`: the VP drafter fills the masked positions of the K inputs in one batch (they share the
   drafter's context); branch `k = [anchor, t_1 .. t_{i_k}, VP tokens]`. The `dflash+samples`
   ablation fills them instead by sampling the first draft's distributions (`sample_branches`).
5. `candidates`: `[K+1, gamma2]` = the first draft, extended from gamma to gamma2 with the MASK id
   (any extension is lossless: verification checks every token; MASK is a valid target id because
   the drafter shares the target's embedding), then the K branches.
6. `verify`: one target forward. Layout `branches`: B = K+1, T = gamma2, causal per branch over the
   shared prefix. Layout `tree`: kernels.tree_mask dedups into N = (K+1) * gamma2 nodes; B = 1,
   T = N, node positions `L + depth`, attention by the ancestor bit mask.
7. `accept`: kernels.accept walks depth by depth with one uniform per depth (`row_of` maps
   candidates to tree nodes).
8. `commit`: kernels.commit copies the accepted rows' K/V into the target cache and their taps into
   the drafter's pending context (one launch for every layer); then kernels.emit, in one launch,
   records those rows' positions and count for the drafters, advances `cache_len`, appends the
   emitted tokens (`t_1 .. t_a, bonus`) to the device output buffer at the device offset
   `out_len`, sets the next anchor to the bonus and writes the host's per-cycle report
   `[a + 1, tokens ...]`.

Every step takes tensors and the `LoopState` and runs without a host sync, so each can be captured in
a CUDA graph (d2sd/graphs.py). Lengths and positions are device tensors; shapes are fixed per
configuration. Positions are int64 `[B, T]` (the AR step passes the int32 length itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from d2sd import ops

__all__ = [
    "LoopState",
    "Sampling",
    "Selection",
    "Verified",
    "accept",
    "ar_step",
    "candidates",
    "commit",
    "draft",
    "draft2",
    "extend_context",
    "sample_branches",
    "select",
    "verify",
]


@dataclass(frozen=True)
class Sampling:
    """The target's warpers (those of kernels.sample_tokens); temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class LoopState:
    """What one cycle hands to the next: device tensors, updated in place by the steps.

    `T` below is the verify block length (gamma for `dflash`, gamma2 for the dual modes, 1 for `ar`).
    """

    anchor: torch.Tensor  # int64 [1]: the last emitted token, at position target cache_len
    target_cache: Any  # d2sd.models Cache: k/v cache, cache_len int32 [1], k/v local rows
    draft_cache: Any | None  # the DFlash drafter's context cache (None for `ar`)
    vp_cache: Any | None  # the second drafter's cache (None unless it has its own weights)
    ctx_hidden: torch.Tensor  # [T, n_taps * H]: taps of the rows the last cycle committed
    ctx_positions: torch.Tensor  # int64 [T]: their positions
    ctx_num_valid: torch.Tensor  # int32 [1]: how many of the T rows are real
    out_tokens: torch.Tensor  # int64 [capacity]: emitted tokens; rows >= out_len are scratch
    out_len: torch.Tensor  # int32 [1]
    cycle: torch.Tensor  # int32 [1]: row of `uniforms` that the next cycle reads
    uniforms: torch.Tensor  # f32 [rows, T]: the target's draws, one row per cycle
    branch_uniforms: torch.Tensor | None  # f32 [rows, K, gamma-1]: `dflash+samples` only
    report: torch.Tensor  # int64 [1 + T]: [tokens emitted by the last cycle, the tokens ...]

    def reset(self) -> None:
        """Empty every cache and counter (cache contents stay; rows past cache_len are scratch)."""
        for cache in (self.target_cache, self.draft_cache, self.vp_cache):
            if cache is not None:
                cache.cache_len.zero_()
        for counter in (self.anchor, self.ctx_num_valid, self.out_len, self.cycle, self.report):
            counter.zero_()
        self.ctx_positions.zero_()


@dataclass
class Selection:
    """Output of `select`: kernels.topk_confidence's tensors."""

    draft_tokens: torch.Tensor  # int64 [G], G = gamma - 1
    confidence: torch.Tensor  # f32 [G]
    r: torch.Tensor  # f32 [G]
    branch_len: torch.Tensor  # int32 [K]
    vp_input_ids: torch.Tensor  # int64 [K, gamma2]


@dataclass
class Verified:
    """Output of `verify`: the target's logits and taps per row, and where each candidate sits."""

    cand_tokens: torch.Tensor  # int64 [B, T]: the candidates in accept's layout
    logits: torch.Tensor  # [R, V] in the model dtype
    taps: torch.Tensor | None  # [R, n_taps * H] (None for `ar`)
    row_of: torch.Tensor | None  # int32 [B, T] for the tree; None: row b * T + t


def _positions(cache_len: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Absolute positions `cache_len + offsets` (int64, shape of `offsets`; the int32 length is
    promoted inside the add: one launch)."""
    return offsets + cache_len


def _current_row(table: torch.Tensor, cycle: torch.Tensor) -> torch.Tensor:
    """`table[cycle]` read on the device (clamped: the run-ahead cycle may look one row past)."""
    index = cycle.to(torch.int64).clamp(max=table.shape[0] - 1)
    return table.index_select(0, index)[0]


def extend_context(drafter: Any, cache: Any, state: LoopState) -> None:
    """Append the pending context rows (taps of the last committed rows) to a drafter's cache."""
    drafter.extend_context(state.ctx_hidden, state.ctx_positions, cache, state.ctx_num_valid)


def draft(
    drafter: Any,
    cache: Any,
    anchor: torch.Tensor,
    cache_len: torch.Tensor,
    mask_token_id: int,
    gamma: int,
) -> torch.Tensor:
    """First draft: logits [1, gamma, V] of the block [anchor, MASK x (gamma-1)] at L .. L+gamma-1."""
    masks = ops.constant(anchor.device, "int64", gamma - 1, mask_token_id)
    block = torch.cat([anchor, masks]).view(1, gamma)
    offsets = ops.constant(anchor.device, "arange", gamma).view(1, gamma)
    return drafter.forward(block, _positions(cache_len, offsets), cache)


def select(
    draft_logits: torch.Tensor,
    anchor: torch.Tensor,
    num_branches: int,
    gamma2: int,
    mask_token_id: int,
) -> Selection:
    """Top-K prefix lengths of the first draft: draft_logits [1, gamma, V] -> Selection."""
    return Selection(
        *ops.topk_confidence(draft_logits[0, 1:], anchor, num_branches, gamma2, mask_token_id)
    )


def draft2(drafter: Any, cache: Any, selection: Selection, cache_len: torch.Tensor) -> torch.Tensor:
    """Second draft: branch_tokens [K, gamma2] = the VP inputs with their masked positions filled
    by the drafter's argmax (positions 0 .. i_k keep the anchor and the first draft's tokens)."""
    vp_input_ids = selection.vp_input_ids
    num_branches, gamma2 = vp_input_ids.shape
    offsets = ops.constant(vp_input_ids.device, "arange", gamma2)
    logits = drafter.forward(
        vp_input_ids, _positions(cache_len, offsets).expand(num_branches, gamma2), cache
    )
    return _keep_prefix(vp_input_ids, logits.argmax(dim=-1), selection.branch_len)


def sample_branches(
    draft_logits: torch.Tensor,
    selection: Selection,
    uniforms: torch.Tensor,
    cycle: torch.Tensor,
    mask_token_id: int,
) -> torch.Tensor:
    """The `dflash+samples` ablation's branches: branch_tokens [K, gamma2] keep the anchor and
    t_1 .. t_{i_k}, then draw each later draft position independently from the first draft's
    distribution at temperature 1 (no top-k/top-p; inverse CDF in token-id order), positions past
    gamma-1 hold MASK.

    draft_logits [1, gamma, V]; uniforms [rows, K, gamma-1] from a generator independent of the
    target's (the tree must not depend on the target's draws); `cycle` picks the row. The CDF of
    each position is built once for all K branches.
    """
    vp_input_ids = selection.vp_input_ids
    cdf = draft_logits[0, 1:].float().softmax(dim=-1).cumsum(dim=-1)  # [G, V]
    draws = _current_row(uniforms, cycle).t().contiguous()  # [G, K]
    sampled = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True)
    sampled = sampled.clamp(max=cdf.shape[-1] - 1).t()  # [K, G]
    filled = torch.full_like(vp_input_ids, mask_token_id)
    filled[:, 1 : 1 + sampled.shape[1]] = sampled
    return _keep_prefix(vp_input_ids, filled, selection.branch_len)


def _keep_prefix(
    vp_input_ids: torch.Tensor, filled: torch.Tensor, branch_len: torch.Tensor
) -> torch.Tensor:
    """Positions 0 .. branch_len[k] from the VP input (anchor, t_1 .. t_i), the rest from `filled`."""
    offsets = ops.constant(vp_input_ids.device, "arange", vp_input_ids.shape[1])
    visible = offsets.view(1, -1) <= branch_len.view(-1, 1)  # int32 vs int64: one launch
    return torch.where(visible, vp_input_ids, filled)


def candidates(
    anchor: torch.Tensor,
    draft_tokens: torch.Tensor,
    branch_tokens: torch.Tensor | None,
    length: int,
    mask_token_id: int,
) -> torch.Tensor:
    """cand_tokens [1 + K, length]: row 0 = [anchor, t_1 .. t_G, MASK ...] (the first draft padded
    to `length`), rows 1.. = branch_tokens [K, length] (None: no branches)."""
    padding = ops.constant(
        anchor.device, "int64", length - 1 - draft_tokens.shape[0], mask_token_id
    )
    rows = [anchor, draft_tokens, padding]
    if branch_tokens is not None:
        rows.append(branch_tokens.flatten())
    return torch.cat(rows).view(-1, length)  # one launch


def verify(
    target: Any,
    cache: Any,
    cand_tokens: torch.Tensor,
    *,
    layout: str,
    branch_len: torch.Tensor | None = None,
    taps: Any = None,
) -> Verified:
    """One target forward over every candidate: cand_tokens [B, T] -> Verified.

    Layout "branches": B causal blocks of T tokens over the shared prefix (rows b * T + t).
    Layout "tree": row 0 is the first draft and rows 1.. the K branches, branch k sharing row 0's
    first `branch_len[k] + 1` tokens; kernels.tree_mask dedups them into N = B * T nodes, run as one
    block (positions L + depth, ancestor bit mask); `row_of` maps each candidate to its node.
    """
    num_cands, length = cand_tokens.shape
    if layout == "branches":
        offsets = ops.constant(cand_tokens.device, "arange", length).view(1, length)
        positions = _positions(cache.cache_len, offsets).expand(num_cands, length)
        logits, hidden = target.forward(cand_tokens, positions, cache, causal=True, taps=taps)
        row_of = None
    elif layout == "tree":
        assert branch_len is not None, "tree verification needs the branch lengths"
        tree = ops.tree_mask(cand_tokens[0], cand_tokens[1:], branch_len)
        positions = _positions(cache.cache_len, tree.depth.to(torch.int64)).view(1, -1)
        logits, hidden = target.forward(
            tree.node_tokens.view(1, -1),
            positions,
            cache,
            causal=False,
            mask=tree.ancestor_mask,
            taps=taps,
        )
        row_of = tree.branch_nodes
    else:
        raise ValueError(f"unknown verify layout {layout!r}")
    return Verified(cand_tokens, logits.reshape(-1, logits.shape[-1]), _flat(hidden), row_of)


def _flat(hidden: torch.Tensor | None) -> torch.Tensor | None:
    return None if hidden is None else hidden.reshape(-1, hidden.shape[-1])


def accept(verified: Verified, sampling: Sampling, state: LoopState):
    """kernels.accept over the verified candidates with this cycle's uniforms (a `kernels.Accept`)."""
    uniforms = None
    if not sampling.greedy:
        uniforms = _current_row(state.uniforms, state.cycle)[: verified.cand_tokens.shape[1]]
    return ops.accept(
        verified.cand_tokens,
        verified.logits,
        row_of=verified.row_of,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        uniforms=uniforms,
    )


def commit(verified: Verified, accepted: Any, state: LoopState) -> None:
    """Commit the accepted path and emit its tokens (see the module docstring, step 8)."""
    cache = state.target_cache
    num_new = accepted.num_accepted + 1
    ops.commit(
        cache.k_local,
        cache.v_local,
        cache.k_cache,
        cache.v_cache,
        accepted.path_rows,
        cache.cache_len,
        num_new,
        verified.taps,
        state.ctx_hidden if verified.taps is not None else None,
        advance=False,
    )
    # the bonus, out_tokens[a], becomes the anchor; the committed rows (positions cache_len ..
    # cache_len + a) become the drafters' pending context
    _emit(state, accepted.out_tokens, num_new, context=True)


def _emit(state: LoopState, tokens: torch.Tensor, num_new: torch.Tensor, *, context: bool) -> None:
    """After a commit with advance=False: append tokens[:num_new] at out_len (all of `tokens` is
    written; the tail is scratch that the next cycle overwrites), advance out_len and the cycle,
    fill the host report, make tokens[num_new - 1] the anchor, record the committed rows as the
    drafters' context (`context`) and advance the target cache's length, in one launch."""
    ops.emit(
        tokens, num_new, state.out_tokens, state.out_len, state.cycle, state.report, state.anchor,
        state.target_cache.cache_len,
        state.ctx_positions if context else None,
        state.ctx_num_valid if context else None,
    )  # fmt: skip


def ar_step(target: Any, sampling: Sampling, state: LoopState) -> None:
    """One autoregressive token: the target reads the anchor at position cache_len, samples the next
    token with this step's uniform, commits the anchor's K/V and emits the sample."""
    cache = state.target_cache
    # int32 positions: RoPE promotes them in its one multiply (no conversion launch)
    logits, _ = target.forward(state.anchor.view(1, 1), cache.cache_len.view(1, 1), cache)
    uniforms = None if sampling.greedy else _current_row(state.uniforms, state.cycle)[:1]
    token = ops.sample_tokens(
        logits.reshape(1, -1),
        uniforms,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
    )
    zero, one = ops.constant(token.device, "int32", 1, 0), ops.constant(token.device, "int32", 1, 1)
    ops.commit(
        cache.k_local, cache.v_local, cache.k_cache, cache.v_cache, zero, cache.cache_len, one,
        advance=False,
    )  # fmt: skip
    _emit(state, token, one, context=False)
