"""Seeded uniforms, prompt encoding and stop handling for the decode loop.

Uniforms. Every random choice of a generation comes from pre-drawn tables, so that a decode step
holds no RNG state of its own and can be replayed from a CUDA graph:
- `target_uniforms(seed, rows, width)`: the target's draws. Row 0, column 0 samples the first new
  token (from the prompt's last logits); row `1 + c` is cycle `c` (AR step `c`), one uniform per
  depth (`width` = the verify block length; AR reads column 0). A cycle reads a row that no other
  cycle reads, so draws are fresh across cycles, and within a cycle one draw serves one depth
  (the nodes alive at a depth share it: see DESIGN.md, "Lossless").
- `branch_uniforms(seed, rows, num_branches, width)`: the `dflash+samples` ablation's draws for
  sampling its extra branches from the first draft. A second generator on a derived seed: the tree
  must never depend on the target's draws.
Tables are drawn on the CPU (the same seed gives the same draws on every device) and copied once.

Stops. A generation ends at the first EOS id, at the first token that completes a stop string, or at
`max_new_tokens`, whichever comes first; the output keeps that token (EOS included, as HF
`generate` does) and nothing after it. Stop strings are matched on the host, between cycles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "StopChecker",
    "branch_uniforms",
    "encode_prompt",
    "eos_token_ids",
    "target_uniforms",
]

# Added to the seed for the ablation's branch sampler; any fixed odd constant keeps the two streams
# distinct, and torch.Generator's Philox/MT19937 streams of distinct seeds are independent in practice.
_BRANCH_SEED_OFFSET = 0x9E3779B1


def target_uniforms(seed: int, rows: int, width: int, device: torch.device | str) -> torch.Tensor:
    """The target's uniforms: float32 `[rows, width]` in [0, 1) on `device`, from `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(rows, width, generator=generator, dtype=torch.float32).to(device)


def branch_uniforms(
    seed: int, rows: int, num_branches: int, width: int, device: torch.device | str
) -> torch.Tensor:
    """The ablation's branch-sampling uniforms: float32 `[rows, num_branches, width]` in [0, 1),
    from a generator independent of `target_uniforms(seed, ...)`."""
    generator = torch.Generator(device="cpu").manual_seed(seed + _BRANCH_SEED_OFFSET)
    table = torch.rand(rows, num_branches, width, generator=generator, dtype=torch.float32)
    return table.to(device)


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids of `text` as one user turn under the tokenizer's chat template (with the assistant
    header appended) when `chat` and the tokenizer has a template; else the plain encoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding by default (return_dict=True); 4.x a list
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def eos_token_ids(tokenizer: Any = None, generation_config: Any = None) -> frozenset[int]:
    """The EOS ids of a tokenizer and (optionally) of a model's generation config; ints or lists."""
    ids: set[int] = set()
    for source in (tokenizer, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, Iterable) else (value,)))
    return frozenset(ids)


class StopChecker:
    """Finds where a growing token sequence must end (EOS, stop strings, `max_new_tokens`).

    `first_stop(tokens, num_checked)` looks only at the tokens after the first `num_checked` (the
    earlier ones were checked at a previous cycle and held no stop) and returns the length to
    truncate to (the stop token included), or None. Stop strings need the tokenizer: each check
    decodes a window that starts far enough back to hold the longest stop string.
    """

    def __init__(
        self,
        *,
        eos_ids: Iterable[int] = (),
        stop_strings: Sequence[str] = (),
        max_new_tokens: int,
        tokenizer: Any = None,
    ) -> None:
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the output")
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        # a token decodes to at least one character except for rare special/partial-byte tokens;
        # the margin covers those, and a check that starts too far back only costs decode time
        self._lookback = max((len(s) for s in self.stop_strings), default=0) + 8

    def first_stop(self, tokens: Sequence[int], num_checked: int) -> int | None:
        """Length of `tokens` up to and including the first stop at index >= `num_checked`; None
        if there is none and fewer than `max_new_tokens` tokens exist."""
        end = min(len(tokens), self.max_new_tokens)
        stopped = end >= self.max_new_tokens
        for index in range(num_checked, end):
            if tokens[index] in self.eos_ids:
                end, stopped = index + 1, True
                break
        if self.stop_strings and end > num_checked:
            hit = self._first_stop_string(tokens, num_checked, end)
            if hit is not None:
                return hit
        return end if stopped else None

    def _first_stop_string(self, tokens: Sequence[int], num_checked: int, end: int) -> int | None:
        start = max(0, num_checked - self._lookback)

        def holds_stop(length: int) -> bool:
            text = self.tokenizer.decode(list(tokens[start:length]), skip_special_tokens=False)
            return any(stop in text for stop in self.stop_strings)

        if not holds_stop(end):
            return None
        # the shortest prefix holding a stop; decoding each candidate length keeps multi-token
        # characters (byte-level BPE) and stops that straddle cycles exact
        for length in range(max(num_checked, start) + 1, end + 1):
            if holds_stop(length):
                return length
        return end
