"""prefix_attention microbenchmark: all B*T queries against a shared prefix of L keys, bf16.

`us` (p20/p80) is ours in a CUDA graph, `eager_us` launched from Python. Bytes = prefix K/V read
once + q + o (fp32) + lse; FLOPs = 4 * B*T * Hq * D * L; `roof%` = H200 roofline / `us`.
Baseline `fi`: FlashInfer's single_prefill_with_kv_cache of the B*T queries, non-causal, with LSE
(step 1 of the reference sequence), eager (`x_fi` vs our eager) and graphed (`x_fi_graph`).
`err_fi` = max |ours - FlashInfer| (smoke check). Caches are allocated at max_len = L + PAD.
"""

from __future__ import annotations

import itertools

import torch

from bench._flashinfer_ref import flashinfer_module, prefix_prefill
from bench._harness import print_table, roofline_us, time_us
from bench.bench_cascade_attention import (
    BATCHES,
    HEADS,
    REP_MS,
    SEQS,
    _ratio,
    attention_flops,
    baseline,
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
    graph = time_us(ours, cuda_graph=True, rep_ms=REP_MS)
    eager = time_us(ours, rep_ms=REP_MS)
    elt = x.q.element_size()
    traffic = (
        elt * 2 * prefix_len * x.k_cache.shape[1] * x.k_cache.shape[2]
        + elt * x.q.numel()
        + 4 * x.q.numel()  # o in fp32
        + 4 * x.q.numel() // x.q.shape[3]  # lse
    )
    roof = roofline_us(traffic, attention_flops(x, prefix_len))
    fi_eager = fi_graph = err = None
    if fi is not None:
        err = baseline(lambda: (out - reference()[0].float()).abs().max().item())
        fi_eager = baseline(lambda: time_us(reference, rep_ms=REP_MS))
        fi_graph = baseline(lambda: time_us(reference, cuda_graph=True, rep_ms=REP_MS))
    return {
        "model": model, "B": batch, "T": seq, "L": prefix_len,
        "us": graph["us"], "p20_us": graph["p20_us"], "p80_us": graph["p80_us"],
        "eager_us": eager["us"], "GB/s": traffic / graph["us"] * 1e-3,
        "roof%": 100 * roof / graph["us"], "roofline_us": roof,
        "fi_us": fi_eager and fi_eager["us"], "x_fi": _ratio(fi_eager, eager),
        "fi_graph_us": fi_graph and fi_graph["us"], "x_fi_graph": _ratio(fi_graph, graph),
        "err_fi": err,
    }  # fmt: skip


def run(quick: bool) -> list[dict]:
    fi = flashinfer_module()
    rows = []
    for model, batch, seq, prefix_len in shapes(quick):
        rows.append(_measure(model, batch, seq, prefix_len, fi))
        torch.cuda.empty_cache()
    print_table("prefix_attention: bf16; us = CUDA graph; x_* = baseline / ours", rows, COLUMNS)
    return rows
