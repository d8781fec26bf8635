"""How `accept`'s time depends on its vocabulary chunking: a sweep that tunes `kernels.accept`'s
_BLOCK (tokens per block), _CHUNK_BLOCKS (blocks per partials program) and the partials kernel's
warps.

The greedy and sampled paths are three launches (partials over (rows, chunks), select per row,
the walk); the partials pass reads every candidate row once and dominates. Its grid is rows x
ceil(V / (BLOCK * CHUNK_BLOCKS)) programs: small chunks make more than one wave of programs, large
ones fewer loads in flight per SM. Each configuration is timed on bench_accept's shapes (B = 5,
T = 16 / 32, V = 151936 / 49152, bf16), replayed in a CUDA graph; `current` marks the shipped one.
The chunking changes the sampled path's float sums, consistently for AR and verification (both
depend on V only), so any row here is a lossless choice.

    python -m bench.accept_chunks [--out-dir DIR]     # CUDA only; accept_chunks-<gpu>-<date>.json
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cuda_sweep_args, print_table, time_us, write_results
from bench.bench_accept import NUM_BRANCHES

# the module (the package binds kernels.accept to the launcher of the same name)
accept_module = importlib.import_module("kernels.accept")

CONFIGS = (  # (BLOCK, CHUNK_BLOCKS, partials warps)
    (8192, 1, 8),
    (8192, 1, 4),
    (8192, 2, 8),
    (8192, 4, 8),
    (4096, 2, 4),
    (4096, 4, 4),
    (4096, 4, 8),
    (16384, 1, 8),
    (16384, 1, 16),
    (2048, 4, 4),
)
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0)}
COLUMNS = ("vocab", "T", "mode", "block", "chunk_blocks", "warps", "programs", "current", "us")


def _configure(block: int, chunk_blocks: int, warps: int) -> None:
    accept_module._BLOCK = block
    accept_module._CHUNK_BLOCKS = chunk_blocks
    accept_module._NUM_WARPS["partials"] = warps


def sweep() -> list[dict]:
    shipped = (
        accept_module._BLOCK,
        accept_module._CHUNK_BLOCKS,
        accept_module._NUM_WARPS["partials"],
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    try:
        for vocab in (151936, 49152):
            for depth in (16, 32):
                num_rows = NUM_BRANCHES * depth
                logits = torch.randn(num_rows, vocab, device="cuda", generator=gen)
                logits = logits.to(torch.bfloat16)
                cand = torch.randint(0, 3, (NUM_BRANCHES, depth), device="cuda", generator=gen)
                uniforms = torch.rand(depth, device="cuda", generator=gen)
                for config in CONFIGS:
                    _configure(*config)
                    chunks = accept_module._chunking(vocab)[2]
                    for mode, warpers in MODES.items():

                        def call(cand=cand, logits=logits, uniforms=uniforms, warpers=warpers):
                            return accept_module.accept(cand, logits, uniforms=uniforms, **warpers)

                        call()  # compile outside the timing
                        rows.append({
                            "vocab": vocab, "T": depth, "mode": mode,
                            "block": config[0], "chunk_blocks": config[1], "warps": config[2],
                            "programs": num_rows * chunks,
                            "current": "*" if config == shipped else "",
                            "us": time_us(call, cuda_graph=True, rep_ms=30)["us"],
                        })  # fmt: skip
    finally:
        _configure(*shipped)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = cuda_sweep_args("accept_chunks", __doc__, argv)
    if args is None:
        return 2
    rows = sweep()
    print_table("accept per vocabulary chunking (bf16, B = 5, CUDA graph)", rows, COLUMNS)
    path = write_results("accept_chunks", {"rows": rows}, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
