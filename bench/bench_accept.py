"""Microbenchmark: accept (target tokens of B x T candidates + the acceptance walk) and
sample_tokens (one AR row), CUDA-graphed, against the torch reference.

Shapes: B = K + 1 = 5 branches, T = gamma2 in {16, 32}, Qwen3 vocabulary 151936 and SmolLM2 49152.
Modes: greedy (argmax), sampled (temperature 1), sampled with top-k 20 / top-p 0.95 (Qwen3's
recommended warpers; the bisection path). Logits bf16, plus fp32 (what a model that upcasts its
logits hands over).
GB/s counts the bytes that must move: every candidate row read once, B * T * V * element size
(the partials and the walk's bytes are negligible); roofline = those bytes at 4.3 TB/s. The
top-k/top-p path re-reads rows (from L2 mostly) once per bisection step, so its GB/s is an
effective rate against the one-read minimum.

python -m bench.kernels --only accept [--quick]
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.accept import accept, accept_ref, sample_tokens, sample_tokens_ref

MODES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0),
    "top-k/p": dict(temperature=0.6, top_k=20, top_p=0.95),
}
NUM_BRANCHES = 5  # K = 4 branches + the first draft


def accept_inputs():
    """The shapes above, bf16, for the sweeps around accept (bench.accept_chunks, read_floor):
    (vocab, T, cand_tokens [B, T], logits [B * T, V], uniforms [T]), seeded."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (151936, 49152):
        for depth in (16, 32):
            num_rows = NUM_BRANCHES * depth
            logits = torch.randn(num_rows, vocab, device="cuda", generator=gen).to(torch.bfloat16)
            cand = torch.randint(0, 3, (NUM_BRANCHES, depth), device="cuda", generator=gen)
            yield vocab, depth, cand, logits, torch.rand(depth, device="cuda", generator=gen)


def _row(op, vocab, num_branches, depth, mode, dtype, fn, ref_fn, num_bytes) -> dict:
    return {
        "op": op,
        "vocab": vocab,
        "B": num_branches,
        "T": depth,
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        **time_vs_ref(fn, ref_fn, num_bytes),
    }


def run(quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (151936, 49152):
        for depth in (16,) if quick else (16, 32):
            for mode, warpers in MODES.items():
                for dtype in (
                    (torch.bfloat16,)
                    if (quick or mode != "greedy")
                    else (torch.bfloat16, torch.float32)
                ):
                    num_rows = NUM_BRANCHES * depth
                    logits = torch.randn(num_rows, vocab, device="cuda", generator=gen).to(dtype)
                    cand = torch.randint(0, 3, (NUM_BRANCHES, depth), device="cuda", generator=gen)
                    uniforms = torch.rand(depth, device="cuda", generator=gen)
                    kwargs = dict(**warpers, uniforms=uniforms)
                    rows.append(
                        _row(
                            "accept", vocab, NUM_BRANCHES, depth, mode, dtype,
                            lambda c=cand, x=logits, k=kwargs: accept(c, x, **k),
                            lambda c=cand, x=logits, k=kwargs: accept_ref(c, x, **k),
                            num_rows * vocab * logits.element_size(),
                        )
                    )  # fmt: skip
        for mode, warpers in MODES.items():  # one autoregressive step
            logits = torch.randn(1, vocab, device="cuda", generator=gen).bfloat16()
            u = torch.rand(1, device="cuda", generator=gen)
            rows.append(
                _row(
                    "sample_tokens", vocab, 1, 1, mode, logits.dtype,
                    lambda x=logits, u=u, w=warpers: sample_tokens(x, u, **w),
                    lambda x=logits, u=u, w=warpers: sample_tokens_ref(x, u, **w),
                    vocab * logits.element_size(),
                )
            )  # fmt: skip
    print_table(
        "accept / sample_tokens (CUDA graph; µs median [p20, p80]; ref = torch reference, graphed)",
        rows,
        ["op", "vocab", "B", "T", "mode", "dtype", *VS_REF_COLUMNS, "speedup_vs_ref"],
    )
    return rows


if __name__ == "__main__":
    run(quick=False)
