"""sample_tokens vs its fp32 reference (exact integers) and vs the warped distribution (statistics).

Sampled tokens are compared exactly only where no float near-tie decides them: uniforms are drawn
inside a token's interval of the inverse CDF, away from its ends (`safe_uniforms`), and the top-p
cut is checked to sit away from every attainable mass (`top_p_margin`). Distribution checks: a
chi-square goodness of fit against the float64 warped probabilities and a chi-square homogeneity
test against torch.multinomial on them, p > 1e-3 (scipy's chi2 survival function when installed,
else `chi2_sf`'s own regularized incomplete gamma function).
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.accept import (
    _BLOCK,
    _CANDIDATES,
    _GROUP,
    _GROUPS_KEPT,
    _LARGE_VOCAB,
    _SMALL_VOCAB_BLOCK,
    _THRESHOLD_BLOCK,
    _chunking,
    sample_tokens,
    sample_tokens_ref,
)

CHUNK = _SMALL_VOCAB_BLOCK  # the sampled chunk below _LARGE_VOCAB
MULTI_CHUNK_V = 2 * CHUNK + 77  # three chunks, the last one partial
LARGE_V = _LARGE_VOCAB + 2 * _BLOCK + 77  # a large vocabulary's chunks, the last one partial
MULTI_BLOCK_V = _THRESHOLD_BLOCK + 904  # two blocks in the threshold kernel's passes
MANY_GROUPS_V = _GROUP * (_GROUPS_KEPT + 30) - 5  # a small top-k bisects over the group maxima
P_MIN = 1e-3  # the statistical tests' threshold


# ---------------------------------------------------------------------------------------------
# Helpers shared with tests/test_accept.py
# ---------------------------------------------------------------------------------------------


def warped_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The warped distribution of every row in float64 [R, V] (module docstring of kernels.accept)."""
    x = logits.double()
    vocab = x.shape[-1]
    kept = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < vocab:
        kept = x >= x.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
    w = torch.where(kept, torch.exp((x - x.max(-1, keepdim=True).values) / temperature), 0.0)
    if top_p < 1.0:
        for r in range(x.shape[0]):
            order = torch.sort(torch.where(kept[r], x[r], -math.inf), descending=True, stable=True)
            mass = w[r][order.indices].cumsum(0)
            cut = int(torch.searchsorted(mass, top_p * mass[-1]))
            kept[r] &= x[r] >= order.values[cut]
        w = torch.where(kept, w, 0.0)
    return w / w.sum(-1, keepdim=True)


def top_p_margin(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Per row, the distance between top_p and the nearest attainable kept-mass fraction
    (the mass of all tokens with logit >= v, for every logit value v): a near-tie at the cut."""
    if top_p >= 1.0:
        return torch.full((logits.shape[0],), math.inf, dtype=torch.float64)
    probs = warped_probs(logits, temperature, top_k, 1.0)
    x_sorted, order = logits.double().sort(dim=-1, descending=True, stable=True)
    mass = probs.gather(-1, order).cumsum(-1)
    # the attainable masses are the cumulative sums at the end of each group of equal logits
    group_end = torch.ones_like(x_sorted, dtype=torch.bool)
    group_end[:, :-1] = x_sorted[:, :-1] != x_sorted[:, 1:]
    return torch.where(group_end, (mass - top_p).abs(), math.inf).min(-1).values


def random_logits(
    rows: int, vocab: int, temperature: float, top_k: int, top_p: float, *, scale: float = 2.0
) -> torch.Tensor:
    """Random float32 logits whose top-p cut has no near-tie (rows redrawn until it has none)."""
    logits = torch.randn(rows, vocab) * scale
    for _ in range(50):
        bad = top_p_margin(logits, temperature, top_k, top_p) < 1e-4
        if not bad.any():
            return logits
        logits[bad] = torch.randn(int(bad.sum()), vocab) * scale
    raise AssertionError("could not draw logits without a near-tie at the top-p cut")


def interval_margin(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the distance of u from the nearest end of an inverse-CDF interval."""
    ends = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)], dim=-1)
    return (ends - uniforms.double()[:, None]).abs().min(-1).values


def safe_uniforms(probs: torch.Tensor, *, min_prob: float = 1e-4) -> torch.Tensor:
    """float32 [R]: per row, u inside the interval of a random token (p >= min_prob), in its middle
    half, so that no rounding of the kernel's or the reference's sums can move it across an end."""
    eligible = torch.where(probs >= min_prob, probs, 0.0)
    token = torch.multinomial(eligible, 1).squeeze(-1)
    below = torch.where(torch.arange(probs.shape[-1]) < token[:, None], probs, 0.0).sum(-1)
    width = probs.gather(-1, token[:, None]).squeeze(-1)
    return (below + width * (0.25 + 0.5 * torch.rand(probs.shape[0], dtype=torch.float64))).float()


def _regularized_upper_gamma(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a): series below a + 1, continued fraction (Lentz) above."""
    if x <= 0.0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-16 * abs(total):
            n += 1.0
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat): scipy when installed, else the regularized upper gamma Q(dof/2, stat/2)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return _regularized_upper_gamma(dof / 2.0, stat / 2.0)
    return float(chi2.sf(stat, dof))


def _pool(expected: torch.Tensor, *observed: torch.Tensor, min_expected: float = 5.0):
    """Merge the categories with expected count < min_expected (and p = 0 ones) into one bin."""
    small = expected < min_expected
    cols = [t[~small] for t in (expected, *observed)]
    if small.any() and expected[small].sum() > 0:
        cols = [torch.cat([c, t[small].sum().view(1)]) for c, t in zip(cols, (expected, *observed))]
    return cols


def chi_square_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts [V] under the float64 probabilities [V] (goodness of fit)."""
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    expected, observed = _pool(probs * counts.sum(), counts.double())
    stat = float(((observed - expected) ** 2 / expected).sum())
    return chi2_sf(stat, len(expected) - 1)


def chi_square_same(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """p-value that two count vectors [V] come from one distribution (homogeneity, 2 x V table)."""
    a, b = counts_a.double(), counts_b.double()
    n_a, n_b = a.sum(), b.sum()
    pooled = (a + b) / (n_a + n_b)
    expected, obs_a, obs_b = _pool(pooled * min(n_a, n_b), a, b)
    keep = expected > 0
    exp_a, exp_b = expected[keep] / min(n_a, n_b) * n_a, expected[keep] / min(n_a, n_b) * n_b
    stat = float(((obs_a[keep] - exp_a) ** 2 / exp_a + (obs_b[keep] - exp_b) ** 2 / exp_b).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# 1: a single token; 13: one partial block; 2049: just past a power of two (a mostly masked block);
# MULTI_CHUNK_V: three chunks (the partials/select split).
@pytest.mark.parametrize("vocab", [1, 13, 2049, MULTI_CHUNK_V])
def test_greedy_matches_reference_with_ties(vocab: int, dtype: torch.dtype) -> None:
    x = torch.randn(5, vocab) * 3
    expected = []
    for r, ties in enumerate([(), (0, vocab - 1), (vocab // 2, vocab - 1), (vocab - 1,)]):
        # plant the maximum at several ids (across blocks/chunks when vocab is large)
        for i in ties:
            x[r, i] = 100.0
        expected.append(ties[0] if ties else int(x[r].argmax()))
    x[4] = 1.5  # all equal: id 0
    expected.append(0)
    x = x.to(dtype)
    tokens = sample_tokens(x, None)
    assert tokens.dtype == torch.int64 and tokens.shape == (5,)
    assert torch.equal(tokens, sample_tokens_ref(x, None))
    assert tokens.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [13, MULTI_CHUNK_V])
def test_greedy_order_keys(vocab: int, dtype: torch.dtype) -> None:
    """Greedy picks like torch.argmax in every dtype: negative maxima, -0 tied with +0 (the first
    wins), -inf tails, the largest finite values and subnormals."""
    info = torch.finfo(dtype)
    x = torch.randn(6, vocab, dtype=torch.float64)
    x[0] = -x[0].abs() - 1.0  # every logit negative
    x[1] = 0.0
    x[1, : vocab // 2] = -0.0  # -0 before +0: the first -0 is the argmax
    x[2, vocab // 3 :] = -math.inf
    x[3, :] = -info.max
    x[3, vocab - 2] = info.max
    # negative subnormals, one positive (bf16: normals; the interpreter's bf16 -> fp32 cast
    # flushes subnormals to zero, the GPU's does not)
    tiny = info.smallest_normal * (2.0 if dtype == torch.bfloat16 else 0.25)
    x[4, :] = -tiny
    x[4, vocab // 2] = tiny
    x[5] = -x[5].abs()
    x[5, vocab - 1] = -0.0  # the maximum is -0, alone
    x = x.to(dtype)
    expected = [int(x[0].argmax()), 0, int(x[2].argmax()), vocab - 2, vocab // 2, vocab - 1]
    assert torch.equal(x.argmax(-1), torch.tensor(expected))  # torch agrees on what is expected
    assert sample_tokens(x, None).tolist() == expected


def test_greedy_ignores_warpers_and_handles_masked_logits() -> None:
    x = torch.randn(3, 50)
    x[:, 10:] = -math.inf  # a masked vocabulary tail
    x[2] = -math.inf  # everything masked: argmax of -inf is id 0, like torch.argmax
    tokens = sample_tokens(x, torch.rand(3), temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(tokens, x.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Sampling: exact integers
# ---------------------------------------------------------------------------------------------

# (temperature, top_k, top_p) and what each case exercises
SAMPLED = [
    (1.0, 0, 1.0),  # plain temperature: two passes, no threshold kernel
    (0.7, 0, 1.0),
    (0.7, 5, 1.0),  # top-k only
    (1.3, 0, 0.8),  # top-p only
    (1.0, 5, 0.8),  # both: top-p on the top-k set
    (0.7, 1, 1.0),  # top-k = 1 (the argmax, unless tied)
    (1.0, 0, 0.3),  # a small nucleus
]


@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLED)
@pytest.mark.parametrize("vocab", [13, 1000])
def test_sampled_matches_reference(
    vocab: int, temperature: float, top_k: int, top_p: float
) -> None:
    x = random_logits(2, vocab, temperature, top_k, top_p)
    for dtype in (torch.float32, torch.float16):  # fp16: keys shifted by 13 bits
        xd = x.to(dtype)
        u = safe_uniforms(warped_probs(xd, temperature, top_k, top_p))
        got = sample_tokens(xd, u, temperature=temperature, top_k=top_k, top_p=top_p)
        ref = sample_tokens_ref(xd, u, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(got, ref), (dtype, got, ref)


@pytest.mark.parametrize(
    "vocab, top_k, top_p",
    [
        (MULTI_CHUNK_V, 0, 1.0),  # several chunks: mass prefix over chunks, scan of one chunk
        (LARGE_V, 0, 1.0),  # ... of the large vocabularies' chunk
        (MULTI_BLOCK_V, 7, 0.9),  # several blocks in every bisection pass
        (MULTI_BLOCK_V, MULTI_BLOCK_V - 1, 1.0),  # top_k = V - 1: cuts one token
        (50, 50, 1.0),  # top_k = V and top_k > V keep everything
        (50, 80, 1.0),
    ],
)
def test_sampled_large_and_edge_vocab(vocab: int, top_k: int, top_p: float) -> None:
    x = random_logits(2, vocab, 1.0, top_k, top_p)
    u = safe_uniforms(warped_probs(x, 1.0, top_k, top_p))
    got = sample_tokens(x, u, temperature=1.0, top_k=top_k, top_p=top_p)
    assert torch.equal(got, sample_tokens_ref(x, u, temperature=1.0, top_k=top_k, top_p=top_p))


def test_sampled_chunks_follow_the_vocabulary() -> None:
    """The vocabularies above take the chunking they are named for (a function of V alone)."""
    assert _chunking(MULTI_CHUNK_V, greedy=False) == (CHUNK, 3)
    assert _chunking(LARGE_V, greedy=False) == (_BLOCK, _LARGE_VOCAB // _BLOCK + 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("top_k, top_p", [(20, 0.9), (1074, 0.5)])
def test_top_k_then_top_p_per_dtype(dtype: torch.dtype, top_k: int, top_p: float) -> None:
    """Both cuts on rows of several threshold blocks in each input dtype (keys of 16, 19 and 32
    bits), with -inf logits, a small and a large top-k."""
    gen = torch.Generator().manual_seed(top_k)
    for _ in range(50):  # rows in the input dtype whose top-p cut has no near-tie
        x = (torch.randn(3, MULTI_BLOCK_V, generator=gen) * 3.0).to(dtype)
        x[0, :5] = -math.inf  # weight 0 among the rest
        if (top_p_margin(x, 0.8, top_k, top_p) >= 1e-4).all():
            break
    else:
        raise AssertionError("no logits without a near-tie at the top-p cut")
    u = safe_uniforms(warped_probs(x, 0.8, top_k, top_p))
    got = sample_tokens(x, u, temperature=0.8, top_k=top_k, top_p=top_p)
    assert torch.equal(got, sample_tokens_ref(x, u, temperature=0.8, top_k=top_k, top_p=top_p))


def test_ties_at_the_cuts_are_all_kept() -> None:
    vocab = 24
    x = torch.tensor([float(i % 4) for i in range(vocab)])[None].half()  # 0..3, six of each
    grid = ((torch.arange(32, dtype=torch.float64) + 0.5) / 32).float()  # every kept id gets a u
    rows = x.expand(32, vocab)
    for top_k, top_p, kept_ids in [
        (3, 1.0, [i for i in range(vocab) if i % 4 == 3]),  # cut inside the tie group of 3.0
        (7, 1.0, [i for i in range(vocab) if i % 4 >= 2]),  # the 7th largest is a 2.0
        (0, 0.1, [i for i in range(vocab) if i % 4 == 3]),  # nucleus cut among tied tokens
    ]:
        got = sample_tokens(rows, grid, temperature=1.0, top_k=top_k, top_p=top_p)
        assert sorted(set(got.tolist())) == kept_ids
        assert torch.equal(
            got, sample_tokens_ref(rows, grid, temperature=1.0, top_k=top_k, top_p=top_p)
        )


def test_all_equal_logits() -> None:
    vocab = 10
    u = (torch.arange(vocab, dtype=torch.float32) + 0.5) / vocab
    x = torch.full((vocab, vocab), -2.5)
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.5)]:  # ties keep every token in both cuts
        got = sample_tokens(x, u, temperature=0.8, top_k=top_k, top_p=top_p)
        assert got.tolist() == list(range(vocab))


@pytest.mark.parametrize(
    "vocab, top_k, top_p",
    [
        (_GROUPS_KEPT + 200, 20, 1.0),  # grouped top-k, every group gathered
        (_GROUPS_KEPT + 200, 20, 0.51),  # ... then top-p
        (MANY_GROUPS_V, 20, 1.0),  # grouped top-k, the groups reaching a cut of the maxima
        (MANY_GROUPS_V, 50, 0.51),
        (_GROUPS_KEPT + 200, _GROUPS_KEPT + 22, 1.0),  # passes over the row
    ],
)
def test_kept_sets_are_exact(vocab: int, top_k: int, top_p: float) -> None:
    """Nearly flat distinct logits and a grid of uniforms finer than every kept token's interval
    draw each kept token, so an off-by-one cut shows, on each way the sampler takes."""
    x = (torch.randperm(vocab, generator=torch.Generator().manual_seed(1)) * 1e-4)[None]
    grid = ((torch.arange(2 * top_k, dtype=torch.float64) + 0.5) / (2 * top_k)).float()
    got = sample_tokens(x.expand(len(grid), vocab), grid, temperature=1.0, top_k=top_k, top_p=top_p)
    kept = x[0].argsort(descending=True)[:top_k]
    if top_p < 1.0:  # equal-ish weights: the nucleus is about top_p * top_k of the largest
        kept = kept[: math.ceil(top_p * top_k)]
    assert sorted(set(got.tolist())) == sorted(kept.tolist())
    ref = sample_tokens_ref(
        x.expand(len(grid), vocab), grid, temperature=1.0, top_k=top_k, top_p=top_p
    )
    assert torch.equal(got, ref)


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (20, 0.9), (_GROUPS_KEPT, 1.0)])
def test_grouped_top_k_on_spread_logits(top_k: int, top_p: float) -> None:
    """The grouped top-k where the row's top tokens crowd into few groups or spread over many:
    a group may hold several of the top-k, and exactly k groups may be needed (top_k = 128)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, MANY_GROUPS_V, generator=gen)
    x[1, 640:700] += 6.0  # the top-k inside one or two groups
    x[2, :: _GROUP + 1] += 6.0  # one top token in each of many groups
    x[3] = torch.linspace(-3.0, 3.0, MANY_GROUPS_V)  # sorted: the top-k in the last groups
    x[4, -3:] = -math.inf  # a masked tail
    x[5] = x[5].half().float()  # coarse values: ties at the cuts
    x = x[top_p_margin(x, 1.0, top_k, top_p) > 1e-4]
    u = safe_uniforms(warped_probs(x, 1.0, top_k, top_p))
    got = sample_tokens(x, u, temperature=1.0, top_k=top_k, top_p=top_p)
    assert torch.equal(got, sample_tokens_ref(x, u, temperature=1.0, top_k=top_k, top_p=top_p))
    assert len(got) >= 4


def test_group_cut_reaches_k_groups() -> None:
    """The group-maxima cut must reach k groups, not k - 1: the top-3 tokens in three groups, the
    third (-1) below the bisection's first midpoint (about 0), which two groups reach."""
    x = torch.full((1, MANY_GROUPS_V), -10.0)
    x[0, 10 * _GROUP + 3] = 5.0
    x[0, 20 * _GROUP + 7] = 4.0
    x[0, 30 * _GROUP + 1] = -1.0
    grid = (torch.arange(6, dtype=torch.float32) + 0.5) / 6  # temperature 100: nearly equal odds
    got = sample_tokens(x.expand(6, -1), grid, temperature=100.0, top_k=3, top_p=1.0)
    assert sorted(set(got.tolist())) == [10 * _GROUP + 3, 20 * _GROUP + 7, 30 * _GROUP + 1]


def test_ties_beyond_the_groups() -> None:
    """Rows whose ties reach more than _GROUPS_KEPT groups at every cut of the group maxima: the
    grouped kernel finds the cuts and draws by passes over the row instead, to the same tokens."""
    x = torch.zeros(2, MANY_GROUPS_V)
    x[0, ::7] = 1.0  # a tie at the top in every group, then the rest tied at 0
    u = (torch.arange(2, dtype=torch.float32) + 0.5) / 2
    for top_k, top_p in [(3, 1.0), (60, 1.0), (60, 0.2), (_GROUPS_KEPT, 1.0)]:
        got = sample_tokens(x, u, temperature=1.0, top_k=top_k, top_p=top_p)
        assert torch.equal(got, sample_tokens_ref(x, u, temperature=1.0, top_k=top_k, top_p=top_p))
        assert int(got[0]) % 7 == 0  # only the tied 1.0s are kept in row 0
        assert 0.7 * MANY_GROUPS_V <= int(got[1]) <= 0.8 * MANY_GROUPS_V  # u = 0.75, all tied


def test_ties_beyond_the_candidates() -> None:
    """More than _CANDIDATES tokens tied at one value in a few groups, fewer than k above it: for
    a top-k that compacts its candidates (k > 32: 64 groups and more), no cut keeps k tokens and
    at most _CANDIDATES, so the grouped kernel takes the passes, to the same tokens as the
    reference; a few tied tokens fewer than _CANDIDATES are compacted. Top-k 20 keeps its tile of
    32 groups, uncompacted, whatever the ties."""
    for num_tied in (_CANDIDATES + 40, _CANDIDATES - 10):
        x = torch.randn(2, MANY_GROUPS_V, generator=torch.Generator().manual_seed(num_tied))
        x[:, 3 : 3 + num_tied] = 5.0  # tied at the top of a few groups
        x[1, 1000] = 6.0  # one token above the tie
        u = torch.tensor([0.3, 0.9])
        for top_k, top_p in [(20, 0.5), (40, 1.0), (40, 0.5), (_GROUPS_KEPT, 0.95)]:
            got = sample_tokens(x, u, temperature=0.8, top_k=top_k, top_p=top_p)
            want = sample_tokens_ref(x, u, temperature=0.8, top_k=top_k, top_p=top_p)
            assert torch.equal(got, want), (num_tied, top_k, top_p)
            assert 3 <= int(got[0]) < 3 + num_tied  # a tied token, drawn at u = 0.3


def test_extreme_uniforms() -> None:
    x = torch.randn(1, 30).expand(2, 30).contiguous()
    x[:, :3] = -math.inf  # weight 0: never drawn, not even by u = 0
    u = torch.tensor([0.0, 1.0 - 2.0**-24])  # the first and the last kept token
    for top_k, top_p in [(0, 1.0), (6, 1.0), (0, 0.7)]:
        probs = warped_probs(x, 1.0, top_k, top_p)[0]
        kept = torch.nonzero(probs > 0).squeeze(-1)
        got = sample_tokens(x, u, temperature=1.0, top_k=top_k, top_p=top_p)
        assert got.tolist() == [int(kept[0]), int(kept[-1])]
        assert torch.equal(got, sample_tokens_ref(x, u, temperature=1.0, top_k=top_k, top_p=top_p))


def test_row_strides() -> None:
    buffer = torch.randn(3, 70)
    x = buffer[:, 5:62]  # row stride 70, offset start
    u = safe_uniforms(warped_probs(x, 1.0, 0, 1.0))
    assert torch.equal(
        sample_tokens(x, u, temperature=1.0), sample_tokens_ref(x, u, temperature=1.0)
    )
    shared = torch.randn(1, 40).expand(4, 40)  # row stride 0
    u = safe_uniforms(warped_probs(shared, 0.7, 0, 1.0))
    assert torch.equal(
        sample_tokens(shared, u, temperature=0.7), sample_tokens_ref(shared, u, temperature=0.7)
    )


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.8)])
def test_row_alone_equals_row_in_batch(top_k: int, top_p: float) -> None:
    """Lossless by construction: the same row and u give the same token (any u, near-ties too)
    whether sampled alone (autoregressive decoding) or among other rows (verification)."""
    x = torch.randn(4, MULTI_CHUNK_V if top_k == 0 else 300).half()
    u = torch.rand(4)
    batch = sample_tokens(x, u, temperature=0.9, top_k=top_k, top_p=top_p)
    alone = [
        sample_tokens(x[r : r + 1], u[r : r + 1], temperature=0.9, top_k=top_k, top_p=top_p)
        for r in range(4)
    ]
    assert torch.equal(batch, torch.cat(alone))


# ---------------------------------------------------------------------------------------------
# Sampling: distribution
# ---------------------------------------------------------------------------------------------

DISTRIBUTION_CASES = [
    (vocab, temperature, top_k, top_p)
    for vocab in (13, 37)
    for temperature in (0.7, 1.0)
    for top_k in (0, 5)
    for top_p in (1.0, 0.8)
]


def _distribution_logits(vocab: int, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return random_logits(1, vocab, temperature, top_k, top_p, scale=1.5)


def test_chi2_sf_matches_known_values() -> None:
    # the fallback used when scipy is missing, against textbook quantiles
    for stat, dof, p in [
        (3.841459, 1, 0.05),
        (18.307038, 10, 0.05),
        (2.705543, 1, 0.10),
        (37.566235, 20, 0.01),
    ]:
        assert abs(_regularized_upper_gamma(dof / 2, stat / 2) - p) < 1e-6
    assert abs(_regularized_upper_gamma(3.0, 0.5) - chi2_sf(1.0, 6)) < 1e-9


@pytest.mark.parametrize("vocab, temperature, top_k, top_p", DISTRIBUTION_CASES)
def test_reference_distribution(vocab: int, temperature: float, top_k: int, top_p: float) -> None:
    """The reference's draws follow the warped distribution, like torch.multinomial's."""
    n = 20_000
    x = _distribution_logits(vocab, temperature, top_k, top_p)
    probs = warped_probs(x, temperature, top_k, top_p)[0]
    draws = sample_tokens_ref(
        x.expand(n, vocab), torch.rand(n), temperature=temperature, top_k=top_k, top_p=top_p
    )
    counts = torch.bincount(draws, minlength=vocab)
    multinomial = torch.bincount(torch.multinomial(probs, n, replacement=True), minlength=vocab)
    assert chi_square_fit(counts, probs) > P_MIN
    assert chi_square_same(counts, multinomial) > P_MIN


def test_kernel_distribution_cpu() -> None:
    """The kernel's own draws, few in the interpreter (the GPU test runs every case, 200k draws)."""
    n, vocab, temperature = 400, 13, 0.7
    x = _distribution_logits(vocab, temperature, 0, 1.0)
    probs = warped_probs(x, temperature, 0, 1.0)[0]
    draws = sample_tokens(x.expand(n, vocab), torch.rand(n), temperature=temperature)
    counts = torch.bincount(draws, minlength=vocab)
    multinomial = torch.bincount(torch.multinomial(probs, n, replacement=True), minlength=vocab)
    assert chi_square_fit(counts, probs) > P_MIN
    assert chi_square_same(counts, multinomial) > P_MIN


def test_inverse_cdf_on_a_grid() -> None:
    """Deterministic check of the map u -> token: on a stratified grid of n uniforms each token
    gets n * p +- 1 of them (its interval's length, up to the grid's end effects)."""
    n = 32
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    for top_k, top_p in [(0, 1.0), (5, 0.8)]:
        x = _distribution_logits(13, 0.7, top_k, top_p).half()
        probs = warped_probs(x, 0.7, top_k, top_p)[0]
        draws = sample_tokens(x.expand(n, 13), grid, temperature=0.7, top_k=top_k, top_p=top_p)
        counts = torch.bincount(draws, minlength=13).double()
        assert ((counts - n * probs).abs() <= 1.0 + 1e-6).all(), (counts, n * probs)


# ---------------------------------------------------------------------------------------------
# GPU: real vocabularies in bf16, the full distribution grid, CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 49152, 262144])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), *SAMPLED])
def test_gpu_real_vocab(vocab: int, temperature: float, top_k: int, top_p: float) -> None:
    rows = 16
    x = (torch.randn(rows, vocab) * 3).bfloat16()
    x[0, 7] = x[0, vocab - 3] = x[0].max() + 1  # an argmax tie across chunks
    u = None
    if temperature > 0.0:
        x = x[top_p_margin(x, temperature, top_k, top_p) > 1e-4]  # no near-tie at the top-p cut
        assert x.shape[0] >= rows // 2
        u = safe_uniforms(warped_probs(x, temperature, top_k, top_p)).cuda()
    x = x.cuda()
    got = sample_tokens(x, u, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = sample_tokens_ref(x, u, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(got, ref)
    if temperature == 0.0:
        assert int(got[0]) == 7
    alone = torch.cat(
        [
            sample_tokens(
                x[r : r + 1],
                None if u is None else u[r : r + 1],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
            for r in range(x.shape[0])
        ]
    )
    assert torch.equal(got, alone)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, temperature, top_k, top_p", DISTRIBUTION_CASES)
def test_gpu_kernel_distribution(vocab: int, temperature: float, top_k: int, top_p: float) -> None:
    n = 200_000
    x = _distribution_logits(vocab, temperature, top_k, top_p).bfloat16()
    probs = warped_probs(x, temperature, top_k, top_p)[0]
    draws = sample_tokens(
        x.cuda().expand(n, vocab),
        torch.rand(n, device="cuda"),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    counts = torch.bincount(draws.cpu(), minlength=vocab)
    multinomial = torch.bincount(torch.multinomial(probs, n, replacement=True), minlength=vocab)
    assert chi_square_fit(counts, probs) > P_MIN
    assert chi_square_same(counts, multinomial) > P_MIN


@pytest.mark.gpu
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.6, 20, 0.95)]
)
def test_gpu_cuda_graph(temperature: float, top_k: int, top_p: float) -> None:
    vocab = 151936
    x = torch.randn(1, vocab, device="cuda").bfloat16()
    u = torch.rand(1, device="cuda")
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sample_tokens(x, u, **kwargs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_tokens(x, u, **kwargs)
    for _ in range(3):
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        u.copy_(torch.rand_like(u))
        graph.replay()
        assert torch.equal(out, sample_tokens(x, u, **kwargs))
