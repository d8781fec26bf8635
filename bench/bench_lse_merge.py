"""lse_merge microbenchmark: merge two bf16 attention states [N, H, D] (+ float32 LSEs).

`us` (p20/p80) is ours in a CUDA graph (a launch-bound kernel at decode sizes), `eager_us`
launched from Python. Bytes = o_a + o_b + o (bf16) + three float32 LSE vectors; `roof%` = H200
bandwidth roofline / `us`. Baselines: FlashInfer's merge_state (out of place, the same work),
eager and graphed; torch (the same formula as a chain of torch ops), eager.
`x_*` = baseline / ours on the same timing mode.
"""

from __future__ import annotations

import torch

from bench._flashinfer_ref import flashinfer_module
from bench._harness import print_table, roofline_us, time_us
from bench.bench_cascade_attention import REP_MS, _ratio, baseline
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
    graph = time_us(ours, cuda_graph=True, rep_ms=REP_MS)
    eager = time_us(ours, rep_ms=REP_MS)
    traffic = 3 * o_a.numel() * o_a.element_size() + 3 * 4 * lse_a.numel()
    roof = roofline_us(traffic, 0.0)
    fi_eager = fi_graph = None
    if fi is not None:

        def reference():
            return fi.merge_state(o_a, lse_a, o_b, lse_b)

        fi_eager = baseline(lambda: time_us(reference, rep_ms=REP_MS))
        fi_graph = baseline(lambda: time_us(reference, cuda_graph=True, rep_ms=REP_MS))
    torch_eager = time_us(lambda: merge_ref(o_a, lse_a, o_b, lse_b), rep_ms=REP_MS)
    return {
        "model": model, "N": tokens, "H": heads, "D": head_dim,
        "us": graph["us"], "p20_us": graph["p20_us"], "p80_us": graph["p80_us"],
        "eager_us": eager["us"], "GB/s": traffic / graph["us"] * 1e-3,
        "roof%": 100 * roof / graph["us"], "roofline_us": roof,
        "fi_us": fi_eager and fi_eager["us"], "x_fi": _ratio(fi_eager, eager),
        "fi_graph_us": fi_graph and fi_graph["us"], "x_fi_graph": _ratio(fi_graph, graph),
        "torch_us": torch_eager["us"], "x_torch": _ratio(torch_eager, eager),
    }  # fmt: skip


def run(quick: bool) -> list[dict]:
    fi = flashinfer_module()
    shapes = SHAPES[:2] if quick else SHAPES
    rows = [_measure(*shape, fi) for shape in shapes]
    print_table(
        "lse_merge: bf16 o, fp32 lse; us = CUDA graph; x_* = baseline / ours", rows, COLUMNS
    )
    return rows
