"""Microbenchmark: rope_qk (q/k per-head RMSNorm + RoPE of q and k, one launch), CUDA-graphed,
against the torch sequence it replaces (rope_qk_ref: Qwen3RMSNorm + apply_rope, graphed).

Heads: SmolLM2-135M (Hq 9, Hkv 3, D 64, no q/k norm) and Qwen3-8B (32, 8, 128, q/k norm), bf16;
N = 1 (AR step), 16 (a verify block), 80 (5 branches x 16) rows; q/k are column views of one
fused [N, (Hq + 2 Hkv) D] projection output, cos/sin [N, D / 2] float32 (positions ~30000).
GB/s counts bytes read + written: q, k read and written (2 * N * (Hq + Hkv) * D * 2 B) + cos and
sin (2 * N * D / 2 * 4 B) + the norm weights (2 * D * 2 B); roofline = those bytes at 4.3 TB/s.

python -m bench.kernels --only rope [--quick]
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.rope import rope_qk, rope_qk_ref

MODELS = {  # q heads, kv heads, head_dim, rope_theta, q/k norm
    "smollm2-135m": (9, 3, 64, 100_000.0, False),
    "qwen3-8b": (32, 8, 128, 1_000_000.0, True),
}


def _case(num_rows: int, q_heads: int, kv_heads: int, head_dim: int, theta: float, norm: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q_cols, kv_cols = q_heads * head_dim, kv_heads * head_dim
    proj = torch.randn(num_rows, q_cols + 2 * kv_cols, device="cuda", generator=gen).bfloat16()
    q = proj[:, :q_cols].unflatten(-1, (q_heads, head_dim))
    k = proj[:, q_cols : q_cols + kv_cols].unflatten(-1, (kv_heads, head_dim))
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device="cuda") / head_dim)
    angles = (30_000 + torch.arange(num_rows, device="cuda"))[:, None].float() * inv_freq
    weights = (None, None)
    if norm:
        weights = tuple(
            (1 + 0.1 * torch.randn(head_dim, device="cuda", generator=gen)).bfloat16()
            for _ in range(2)
        )
    return (q, k, angles.cos(), angles.sin(), *weights, 1e-6)


def run(quick: bool) -> list[dict]:
    rows = []
    for model, (q_heads, kv_heads, head_dim, theta, norm) in MODELS.items():
        for num_rows in (1, 16) if quick else (1, 16, 80):
            args = _case(num_rows, q_heads, kv_heads, head_dim, theta, norm)
            rope_qk(*args)  # compile outside the timings
            num_bytes = 2 * num_rows * (q_heads + kv_heads) * head_dim * 2
            num_bytes += 2 * num_rows * head_dim // 2 * 4 + (2 * head_dim * 2 if norm else 0)
            rows.append(
                {
                    "op": "rope_qk",
                    "model": model,
                    "N": num_rows,
                    "qk_norm": norm,
                    **time_vs_ref(
                        lambda a=args: rope_qk(*a), lambda a=args: rope_qk_ref(*a), num_bytes
                    ),
                }
            )
    print_table(
        "rope_qk (CUDA graph; µs median [p20, p80]; ref = torch norm + RoPE sequence, graphed)",
        rows,
        ["model", "N", "qk_norm", *VS_REF_COLUMNS, "speedup_vs_ref"],
    )
    return rows


if __name__ == "__main__":
    run(quick=False)
