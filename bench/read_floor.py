"""The floor under `accept`'s partials pass: how fast one read of the candidate logits can go.

Minimal Triton kernels over accept's shapes (bf16 logits [B * T, V], B = 5, T = 16 / 32,
V = 151936 / 49152), grid (rows, chunks of BLOCK tokens) like the partials pass, each program
reducing its chunk to one value (`max`), or to (max, first argmax) with Triton's index reduction
(`argmax`) or as a max then the first id equal to it (`max_then_first`). Beside them torch's
`amax(dim=1)` and `clone` (a read and a write), and `accept` itself. Replayed in a CUDA graph
back to back, as bench_accept times accept, so rows that fit in L2 are read from it.

    python -m bench.read_floor [--out-dir DIR]     # CUDA only; read_floor-<gpu>-<date>.json
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cuda_sweep_args, print_table, time_us, write_results
from bench.bench_accept import MODES, accept_inputs
from kernels.accept import accept

REDUCTIONS = ("max", "argmax", "max_then_first")
COLUMNS = ("vocab", "T", "kernel", "block", "warps", "us", "TB/s")


@triton.jit
def _chunk_reduce_kernel(
    x_ptr, max_ptr, argmax_ptr, vocab, num_chunks, stride_row,
    BLOCK: tl.constexpr, REDUCTION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    idx = chunk * BLOCK + offs
    x = tl.load(x_ptr + row.to(tl.int64) * stride_row + idx, mask=idx < vocab, other=float("-inf"))
    x = x.to(tl.float32)
    out = row * num_chunks + chunk
    if REDUCTION == "max":
        tl.store(max_ptr + out, tl.max(x, axis=0))
    else:
        if REDUCTION == "argmax":
            x_max, first = tl.max(
                x, axis=0, return_indices=True, return_indices_tie_break_left=True
            )
        else:
            x_max = tl.max(x, axis=0)
            first = tl.min(tl.where(x == x_max, offs, BLOCK), axis=0)
        tl.store(max_ptr + out, x_max)
        tl.store(argmax_ptr + out, first)


def _chunk_reduce(x: torch.Tensor, block: int, warps: int, reduction: str):
    """A launch of `_chunk_reduce_kernel` over x [R, V] (its outputs allocated once)."""
    num_rows, vocab = x.shape
    num_chunks = triton.cdiv(vocab, block)
    chunk_max = torch.empty(num_rows, num_chunks, device=x.device)
    chunk_argmax = torch.empty_like(chunk_max, dtype=torch.int32)

    def launch() -> None:
        _chunk_reduce_kernel[(num_rows, num_chunks)](
            x, chunk_max, chunk_argmax, vocab, num_chunks, x.stride(0),
            BLOCK=block, REDUCTION=reduction, num_warps=warps,
        )  # fmt: skip

    return launch


def _row(vocab: int, depth: int, kernel: str, fn, num_bytes: int, **knobs) -> dict:
    fn()  # compile outside the timing
    us = time_us(fn, cuda_graph=True, rep_ms=50)["us"]
    return {"vocab": vocab, "T": depth, "kernel": kernel, **knobs, "us": us,
            "TB/s": num_bytes / us * 1e-6}  # fmt: skip


def run() -> list[dict]:
    rows = []
    for vocab, depth, cand, x, uniforms in accept_inputs():
        num_bytes = x.numel() * x.element_size()
        for block in (4096, 8192, 16384):
            for warps in (4, 8):
                for reduction in REDUCTIONS:
                    launch = _chunk_reduce(x, block, warps, reduction)
                    knobs = {"block": block, "warps": warps}
                    rows.append(_row(vocab, depth, reduction, launch, num_bytes, **knobs))
        rows.append(_row(vocab, depth, "torch amax", lambda x=x: x.amax(dim=1), num_bytes))
        rows.append(_row(vocab, depth, "torch clone", lambda x=x: x.clone(), num_bytes))
        for mode, warpers in MODES.items():

            def call(x=x, cand=cand, uniforms=uniforms, warpers=warpers):
                return accept(cand, x, uniforms=uniforms, **warpers)

            rows.append(_row(vocab, depth, f"accept {mode}", call, num_bytes))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = cuda_sweep_args("read_floor", __doc__, argv)
    if args is None:
        return 2
    rows = run()
    print_table("one read of accept's logits (bf16, B = 5, CUDA graph)", rows, COLUMNS)
    path = write_results("read_floor", {"rows": rows}, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
