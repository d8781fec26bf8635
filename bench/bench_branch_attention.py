"""branch_attention microbenchmark: each branch's T queries against its T local keys (causal),
merged into an incoming bf16 prefix state, bf16.

`us` (p20/p80) is ours in a CUDA graph, `eager_us` launched from Python. Bytes = q + local K/V +
prefix o + prefix lse + o + lse; FLOPs = 4 * B*T * Hq * D * T; `roof%` = H200 roofline / `us`.
Baseline `fi`: per branch FlashInfer's single_prefill_with_kv_cache (causal, with LSE) +
merge_state_in_place of the prefix state (step 2 of the reference sequence), eager (`x_fi` vs our
eager) and graphed (`x_fi_graph`). `err_fi` = max |ours - FlashInfer| (smoke check).
"""

from __future__ import annotations

import itertools

import torch

from bench._flashinfer_ref import branch_sequence, run_vs_flashinfer
from bench._harness import baseline, time_baseline, time_ours
from bench.bench_cascade_attention import (
    BATCHES,
    HEADS,
    REP_MS,
    attention_flops,
    make_inputs,
)
from kernels.branch_attention import branch_attention

SEQS = (16, 32, 64)
COLUMNS = (
    "model", "B", "T", "us", "p20_us", "p80_us", "eager_us", "GB/s", "roof%",
    "fi_us", "x_fi", "fi_graph_us", "x_fi_graph", "err_fi",
)  # fmt: skip


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [("qwen3-8b", 5, 16), ("smollm2", 5, 16)]
    return list(itertools.product(HEADS, BATCHES, SEQS))


def _measure(model: str, batch: int, seq: int, fi: object | None) -> dict:
    x = make_inputs(model, batch, seq, 0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    prefix_o = torch.randn(x.q.shape, device="cuda", generator=gen).to(x.q.dtype)
    prefix_lse = torch.randn(x.q.shape[:3], device="cuda", generator=gen) * 3 + 4

    def ours():
        return branch_attention(
            x.q, x.k_local, x.v_local, causal=True, prefix_o=prefix_o, prefix_lse=prefix_lse,
            return_lse=True,
        )  # fmt: skip

    def reference():
        return branch_sequence(x.q, x.k_local, x.v_local, prefix_o, prefix_lse, causal=True)

    out, _ = ours()
    elt = x.q.element_size()
    traffic = elt * (3 * x.q.numel() + 2 * x.k_local.numel()) + 4 * 2 * prefix_lse.numel()
    timed = time_ours(ours, bytes_moved=traffic, flops=attention_flops(x, seq), rep_ms=REP_MS)
    with_fi = fi is not None
    err = None
    if with_fi:
        err = baseline(lambda: (out.float() - reference()[0].float()).abs().max().item())
    row = {"model": model, "B": batch, "T": seq, **timed}
    row |= time_baseline("fi", timed, reference if with_fi else None, rep_ms=REP_MS, graphed=True)
    row["err_fi"] = err
    return row


def run(quick: bool) -> list[dict]:
    return run_vs_flashinfer(
        "branch_attention: bf16, causal, bf16 prefix state; us = CUDA graph; x_* = baseline / ours",
        COLUMNS,
        shapes(quick),
        _measure,
    )
