"""Training objectives of the two drafters: blocks, the block mask, labels and loss weights.

Layout of one training batch (fixed shapes, so compiled kernels see one shape per run)::

    B sequences (prompt + the target's response), right-padded to T tokens
    context rows  n = b * T + t          S = B * T      ctx_pos[n] = t
    A blocks per sequence, block j = b * A + a, anchor position anchors[j] (inside sequence b)
    noise rows    m = j * gamma + k      M = B * A * gamma   noise_pos[m] = anchors[j] + k

A block is ``[anchor, MASK x (gamma - 1)]`` (DFlash) or ``[anchor, x_{a+1} .. x_{a+l}, MASK ...]``
(VP, visible prefix length l). Block position k >= 1 predicts the token AT ``anchor + k`` (not the
next one), as at inference (ARCHITECTURE.md, DFlash semantics).

The block mask (one definition, ``visible``; the flex_attention ``mask_mod`` and the dense SDPA
mask are both built from it). Keys 0..S-1 are the context rows, S..S+M-1 the noise rows::

    query m (block j = m // gamma, sequence b = j // A) sees key n  iff
        n <  S : n // T == b  and  n % T < anchors[j]      (own sequence, strictly before the anchor)
        n >= S : (n - S) // gamma == j                     (own block, bidirectional)

So a block sees exactly what it would see at inference: the target's hidden states of the tokens
before its anchor, and itself. Padded context rows (t >= length) are never visible because every
anchor lies inside its sequence; padded blocks (sequences with fewer than A anchor positions) keep
anchor 0, see only themselves, and carry no loss.

Anchors are drawn uniformly without replacement from the response positions
``prompt_len <= a <= length - 2`` (at least one label after the anchor). Labels beyond the
sequence end are ignored.

Loss weights (per noise row, 0 where no label):
- DFlash: ``w_k = exp(-(k - 1) / gamma_decay)`` for k = 1..gamma-1 (position 0, the anchor, has
  none). Early positions matter most: a draft is accepted only up to its first miss.
- VP (D2SD paper Sec. 3.4): l ~ P(l) proportional to beta^l on 0..gamma-2; positions 0..l are
  visible, l+1..gamma-1 are MASK; ``w_k = exp(-(k - l - 1) / tau)`` for k > l. Near the end of a
  sequence l is clamped to ``length - 2 - anchor`` so that every block has a label.
Both losses are ``sum(w * CE) / sum(w)`` over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def default_gamma_decay(block_size: int) -> float:
    """The DFlash recipe's decay: 7 for gamma = 16, 4 for gamma = 8, linear in gamma between
    (and beyond) those two points, never below 1."""
    return max(1.0, 4.0 + (block_size - 8) * 3.0 / 8.0)


def dflash_position_weights(block_size: int, gamma_decay: float) -> torch.Tensor:
    """float32 [gamma]: w_0 = 0 (the anchor), w_k = exp(-(k - 1) / gamma_decay) for k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma_decay)
    w[0] = 0.0
    return w


def prefix_length_probs(block_size: int, beta: float) -> torch.Tensor:
    """float64 [gamma - 1]: P(l) = beta^l / sum_{j=0}^{gamma-2} beta^j, l = 0..gamma-2."""
    p = beta ** torch.arange(block_size - 1, dtype=torch.float64)
    return p / p.sum()


def sample_prefix_lengths(
    num: int, block_size: int, beta: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """int64 [num]: i.i.d. visible-prefix lengths l from the truncated geometric
    ``prefix_length_probs(block_size, beta)`` (CPU generator)."""
    probs = prefix_length_probs(block_size, beta)
    return torch.multinomial(probs, num, replacement=True, generator=generator)


def sample_anchors(
    lengths: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_len: int,
    blocks_per_seq: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random anchors inside each response.

    Args:
        lengths: int64 [B], tokens of each sequence (prompt + response, <= seq_len).
        prompt_lens: int64 [B].
        seq_len: T. blocks_per_seq: A.
    Returns:
        anchors int64 [B, A] (ascending among the valid ones; 0 where invalid), valid bool [B, A].
        Candidates are ``prompt_len <= a <= length - 2``; a sequence with fewer than A candidates
        keeps all of them.
    """
    pos = torch.arange(seq_len)
    candidate = (pos[None] >= prompt_lens[:, None]) & (pos[None] <= lengths[:, None] - 2)
    scores = torch.rand((lengths.numel(), seq_len), generator=generator)
    scores = torch.where(candidate, scores, torch.full_like(scores, -1.0))
    top, idx = scores.topk(min(blocks_per_seq, seq_len), dim=1)
    valid = top >= 0
    anchors = torch.where(valid, idx, torch.full_like(idx, seq_len))
    anchors, order = anchors.sort(dim=1)
    valid = valid.gather(1, order)
    anchors = torch.where(valid, anchors, torch.zeros_like(anchors))
    if anchors.shape[1] < blocks_per_seq:  # T < A: pad with invalid blocks
        pad = blocks_per_seq - anchors.shape[1]
        anchors = F.pad(anchors, (0, pad))
        valid = F.pad(valid, (0, pad))
    return anchors, valid


@dataclass
class BlockBatch:
    """Everything a training step needs beyond the target's hidden states (see module docstring).

    Shapes: S = B * T context rows, M = B * A * gamma noise rows, B * A blocks."""

    input_ids: torch.Tensor  # int64 [B, T], right-padded sequences (pad id 0)
    lengths: torch.Tensor  # int64 [B]
    ctx_pos: torch.Tensor  # int64 [S]
    anchors: torch.Tensor  # int64 [B * A]
    block_valid: torch.Tensor  # bool [B * A]
    prefix_len: torch.Tensor  # int64 [B * A]: visible tokens after the anchor (0 for DFlash)
    noise_ids: torch.Tensor  # int64 [M]
    noise_pos: torch.Tensor  # int64 [M]
    labels: torch.Tensor  # int64 [M], IGNORE where no loss
    weights: torch.Tensor  # float32 [M], 0 where no loss
    block_size: int
    blocks_per_seq: int

    @property
    def num_seqs(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> BlockBatch:
        """The same batch with every tensor on ``device``."""
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return BlockBatch(**moved)


def build_blocks(
    sequences: list[torch.Tensor],
    prompt_lens: torch.Tensor,
    *,
    seq_len: int,
    block_size: int,
    blocks_per_seq: int,
    mask_token_id: int,
    objective: str,
    gamma_decay: float | None = None,
    beta: float = 0.9,
    tau: float | None = None,
    generator: torch.Generator | None = None,
) -> BlockBatch:
    """Pad sequences, draw anchors (and VP prefix lengths), and lay out blocks, labels, weights.

    Args:
        sequences: B int64 tensors (prompt + response ids), each cut to at most ``seq_len``.
        prompt_lens: int64 [B].
        seq_len: T (pad width). block_size: gamma. blocks_per_seq: A.
        mask_token_id: the drafter's MASK id.
        objective: "dflash" or "vp".
        gamma_decay: DFlash decay (default ``default_gamma_decay(gamma)``).
        beta, tau: VP prefix distribution and decay (tau defaults to ``default_gamma_decay``).
        generator: CPU generator for anchors and prefix lengths (seeded per step for resume).
    Returns:
        a CPU ``BlockBatch``.
    """
    if objective not in ("dflash", "vp"):
        raise ValueError(f"objective must be 'dflash' or 'vp', got {objective!r}")
    num_seqs, gamma, per_seq = len(sequences), block_size, blocks_per_seq
    input_ids = torch.zeros((num_seqs, seq_len), dtype=torch.int64)
    lengths = torch.tensor([min(len(s), seq_len) for s in sequences], dtype=torch.int64)
    for b, s in enumerate(sequences):
        input_ids[b, : lengths[b]] = s[:seq_len]
    anchors, valid = sample_anchors(lengths, prompt_lens, seq_len, per_seq, generator)
    anchors, valid = anchors.reshape(-1), valid.reshape(-1)
    seq_of_block = torch.arange(num_seqs).repeat_interleave(per_seq)
    k = torch.arange(gamma)
    pos = anchors[:, None] + k[None]  # [B*A, gamma]
    in_seq = valid[:, None] & (pos < lengths[seq_of_block][:, None])
    truth = input_ids[seq_of_block[:, None], pos.clamp(max=seq_len - 1)]

    decay = default_gamma_decay(gamma)
    if objective == "dflash":
        prefix_len = torch.zeros_like(anchors)
        weights = dflash_position_weights(gamma, gamma_decay or decay)[None].expand(
            len(anchors), -1
        )
    else:
        prefix_len = sample_prefix_lengths(len(anchors), gamma, beta, generator)
        room = (lengths[seq_of_block] - 2 - anchors).clamp(min=0)  # keep >= 1 label per block
        prefix_len = torch.minimum(prefix_len, room)
        rel = (k[None] - prefix_len[:, None] - 1).float()
        weights = torch.where(rel >= 0, torch.exp(-rel / (tau or decay)), torch.zeros_like(rel))
    visible = k[None] <= prefix_len[:, None]
    noise_ids = torch.where(visible, truth, torch.full_like(truth, mask_token_id))
    supervised = in_seq & ~visible & (weights > 0)
    labels = torch.where(supervised, truth, torch.full_like(truth, IGNORE))
    weights = torch.where(supervised, weights, torch.zeros_like(weights))
    return BlockBatch(
        input_ids=input_ids,
        lengths=lengths,
        ctx_pos=torch.arange(seq_len).repeat(num_seqs),
        anchors=anchors,
        block_valid=valid,
        prefix_len=prefix_len,
        noise_ids=noise_ids.reshape(-1),
        noise_pos=pos.reshape(-1),
        labels=labels.reshape(-1),
        weights=weights.reshape(-1).float().contiguous(),
        block_size=gamma,
        blocks_per_seq=per_seq,
    )


# ----------------------------------------------------------------------------- the block mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def visible(
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    anchors: torch.Tensor,
    *,
    seq_len: int,
    blocks_per_seq: int,
    block_size: int,
    num_ctx: int,
) -> torch.Tensor:
    """THE block-mask rule (module docstring): may noise row ``q_idx`` see key ``kv_idx``?

    Elementwise over broadcastable int tensors; traceable (no data-dependent Python), so it is
    also the body of the flex_attention ``mask_mod``."""
    block = q_idx // block_size
    ctx_row = kv_idx.clamp(max=num_ctx - 1)
    sees_ctx = (ctx_row // seq_len == block // blocks_per_seq) & (
        ctx_row % seq_len < anchors[block]
    )
    sees_noise = (kv_idx - num_ctx) // block_size == block
    return torch.where(kv_idx < num_ctx, sees_ctx, sees_noise)


def block_mask_mod(batch: BlockBatch) -> MaskMod:
    """``visible`` as a flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` for this batch."""
    anchors = batch.anchors
    kw = dict(
        seq_len=batch.seq_len,
        blocks_per_seq=batch.blocks_per_seq,
        block_size=batch.block_size,
        num_ctx=batch.num_seqs * batch.seq_len,
    )

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx, anchors, **kw)

    return mask_mod


def dense_mask(batch: BlockBatch) -> torch.Tensor:
    """bool [M, S + M]: ``visible`` on every (query, key) pair."""
    num_ctx, num_noise = batch.ctx_pos.numel(), batch.noise_ids.numel()
    q = torch.arange(num_noise, device=batch.anchors.device)[:, None]
    kv = torch.arange(num_ctx + num_noise, device=batch.anchors.device)[None]
    return block_mask_mod(batch)(None, None, q, kv)


def tile_columns(batch: BlockBatch) -> torch.Tensor:
    """int64 [B, T + A*gamma]: the key columns of sequence b's tile (its T context rows, then its
    A*gamma noise rows). ``visible`` is False outside these tiles (a block only sees its own
    sequence), which is what lets the dense executor work per sequence."""
    num_seqs, seq_len = batch.num_seqs, batch.seq_len
    per_seq_noise = batch.blocks_per_seq * batch.block_size
    b = torch.arange(num_seqs, device=batch.anchors.device)[:, None]
    ctx = b * seq_len + torch.arange(seq_len, device=b.device)[None]
    noise = num_seqs * seq_len + b * per_seq_noise + torch.arange(per_seq_noise, device=b.device)
    return torch.cat([ctx, noise], dim=1)


def tiled_dense_mask(batch: BlockBatch) -> torch.Tensor:
    """bool [B, A*gamma, T + A*gamma]: ``visible`` on each sequence's own tile."""
    per_seq_noise = batch.blocks_per_seq * batch.block_size
    q = torch.arange(batch.noise_ids.numel(), device=batch.anchors.device)
    q = q.view(batch.num_seqs, per_seq_noise, 1)
    return block_mask_mod(batch)(None, None, q, tile_columns(batch)[:, None, :])


# ----------------------------------------------------------------------------- executors

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_attend(batch: BlockBatch) -> Attend:
    """``attend(q [M, Hq, D], k [S+M, Hkv, D], v) -> o [M, Hq, D]`` by SDPA with the boolean mask,
    one sequence tile per batch row (exact: nothing outside the tiles is visible). CPU and
    reference executor; GQA by repeating the kv heads."""
    mask = tiled_dense_mask(batch)[:, None]  # [B, 1, A*gamma, T + A*gamma]
    cols = tile_columns(batch)
    num_seqs = batch.num_seqs

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        qt = q.view(num_seqs, -1, heads, dim).transpose(1, 2)
        kt = k[cols].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        vt = v[cols].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.to(q.device))
        return o.transpose(1, 2).reshape(q.shape)

    return attend


_compiled_flex = None


def flex_attend(batch: BlockBatch, *, compile: bool = True) -> Attend:
    """``attend`` by flex_attention with a BlockMask built from ``visible`` (CUDA executor: only
    the tiles the mask touches are computed). ``compile=False`` runs flex eagerly (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = batch.anchors.device
    num_noise = batch.noise_ids.numel()
    num_keys = batch.ctx_pos.numel() + num_noise
    block_mask = create_block_mask(
        block_mask_mod(batch), None, None, num_noise, num_keys, device=device, _compile=compile
    )
    if compile and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    fn = _compiled_flex if compile else flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = fn(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=block_mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return o[0].transpose(0, 1)

    return attend


# ----------------------------------------------------------------------------- loss and metrics


@dataclass
class LossStats:
    """Loss and accuracy of one step. ``correct``/``counted`` are float32 [gamma] per block position
    (for VP indexed by k - l, the distance past the visible prefix); ``accepted`` is the mean number
    of leading correct predictions per valid block (the acceptance length it implies, minus the
    bonus token)."""

    loss: torch.Tensor
    correct: torch.Tensor
    counted: torch.Tensor
    accepted: torch.Tensor


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum(w * CE(logits, labels)) / sum(w)`` (CE in float32).

    Args:
        logits: float [R, V]. labels: int64 [R] (IGNORE rows must carry weight 0). weights: [R].
    """
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (ce * weights).sum() / weights.sum().clamp(min=1e-12)


def block_stats(hit: torch.Tensor, batch: BlockBatch) -> tuple[torch.Tensor, ...]:
    """Per-position accuracy counts and mean leading-hit run (see ``LossStats``).

    Args:
        hit: bool [M], argmax == label on supervised rows (False elsewhere).
    """
    gamma = batch.block_size
    supervised = (batch.labels != IGNORE).view(-1, gamma)
    hit = hit.view(-1, gamma) & supervised
    k = torch.arange(gamma, device=hit.device)
    prefix = batch.prefix_len[:, None]
    rel = (k[None] - prefix).clamp(min=0).reshape(-1)
    zeros = torch.zeros(gamma, device=hit.device)
    correct = zeros.index_add(0, rel, hit.float().reshape(-1))
    counted = zeros.index_add(0, rel, supervised.float().reshape(-1))
    # leading run of hits past the prefix (a miss or a missing label stops it)
    run = torch.where(k[None] > prefix, hit, torch.ones_like(hit))
    leading = run.long().cumprod(dim=1).sum(dim=1) - 1 - batch.prefix_len
    valid = batch.block_valid
    accepted = (leading * valid).sum() / valid.sum().clamp(min=1)
    return correct, counted, accepted.float()


def drafter_loss(
    drafter: torch.nn.Module, batch: BlockBatch, ctx_hidden: torch.Tensor, attend: Attend
) -> LossStats:
    """One drafter forward over every block of the batch, its weighted loss and statistics.

    Args:
        drafter: a ``DFlashDrafter`` (``forward_packed`` + ``logits``).
        batch: a ``BlockBatch`` on the drafter's device.
        ctx_hidden: [S, n_taps * H] the target's tapped hidden states, row b * T + t.
        attend: ``dense_attend(batch)`` or ``flex_attend(batch)``.
    Only supervised rows go through the lm_head (the anchor, VP's visible prefix and padding
    need no logits: ~40% of the rows for VP at beta = 0.9).
    """
    hidden = drafter.forward_packed(
        batch.noise_ids, batch.noise_pos, ctx_hidden, batch.ctx_pos, attend
    )
    rows = (batch.weights > 0).nonzero().squeeze(1)
    logits = drafter.logits(hidden[rows])
    labels = batch.labels[rows]
    loss = weighted_cross_entropy(logits, labels, batch.weights[rows])
    with torch.no_grad():
        hit = torch.zeros_like(batch.labels, dtype=torch.bool)
        hit[rows] = logits.argmax(-1) == labels
        correct, counted, accepted = block_stats(hit, batch)
    return LossStats(loss, correct, counted, accepted)


def expected_acceptance(correct: torch.Tensor, counted: torch.Tensor) -> float:
    """1 + sum_k prod_{j<=k} acc_j over positions 1..gamma-1: the acceptance length that the
    per-position accuracies imply if misses were independent (a coarse monitor)."""
    acc = (correct[1:] / counted[1:].clamp(min=1)).double()
    return 1.0 + float(torch.cumprod(acc, 0).sum())
