"""Microbenchmark of `topk_confidence` (kernels/topk_confidence.py) against its torch reference.

Shapes: the first draft's logits [γ-1, V] in bf16 at the Qwen3 (151936) and SmolLM2 (49152)
vocabularies, γ = 16, γ2 in {16, 32}, K = 4. Both sides are timed as CUDA-graph replays (the kernel
is launch-bound: a 1-5 MB read). Throughput: GB/s = bytes / time, bytes = the logits read once
plus every output written (partials are on-chip-sized and not counted); the roofline is that byte
count at 4.3 TB/s.
"""

from __future__ import annotations

import math

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.topk_confidence import topk_confidence, topk_confidence_ref

MASK_TOKEN = 151669
COLUMNS = ["vocab", "gamma", "gamma2", "K", "dtype", *VS_REF_COLUMNS, "x_ref"]


def _logits(num_rows: int, vocab: int) -> torch.Tensor:
    """bf16 N(0, 1) logits with one peak per row (confidences spread like a real draft's)."""
    x = torch.randn(num_rows, vocab, device="cuda")
    target = torch.rand(num_rows, device="cuda") * 0.9 + 0.05
    peak = math.log(vocab * math.exp(0.5)) + torch.log(target / (1 - target))
    x[torch.arange(num_rows), torch.randint(0, vocab, (num_rows,))] = peak
    return x.to(torch.bfloat16)


def run(quick: bool = False) -> list[dict]:
    """Time kernel and reference per shape; print a table and return its rows."""
    gamma, num_branches = 16, 4
    shapes = [(v, g2) for v in (151936, 49152) for g2 in ((16,) if quick else (16, 32))]
    rows = []
    for vocab, gamma2 in shapes:
        logits = _logits(gamma - 1, vocab)
        anchor = torch.tensor([1], device="cuda")
        args = (logits, anchor, num_branches, gamma2, MASK_TOKEN)
        nbytes = logits.numel() * logits.element_size() + (gamma - 1) * (8 + 4 + 4)
        nbytes += num_branches * (4 + 8 * gamma2)
        rows.append(
            {
                "kernel": "topk_confidence",
                "vocab": vocab,
                "gamma": gamma,
                "gamma2": gamma2,
                "K": num_branches,
                "dtype": "bf16",
                **time_vs_ref(
                    lambda a=args: topk_confidence(*a),
                    lambda a=args: topk_confidence_ref(*a),
                    nbytes,
                    speedup_key="x_ref",
                ),
            }
        )
    print_table("topk_confidence (CUDA graph replay; bytes = logits + outputs)", rows, COLUMNS)
    return rows


if __name__ == "__main__":
    run()
