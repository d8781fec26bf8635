"""accept vs accept_ref (exact integers) and vs hand-computed walks.

Scenarios: planted target tokens (greedy) make the walk's expected result computable by hand; random
small-alphabet drafts make messy walks where branches at one depth disagree on the target (the
FIRST alive branch decides); `row_of` from a prefix tree shares nodes between branches. Sampled
acceptance uses one uniform per depth, drawn away from every inverse-CDF interval end of every
row at that depth (tests/test_sample_tokens.py's helpers), so that the reference decides the same.
"""

from __future__ import annotations

import pytest
import torch

from kernels.accept import accept, accept_ref, sample_tokens
from tests.test_sample_tokens import MULTI_CHUNK_V, warped_probs


def planted_logits(targets: torch.Tensor, vocab: int, *, gap: float = 4.0) -> torch.Tensor:
    """float32 [R, V] random logits whose argmax is targets[r] (by `gap`)."""
    logits = torch.randn(targets.numel(), vocab)
    logits[torch.arange(targets.numel()), targets.view(-1)] = logits.max(-1).values + gap
    return logits


def designed_case(accepted: list[int], depth: int, vocab: int, *, gap: float = 4.0):
    """Every row of depth t has target s_t (argmax by `gap`); branch b accepts exactly accepted[b]
    drafts.

    Returns (cand_tokens, logits, expected (a, branch, s)) with the hand-computed walk."""
    num_branches = len(accepted)
    s = torch.randint(1, vocab, (depth,))
    cand = torch.randint(1, vocab, (num_branches, depth))
    for b, n in enumerate(accepted):
        cand[b, 1 : n + 1] = s[:n]
        if n + 1 < depth:
            cand[b, n + 1] = 0  # never a target (targets are >= 1): the branch dies at depth n
    logits = planted_logits(s.repeat(num_branches), vocab, gap=gap)
    a = max(accepted)
    return cand, logits, (a, accepted.index(a), s)


def assert_same(got, ref) -> None:
    for name, g, r in zip(got._fields, got, ref):
        assert g.dtype == r.dtype and torch.equal(g, r), (name, g, r)


# (accepted drafts per branch, depth) and what each case exercises
DESIGNED = [
    ([0, 0, 0, 0, 0], 16),  # every branch rejected at once: a = 0, bonus = s_0
    ([15, 15, 15, 15, 15], 16),  # everything accepted: a = T - 1, branch 0
    ([2, 9, 4, 9, 1], 16),  # diverging at different depths; a tie of the longest: the first
    ([1, 3, 6, 10, 15], 16),  # the last branch wins: the first alive branch changes 4 times
    ([7], 16),  # B = 1
    ([0, 12, 5], 17),  # T not a power of two
    ([3, 3, 2, 5, 0, 8, 1, 4, 6], 5),  # B = 9 (K = 8), short blocks: capped at T - 1 = 4
    ([0, 0], 1),  # T = 1: the anchor's target is the bonus
]


@pytest.mark.parametrize("accepted, depth", DESIGNED)
def test_designed_walks(accepted: list[int], depth: int) -> None:
    accepted = [min(n, depth - 1) for n in accepted]
    cand, logits, (a, branch, s) = designed_case(accepted, depth, vocab=40)
    got = accept(cand, logits)
    assert_same(got, accept_ref(cand, logits))
    assert int(got.num_accepted) == a and int(got.branch) == branch
    assert got.out_tokens.tolist() == s[: a + 1].tolist() + [-1] * (depth - a - 1)
    assert int(got.bonus) == int(s[a])
    assert got.path_rows.tolist() == [branch * depth + t for t in range(depth)]
    assert torch.equal(got.target_tokens, s.expand(len(accepted), depth))


@pytest.mark.parametrize(
    "num_branches, depth, vocab", [(1, 7, 30), (3, 16, 30), (5, 17, 2100), (9, 32, 30)]
)
def test_random_walks(num_branches: int, depth: int, vocab: int) -> None:
    """Drafts and targets from {0, 1, 2}: many partial matches, and branches alive at one depth
    whose own rows disagree (the first alive branch's row decides)."""
    for _ in range(4):
        cand = torch.randint(0, 3, (num_branches, depth))
        logits = planted_logits(torch.randint(0, 3, (num_branches * depth,)), vocab)
        assert_same(accept(cand, logits), accept_ref(cand, logits))


def test_walk_many_shapes() -> None:
    """The walk on many random trees: binary drafts and targets (much sharing, many first-alive
    changes), B from 1 to 9, T from 1 to 33 (block sizes of the walk's tensors crossed)."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(40):
        num_branches = int(torch.randint(1, 10, (1,), generator=gen))
        depth = int(torch.randint(1, 34, (1,), generator=gen))
        cand = torch.randint(0, 2, (num_branches, depth), generator=gen)
        targets = torch.randint(0, 2, (num_branches * depth,), generator=gen)
        logits = planted_logits(targets, 8)
        assert_same(accept(cand, logits), accept_ref(cand, logits))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_multi_chunk_rows(temperature: float) -> None:
    """Rows of several chunks (partials reduced across chunks), and sample_tokens on the same rows
    agrees with accept's target tokens (one sampler for AR and verification)."""
    vocab = MULTI_CHUNK_V
    for accepted in ([3, 9, 0], [5, 5, 15]):
        cand, logits, _ = designed_case(accepted, 16, vocab)
        uniforms = torch.rand(16) if temperature else None
        got = accept(cand, logits, temperature=temperature, uniforms=uniforms)
        assert_same(got, accept_ref(cand, logits, temperature=temperature, uniforms=uniforms))
        tokens = sample_tokens(
            logits, uniforms.repeat(3) if temperature else None, temperature=temperature
        )
        assert torch.equal(tokens, got.target_tokens.view(-1))


def test_first_alive_branch_decides() -> None:
    # branches 0 and 1 share every draft; their rows of depth 2 disagree: branch 0's row says 7
    # (which both drafted), branch 1's says 9. Branch 0 dies at depth 3, branch 1 lives on.
    s = [4, 5, 7, 6, 3]
    cand = torch.tensor([[1, 4, 5, 7, 2], [1, 4, 5, 7, 6]])
    targets = torch.tensor([s, [*s[:2], 9, *s[3:]]])
    logits = planted_logits(targets.view(-1), 20)
    got = accept(cand, logits)
    assert_same(got, accept_ref(cand, logits))
    assert (int(got.num_accepted), int(got.branch), int(got.bonus)) == (4, 1, 3)
    assert got.out_tokens.tolist() == [4, 5, 7, 6, 3]
    assert got.path_rows.tolist() == [5, 6, 7, 8, 9]


def test_all_equal_logits() -> None:
    # every target is id 0 (argmax ties to the smaller id); drafts of 0 are all accepted
    cand = torch.zeros(3, 6, dtype=torch.int64)
    cand[1, 4] = 1
    got = accept(cand, torch.zeros(18, 11))
    assert (int(got.num_accepted), int(got.branch), int(got.bonus)) == (5, 0, 0)
    assert got.out_tokens.tolist() == [0] * 6


def tree_rows(cand: torch.Tensor) -> tuple[torch.Tensor, int]:
    """row_of [B, T]: the node id of each prefix cand[b, :t + 1] in a prefix tree; node count."""
    nodes: dict[tuple[int, ...], int] = {}
    rows = torch.empty_like(cand, dtype=torch.int32)
    for b in range(cand.shape[0]):
        for t in range(cand.shape[1]):
            rows[b, t] = nodes.setdefault(tuple(cand[b, : t + 1].tolist()), len(nodes))
    return rows, len(nodes)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_rows_share_nodes(temperature: float) -> None:
    """row_of from a tree: the first draft plus branches that keep its first i tokens; branches
    that share a node read the same logits row (and the same uniform)."""
    depth, vocab = 12, 30
    first = torch.randint(0, 3, (depth,))
    cand = first.repeat(5, 1)
    for b, keep in enumerate([3, 0, 7, 5], start=1):
        cand[b, keep + 1 :] = torch.randint(0, 3, (depth - keep - 1,))
    cand[:, 0] = 17  # the anchor, shared
    row_of, num_nodes = tree_rows(cand)
    assert num_nodes < cand.numel()
    logits = planted_logits(torch.randint(0, 3, (num_nodes,)), vocab, gap=1.0)
    uniforms = None
    if temperature > 0:
        uniforms = shared_safe_uniforms(logits, row_of, temperature, 0, 1.0)
    kwargs = dict(row_of=row_of, temperature=temperature, uniforms=uniforms)
    got = accept(cand, logits, **kwargs)
    assert_same(got, accept_ref(cand, logits, **kwargs))
    assert torch.equal(got.path_rows, row_of[int(got.branch)])
    for b in range(5):  # a shared node has one target
        shared = row_of[b] == row_of[0]
        assert torch.equal(got.target_tokens[b][shared], got.target_tokens[0][shared])
    assert row_of.dtype == torch.int32
    got64 = accept(cand, logits, **{**kwargs, "row_of": row_of.long()})  # int64 rows too
    assert_same(got64, got)


def shared_safe_uniforms(
    logits: torch.Tensor, row_of: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """uniforms [T]: u_t away from every interval end of every row read at depth t."""
    probs = warped_probs(logits, temperature, top_k, top_p)
    ends = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)], dim=-1)
    ends = ends[row_of.long().T.reshape(-1)].view(
        row_of.shape[1], row_of.shape[0], -1
    )  # [T, B, V+1]
    uniforms = torch.rand(row_of.shape[1])
    for _ in range(200):
        margin = (ends - uniforms.double()[:, None, None]).abs().amin(dim=(1, 2))
        bad = margin < 1e-4
        if not bad.any():
            return uniforms
        uniforms[bad] = torch.rand(int(bad.sum()))
    raise AssertionError("no safe uniforms")


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.8)])
def test_sampled_matches_reference(top_k: int, top_p: float) -> None:
    num_branches, depth, vocab = 3, 6, 40
    logits = torch.randn(num_branches * depth, vocab) * 3
    # drafts among each row's likeliest tokens, so that some are accepted
    cand = logits.topk(2, dim=-1).indices[
        torch.arange(num_branches * depth), torch.randint(0, 2, (num_branches * depth,))
    ]
    cand = cand.view(num_branches, depth).roll(1, dims=1)
    row_of = torch.arange(num_branches * depth, dtype=torch.int32).view(num_branches, depth)
    uniforms = shared_safe_uniforms(logits, row_of, 1.0, top_k, top_p)
    kwargs = dict(temperature=1.0, top_k=top_k, top_p=top_p, uniforms=uniforms)
    got = accept(cand, logits, **kwargs)
    assert_same(got, accept_ref(cand, logits, **kwargs))
    # the verification targets are exactly what AR sampling draws from the same rows and u
    ar = sample_tokens(
        logits, uniforms.repeat(num_branches), temperature=1.0, top_k=top_k, top_p=top_p
    )
    assert torch.equal(got.target_tokens.view(-1), ar)


def test_fp16_and_strided_logits() -> None:
    num_branches, depth, vocab = 4, 8, 64
    cand = torch.randint(0, 3, (num_branches, depth))
    buffer = torch.zeros(num_branches * depth, vocab + 16)
    buffer[:, :vocab] = planted_logits(torch.randint(0, 3, (num_branches * depth,)), vocab)
    logits = buffer[:, :vocab].half()
    assert_same(accept(cand, logits), accept_ref(cand, logits))
    strided = buffer[:, :vocab]  # row stride vocab + 16
    assert_same(accept(cand, strided), accept_ref(cand, strided))


# ---------------------------------------------------------------------------------------------
# GPU: real shapes in bf16, CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 49152])
@pytest.mark.parametrize("depth", [16, 32])
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.9)]
)
def test_gpu_real_shapes(
    vocab: int, depth: int, temperature: float, top_k: int, top_p: float
) -> None:
    num_branches = 5
    accepted = [3, depth - 1, 0, 9, 9]
    # a dominant target (gap 12 over ~V tokens of N(0, 1)), so that one u per depth falls well
    # inside the target's interval in every row of that depth
    cand, logits, (a, branch, _) = designed_case(accepted, depth, vocab, gap=12.0)
    logits = logits.bfloat16()
    uniforms = None
    if temperature > 0:
        row_of = torch.arange(num_branches * depth).view(num_branches, depth)
        uniforms = shared_safe_uniforms(logits, row_of, temperature, top_k, top_p).cuda()
    cand, logits = cand.cuda(), logits.cuda()
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, uniforms=uniforms)
    got = accept(cand, logits, **kwargs)
    assert_same(got, accept_ref(cand, logits, **kwargs))
    if temperature == 0.0:
        assert (int(got.num_accepted), int(got.branch)) == (a, branch)
    else:  # dominant targets are sampled nearly always: a fair chance the walk went far
        assert int(got.num_accepted) <= a


@pytest.mark.gpu
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.9)]
)
@pytest.mark.parametrize("tree", [False, True])
def test_gpu_cuda_graph(temperature: float, top_k: int, top_p: float, tree: bool) -> None:
    num_branches, depth, vocab = 5, 16, 151936
    cand = torch.randint(0, 3, (num_branches, depth), device="cuda")
    row_of = None
    num_rows = num_branches * depth
    if tree:
        row_of = torch.randperm(num_rows, device="cuda").to(torch.int32).view(num_branches, depth)
    logits = torch.randn(num_rows, vocab, device="cuda").bfloat16()
    uniforms = torch.rand(depth, device="cuda")
    kwargs = dict(
        row_of=row_of, temperature=temperature, top_k=top_k, top_p=top_p, uniforms=uniforms
    )
    accept(cand, logits, **kwargs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = accept(cand, logits, **kwargs)
    for _ in range(3):
        cand.copy_(torch.randint(0, 3, cand.shape, device="cuda"))
        small = torch.randint(0, 3, (num_rows,), device="cuda")
        fresh = torch.randn(num_rows, vocab, device="cuda")
        fresh[torch.arange(num_rows, device="cuda"), small] += 6.0  # drafts get accepted at times
        logits.copy_(fresh)
        uniforms.copy_(torch.rand_like(uniforms))
        graph.replay()
        assert_same(out, accept(cand, logits, **kwargs))
