"""Candidate token tree of one D2SD cycle: dedup the K+1 branches into a trie, with its attention mask.

Inputs (T = gamma2):
    first_tokens   int64 [T]      branch 0: anchor, t_1 .. t_{γ-1}, then the decoder's padding
    branch_tokens  int64 [K, T]   VP branch k: anchor, t_1 .. t_i, VP drafts (i = branch_len[k])
    branch_len     int32 [K]      i in [0, T-1]: the branch point of VP branch k

Effective token of branch b at position t: `first_tokens[t]` if b == 0 or t <= branch_len[b-1]
(the VP drafter's visible prefix, whatever `branch_tokens` holds there), else
`branch_tokens[b-1, t]`.

Trie insertion in branch order (b = 0, 1, .., K; t = 0, 1, .., T-1): position (b, t) joins an
existing node iff that node has the same parent node and the same token, else it creates the next
node. So nodes are numbered by first insertion, parent[n] < n, branch 0 is nodes 0..T-1 and node 0
(the anchor) is the root. Equivalently, (b, t) and (b', t) share a node iff their effective tokens
agree on positions 0..t; the kernel uses this closed form instead of a sequential walk:
    d(b, b')  = first position where branches b and b' differ (T if none)
    D(b)      = max_{b' < b} d(b, b') (D(0) = 0): (b, t) creates a node iff t >= D(b)
    first(b)  = sum_{b' < b} (T - D(b')) - D(b):  node of a creating (b, t) = first(b) + t
    node(b, t) = node(rep, t), rep = the smallest b' with d(b, b') > t

Outputs (`Tree`), N = (K+1) * T static, num_nodes <= N on the device:
    node_tokens   int64 [N]             token of each node
    parent        int32 [N]             parent node, -1 for the root
    depth         int32 [N]             position offset from the anchor (position id = cache_len + depth)
    num_nodes     int32 [1]
    ancestor_mask int32 [N, ceil(N/32)] bit j % 32 of word j // 32 of row n: node n may attend node j
                                        (j is n or one of its ancestors); branch_attention's `mask`
    branch_nodes  int32 [K+1, T]        node of every (branch, position); branch 0 = first draft
Padding nodes n >= num_nodes: token = the anchor (first_tokens[0]), parent -1, depth 0, mask row
= only itself, so a verify forward over all N rows stays finite and harmless.

One launch, grid (K+1,): program b rebuilds the tiny divergence matrix d and writes branch b's
nodes, its row of branch_nodes, their mask rows, and the padding nodes n in [b*T, (b+1)*T).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Tree(NamedTuple):
    """The deduplicated candidate tree (see the module docstring for shapes and conventions)."""

    node_tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    num_nodes: torch.Tensor
    ancestor_mask: torch.Tensor
    branch_nodes: torch.Tensor


@triton.jit
def _effective_tokens(first_ptr, branch_ptr, branch_len_ptr, b, t, num_branches, gamma2, stride_b):
    """Token of branch b at position t (broadcast shapes); rows b > K read as branch 0."""
    is_vp = (b >= 1) & (b <= num_branches)
    split = tl.load(branch_len_ptr + (b - 1), mask=is_vp, other=0)
    from_vp = is_vp & (t > split) & (t < gamma2)
    first = tl.load(first_ptr + t, mask=t < gamma2, other=0)
    vp = tl.load(branch_ptr + (b - 1) * stride_b + t, mask=from_vp, other=0)
    return tl.where(from_vp, vp, first)


@triton.jit
def _tree_kernel(
    # pointers
    first_ptr,
    branch_ptr,
    branch_len_ptr,
    node_tokens_ptr,
    parent_ptr,
    depth_ptr,
    num_nodes_ptr,
    mask_ptr,
    branch_nodes_ptr,
    # sizes
    num_branches,
    gamma2,
    num_words,
    # strides
    stride_branch,
    # meta
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    me = tl.program_id(0)
    num_rows = num_branches + 1
    bs = tl.arange(0, BLOCK_B)
    ts = tl.arange(0, BLOCK_T)
    b_row = bs[:, None]  # branch b along axis 0
    b_col = bs[None, :]  # branch b' along axis 1

    # d[b, b'] = first position where the two branches differ (gamma2 if none); symmetric
    tok_row = _effective_tokens(
        first_ptr,
        branch_ptr,
        branch_len_ptr,
        bs[:, None, None],
        ts[None, None, :],
        num_branches,
        gamma2,
        stride_branch,
    )
    tok_col = _effective_tokens(
        first_ptr,
        branch_ptr,
        branch_len_ptr,
        bs[None, :, None],
        ts[None, None, :],
        num_branches,
        gamma2,
        stride_branch,
    )
    differ = (tok_row != tok_col) & (ts[None, None, :] < gamma2)
    d = tl.min(tl.where(differ, ts[None, None, :], gamma2), axis=2)

    # D(b): where branch b leaves every earlier branch; it creates gamma2 - D(b) nodes from there.
    # Computed along both axes (d is symmetric) to avoid a layout shuffle.
    div_row = tl.max(tl.where(b_col < b_row, d, 0), axis=1)
    div_col = tl.max(tl.where(b_row < b_col, d, 0), axis=0)
    new_row = tl.where(bs < num_rows, gamma2 - div_row, 0)
    num_nodes = tl.sum(new_row, axis=0)
    base_col = tl.sum(tl.where(b_row < b_col, new_row[:, None], 0), axis=0)
    first_col = base_col - div_col  # node of a creating (b', t) is first_col[b'] + t

    # this program's branch: the node of each position, via its representative branch
    d_me = tl.sum(tl.where(b_row == me, d, 0), axis=0)  # d[me, b'] along b'
    div_me = tl.sum(tl.where(bs == me, div_col, 0), axis=0)
    shares = d_me[:, None] > ts[None, :]  # [b', t]: b' agrees with me on 0..t
    rep = tl.min(tl.where(shares, bs[:, None], BLOCK_B), axis=0)
    node = ts + tl.sum(tl.where(bs[:, None] == rep[None, :], first_col[:, None], 0), axis=0)
    in_t = ts < gamma2
    creates = in_t & (ts >= div_me)
    tl.store(branch_nodes_ptr + me * gamma2 + ts, node, mask=in_t)

    # created nodes: token, depth, parent (the previous node of this branch; at the divergence
    # point that is a node of an earlier branch)
    tok = _effective_tokens(
        first_ptr, branch_ptr, branch_len_ptr, ts * 0 + me, ts, num_branches, gamma2, stride_branch
    )
    before_split = tl.sum(tl.where(ts == div_me - 1, node, 0), axis=0)
    parent = tl.where(ts == 0, -1, tl.where(ts > div_me, node - 1, before_split))
    tl.store(node_tokens_ptr + node, tok, mask=creates)
    tl.store(parent_ptr + node, parent, mask=creates)
    tl.store(depth_ptr + node, ts, mask=creates)

    # padding nodes: this program owns candidates me*gamma2 + t
    pad = me * gamma2 + ts
    is_pad = in_t & (pad >= num_nodes)
    anchor = tl.load(first_ptr)
    tl.store(node_tokens_ptr + pad, tl.full([BLOCK_T], 0, tl.int64) + anchor, mask=is_pad)
    tl.store(parent_ptr + pad, tl.full([BLOCK_T], -1, tl.int32), mask=is_pad)
    tl.store(depth_ptr + pad, tl.full([BLOCK_T], 0, tl.int32), mask=is_pad)
    tl.store(num_nodes_ptr, num_nodes, mask=me == 0)

    # mask rows: node (me, t) sees the nodes of positions 0..t of its branch. Those are distinct
    # nodes (one per depth), so the sum of their bits is their OR.
    node_anc = node[None, :]
    bit_anc = tl.full([1, BLOCK_T], 1, tl.int32) << (node_anc & 31)
    word_anc = node_anc >> 5
    sees = (ts[None, :] <= ts[:, None]) & (ts[None, :] < gamma2)  # [t, t']
    one = tl.full([BLOCK_T], 1, tl.int32)
    for w in range(num_words):
        word = tl.sum(tl.where(sees & (word_anc == w), bit_anc, 0), axis=1)
        tl.store(mask_ptr + node * num_words + w, word, mask=creates)
        self_word = tl.where((pad >> 5) == w, one << (pad & 31), 0)
        tl.store(mask_ptr + pad * num_words + w, self_word, mask=is_pad)


@torch.library.custom_op("d2sd::tree_mask", mutates_args=())
def _tree_mask_op(
    first_tokens: torch.Tensor, branch_tokens: torch.Tensor, branch_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_branches, gamma2 = branch_tokens.shape
    num_nodes_max = (num_branches + 1) * gamma2
    num_words = triton.cdiv(num_nodes_max, 32)
    dev = first_tokens.device
    node_tokens = torch.empty(num_nodes_max, device=dev, dtype=torch.int64)
    parent = torch.empty(num_nodes_max, device=dev, dtype=torch.int32)
    depth = torch.empty(num_nodes_max, device=dev, dtype=torch.int32)
    num_nodes = torch.empty(1, device=dev, dtype=torch.int32)
    ancestor_mask = torch.empty(num_nodes_max, num_words, device=dev, dtype=torch.int32)
    branch_nodes = torch.empty(num_branches + 1, gamma2, device=dev, dtype=torch.int32)
    _tree_kernel[(num_branches + 1,)](
        first_tokens,
        branch_tokens,
        branch_len,
        node_tokens,
        parent,
        depth,
        num_nodes,
        ancestor_mask,
        branch_nodes,
        num_branches,
        gamma2,
        num_words,
        branch_tokens.stride(0),
        BLOCK_B=max(2, triton.next_power_of_2(num_branches + 1)),
        BLOCK_T=max(16, triton.next_power_of_2(gamma2)),
        num_warps=4,
    )
    return node_tokens, parent, depth, num_nodes, ancestor_mask, branch_nodes


@_tree_mask_op.register_fake
def _(first_tokens, branch_tokens, branch_len):
    num_branches, gamma2 = branch_tokens.shape
    n = (num_branches + 1) * gamma2
    new = first_tokens.new_empty
    return (
        new(n, dtype=torch.int64),
        new(n, dtype=torch.int32),
        new(n, dtype=torch.int32),
        new(1, dtype=torch.int32),
        new(n, triton.cdiv(n, 32), dtype=torch.int32),
        new(num_branches + 1, gamma2, dtype=torch.int32),
    )


def tree_mask(
    first_tokens: torch.Tensor, branch_tokens: torch.Tensor, branch_len: torch.Tensor
) -> Tree:
    """Build the deduplicated candidate tree of the first draft and K VP branches.

    Args:
        first_tokens: int64 [T] (T = gamma2): anchor, first-draft tokens, padding.
        branch_tokens: int64 [K, T], unit stride along T: the VP branches (anchor, prefix, drafts).
        branch_len: int32 [K], each in [0, T-1]: the branch points (positions <= it are the first
            draft's).

    Returns:
        Tree(node_tokens int64 [N], parent int32 [N], depth int32 [N], num_nodes int32 [1],
        ancestor_mask int32 [N, ceil(N/32)], branch_nodes int32 [K+1, T]), N = (K+1) * T.
    """
    assert first_tokens.ndim == 1 and first_tokens.dtype == torch.int64, first_tokens.dtype
    assert branch_tokens.ndim == 2 and branch_tokens.dtype == torch.int64, branch_tokens.dtype
    assert branch_tokens.shape[1] == first_tokens.shape[0], (
        branch_tokens.shape,
        first_tokens.shape,
    )
    assert branch_tokens.shape[0] >= 1 and branch_tokens.stride(1) == 1
    assert first_tokens.stride(0) == 1 and branch_len.stride(0) == 1
    assert branch_len.shape == (branch_tokens.shape[0],) and branch_len.dtype == torch.int32
    assert first_tokens.device == branch_tokens.device == branch_len.device
    return Tree(*_tree_mask_op(first_tokens, branch_tokens, branch_len))


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def tree_mask_ref(
    first_tokens: torch.Tensor, branch_tokens: torch.Tensor, branch_len: torch.Tensor
) -> Tree:
    """Reference of `tree_mask`: a sequential trie insertion keyed by (parent node, token)."""
    num_branches, gamma2 = branch_tokens.shape
    first, branches, splits = first_tokens.tolist(), branch_tokens.tolist(), branch_len.tolist()
    child: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    branch_nodes = []
    for b in range(num_branches + 1):
        row, prev = [], -1
        for t in range(gamma2):
            tok = first[t] if b == 0 or t <= splits[b - 1] else branches[b - 1][t]
            if (prev, tok) not in child:
                child[prev, tok] = len(tokens)
                tokens.append(tok)
                parents.append(prev)
                depths.append(t)
            prev = child[prev, tok]
            row.append(prev)
        branch_nodes.append(row)
    num_nodes = len(tokens)
    n_max = (num_branches + 1) * gamma2
    num_pad = n_max - num_nodes
    words = torch.zeros(n_max, triton.cdiv(n_max, 32), dtype=torch.int64)
    for n in range(n_max):
        j = n
        while j >= 0:  # padding nodes (n >= num_nodes) see only themselves
            words[n, j // 32] |= 1 << (j % 32)
            j = parents[j] if n < num_nodes else -1
    dev = first_tokens.device
    return Tree(
        node_tokens=torch.tensor(tokens + [first[0]] * num_pad, dtype=torch.int64, device=dev),
        parent=torch.tensor(parents + [-1] * num_pad, dtype=torch.int32, device=dev),
        depth=torch.tensor(depths + [0] * num_pad, dtype=torch.int32, device=dev),
        num_nodes=torch.tensor([num_nodes], dtype=torch.int32, device=dev),
        ancestor_mask=_to_int32_bits(words).to(dev),
        branch_nodes=torch.tensor(branch_nodes, dtype=torch.int32, device=dev),
    )
