"""Microbenchmark: rms_norm (HF RMSNorm rounding, optionally after the residual add), CUDA-graphed,
against the torch reference sequence (HF's forward: cast, pow, mean, add, rsqrt, mul, cast, mul,
plus the add), also graphed.

Shapes: SmolLM2-135M (H 576) and Qwen3-8B (H 4096), bf16, rows 1 (AR decode step), 16 (one
branch of gamma 16) and 80 (a verify step of 5 x 16), residual on and off.
GB/s counts bytes read + written: rows * H * 2 B * (2, or 4 with the residual: x, out, + residual,
s) + H * 2 B (weight); roofline = those bytes at 4.3 TB/s.

python -m bench.kernels --only rms_norm [--quick]
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.rms_norm import rms_norm, rms_norm_ref

MODELS = {"smollm2-135m": 576, "qwen3-8b": 4096}  # hidden size
EPS = 1e-6


def _measure(model: str, hidden: int, rows: int, with_residual: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).bfloat16()
    residual = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    residual = residual if with_residual else None

    def ours():
        return rms_norm(x, weight, EPS, residual)

    def ref():
        return rms_norm_ref(x, weight, EPS, residual)

    ours()  # compile outside the graph capture
    ref()
    num_bytes = rows * hidden * 2 * (4 if with_residual else 2) + hidden * 2
    return {
        "op": "rms_norm",
        "model": model,
        "H": hidden,
        "rows": rows,
        "residual": with_residual,
        **time_vs_ref(ours, ref, num_bytes),
    }


def run(quick: bool) -> list[dict]:
    rows = [
        _measure(model, hidden, num_rows, with_residual)
        for model, hidden in MODELS.items()
        for num_rows in ((1, 80) if quick else (1, 16, 80))
        for with_residual in (False, True)
    ]
    print_table(
        "rms_norm (bf16; CUDA graph; µs median [p20, p80]; ref = HF's torch sequence, graphed)",
        rows,
        ["model", "H", "rows", "residual", *VS_REF_COLUMNS, "speedup_vs_ref"],
    )
    return rows


if __name__ == "__main__":
    run(quick=False)
