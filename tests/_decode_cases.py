"""Shared pieces of the decoding tests (test_lossless, test_sampling_lossless).

`ScriptedDrafter`: the base of the tests' hand-written drafters. It borrows a real tiny drafter
(`inner`) for what the Decoder asks of a drafter besides its logits (mask id, tapped target
layers, cache allocation), and its context extension only advances the cache length: the
subclass's `forward` computes the logits from the ids and positions alone.
"""

from __future__ import annotations

import torch


class ScriptedDrafter(torch.nn.Module):
    """A drafter whose logits a subclass's `forward(input_ids [B, L], positions, cache) -> [B, L, V]`
    scripts; caches and ids come from the wrapped real drafter `inner`."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def mask_token_id(self) -> int:
        return self.inner.mask_token_id

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.inner.target_layer_ids

    def allocate_cache(self, max_len: int, batch: int = 1, block_size: int | None = None):
        return self.inner.allocate_cache(max_len, batch, block_size)

    def extend_context(self, ctx_hidden, positions, cache, num_valid) -> None:
        cache.cache_len.add_(num_valid)
