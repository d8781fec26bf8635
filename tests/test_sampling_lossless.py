"""Sampled decoding keeps the target's distribution: statistical tests on a tiny vocabulary (V = 8).

Two tests of the same claim, "every emitted token is a draw from the target's warped conditional
distribution given the tokens before it, independent of the earlier draws":

1. Probability integral transform (all modes, three warper settings). For a generated sequence,
   the randomized PIT of token n, u_n = F_n(x_n - 1) + w_n * p_n(x_n) (F_n the CDF of the exact
   warped conditional p_n in token-id order, w_n ~ U(0, 1) from the test's own generator), is
   i.i.d. U(0, 1) exactly when every token is sampled from p_n with fresh randomness: we
   chi-square the u_n of many seeded generations in 10 bins. Independence: the mid-PIT
   m_n = F_n(x_n - 1) + p_n(x_n) / 2 has E[m_n | past] = 1/2 exactly, so with d_n = m_n - 1/2 the
   sum S = sum_n d_n d_{n+1} is a martingale and S / sqrt(sum_n d_n^2 d_{n+1}^2) is
   asymptotically N(0, 1). A uniform shared by two depths, or reused by two cycles, correlates
   consecutive tokens (this test flags such a mutation of the loop at z = 3.5 .. 7).
   p_n comes from one teacher-forced target forward and the sampler's documented warpers
   (`warped_probs`, itself checked against kernels.sample_tokens_ref).
2. Joint of the first tokens (d2sd tree, temperature 1): the counts of (x_2, x_3) over many seeds
   against the exact distribution enumerated over x_1 (x_1 comes from the prefill, x_2 and x_3
   from the cycles).

Drafters: deterministic "bigram" drafters (the first drafter chains the target's most likely next
token given only the previous one; the second takes the runner-up at its first masked position),
so drafts are often accepted, branches are often taken, and some cycles accept a whole block.
All tests require p > 1e-3; the seeds are fixed, so a pass is reproducible.
"""

from __future__ import annotations

import functools

import pytest
import torch

from d2sd.generate import Decoder, GenerationConfig
from kernels.accept import sample_tokens_ref
from tests._decode_cases import ScriptedDrafter
from tests.tiny_models import tiny_drafter, tiny_target

VOCAB = 8
GAMMA, GAMMA2, TOPK = 4, 5, 2
PIT_SEEDS, PIT_TOKENS = 20, 40
P_MIN = 1e-3

WARPERS = {
    "temperature": dict(temperature=1.0),
    "top_k": dict(temperature=0.7, top_k=3),
    "top_p": dict(temperature=1.0, top_p=0.8),
}
# (mode, layout, warpers): every mode; every warper on the richest path (d2sd tree); `ar` once, to
# check the harness on the sampler alone
CASES = [
    ("ar", "branches", "temperature"),
    ("d2sd", "tree", "temperature"),
    ("d2sd", "tree", "top_k"),
    ("d2sd", "tree", "top_p"),
    ("d2sd", "branches", "top_k"),
    ("dflash", "branches", "temperature"),
    ("dflash+samples", "tree", "top_p"),
    ("dflash-dflash", "branches", "temperature"),
]


def normal_two_sided_p(z: float) -> float:
    return float(torch.special.erfc(torch.tensor(abs(z) / 2**0.5, dtype=torch.float64)))


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor, dof: int) -> float:
    """Upper tail of the chi-square statistic sum (o - e)^2 / e with `dof` degrees of freedom."""
    statistic = ((observed.double() - expected.double()) ** 2 / expected.double()).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0))


def warped_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The sampler's distribution (kernels/accept.py docstring, steps 1-3): [R, V] -> [R, V]."""
    x = logits.double()
    kept = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[-1]:
        kept = x >= x.topk(top_k, dim=-1).values[:, -1:]
    weights = torch.where(kept, torch.exp((x - x.amax(-1, keepdim=True)) / temperature), 0.0)
    if top_p < 1.0:
        for row in range(x.shape[0]):
            order = torch.argsort(torch.where(kept[row], x[row], -torch.inf), descending=True)
            mass = weights[row, order].cumsum(0)
            cut = int(torch.searchsorted(mass, top_p * mass[-1]))
            kept[row] &= x[row] >= x[row, order[min(cut, x.shape[-1] - 1)]]
        weights = torch.where(kept, weights, 0.0)
    return weights / weights.sum(-1, keepdim=True)


class BigramDrafter(ScriptedDrafter):
    """Deterministic drafter: position k's logits are `table[previous token]`, the previous token
    being the visible input or the drafter's own argmax; with `runner_up`, the first masked
    position's best token is suppressed (a VP drafter that bets the first draft is wrong there).
    Context extension only advances the cache length."""

    def __init__(self, inner: torch.nn.Module, table: torch.Tensor, *, runner_up: bool) -> None:
        super().__init__(inner)
        self.register_buffer("table", table.float())
        self.runner_up = runner_up

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB, device=input_ids.device)
        previous = input_ids[:, 0]
        before_first_mask = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        for k in range(1, length):
            row = self.table[previous]
            masked = input_ids[:, k] == self.mask_token_id
            if self.runner_up:
                demoted = row.scatter(-1, row.argmax(-1, keepdim=True), -1e4)
                row = torch.where((before_first_mask & masked)[:, None], demoted, row)
            logits[:, k] = row
            previous = torch.where(masked, row.argmax(-1), input_ids[:, k])
            before_first_mask &= ~masked
        return logits


@functools.cache
def setup() -> tuple:
    """(target, decoder) on CPU: a 2-layer tiny qwen3 (logits scaled x3: peaked enough that drafts
    are often right) with bigram drafters read off the target."""
    hf, target = tiny_target("qwen3", vocab_size=VOCAB, num_hidden_layers=2, tap_layer_ids=(0, 1))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        hf.lm_head.weight.mul_(3.0)
    inner = tiny_drafter(target, block_size=GAMMA, seed=1)
    table = bigram_table(target)
    draft = BigramDrafter(inner, table, runner_up=False)
    vp_draft = BigramDrafter(inner, table, runner_up=True)
    return target, Decoder(target, None, draft, vp_draft, max_len=96)


@torch.no_grad()
def bigram_table(target, contexts: int = 64, context_len: int = 6) -> torch.Tensor:
    """[V, V]: the target's next-token log-probabilities after token x, averaged over random
    contexts (a fixed table: the drafts never depend on the target's draws)."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB, (contexts, context_len), generator=generator)
    positions = torch.arange(context_len + 1).expand(contexts, -1)
    rows = []
    for token in range(VOCAB):
        ids = torch.cat([context, torch.full((contexts, 1), token)], dim=1)
        cache = target.allocate_cache(context_len + 2, contexts, context_len + 1)
        logits, _ = target.forward(ids, positions, cache)
        rows.append(logits[:, -1].log_softmax(-1).mean(0))
    return torch.stack(rows)


def conditional_probs(target, prompt: list[int], tokens: list[int], warpers: dict) -> torch.Tensor:
    """Exact warped p_n(. | prompt, tokens[:n]) for every new token: [len(tokens), V] float64."""
    sequence = torch.tensor([prompt + tokens[:-1]])
    cache = target.allocate_cache(sequence.shape[1] + 1, 1, sequence.shape[1])
    with torch.no_grad():
        logits, _ = target.forward(sequence, torch.arange(sequence.shape[1])[None], cache)
    return warped_probs(logits[0, len(prompt) - 1 :], **warpers)


def pit_values(
    probs: torch.Tensor, tokens: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized PIT u_n = F_n(x_n - 1) + w_n p_n(x_n) and mid-PIT F_n(x_n - 1) + p_n(x_n) / 2."""
    index = torch.tensor(tokens).view(-1, 1)
    mass = probs.gather(-1, index).squeeze(-1)
    below = probs.cumsum(-1).gather(-1, index).squeeze(-1) - mass
    jitter = torch.rand(len(tokens), generator=generator, dtype=torch.float64)
    return below + jitter * mass, below + mass / 2


def config_for(mode: str, layout: str, warpers: dict, seed: int, max_new_tokens: int):
    return GenerationConfig(
        mode=mode,
        block_size=GAMMA,
        block_size_2=GAMMA2,
        topk=TOPK,
        verify_layout=layout,
        max_new_tokens=max_new_tokens,
        seed=seed,
        **warpers,
    )


def test_warped_probs_match_the_sampler() -> None:
    """The test's exact distribution equals kernels.sample_tokens_ref's frequencies on a fine
    grid of uniforms (the inverse CDF maps a u-interval of length p(v) to token v)."""
    logits = torch.randn(6, VOCAB) * 2
    grid = (torch.arange(20000, dtype=torch.float32) + 0.5) / 20000
    for warpers in WARPERS.values():
        probs = warped_probs(logits, **warpers)
        for row in range(logits.shape[0]):
            tokens = sample_tokens_ref(logits[row].expand(grid.shape[0], VOCAB), grid, **warpers)
            frequency = torch.bincount(tokens, minlength=VOCAB).double() / grid.shape[0]
            torch.testing.assert_close(frequency, probs[row], atol=2e-4, rtol=0)


@pytest.mark.parametrize(("mode", "layout", "warper"), CASES)
def test_pit_is_uniform_and_independent(mode: str, layout: str, warper: str) -> None:
    target, decoder = setup()
    warpers = WARPERS[warper]
    generator = torch.Generator().manual_seed(1234)
    prompt_generator = torch.Generator().manual_seed(99)
    values, products, lengths = [], [], []
    for seed in range(PIT_SEEDS):
        prompt = torch.randint(0, VOCAB, (5,), generator=prompt_generator).tolist()
        result = decoder.generate(prompt, config_for(mode, layout, warpers, seed, PIT_TOKENS))
        assert len(result.tokens) == PIT_TOKENS
        probs = conditional_probs(target, prompt, result.tokens, warpers)
        assert (probs.gather(-1, torch.tensor(result.tokens)[:, None]) > 0).all(), (
            "impossible token"
        )
        u, mid = pit_values(probs, result.tokens, generator)
        values.append(u)
        centered = mid - 0.5
        products.append(centered[:-1] * centered[1:])
        lengths.extend(result.accept_lengths)
    u = torch.cat(values)
    counts = torch.bincount((u * 10).long().clamp(max=9), minlength=10)
    p_uniform = chi_square_p(counts, torch.full((10,), len(u) / 10), dof=9)
    product = torch.cat(products)
    z = float(product.sum() / product.square().sum().sqrt())
    p_independent = normal_two_sided_p(z)
    assert p_uniform > P_MIN and p_independent > P_MIN, (p_uniform, z, counts)
    if mode != "ar":
        # the drafts are right often enough that acceptance paths are exercised
        assert sum(lengths) / len(lengths) > 1.6 and max(lengths) >= GAMMA, lengths


def test_first_tokens_joint_distribution() -> None:
    """Counts of (x_2, x_3) from d2sd (tree, temperature 1) against the exact enumeration."""
    target, decoder = setup()
    warpers, num_samples = WARPERS["temperature"], 600
    prompt = [3, 1, 4, 1, 5]
    # exact P(x_1, x_2, x_3) by enumeration over the V^2 prefixes of x_3
    p1 = conditional_probs(target, prompt, [0], warpers)[0]
    p2 = torch.stack([conditional_probs(target, prompt, [a, 0], warpers)[1] for a in range(VOCAB)])
    p3 = torch.stack(
        [
            conditional_probs(target, prompt, [a, b, 0], warpers)[2]
            for a in range(VOCAB)
            for b in range(VOCAB)
        ]
    ).view(VOCAB, VOCAB, VOCAB)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).reshape(-1)  # over (x_2, x_3)
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    for seed in range(num_samples):
        tokens = decoder.generate(prompt, config_for("d2sd", "tree", warpers, seed, 3)).tokens
        counts[tokens[1] * VOCAB + tokens[2]] += 1
    expected = exact * num_samples
    # cells expected below 5 are pooled into one, as the chi-square approximation needs
    small = expected < 5
    observed, expected = counts[~small], expected[~small]
    if small.any():
        observed = torch.cat([observed, counts[small].sum().view(1)])
        expected = torch.cat([expected, (exact[small] * num_samples).sum().view(1)])
    p_value = chi_square_p(observed, expected, dof=len(observed) - 1)
    assert p_value > P_MIN, p_value
