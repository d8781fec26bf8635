"""Microbenchmark: silu_mul (silu(gate) * up of a [gate; up] projection, HF's two roundings),
CUDA-graphed, against the torch reference sequence (chunk, silu, mul), also graphed.

Shapes: SmolLM2-135M (I 1536) and Qwen3-8B (I 12288), bf16, rows 1 (AR decode step), 16 (one
branch of gamma 16) and 80 (a verify step of 5 x 16).
GB/s counts bytes read + written: rows * 2I * 2 B (gate_up) + rows * I * 2 B (out);
roofline = those bytes at 4.3 TB/s.

python -m bench.kernels --only silu_mul [--quick]
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.silu_mul import silu_mul, silu_mul_ref

MODELS = {"smollm2-135m": 1536, "qwen3-8b": 12288}  # intermediate size I


def _measure(model: str, inter: int, rows: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter, device="cuda", generator=gen).bfloat16()
    silu_mul(gate_up)  # compile outside the graph capture
    silu_mul_ref(gate_up)
    num_bytes = rows * 2 * inter * 2 + rows * inter * 2
    return {
        "op": "silu_mul",
        "model": model,
        "I": inter,
        "rows": rows,
        **time_vs_ref(lambda: silu_mul(gate_up), lambda: silu_mul_ref(gate_up), num_bytes),
    }


def run(quick: bool) -> list[dict]:
    rows = [
        _measure(model, inter, num_rows)
        for model, inter in MODELS.items()
        for num_rows in ((1, 80) if quick else (1, 16, 80))
    ]
    print_table(
        "silu_mul (bf16; CUDA graph; µs median [p20, p80]; ref = torch silu * up, graphed)",
        rows,
        ["model", "I", "rows", *VS_REF_COLUMNS, "speedup_vs_ref"],
    )
    return rows


if __name__ == "__main__":
    run(quick=False)
