"""lse_merge microbenchmark: merge two bf16 attention states [N, H, D] (+ float32 LSEs).

`us` (p20/p80) is ours in a CUDA graph (a launch-bound kernel at decode sizes), `eager_us`
launched from Python. Bytes = o_a + o_b + o (bf16) + three float32 LSE vectors; `roof%` = H200
bandwidth roofline / `us`. Baselines: FlashInfer's merge_state (out of place, the same work),
eager and graphed; torch (the same formula as a chain of torch ops), eager.
`x_*` = baseline / ours on the same timing mode.
"""

from __future__ import annotations

import torch

from bench._flashinfer_ref import run_vs_flashinfer
from bench._harness import time_baseline, time_ours
from bench.bench_cascade_attention import REP_MS
from kernels._attention import merge_ref
from kernels.lse_merge import lse_merge

# (name, tokens N, heads H, head_dim D): verify step of Qwen3-8B / SmolLM2 (80 = 5 x 16 tokens),
# and a prefill-sized merge
SHAPES = (
    ("qwen3-8b", 80, 32, 128),
    ("smollm2", 80, 9, 64),
    ("qwen3-8b", 1024, 32, 128),
    ("qwen3-8b", 16384, 32, 128),
)
COLUMNS = (
    "model", "N", "H", "D", "us", "p20_us", "p80_us", "eager_us", "GB/s", "roof%",
    "fi_us", "x_fi", "fi_graph_us", "x_fi_graph", "torch_us", "x_torch",
)  # fmt: skip


def _measure(model: str, tokens: int, heads: int, head_dim: int, fi: object | None) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (tokens, heads, head_dim)
    o_a = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    o_b = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    lse_a = torch.randn(shape[:2], device="cuda", generator=gen) * 3
    lse_b = torch.randn(shape[:2], device="cuda", generator=gen) * 3

    def ours():
        return lse_merge(o_a, lse_a, o_b, lse_b)

    ours()
    traffic = 3 * o_a.numel() * o_a.element_size() + 3 * 4 * lse_a.numel()
    timed = time_ours(ours, bytes_moved=traffic, flops=0.0, rep_ms=REP_MS)
    reference = None if fi is None else lambda: fi.merge_state(o_a, lse_a, o_b, lse_b)
    row = {"model": model, "N": tokens, "H": heads, "D": head_dim, **timed}
    row |= time_baseline("fi", timed, reference, rep_ms=REP_MS, graphed=True)
    row |= time_baseline("torch", timed, lambda: merge_ref(o_a, lse_a, o_b, lse_b), rep_ms=REP_MS)
    return row


def run(quick: bool) -> list[dict]:
    return run_vs_flashinfer(
        "lse_merge: bf16 o, fp32 lse; us = CUDA graph; x_* = baseline / ours",
        COLUMNS,
        SHAPES[:2] if quick else SHAPES,
        _measure,
    )
