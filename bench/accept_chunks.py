"""How `accept`'s time depends on its vocabulary chunking and launch shapes: a sweep that tunes
`kernels.accept`'s _BLOCK and _SMALL_VOCAB_BLOCK (tokens per chunk when sampling, at or above
_LARGE_VOCAB and below it), _GREEDY_BLOCK (per chunk for the argmax), the three kernels' warps and
whether they use programmatic dependent launch (PDL, sm_90+).

The greedy and sampled paths are three launches (partials over (rows, chunks), select per row, the
walk); the partials pass reads every candidate row once and dominates. Each configuration is timed
on bench_accept's shapes (B = 5, T = 16 / 32, V = 151936 / 49152, bf16), replayed in a CUDA graph;
`current` marks the shipped one. The sampled chunk changes the float sums, consistently for AR and
verification (both depend on V only), so any row here is a lossless choice.

A second sweep times top-k 20 / top-p 0.95 per warps of its two kernels (the group maxima and the
grouped top-k), the fewest groups the grouped top-k gathers, from how many it compacts their
candidates and the tokens per group. Last, the shipped configuration's graphed time (without
programmatic dependent launch) is split into its kernels (torch.profiler over graph replays): each
kernel's device time per call, and the rest of the graph's time, the gaps between dependent
launches; beside it the time with PDL.

    python -m bench.accept_chunks [--out-dir DIR] [--only chunks thresholds split]
                                        # CUDA only; accept_chunks-<gpu>-<date>.json
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cuda_sweep_args, print_table, time_us, write_results
from bench.bench_accept import accept_inputs

# the module (the package binds kernels.accept to the launcher of the same name)
accept_module = importlib.import_module("kernels.accept")

# (sampled BLOCK at V >= 131072, below it, greedy BLOCK, partials warps, select warps, walk warps,
# programmatic dependent launch); earlier sweeps (bench/results/accept_chunks-*) found several
# blocks per partials program, a persistent partials grid (a few programs per SM looping over the
# chunks), a packed int32 greedy argmax, a one-launch accept (select and walk by the last program
# to arrive) and the walk on 1 or 2 warps or select on 2 slower
CONFIGS = (
    (8192, 4096, 4096, 4, 8, 4, True),
    (8192, 4096, 4096, 4, 8, 4, False),
    (8192, 8192, 4096, 4, 8, 4, True),
    (4096, 4096, 4096, 4, 8, 4, True),
    (8192, 2048, 4096, 4, 8, 4, True),
    (8192, 4096, 4096, 8, 8, 4, True),
    (8192, 4096, 4096, 2, 8, 4, True),
    (8192, 4096, 4096, 4, 4, 4, True),
    (8192, 4096, 2048, 4, 8, 4, True),
    (8192, 4096, 8192, 4, 8, 4, True),
)
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0)}
PARTS = ("chunks", "thresholds", "split")  # the sweeps, in the order they run
KNOBS = ("block", "small_block", "greedy_block", "warps", "select_warps", "scan_warps", "pdl")
COLUMNS = ("vocab", "T", "mode", *KNOBS, "current", "us")
SPLIT_COLUMNS = ("vocab", "T", "mode", "us", "pdl_us", "kernels_us", "gaps_us", "per_kernel")


def _configure(
    block: int, small_block: int, greedy_block: int, warps: int, select: int, scan: int, pdl: bool
) -> None:
    accept_module._BLOCK = block
    accept_module._SMALL_VOCAB_BLOCK = small_block
    accept_module._GREEDY_BLOCK = greedy_block
    accept_module._NUM_WARPS.update(partials=warps, select=select, scan=scan)
    accept_module._PDL = pdl


def _shipped() -> tuple:
    return (
        accept_module._BLOCK,
        accept_module._SMALL_VOCAB_BLOCK,
        accept_module._GREEDY_BLOCK,
        accept_module._NUM_WARPS["partials"],
        accept_module._NUM_WARPS["select"],
        accept_module._NUM_WARPS["scan"],
        accept_module._PDL,
    )


def _timed_sweep(
    configs: Sequence[tuple],
    knobs: Sequence[str],
    configure: Callable[..., None],
    shipped: tuple,
    modes: dict[str, dict],
) -> list[dict]:
    """accept's graphed time per shape, configuration (set by `configure(*config)`) and mode;
    the shipped configuration restored at the end."""
    rows = []
    try:
        for vocab, depth, cand, logits, uniforms in accept_inputs():
            for config in configs:
                configure(*config)
                for mode, warpers in modes.items():

                    def call(cand=cand, logits=logits, uniforms=uniforms, warpers=warpers):
                        return accept_module.accept(cand, logits, uniforms=uniforms, **warpers)

                    call()  # compile outside the timing
                    rows.append({
                        "vocab": vocab, "T": depth, "mode": mode,
                        **dict(zip(knobs, config)),
                        "current": "*" if config == shipped else "",
                        "us": time_us(call, cuda_graph=True, rep_ms=30)["us"],
                    })  # fmt: skip
    finally:
        configure(*shipped)
    return rows


def sweep() -> list[dict]:
    return _timed_sweep(CONFIGS, KNOBS, _configure, _shipped(), MODES)


# top-k / top-p: (warps of the group maxima kernel, warps of the grouped top-k kernel, the fewest
# groups it gathers (max(that, next_pow2(k))), the fewest gathered groups whose candidates it
# compacts, tokens per group); (4, 4, 128, 128, 64) is session 8's shipped configuration
THRESHOLD_CONFIGS = (
    (2, 4, 32, 64, 64),
    (2, 4, 32, 64, 128),
    (2, 8, 32, 64, 128),
    (2, 4, 32, 64, 32),
    (2, 8, 32, 64, 64),
    (4, 4, 32, 64, 64),
    (4, 4, 128, 128, 64),
)
TOP_K_P = dict(temperature=0.6, top_k=20, top_p=0.95)  # Qwen3's recommended warpers
THRESHOLD_KNOBS = (
    "group_max_warps",
    "grouped_top_k_warps",
    "min_groups_kept",
    "compact_from",
    "group",
)
THRESHOLD_COLUMNS = ("vocab", "T", *THRESHOLD_KNOBS, "current", "us")


def _configure_thresholds(
    group_max: int, grouped_top_k: int, min_groups_kept: int, compact_from: int, group: int
) -> None:
    accept_module._NUM_WARPS.update(group_max=group_max, grouped_top_k=grouped_top_k)
    accept_module._MIN_GROUPS_KEPT = min_groups_kept
    accept_module._COMPACT_FROM_GROUPS = compact_from
    accept_module._GROUP = group


def threshold_sweep() -> list[dict]:
    """accept with top-k 20 / top-p 0.95 per warps of its two kernels, the fewest groups the
    grouped top-k gathers, from how many it compacts and the tokens per group."""
    shipped = (
        accept_module._NUM_WARPS["group_max"],
        accept_module._NUM_WARPS["grouped_top_k"],
        accept_module._MIN_GROUPS_KEPT,
        accept_module._COMPACT_FROM_GROUPS,
        accept_module._GROUP,
    )
    modes = {"top-k/p": TOP_K_P}
    return _timed_sweep(THRESHOLD_CONFIGS, THRESHOLD_KNOBS, _configure_thresholds, shipped, modes)


def kernel_split(replays: int = 200) -> list[dict]:
    """The shipped configuration's graphed time per shape and mode, split into its kernels. The
    split is taken without programmatic dependent launch (under it a kernel's time includes its
    wait for the previous one); `pdl_us` is the graphed time with it, as shipped on sm_90+."""
    from torch.profiler import ProfilerActivity, profile

    shipped_pdl = accept_module._PDL
    rows = []
    for vocab, depth, cand, logits, uniforms in accept_inputs():
        for mode, warpers in {**MODES, "top-k/p": TOP_K_P}.items():

            def call(cand=cand, logits=logits, uniforms=uniforms, warpers=warpers):
                return accept_module.accept(cand, logits, uniforms=uniforms, **warpers)

            accept_module._PDL = True
            call()
            pdl_us = time_us(call, cuda_graph=True, rep_ms=30)["us"]
            accept_module._PDL = False
            call()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            graph.replay()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    graph.replay()
                torch.cuda.synchronize()
            per_kernel = {
                event.key.removeprefix("_").removesuffix("_kernel")[:24]: round(
                    event.self_device_time_total / replays, 2
                )
                for event in prof.key_averages()
                if event.self_device_time_total > 0
            }
            graphed = time_us(call, cuda_graph=True, rep_ms=30)["us"]
            kernels_us = sum(per_kernel.values())
            rows.append({
                "vocab": vocab, "T": depth, "mode": mode, "us": graphed, "pdl_us": pdl_us,
                "kernels_us": kernels_us, "gaps_us": graphed - kernels_us,
                "per_kernel": per_kernel,
            })  # fmt: skip
    accept_module._PDL = shipped_pdl
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = cuda_sweep_args("accept_chunks", __doc__, argv, parts=PARTS)
    if args is None:
        return 2
    results = {}
    if "chunks" in args.only:
        results["rows"] = sweep()
        title = "accept per vocabulary chunking (bf16, B = 5, CUDA graph)"
        print_table(title, results["rows"], COLUMNS)
    if "thresholds" in args.only:
        results["thresholds"] = threshold_sweep()
        title = "accept, top-k 20 / top-p 0.95, per warps of its two kernels"
        print_table(title, results["thresholds"], THRESHOLD_COLUMNS)
    if "split" in args.only:
        results["kernel_split"] = kernel_split()
        title = "accept's graphed time per kernel (shipped configuration)"
        print_table(title, results["kernel_split"], SPLIT_COLUMNS)
    path = write_results("accept_chunks", results, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
