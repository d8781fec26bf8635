"""Would moving accept's greedy partials into the lm_head GEMM pay? A feasibility measurement.

`accept` reads the verification logits once (the partials pass; one read of Qwen3's bf16 logits
at B = 5, T = 32 takes ~11 us on the H200, `bench.read_floor`). A GEMM that writes the logits could
also write each (row, tile of columns) maximum from its registers, leaving accept only select and
the walk. That pays only if such a GEMM costs less extra, over the cuBLAS GEMM the targets use
today (`torch.nn.functional.linear`), than the partials pass it saves.

Timed here, CUDA-graphed, on the lm_head shapes of accept's benchmark (rows M = B * T = 80 / 160):
Qwen3-8B (hidden 4096, vocabulary 151936) and SmolLM2-135M (576, 49152), bf16:
* `cublas`: `F.linear(hidden, weight)` -> bf16 logits [M, V];
* `triton`: a tiled Triton GEMM (autotuned over tile shapes) writing the same logits;
* `triton+max`: the same GEMM also writing the maximum of each row's BLOCK_N columns of logits;
* `accept`: `kernels.accept` greedy over those logits (B = 5, T = M / 5), the work the epilogue
  would mostly replace.
Each Triton row also checks its logits against cuBLAS's (max abs difference) and its tile maxima
against the maxima of its own logits (exact).

    python -m bench.lm_head_fusion [--out-dir DIR]     # CUDA only; lm_head_fusion-<gpu>-<date>.json
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cuda_sweep_args, print_table, time_us, write_results
from bench.bench_accept import NUM_BRANCHES
from kernels.accept import accept

SHAPES = {"qwen3-8b": (4096, 151936), "smollm2": (576, 49152)}  # (hidden, vocabulary)
DEPTHS = (16, 32)
COLUMNS = ("model", "M", "cublas_us", "triton_us", "triton_max_us", "accept_us", "extra_us",
           "max_abs_diff", "config")  # fmt: skip


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (64, 128, 4, 4),
            (64, 256, 8, 3),
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (256, 128, 8, 3),
        )
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "TILE_MAX"])
@triton.jit
def _lm_head_kernel(
    h_ptr,  # [M, K] bf16
    w_ptr,  # [N, K] bf16
    out_ptr,  # [M, N] bf16 logits
    tile_max_ptr,  # [M, cdiv(N, BLOCK_N)] f32 (TILE_MAX)
    M,
    N,
    K,
    stride_h,
    stride_w,
    stride_out,
    TILE_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # the M tiles of one column tile are consecutive programs: they share its weights through L2
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(
            h_ptr + rm[:, None].to(tl.int64) * stride_h + (k + rk)[None, :],
            mask=(rm < M)[:, None] & (k + rk < K)[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + rn[:, None].to(tl.int64) * stride_w + (k + rk)[None, :],
            mask=(rn < N)[:, None] & (k + rk < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(b), acc)
    logits = acc.to(out_ptr.dtype.element_ty)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_out + rn[None, :], logits, mask=ok)
    if TILE_MAX:  # the greedy partials, from the rounded logits (what accept would have read)
        x = tl.where(ok, logits.to(tl.float32), float("-inf"))
        num_tiles = tl.cdiv(N, BLOCK_N)
        tl.store(tile_max_ptr + rm * num_tiles + pid_n, tl.max(x, axis=1), mask=rm < M)


def lm_head(
    hidden: torch.Tensor, weight: torch.Tensor, tile_max: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [M, K] @ weight [N, K]^T -> (logits [M, N] in hidden's dtype, and with `tile_max`
    the maximum of each row's BLOCK_N columns [M, cdiv(N, BLOCK_N)] f32, else None)."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    logits = torch.empty(num_rows, vocab, dtype=hidden.dtype, device=hidden.device)
    # room for the smallest BLOCK_N's tiles (the autotuner runs every BLOCK_N into it); NaN, so
    # that a tile the kernel misses fails the exact check; unused (and not filled) without the max
    num_slots = num_rows * triton.cdiv(vocab, 128) if tile_max else 0
    maxima = torch.full((num_slots,), float("nan"), device=hidden.device)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_N"]),)

    _lm_head_kernel[grid](
        hidden, weight, logits, maxima,
        num_rows, vocab, hidden_size,
        hidden.stride(0), weight.stride(0), logits.stride(0),
        TILE_MAX=tile_max,
    )  # fmt: skip
    if not tile_max:
        return logits, None
    num_tiles = triton.cdiv(vocab, _lm_head_kernel.best_config.kwargs["BLOCK_N"])
    return logits, maxima[: num_rows * num_tiles].view(num_rows, num_tiles)


def _row(model: str, depth: int, gen: torch.Generator) -> dict:
    hidden_size, vocab = SHAPES[model]
    num_rows = NUM_BRANCHES * depth
    weight = torch.randn(vocab, hidden_size, device="cuda", generator=gen).bfloat16()
    weight /= hidden_size**0.5
    hidden = torch.randn(num_rows, hidden_size, device="cuda", generator=gen).bfloat16()
    cand = torch.randint(0, 3, (NUM_BRANCHES, depth), device="cuda", generator=gen)

    reference = F.linear(hidden, weight)
    logits, maxima = lm_head(hidden, weight, tile_max=True)  # autotunes (with the epilogue)
    block_n = _lm_head_kernel.best_config.kwargs["BLOCK_N"]
    config = str(_lm_head_kernel.best_config)
    padded = torch.full((num_rows, maxima.shape[1] * block_n), float("-inf"), device="cuda")
    padded[:, :vocab] = logits.float()
    assert torch.equal(maxima, padded.view(num_rows, -1, block_n).amax(dim=2)), "tile maxima"
    lm_head(hidden, weight, tile_max=False)  # autotunes without it
    return {
        "model": model,
        "M": num_rows,
        "cublas_us": time_us(lambda: F.linear(hidden, weight), cuda_graph=True)["us"],
        "triton_us": time_us(lambda: lm_head(hidden, weight, False), cuda_graph=True)["us"],
        "triton_max_us": time_us(lambda: lm_head(hidden, weight, True), cuda_graph=True)["us"],
        "accept_us": time_us(lambda: accept(cand, reference), cuda_graph=True, rep_ms=30)["us"],
        "max_abs_diff": (logits.float() - reference.float()).abs().max().item(),
        "config": config,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = cuda_sweep_args("lm_head_fusion", __doc__, argv)
    if args is None:
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model in SHAPES:
        for depth in DEPTHS:
            row = _row(model, depth, gen)
            # what the fused GEMM costs over cuBLAS; it pays only below accept's partials pass
            row["extra_us"] = row["triton_max_us"] - row["cublas_us"]
            rows.append(row)
            torch.cuda.empty_cache()
    print_table("lm_head GEMM with accept's greedy partials in its epilogue (bf16, CUDA graph)",
                rows, COLUMNS)  # fmt: skip
    path = write_results("lm_head_fusion", {"rows": rows}, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
