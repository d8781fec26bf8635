"""Greedy losslessness: every speculative mode emits exactly the `ar` greedy tokens (fp32, CPU).

Two kinds of drafters:
- random tiny DFlash drafters (tests/tiny_models.py): the real drafter code path, but their drafts
  are rarely accepted, so cycles mostly emit the bonus alone;
- `OracleDrafter`: drafts the known AR continuation with seeded corruptions and matching (mostly
  low) confidences, so that cycles accept long prefixes, follow second-draft branches past the
  first draft's mistakes, accept whole blocks (bonus from the last depth) and sometimes miss.
  The first and the second drafter corrupt different positions.

Targets: one tiny random model of each family (llama untied: a tied random llama repeats one token
under greedy decoding). Prompts are random ids. Budget (one CPU core): the oracle test runs 20
prompts x 64 tokens through every mode but dflash-dflash; the random-drafter test 2 prompts x 32
tokens through every mode; under TRITON_INTERPRET=1 one small d2sd case runs the Triton attention
backend and the Triton loop kernels (ops.cpu_kernels) instead of the torch references.
"""

from __future__ import annotations

import functools

import pytest
import torch

from d2sd import ops
from d2sd.generate import Decoder, GenerationConfig
from tests._decode_cases import ScriptedDrafter
from tests.conftest import interpreting
from tests.tiny_models import FAMILY_NAMES, tiny_drafter, tiny_target

VOCAB = 96
NEW_TOKENS = 64
NUM_PROMPTS = 20
MAX_LEN = 128
GAMMA, GAMMA2, TOPK = 6, 8, 3

# (mode, verify layout): every mode; d2sd in both layouts, each ablation in one of them. Targets
# with sliding windows (gpt_oss) verify "tree" as "branches" (Decoder.sliding_window).
MODES = [
    ("dflash", "branches"),
    ("d2sd", "branches"),
    ("d2sd", "tree"),
    ("dflash+samples", "tree"),
    ("dflash-dflash", "branches"),
]
# dflash-dflash differs from d2sd only in which drafter (and cache) fills the branches: the real
# drafters exercise that; an oracle drafter would make it a copy of d2sd
ORACLE_MODES = MODES[:4]
# random drafts are accepted about never (one target forward per token): the CPU budget allows
# 2 prompts x 32 tokens per mode and family there
RANDOM_DRAFTER_PROMPTS, RANDOM_DRAFTER_TOKENS = 2, 32


def family_overrides(family: str) -> dict:
    """2 layers (time); llama untied (a tied random llama repeats one token under greedy)."""
    overrides = {"num_hidden_layers": 2, "tap_layer_ids": (0, 1)}
    if family == "llama":
        overrides["tie_word_embeddings"] = False
    return overrides


@functools.cache
def family_target(family: str, backend: str = "torch"):
    """The family's tiny target (fp32; no tokenizer and no EOS id: every output has 64 tokens)."""
    hf, target = tiny_target(family, vocab_size=VOCAB, backend=backend, **family_overrides(family))
    hf.generation_config.eos_token_id = None
    return target


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (count,), generator=generator)
    return [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist() for n in lengths]


@functools.cache
def ar_reference(family: str) -> list[list[int]]:
    decoder = Decoder(family_target(family), max_len=MAX_LEN)
    config = GenerationConfig(mode="ar", max_new_tokens=NEW_TOKENS)
    return [decoder.generate(p, config).tokens for p in random_prompts(NUM_PROMPTS)]


class OracleDrafter(ScriptedDrafter):
    """A drafter that predicts `reference[p]` at absolute position p, except at a `corrupt_rate`
    share of positions (picked by a hash of p and `salt`) where it predicts another token.

    Confidence: the predicted token's logit is 8 above the others (c ~ 0.97 at V = 96) at 3 of 4
    right positions and at 1 of 4 corrupted ones, else 0.5 (c ~ 0.02), so r(i) points at the real
    mistakes most of the time but not always. Context extension only advances the cache length;
    caches and ids come from the wrapped real drafter. Device-only arithmetic: graph-capturable.
    """

    def __init__(
        self, inner: torch.nn.Module, reference: list[int], *, salt: int, corrupt_rate: float
    ) -> None:
        super().__init__(inner)
        self.register_buffer("reference", torch.tensor(reference, dtype=torch.int64))
        self.salt = salt
        self.corrupt_per_mille = int(corrupt_rate * 1000)
        self.vocab_size = inner.config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        p = positions.clamp(max=self.reference.shape[0] - 1)
        truth = self.reference[p]
        mixed = (p * 2654435761 + self.salt * 40503) % 1000003
        corrupt = mixed % 1000 < self.corrupt_per_mille
        wrong = (truth + 1 + mixed % (self.vocab_size - 1)) % self.vocab_size
        token = torch.where(corrupt, wrong, truth)
        confident = ((mixed // 1000) % 4 == 0) == corrupt
        margin = torch.where(confident, 8.0, 0.5)
        logits = torch.zeros(*input_ids.shape, self.vocab_size, device=input_ids.device)
        return logits.scatter_(-1, token[..., None], margin[..., None])


def oracle_decoder(
    family: str, prompt: list[int], tokens: list[int], corrupt_rate: float, target=None
):
    """Decoder of `target` (default: the family's torch target) with the two oracle drafters."""
    target = family_target(family) if target is None else target
    reference = prompt + tokens + [0] * (2 * GAMMA2 + 2)
    inner = tiny_drafter(target, block_size=GAMMA, seed=1)
    first = OracleDrafter(inner, reference, salt=1, corrupt_rate=corrupt_rate)
    second = OracleDrafter(inner, reference, salt=2, corrupt_rate=corrupt_rate)
    return Decoder(target, None, first, second, max_len=MAX_LEN)


def config_for(mode: str, layout: str, max_new_tokens: int = NEW_TOKENS) -> GenerationConfig:
    return GenerationConfig(
        mode=mode,
        block_size=GAMMA,
        block_size_2=GAMMA2,
        topk=TOPK,
        verify_layout=layout,
        max_new_tokens=max_new_tokens,
    )


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_oracle_drafters_match_ar(family: str) -> None:
    """20 prompts x 64 tokens, every mode and layout, drafts mostly right: exact AR tokens, and the
    acceptance paths the oracle is built to produce really occur."""
    lengths_by_mode: dict[tuple[str, str], list[int]] = {m: [] for m in ORACLE_MODES}
    for index, (prompt, expected) in enumerate(
        zip(random_prompts(NUM_PROMPTS), ar_reference(family))
    ):
        # corruption from 3% to 30%: long accepts, full blocks, and frequent branch switches
        decoder = oracle_decoder(family, prompt, expected, corrupt_rate=0.03 + 0.27 * index / 19)
        for mode, layout in ORACLE_MODES:
            result = decoder.generate(prompt, config_for(mode, layout))
            assert result.tokens == expected, (family, mode, layout, index)
            assert sum(result.accept_lengths) >= NEW_TOKENS - 1
            lengths_by_mode[(mode, layout)].extend(result.accept_lengths)
    for (mode, layout), lengths in lengths_by_mode.items():
        tau = sum(lengths) / len(lengths)
        assert tau > 2.5, (mode, layout, tau)  # positions and contexts line up
        # whole blocks accepted (bonus from the last depth); past the first draft the sampled
        # ablation's branches hold MASK, so it is sure to reach gamma only
        full_block = GAMMA2 if mode in ("d2sd", "dflash-dflash") else GAMMA
        assert full_block <= max(lengths) <= GAMMA2, (mode, layout)
        if mode == "d2sd":
            # longer than the first draft can reach: a second-draft branch was followed
            assert any(n > GAMMA for n in lengths), (mode, layout)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_random_drafters_match_ar(family: str) -> None:
    """The real drafter code path (context extension, VP batch, the reused DFlash drafter) with
    random drafters; the first 10 prompts are spread over the modes."""
    target = family_target(family)
    draft = tiny_drafter(target, block_size=GAMMA, seed=1)
    vp_draft = tiny_drafter(target, block_size=GAMMA2, seed=2)
    decoder = Decoder(target, None, draft, vp_draft, max_len=MAX_LEN)
    prompts, references = random_prompts(NUM_PROMPTS), ar_reference(family)
    for index, (mode, layout) in enumerate(MODES):
        for prompt_index in range(index, len(MODES) * RANDOM_DRAFTER_PROMPTS, len(MODES)):
            config = config_for(mode, layout, RANDOM_DRAFTER_TOKENS)
            result = decoder.generate(prompts[prompt_index], config)
            expected = references[prompt_index][:RANDOM_DRAFTER_TOKENS]
            assert result.tokens == expected, (family, mode, layout, prompt_index)


@pytest.mark.skipif(not interpreting(), reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
def test_triton_backend_and_kernels_match_ar() -> None:
    """One small case through the Triton attention backend and the Triton loop kernels
    (interpreter): d2sd in both layouts with the oracle drafters."""
    family, num_tokens = "qwen3", 16
    prompt = random_prompts(1, seed=3)[0]
    expected = (
        Decoder(family_target(family), max_len=MAX_LEN)
        .generate(prompt, GenerationConfig(mode="ar", max_new_tokens=num_tokens))
        .tokens
    )
    triton_target = family_target(family, backend="triton")
    decoder = oracle_decoder(family, prompt, expected, corrupt_rate=0.3, target=triton_target)
    with ops.cpu_kernels():
        for layout in ("branches", "tree"):
            result = decoder.generate(prompt, config_for("d2sd", layout, num_tokens))
            assert result.tokens == expected, layout
