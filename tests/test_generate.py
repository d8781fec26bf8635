"""The decoder's API and bookkeeping on the CPU: configs, stops, prompts, buffers, timings, steps.

Losslessness itself is in tests/test_lossless.py and tests/test_sampling_lossless.py; here the
targets are tiny (tests/tiny_models.py) and the drafts come from the oracle drafter there, so that
cycles emit several tokens and stops land inside a cycle.
"""

from __future__ import annotations

import functools
import types
from dataclasses import replace

import pytest
import torch

from d2sd import steps
from d2sd.errors import D2SDError
from d2sd.generate import (
    Decoder,
    GenerationConfig,
    assert_greedy_equal_up_to_near_tie,
    greedy_top2_gaps,
    near_tie_noise,
    non_greedy_tokens,
)
from d2sd.sampling import StopChecker, encode_prompt, eos_token_ids
from tests.test_lossless import GAMMA, GAMMA2, TOPK, OracleDrafter
from tests.tiny_models import tiny_drafter, tiny_target, tiny_tokenizer

NEW_TOKENS = 40


@functools.cache
def byte_target():
    """A tiny qwen3 with the byte-level test tokenizer (V = 320, EOS 258, so stop strings decode)."""
    hf, target = tiny_target("qwen3", vocab_size=320, num_hidden_layers=2, tap_layer_ids=(0, 1))
    hf.generation_config.eos_token_id = None
    return target


@functools.cache
def prompt_and_ar() -> tuple[list[int], list[int]]:
    target = byte_target()
    prompt = encode_prompt(target.tokenizer, "Count: one two three")
    tokens = Decoder(target, None, max_len=160).generate(
        prompt, GenerationConfig(mode="ar", max_new_tokens=NEW_TOKENS)
    )
    return prompt, tokens.tokens


def oracle_decoder(tokenizer=None, corrupt_rate: float = 0.1) -> Decoder:
    target = byte_target()
    prompt, expected = prompt_and_ar()
    inner = tiny_drafter(target, block_size=GAMMA, seed=1)
    reference = prompt + expected + [0] * (2 * GAMMA2 + 2)
    return Decoder(
        target,
        tokenizer,
        OracleDrafter(inner, reference, salt=1, corrupt_rate=corrupt_rate),
        OracleDrafter(inner, reference, salt=2, corrupt_rate=corrupt_rate),
        max_len=160,
    )


def spec_config(**overrides) -> GenerationConfig:
    fields = dict(
        mode="d2sd", block_size=GAMMA, block_size_2=GAMMA2, topk=TOPK, max_new_tokens=NEW_TOKENS
    )
    return GenerationConfig(**{**fields, **overrides})


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(mode="medusa"),
        dict(verify_layout="graph"),
        dict(block_size=1),
        dict(block_size=8, block_size_2=6),  # gamma2 < gamma
        dict(block_size=4, topk=4),  # more branches than branch points (gamma - 1)
        dict(topk=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(max_new_tokens=0),
    ],
)
def test_bad_configs_raise(fields: dict) -> None:
    with pytest.raises(D2SDError):
        GenerationConfig(**fields)


def test_config_defaults_follow_architecture() -> None:
    config = GenerationConfig(stop_strings=["\n\n"])
    assert (config.mode, config.block_size, config.block_size_2, config.topk) == ("d2sd", 16, 16, 4)
    assert config.verify_layout == "branches" and config.cuda_graphs and config.seed == 0
    assert config.stop_strings == ("\n\n",)  # a list becomes a tuple: configs stay hashable
    hash(config)


def test_missing_drafters_and_long_prompts_raise() -> None:
    target = byte_target()
    with pytest.raises(D2SDError, match="DFlash drafter"):
        Decoder(target, max_len=64).generate([1, 2, 3], spec_config(mode="dflash"))
    draft = tiny_drafter(target, block_size=GAMMA, seed=1)
    with pytest.raises(D2SDError, match="VP drafter"):
        Decoder(target, None, draft, max_len=64).generate([1, 2, 3], spec_config())
    with pytest.raises(D2SDError, match="max_len"):
        # 40 prompt + 20 new + 2 * 5 + 1 slack > 64
        Decoder(target, None, draft, draft, max_len=64).generate(
            list(range(40)), spec_config(max_new_tokens=20)
        )
    with pytest.raises(D2SDError, match="at least one token"):
        Decoder(target, max_len=64).generate([], GenerationConfig(mode="ar"))


# -- prompts and stops ---------------------------------------------------------------------------


def test_encode_prompt_applies_the_chat_template() -> None:
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, "hi")
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tokenizer, "hi", chat=False) == [ord("h"), ord("i")]
    tokenizer.chat_template = None
    assert encode_prompt(tokenizer, "hi") == [ord("h"), ord("i")]


def test_eos_ids_merge_tokenizer_and_generation_config() -> None:
    generation_config = types.SimpleNamespace(eos_token_id=[7, 258])
    assert eos_token_ids(tiny_tokenizer(), generation_config) == {7, 258}
    assert eos_token_ids(None, None) == frozenset()


def test_stop_checker() -> None:
    checker = StopChecker(eos_ids=[9], max_new_tokens=6)
    assert checker.first_stop([1, 2], 0) is None
    assert checker.first_stop([1, 2, 9], 2) == 3  # EOS as the last token of a cycle
    assert checker.first_stop([1, 9, 3, 9], 1) == 2  # the first EOS, the rest dropped
    assert checker.first_stop([1, 2, 3, 4, 5, 6, 7, 8], 4) == 6  # max_new_tokens
    tokenizer = tiny_tokenizer()
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    strings = StopChecker(stop_strings=["END"], max_new_tokens=50, tokenizer=tokenizer)
    assert strings.first_stop(ids("abc EN"), 0) is None
    # "END" straddles two cycles: found when the "D" arrives, kept up to and including it
    assert strings.first_stop(ids("abc END and more"), len(ids("abc EN"))) == len(ids("abc END"))
    with pytest.raises(ValueError):
        StopChecker(stop_strings=["x"], max_new_tokens=3)


@pytest.mark.parametrize("mode", ["ar", "dflash", "d2sd"])
def test_eos_truncates_inside_a_cycle(mode: str) -> None:
    """A token of the AR output declared EOS ends every mode right after its first occurrence,
    also when it is accepted in the middle of a cycle."""
    prompt, expected = prompt_and_ar()
    eos = expected[11]
    decoder = oracle_decoder()
    decoder.eos_ids = frozenset({eos})
    result = decoder.generate(prompt, spec_config(mode=mode))
    assert result.tokens == expected[: expected.index(eos) + 1]


@pytest.mark.parametrize("mode", ["ar", "d2sd"])
def test_stop_strings_truncate_at_the_completing_token(mode: str) -> None:
    prompt, expected = prompt_and_ar()
    tokenizer = byte_target().tokenizer
    stop = tokenizer.decode(expected[14:17])
    decoder = oracle_decoder(tokenizer)
    result = decoder.generate(prompt, spec_config(mode=mode, stop_strings=(stop,)))
    first = next(n for n in range(1, NEW_TOKENS + 1) if stop in tokenizer.decode(expected[:n]))
    assert result.tokens == expected[:first]


@pytest.mark.parametrize("stop", ["eos", "max_new_tokens"])
def test_run_ahead_cycles_are_dropped_at_a_stop(stop: str) -> None:
    """The CUDA loop queues one cycle before reading the last report; the same logic on the CPU:
    whatever the run-ahead cycle emits after the stop never reaches the output."""
    prompt, expected = prompt_and_ar()
    decoder = oracle_decoder()
    decoder.run_ahead = 1
    if stop == "eos":
        decoder.eos_ids = frozenset({expected[20]})
        expected = expected[: expected.index(expected[20]) + 1]
    config = spec_config(max_new_tokens=NEW_TOKENS if stop == "eos" else 23)
    assert decoder.generate(prompt, config).tokens == expected[: config.max_new_tokens]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_is_exact(max_new_tokens: int) -> None:
    prompt, expected = prompt_and_ar()
    result = oracle_decoder().generate(prompt, spec_config(max_new_tokens=max_new_tokens))
    assert result.tokens == expected[:max_new_tokens]
    if max_new_tokens == 1:  # the prefill's token alone: no cycle
        assert result.num_cycles == 0 and result.accept_lengths == []


# -- results, buffers, timings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "stages"),
    [
        ("ar", {"step"}),
        ("dflash", {"draft1", "verify", "accept_commit"}),
        ("d2sd", {"draft1", "select", "draft2", "verify", "accept_commit"}),
        ("dflash+samples", {"draft1", "select", "draft2", "verify", "accept_commit"}),
    ],
)
def test_result_bookkeeping(mode: str, stages: set[str]) -> None:
    prompt, expected = prompt_and_ar()
    result = oracle_decoder().generate(prompt, spec_config(mode=mode))
    assert result.tokens == expected
    assert set(result.stage_ms) == stages | {"prefill"}
    assert all(ms >= 0 for ms in result.stage_ms.values())
    assert result.num_cycles == len(result.accept_lengths) > 0
    # every cycle commits 1 .. T tokens; the last one may be cut by the stop
    block = 1 if mode == "ar" else GAMMA if mode == "dflash" else GAMMA2
    assert all(1 <= n <= block for n in result.accept_lengths)
    assert 0 <= sum(result.accept_lengths) + 1 - len(result.tokens) < block
    assert result.wall_s >= sum(result.stage_ms.values()) / 1e3 * 0.5
    assert result.mean_accept_length == sum(result.accept_lengths) / result.num_cycles


def test_buffers_are_reused_and_regrown_across_configs() -> None:
    """One decoder, alternating shapes (a larger K reallocates the caches): outputs stay exact."""
    prompt, expected = prompt_and_ar()
    decoder = oracle_decoder(corrupt_rate=0.3)
    for config in (
        spec_config(),
        spec_config(mode="dflash"),
        spec_config(topk=1, verify_layout="tree"),
        spec_config(block_size=5, block_size_2=7, topk=4, verify_layout="tree"),
        spec_config(mode="ar"),
        spec_config(),
    ):
        assert decoder.generate(prompt, config).tokens == expected, config


def test_sampling_is_seeded() -> None:
    prompt, _ = prompt_and_ar()
    decoder = oracle_decoder()
    runs = [
        decoder.generate(prompt, spec_config(temperature=1.0, seed=seed)).tokens
        for seed in (5, 5, 6)
    ]
    assert runs[0] == runs[1] != runs[2]


# -- steps ---------------------------------------------------------------------------------------


def test_candidates_pad_the_first_draft_and_stack_the_branches() -> None:
    anchor = torch.tensor([7])
    drafts = torch.tensor([1, 2, 3])
    branches = torch.tensor([[7, 4, 4, 4, 4, 4], [7, 1, 5, 5, 5, 5]])
    cand = steps.candidates(anchor, drafts, branches, 6, mask_token_id=99)
    assert cand.tolist() == [[7, 1, 2, 3, 99, 99], *branches.tolist()]
    assert steps.candidates(anchor, drafts, None, 4, 99).tolist() == [[7, 1, 2, 3]]


def test_second_draft_keeps_the_visible_prefix() -> None:
    """Branch k keeps anchor, t_1 .. t_{i_k} whatever the VP drafter predicts there."""
    vp_input = torch.tensor([[7, 99, 99, 99], [7, 1, 2, 99]])
    selection = steps.Selection(
        draft_tokens=torch.tensor([1, 2, 3]),
        confidence=torch.ones(3),
        r=torch.ones(3),
        branch_len=torch.tensor([0, 2], dtype=torch.int32),
        vp_input_ids=vp_input,
    )

    class Constant:
        def forward(self, input_ids, positions, cache):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[..., 8] = 1.0
            return logits

    branches = steps.draft2(Constant(), None, selection, torch.tensor([5], dtype=torch.int32))
    assert branches.tolist() == [[7, 8, 8, 8], [7, 1, 2, 8]]


def test_sampled_branches_follow_the_first_draft_distribution() -> None:
    """dflash+samples: past the visible prefix, branch tokens are draws from softmax(draft logits)
    (frequencies within 5 binomial sigmas), the prefix is kept and positions past gamma-1 are MASK."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -3.0]]])
    selection = steps.Selection(
        draft_tokens=torch.tensor([3, 0]),
        confidence=torch.ones(2),
        r=torch.ones(2),
        branch_len=torch.tensor([0, 1], dtype=torch.int32),
        vp_input_ids=torch.tensor([[7, 9, 9, 9], [7, 3, 9, 9]]),
    )
    num_draws = 4000
    uniforms = torch.rand(num_draws, 2, 2, generator=torch.Generator().manual_seed(3))
    rows = torch.stack(
        [
            steps.sample_branches(logits, selection, uniforms, torch.tensor([c]), mask_token_id=9)
            for c in range(num_draws)
        ]
    )
    assert (rows[:, :, 0] == 7).all() and (rows[:, 1, 1] == 3).all() and (rows[:, :, 3] == 9).all()
    for position, samples in ((1, rows[:, 0, 1]), (2, rows[:, 0, 2]), (2, rows[:, 1, 2])):
        probs = logits[0, position].softmax(-1)
        frequency = torch.bincount(samples, minlength=4).double() / num_draws
        sigma = (probs * (1 - probs) / num_draws).sqrt()
        assert ((frequency - probs).abs() <= 5 * sigma + 1e-9).all(), (position, frequency, probs)


# -- the bf16 comparison helper ------------------------------------------------------------------


def test_near_tie_comparison() -> None:
    reference = [1, 2, 3, 4, 5]
    gaps = torch.tensor([1.0, 1.0, 0.01, 1.0, 1.0])
    # a difference at or after the first near tie is allowed; the count says what was compared
    assert assert_greedy_equal_up_to_near_tie(reference, [1, 2, 9, 9, 9], gaps, 0.1) == 2
    assert assert_greedy_equal_up_to_near_tie(reference, reference, gaps * 100, 0.1) == 5
    assert assert_greedy_equal_up_to_near_tie(reference, [1, 2], gaps * 100, 0.1) == 2
    with pytest.raises(AssertionError, match="mismatch at new token 1"):
        assert_greedy_equal_up_to_near_tie(reference, [1, 9, 3, 4, 5], gaps, 0.1)
    assert near_tie_noise(torch.bfloat16, 10.0) == pytest.approx(4 * 2**-7 * 10)


def test_top2_gaps_follow_the_ar_argmax() -> None:
    """Teacher-forced gaps are positive (greedy picked the top token) and there is one per token."""
    target = byte_target()
    prompt, expected = prompt_and_ar()
    gaps, scale = greedy_top2_gaps(target, prompt, expected)
    assert gaps.shape == scale.shape == (len(expected),)
    assert (gaps >= 0).all() and (scale > 0).all()
    noise = near_tie_noise(torch.float32, 1.0) * scale
    assert assert_greedy_equal_up_to_near_tie(expected, expected, gaps, noise) == len(expected)


def test_non_greedy_tokens_accepts_ar_and_flags_a_wrong_token() -> None:
    """AR's own output and a lossless d2sd output have no token off the target's argmax; one
    changed token is caught (there, and wherever the changed context moves the argmax after it)."""
    target = byte_target()
    prompt, expected = prompt_and_ar()
    assert non_greedy_tokens(target, prompt, expected) == 0
    result = oracle_decoder().generate(prompt, spec_config())
    assert non_greedy_tokens(target, prompt, result.tokens) == 0
    gaps, _ = greedy_top2_gaps(target, prompt, expected)
    index = int(gaps[5:].argmax()) + 5  # a confident position: any other token is far below
    wrong = list(expected)
    wrong[index] = (wrong[index] + 1) % 256
    assert non_greedy_tokens(target, prompt, wrong) >= 1
    assert non_greedy_tokens(target, prompt, []) == 0


class _HostSyncingBackend:
    """A backend like FlashInfer's that reads device values on the host (not capturable)."""

    name = "syncing"
    graph_capturable = False

    def __init__(self, inner) -> None:
        self.inner = inner

    def cascade(self, *args, **kwargs):
        return self.inner.cascade(*args, **kwargs)


def test_a_backend_that_cannot_be_captured_turns_graphs_off() -> None:
    target = byte_target()
    prompt, expected = prompt_and_ar()
    decoder = oracle_decoder()
    assert decoder.graph_capturable
    original = target.backend
    try:
        target.backend = _HostSyncingBackend(original)
        decoder = oracle_decoder()
        assert not decoder.graph_capturable
        assert decoder.generate(prompt, spec_config(cuda_graphs=True)).tokens == expected
        assert set(decoder._graphs) == {False}  # the step runner asked for was the eager one
    finally:
        target.backend = original


# -- warm-up -------------------------------------------------------------------------------------


def test_warm_up_lengths_meet_every_row_bucket() -> None:
    """Every prompt length (prefill chunk or drafter context extension), for every GQA group,
    falls into an autotuning row bucket that one of the warm-up lengths also falls into."""
    from d2sd.generate import WARM_UP_PROMPT_LENS
    from kernels._attention import rows_bucket

    for group in range(1, 17):
        warmed = {rows_bucket(length * group) for length in WARM_UP_PROMPT_LENS}
        missing = [n for n in range(1, 2049) if rows_bucket(n * group) not in warmed]
        assert not missing, f"group {group}: lengths {missing[:5]} meet an unwarmed bucket"


def test_warm_up_fits_max_len_and_leaves_generation_exact() -> None:
    prompt, expected = prompt_and_ar()
    decoder = oracle_decoder()
    config = spec_config()
    lengths = decoder.warm_up_prompt_lens(replace(config, max_new_tokens=2))
    slack = (1 + decoder.run_ahead) * GAMMA2 + 1  # d2sd's branch length is gamma2
    assert lengths and max(lengths) + 2 + slack <= decoder.max_len
    assert len(lengths) < 20, "max_len 160 cannot fit the longest warm-up prompts"
    decoder.warm_up(prompt, config)
    assert decoder.generate(prompt, config).tokens == expected
