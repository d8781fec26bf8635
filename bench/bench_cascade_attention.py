"""cascade_attention microbenchmark: one layer's verify attention, B branches x T tokens over a
shared prefix of L keys, bf16, causal branch-local keys.

Columns: `us` (p20/p80) is ours replayed in a CUDA graph (how decode steps run); `eager_us`
launched from Python. Throughput: bytes = prefix K/V read once + q + local K/V + o (our count of
the unavoidable traffic); FLOPs = 4 * B*T * Hq * D * (L + T); `roof%` = the H200 roofline
(bench/_harness.roofline_us) over `us`. Baselines, each as a speedup `x_*` = its time / ours:
- `fi`: the reference code's FlashInfer sequence (one shared single_prefill over all B*T queries
  + per branch a local causal prefill and merge_state_in_place), eager and in a CUDA graph
  (`x_fi` compares eager with eager, `x_fi_graph` graph with graph);
- `ml`: FlashInfer's MultiLevelCascadeAttentionWrapper (two levels over a paged copy; plan() is
  outside the timing), eager, against our eager time;
- `sdpa`: torch scaled_dot_product_attention over [prefix | local] keys per branch with an
  explicit bool mask (the concatenated K/V are built outside the timing), against our eager time.
`err_fi` = max |ours - FlashInfer sequence| (a smoke check; the tests hold the real tolerances).
Every prefix cache is allocated at max_len = L + PAD with a device cache_len, as in decoding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench._flashinfer_ref import MultiLevelCascade, cascade_sequence, run_vs_flashinfer
from bench._harness import baseline, time_baseline, time_ours
from kernels.cascade_attention import cascade_attention

# name -> (Hq, Hkv, head_dim)
HEADS = {"qwen3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
BATCHES = (1, 5, 9)
SEQS = (16, 32)
PREFIX_LENS = (0, 511, 2048, 8192, 32768)
PAD = 256  # free cache rows beyond the prefix, as in a decode loop
REP_MS = 50
DTYPE = torch.bfloat16

COLUMNS = (
    "model", "B", "T", "L", "us", "p20_us", "p80_us", "eager_us", "GB/s", "roof%",
    "fi_us", "x_fi", "fi_graph_us", "x_fi_graph", "ml_us", "x_ml", "sdpa_us", "x_sdpa", "err_fi",
)  # fmt: skip


@dataclass
class Inputs:
    q: torch.Tensor  # [B, T, Hq, D]
    k_cache: torch.Tensor  # [max_len, Hkv, D]
    v_cache: torch.Tensor
    cache_len: torch.Tensor  # int32 [1]
    k_local: torch.Tensor  # [B, T, Hkv, D]
    v_local: torch.Tensor
    prefix_len: int

    @property
    def k_prefix(self) -> torch.Tensor:
        return self.k_cache[: self.prefix_len]

    @property
    def v_prefix(self) -> torch.Tensor:
        return self.v_cache[: self.prefix_len]


def make_inputs(model: str, batch: int, seq: int, prefix_len: int) -> Inputs:
    """Random bf16 inputs on the GPU; the cache has PAD spare rows past the prefix."""
    num_q_heads, num_kv_heads, head_dim = HEADS[model]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).to(DTYPE)

    max_len = prefix_len + PAD
    return Inputs(
        q=randn(batch, seq, num_q_heads, head_dim),
        k_cache=randn(max_len, num_kv_heads, head_dim),
        v_cache=randn(max_len, num_kv_heads, head_dim),
        cache_len=torch.tensor([prefix_len], dtype=torch.int32, device="cuda"),
        k_local=randn(batch, seq, num_kv_heads, head_dim),
        v_local=randn(batch, seq, num_kv_heads, head_dim),
        prefix_len=prefix_len,
    )


def traffic_bytes(x: Inputs) -> int:
    """Prefix K/V read once + q + local K/V + o."""
    elt = x.q.element_size()
    prefix = 2 * x.prefix_len * x.k_cache.shape[1] * x.k_cache.shape[2]
    return elt * (prefix + 2 * x.q.numel() + 2 * x.k_local.numel())


def attention_flops(x: Inputs, num_keys: int) -> float:
    """4 * queries * Hq * D * keys (QK^T and PV, 2 FLOPs per multiply-add)."""
    batch, seq, num_q_heads, head_dim = x.q.shape
    return 4.0 * batch * seq * num_q_heads * head_dim * num_keys


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    if quick:  # the targets' shape (Qwen3-8B heads, 5 x 16) plus one wide batch
        return [("qwen3-8b", 5, 16, n) for n in (0, 2048, 8192, 32768)] + [
            ("qwen3-8b", 9, 32, 2048)
        ]
    return list(itertools.product(HEADS, BATCHES, SEQS, PREFIX_LENS))


def _sdpa_inputs(x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, T, D] queries, [B, Hkv, L + T, D] keys/values and a bool [B, 1, T, L + T] mask."""
    batch, seq = x.q.shape[:2]
    k = torch.cat([x.k_prefix.expand(batch, -1, -1, -1), x.k_local], dim=1)
    v = torch.cat([x.v_prefix.expand(batch, -1, -1, -1), x.v_local], dim=1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    prefix = torch.ones(seq, x.prefix_len, dtype=torch.bool, device="cuda")
    mask = torch.cat([prefix, causal], dim=1).expand(batch, 1, -1, -1)
    return (
        x.q.transpose(1, 2).contiguous(),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        mask,
    )


def _multilevel(x: Inputs) -> Callable[[], object]:
    """FlashInfer's two-level cascade over x, planned and run once (both outside the timings)."""
    cascade = MultiLevelCascade(
        x.k_prefix, x.v_prefix, x.k_local, x.v_local, x.q.shape[2], causal=True
    )
    q_flat = x.q.flatten(0, 1)
    cascade.run(q_flat)
    return lambda: cascade.run(q_flat)


def _sdpa(x: Inputs) -> Callable[[], object]:
    q, k, v, mask = _sdpa_inputs(x)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _measure(model: str, batch: int, seq: int, prefix_len: int, fi: object | None) -> dict:
    x = make_inputs(model, batch, seq, prefix_len)

    def ours():
        return cascade_attention(
            x.q, x.k_cache, x.v_cache, x.cache_len, x.k_local, x.v_local, causal=True
        )

    def reference():
        return cascade_sequence(x.q, x.k_prefix, x.v_prefix, x.k_local, x.v_local, causal=True)

    out = ours()  # compile + autotune outside the timings
    timed = time_ours(
        ours,
        bytes_moved=traffic_bytes(x),
        flops=attention_flops(x, prefix_len + seq),
        rep_ms=REP_MS,
    )
    with_fi = fi is not None
    err = None
    if with_fi:
        err = baseline(lambda: (out.float() - torch.stack(reference()).float()).abs().max().item())
    # the baselines are timed in column order: fi (eager, graphed), ml, sdpa
    row = {"model": model, "B": batch, "T": seq, "L": prefix_len, **timed}
    row |= time_baseline("fi", timed, reference if with_fi else None, rep_ms=REP_MS, graphed=True)
    multilevel = (lambda: _multilevel(x)) if with_fi and prefix_len > 0 else None
    row |= time_baseline("ml", timed, build=multilevel, rep_ms=REP_MS)
    row |= time_baseline("sdpa", timed, build=lambda: _sdpa(x), rep_ms=REP_MS)
    row["err_fi"] = err
    return row


def run(quick: bool) -> list[dict]:
    return run_vs_flashinfer(
        "cascade_attention: bf16, causal local; us = CUDA graph; x_* = baseline / ours",
        COLUMNS,
        shapes(quick),
        _measure,
    )
