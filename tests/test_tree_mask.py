"""kernels/tree_mask.py against its reference (a sequential trie walk) and the tree's invariants.

Every output is integer, so everything must match exactly. Besides the reference, each tree is
checked on its own: parent[n] < n, depth = parent's depth + 1, each branch's path spells its
effective tokens, no two nodes share (parent, token), and the mask rows decode to exactly the
reflexive ancestor relation (padding rows: only themselves).
"""

import pytest
import torch

from kernels.tree_mask import Tree, tree_mask, tree_mask_ref

ANCHOR = 9001


def make_branches(
    num_branches: int, gamma2: int, vocab: int, device: str, branch_len: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """first_tokens, branch_tokens (prefix copied from the first draft), branch_len; tokens drawn
    from a tiny vocabulary collide often and so exercise the dedup."""
    first = torch.randint(0, vocab, (gamma2,))
    first[0] = ANCHOR
    if branch_len is None:
        branch_len = torch.randint(0, gamma2 - 1, (num_branches,)).tolist()
    branches = torch.randint(0, vocab, (num_branches, gamma2))
    for k, i in enumerate(branch_len):
        branches[k, : i + 1] = first[: i + 1]
    lens = torch.tensor(branch_len, dtype=torch.int32)
    return first.to(device), branches.to(device), lens.to(device)


def decode_mask(mask: torch.Tensor) -> torch.Tensor:
    """int32 [N, W] bit-packed rows -> bool [N, N]: [i, j] = bit j % 32 of word j // 32 of row i."""
    n = mask.shape[0]
    j = torch.arange(n, device=mask.device)
    words = mask.long()[:, j // 32] & 0xFFFFFFFF
    return ((words >> (j % 32)) & 1).bool()


def check_invariants(tree: Tree, first, branches, lens) -> None:
    num_branches, gamma2 = branches.shape
    n_max = (num_branches + 1) * gamma2
    num_nodes = int(tree.num_nodes)
    tokens, parent, depth = tree.node_tokens.tolist(), tree.parent.tolist(), tree.depth.tolist()
    assert 1 <= num_nodes <= n_max and tree.ancestor_mask.shape == (n_max, (n_max + 31) // 32)
    assert parent[0] == -1 and depth[0] == 0 and tokens[0] == int(first[0])
    keys = set()
    for n in range(1, num_nodes):
        assert 0 <= parent[n] < n and depth[n] == depth[parent[n]] + 1
        assert (parent[n], tokens[n]) not in keys  # deduplicated
        keys.add((parent[n], tokens[n]))
    for n in range(num_nodes, n_max):  # harmless padding
        assert (tokens[n], parent[n], depth[n]) == (int(first[0]), -1, 0)
    nodes = tree.branch_nodes.tolist()
    for b in range(num_branches + 1):
        for t in range(gamma2):
            keep_first = b == 0 or t <= int(lens[b - 1])
            want = int(first[t]) if keep_first else int(branches[b - 1, t])
            n = nodes[b][t]
            assert tokens[n] == want and depth[n] == t
            assert parent[n] == (nodes[b][t - 1] if t else -1)
    sees = decode_mask(tree.ancestor_mask).cpu()
    ancestors = torch.eye(n_max, dtype=torch.bool)
    for n in range(1, num_nodes):  # parents come first, so one pass closes the relation
        ancestors[n] |= ancestors[parent[n]]
    assert torch.equal(sees, ancestors)


def run_and_check(first, branches, lens) -> Tree:
    tree = tree_mask(first, branches, lens)
    ref = tree_mask_ref(first, branches, lens)
    for name, got, want in zip(Tree._fields, tree, ref):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name
    check_invariants(tree, first, branches, lens)
    return tree


# ---------------------------------------------------------------- CPU interpreter (and GPU too)


@pytest.mark.parametrize(
    "num_branches, gamma2, vocab",
    [
        (4, 16, 3),  # the default K, γ2 = γ: many merges
        (4, 32, 2),  # γ2 = 2γ, binary tokens: maximal sharing
        (8, 32, 4),  # the largest K: N = 288, 9 mask words
        (1, 16, 3),  # K = 1
        (3, 5, 2),  # γ2 not a power of two
        (5, 20, 100000),  # large vocabulary: VP drafts rarely merge
    ],
)
def test_random_branches(num_branches, gamma2, vocab):
    for _ in range(3):
        run_and_check(*make_branches(num_branches, gamma2, vocab, "cpu"))


@pytest.mark.parametrize("num_branches, gamma2", [(4, 16), (8, 32), (1, 16)])
def test_full_dedup(num_branches, gamma2):
    # every VP branch equals the first draft: the tree is the first draft's chain
    first, branches, lens = make_branches(num_branches, gamma2, 50, "cpu")
    branches[:] = first
    tree = run_and_check(first, branches, lens)
    assert int(tree.num_nodes) == gamma2
    assert (tree.branch_nodes == torch.arange(gamma2, dtype=torch.int32)).all()


@pytest.mark.parametrize("num_branches, gamma2", [(4, 16), (8, 32)])
def test_all_different(num_branches, gamma2):
    # VP drafts share nothing with anything: each branch adds gamma2 - 1 - branch_len nodes
    first, branches, lens = make_branches(num_branches, gamma2, 50, "cpu")
    fresh = 10**6 + torch.arange(num_branches * gamma2).view(num_branches, gamma2)
    after = torch.arange(gamma2)[None, :] > lens[:, None].long()
    branches = torch.where(after, fresh, branches)
    tree = run_and_check(first, branches, lens)
    assert int(tree.num_nodes) == gamma2 + sum(gamma2 - 1 - i for i in lens.tolist())


@pytest.mark.parametrize(
    "branch_len",
    [
        [0, 0, 0, 0],  # branch point 0: every VP branch hangs off the anchor
        [14, 14, 14, 14],  # branch point γ - 2 for γ = 16
        [0, 14, 7, 31],  # γ2 - 1: the whole branch is the first draft's, no new node
        [3, 3, 5, 5],  # repeated branch points (K > γ - 1 gives these)
    ],
)
def test_branch_points(branch_len):
    first, branches, lens = make_branches(4, 32, 3, "cpu", branch_len)
    run_and_check(first, branches, lens)


def test_identical_vp_branches_share_their_nodes():
    # branches 1 and 2 equal each other but not the first draft: branch 2 adds nothing
    first, branches, lens = make_branches(3, 16, 1000, "cpu", [4, 4, 2])
    branches[1] = branches[0]
    branches[0, 5:] = branches[1, 5:] = 5000 + torch.arange(11)
    tree = run_and_check(first, branches, lens)
    assert torch.equal(tree.branch_nodes[2], tree.branch_nodes[1])
    assert int(tree.num_nodes) == 16 + 11 + (16 - 3)


def test_visible_prefix_comes_from_the_first_draft():
    # positions <= branch_len are the VP input (the first draft), whatever branch_tokens holds
    first, branches, lens = make_branches(4, 16, 3, "cpu", [2, 6, 0, 9])
    clean = run_and_check(first, branches, lens)
    for k, i in enumerate(lens.tolist()):
        branches[k, : i + 1] = 77
    assert all(torch.equal(a, b) for a, b in zip(run_and_check(first, branches, lens), clean))


def test_torch_compile_traces_the_op():
    first, branches, lens = make_branches(4, 16, 3, "cpu")
    step = torch.compile(tree_mask, backend="eager", fullgraph=True)
    for got, want in zip(step(first, branches, lens), tree_mask(first, branches, lens)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- GPU: real shapes, graphs


@pytest.mark.gpu
@pytest.mark.parametrize("num_branches", [1, 4, 8, 15])
@pytest.mark.parametrize("gamma2", [16, 32, 64])
@pytest.mark.parametrize("vocab", [2, 5, 151936])
def test_gpu_random_branches(num_branches, gamma2, vocab):
    for _ in range(4):
        run_and_check(*make_branches(num_branches, gamma2, vocab, "cuda"))


@pytest.mark.gpu
def test_gpu_adversarial():
    for num_branches, gamma2 in ((4, 16), (4, 32), (8, 32)):
        first, branches, lens = make_branches(num_branches, gamma2, 7, "cuda")
        run_and_check(first, first.expand(num_branches, -1).contiguous(), lens)  # full dedup
        fresh = 10**6 + torch.arange(num_branches * gamma2, device="cuda")
        run_and_check(first, fresh.view(num_branches, gamma2), lens)  # all different
        zero = torch.zeros_like(lens)
        run_and_check(first, branches, zero)  # every branch point 0
        run_and_check(first, branches, zero + gamma2 - 1)  # nothing new


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    num_branches, gamma2 = 4, 32
    first, branches, lens = make_branches(num_branches, gamma2, 5, "cuda")
    tree_mask(first, branches, lens)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tree_mask(first, branches, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree = tree_mask(first, branches, lens)
    for _ in range(3):  # new branches each replay, as in a decode loop
        new_first, new_branches, new_lens = make_branches(num_branches, gamma2, 5, "cuda")
        first.copy_(new_first)
        branches.copy_(new_branches)
        lens.copy_(new_lens)
        graph.replay()
        torch.cuda.synchronize()
        for name, got, want in zip(Tree._fields, tree, tree_mask_ref(first, branches, lens)):
            assert torch.equal(got, want), name
