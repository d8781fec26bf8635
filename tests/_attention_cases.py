"""Shared inputs and tolerances for the attention-kernel tests (lse_merge, prefix, branch, cascade).

Tolerance rule (STYLE.md): the kernel's max error against the fp32 reference may be at most twice
the error torch itself makes computing the same thing in the input dtype, plus a tiny floor; in
fp32 the bound is a fixed 1e-5 relative. LSEs are float32 in every dtype (the scores are dots of
the same rounded inputs accumulated in fp32), so they get a fixed fp32-level bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import pack_mask
from tests.conftest import interpreting

DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
# The interpreter has no bf16; fp16 stands in for "a 16-bit dtype" there.
LOW_DTYPES = (torch.float16,) if interpreting() else (torch.bfloat16, torch.float16)


def assert_close_by_dtype(
    out: torch.Tensor,
    ref32: torch.Tensor,
    ref_low: torch.Tensor | None,
    dtype: torch.dtype,
    what: str = "o",
) -> None:
    """max|out - ref32| <= 2 * max|ref_low - ref32| + floor (fp32: 1e-5 relative to max|ref32|)."""
    out, ref32 = out.float(), ref32.float()
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out - ref32).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref32.abs().max().item() if ref32.numel() else 0.0)
    if dtype == torch.float32:
        bound = 1e-5 * scale
    else:
        assert ref_low is not None
        torch_err = (ref_low.float() - ref32).abs().max().item() if out.numel() else 0.0
        bound = 2 * torch_err + 1e-5 * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, what: str = "lse") -> None:
    """Same -inf pattern, finite values within fp32 accumulation error."""
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}"
    empty, ref_empty = lse == float("-inf"), ref == float("-inf")
    assert torch.equal(empty, ref_empty), f"{what}: -inf rows differ"
    assert not torch.isnan(lse).any(), f"{what}: NaN"
    if (~empty).any():
        a, b = lse[~empty], ref[~empty].float()
        err = (a - b).abs().max().item()
        bound = 2e-5 * max(1.0, b.abs().max().item())
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@dataclass
class Problem:
    """One cascade problem: B branches of T tokens over a shared prefix of `prefix_len` keys."""

    q: torch.Tensor  # [B, T, Hq, D]
    k_cache: torch.Tensor  # [max_len, Hkv, D]
    v_cache: torch.Tensor
    cache_len: torch.Tensor  # int32 [1]
    k_local: torch.Tensor  # [B, T, Hkv, D]
    v_local: torch.Tensor

    @property
    def prefix_len(self) -> int:
        return int(self.cache_len.item())


def make_problem(
    batch: int,
    seq: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    prefix_len: int,
    dtype: torch.dtype,
    *,
    max_len: int | None = None,
    device: str = DEVICE,
) -> Problem:
    """Random inputs; the cache holds garbage (large values) past `prefix_len` to catch overreads."""
    max_len = max_len if max_len is not None else prefix_len + 7

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    k_cache = torch.full((max_len, num_kv_heads, head_dim), 1e4, device=device).to(dtype)
    v_cache = torch.full((max_len, num_kv_heads, head_dim), 1e4, device=device).to(dtype)
    k_cache[:prefix_len] = randn(prefix_len, num_kv_heads, head_dim)
    v_cache[:prefix_len] = randn(prefix_len, num_kv_heads, head_dim)
    return Problem(
        q=randn(batch, seq, num_q_heads, head_dim),
        k_cache=k_cache,
        v_cache=v_cache,
        cache_len=torch.tensor([prefix_len], dtype=torch.int32, device=device),
        k_local=randn(batch, seq, num_kv_heads, head_dim),
        v_local=randn(batch, seq, num_kv_heads, head_dim),
    )


def random_tree_mask(
    seq: int, batch: int | None = None, *, empty_row: int | None = None, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tree over `seq` nodes (parent < child), as ancestor-or-self visibility.

    Returns (packed int32 [T, W] or [B, T, W], dense bool [T, T] or [B, T, T]); `empty_row` gets no
    visible key at all (a fully masked row).
    """
    shape = (batch,) if batch is not None else ()
    dense = torch.zeros(*shape, seq, seq, dtype=torch.bool)
    for idx in range(batch or 1):
        vis = dense[idx] if batch is not None else dense
        for node in range(seq):
            vis[node, node] = True
            if node > 0:
                parent = int(torch.randint(0, node, ()).item())
                vis[node] |= vis[parent]
    if empty_row is not None:
        dense[..., empty_row, :] = False
    dense = dense.to(device)
    return pack_mask(dense), dense
