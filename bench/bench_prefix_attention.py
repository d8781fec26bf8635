"""prefix_attention microbenchmark: all B*T queries against a shared prefix of L keys, bf16.

`us` (p20/p80) is ours in a CUDA graph, `eager_us` launched from Python. Bytes = prefix K/V read
once + q + o (fp32) + lse; FLOPs = 4 * B*T * Hq * D * L; `roof%` = H200 roofline / `us`.
Baseline `fi`: FlashInfer's single_prefill_with_kv_cache of the B*T queries, non-causal, with LSE
(step 1 of the reference sequence), eager (`x_fi` vs our eager) and graphed (`x_fi_graph`).
`err_fi` = max |ours - FlashInfer| (smoke check). Caches are allocated at max_len = L + PAD.
"""

from __future__ import annotations

import itertools

from bench._flashinfer_ref import prefix_prefill, run_vs_flashinfer
from bench._harness import baseline, time_baseline, time_ours
from bench.bench_cascade_attention import (
    BATCHES,
    HEADS,
    REP_MS,
    SEQS,
    attention_flops,
    make_inputs,
)
from kernels.prefix_attention import prefix_attention

PREFIX_LENS = (511, 2048, 8192, 32768)
COLUMNS = (
    "model", "B", "T", "L", "us", "p20_us", "p80_us", "eager_us", "GB/s", "roof%",
    "fi_us", "x_fi", "fi_graph_us", "x_fi_graph", "err_fi",
)  # fmt: skip


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    if quick:
        return [("qwen3-8b", 5, 16, n) for n in (2048, 32768)]
    return list(itertools.product(HEADS, BATCHES, SEQS, PREFIX_LENS))


def _measure(model: str, batch: int, seq: int, prefix_len: int, fi: object | None) -> dict:
    x = make_inputs(model, batch, seq, prefix_len)

    def ours():
        return prefix_attention(x.q, x.k_cache, x.v_cache, x.cache_len)

    def reference():
        return prefix_prefill(x.q, x.k_prefix, x.v_prefix)

    out, _ = ours()
    elt = x.q.element_size()
    traffic = (
        elt * 2 * prefix_len * x.k_cache.shape[1] * x.k_cache.shape[2]
        + elt * x.q.numel()
        + 4 * x.q.numel()  # o in fp32
        + 4 * x.q.numel() // x.q.shape[3]  # lse
    )
    timed = time_ours(
        ours, bytes_moved=traffic, flops=attention_flops(x, prefix_len), rep_ms=REP_MS
    )
    with_fi = fi is not None
    err = None
    if with_fi:
        err = baseline(lambda: (out - reference()[0].float()).abs().max().item())
    row = {"model": model, "B": batch, "T": seq, "L": prefix_len, **timed}
    row |= time_baseline("fi", timed, reference if with_fi else None, rep_ms=REP_MS, graphed=True)
    row["err_fi"] = err
    return row


def run(quick: bool) -> list[dict]:
    return run_vs_flashinfer(
        "prefix_attention: bf16; us = CUDA graph; x_* = baseline / ours",
        COLUMNS,
        shapes(quick),
        _measure,
    )
