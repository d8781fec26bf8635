"""Microbenchmark: commit (accepted K/V rows of every layer + hidden states, one launch, then the
cache_len add), CUDA-graphed, against the torch reference.

Cache shapes: Qwen3-8B (36 layers, 8 kv heads x 128, hidden 4096) and SmolLM2-135M (30 layers,
3 x 64, hidden 576), bf16, max_len 4096, cache_len 1000; T = gamma2 in {16, 32} rows from
R = 5 * T local rows; hidden states of 5 tapped layers (Hh = 5 * hidden).
GB/s counts bytes read + written: 2 (K, V) * layers * T * Hkv * D * 2 B * 2 + T * Hh * 2 B * 2;
roofline = those bytes at 4.3 TB/s.

python -m bench.kernels --only commit [--quick]
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.commit import commit, commit_ref

MODELS = {  # layers, kv heads, head_dim, hidden
    "qwen3-8b": (36, 8, 128, 4096),
    "smollm2-135m": (30, 3, 64, 576),
}
NUM_TAPS = 5
MAX_LEN = 4096


def run(quick: bool) -> list[dict]:
    rows = []
    for model, (layers, kv_heads, head_dim, hidden) in MODELS.items():
        for depth in (16,) if quick else (16, 32):
            for with_hidden in (True, False):
                num_rows = 5 * depth
                k_local = torch.randn(
                    layers, num_rows, kv_heads, head_dim, device="cuda"
                ).bfloat16()
                v_local = torch.randn_like(k_local)
                k_cache = torch.zeros(layers, MAX_LEN, kv_heads, head_dim, device="cuda").bfloat16()
                v_cache = torch.zeros_like(k_cache)
                rows_idx = torch.randperm(num_rows, device="cuda")[:depth].to(torch.int32)
                cache_len = torch.tensor([1000], dtype=torch.int32, device="cuda")
                num_new = torch.zeros(1, dtype=torch.int32, device="cuda")  # replays stay in place
                hh = NUM_TAPS * hidden
                hidden_src = (
                    torch.randn(num_rows, hh, device="cuda").bfloat16() if with_hidden else None
                )
                hidden_dst = (
                    torch.empty(depth, hh, device="cuda").bfloat16() if with_hidden else None
                )
                args = (
                    k_local,
                    v_local,
                    k_cache,
                    v_cache,
                    rows_idx,
                    cache_len,
                    num_new,
                    hidden_src,
                    hidden_dst,
                )
                num_bytes = 2 * layers * depth * kv_heads * head_dim * 2 * 2
                num_bytes += depth * hh * 2 * 2 if with_hidden else 0
                rows.append(
                    {
                        "op": "commit",
                        "model": model,
                        "T": depth,
                        "hidden": hh if with_hidden else 0,
                        **time_vs_ref(
                            lambda a=args: commit(*a), lambda a=args: commit_ref(*a), num_bytes
                        ),
                    }
                )
    print_table(
        "commit (CUDA graph; µs median [p20, p80]; ref = torch reference, graphed)",
        rows,
        ["model", "T", "hidden", *VS_REF_COLUMNS, "speedup_vs_ref"],
    )
    return rows


if __name__ == "__main__":
    run(quick=False)
