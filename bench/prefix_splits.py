"""Where the cascade's time goes, per KV split count: a sweep that tunes `num_kv_splits`.

`cascade_attention` is two launches: the prefix split pass (grid row tiles x S splits x kv heads,
partial states [S, B, T, Hq, D] float32) and the branch pass (local keys + the merge of the S
states). For each shape and each forced S this times, replayed in CUDA graphs: the split pass
alone (`split_us`), the branch pass alone (`merge_us`) and both (`total_us`), and marks the S that
`kernels._attention.num_kv_splits` picks (`chosen`). The difference between the chosen row and the
best row is what a better heuristic would save; split vs merge says which launch to work on.

    python -m bench.prefix_splits [--out-dir DIR]     # CUDA only; writes prefix_splits-<gpu>-<date>.json
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cuda_sweep_args, print_table, time_us, write_results
from bench.bench_cascade_attention import Inputs, make_inputs
from kernels._attention import min_split_keys
from kernels.branch_attention import launch_branch
from kernels.prefix_attention import launch_prefix_split, prefix_splits

SHAPES = (  # (model, B, T): the verify of the targets' shape, an AR step, SmolLM2's verify
    ("qwen3-8b", 5, 16),
    ("qwen3-8b", 1, 1),
    ("smollm2", 5, 16),
)
PREFIX_LENS = (511, 2048, 8192, 32768)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
COLUMNS = ("model", "B", "T", "L", "S", "chosen", "split_us", "merge_us", "total_us")


def _row(x: Inputs, model: str, splits: int, chosen: int) -> dict:
    """Both launches of cascade_attention over `x` with `splits` KV splits, timed in CUDA graphs."""
    batch, seq = x.q.shape[:2]
    scale = x.q.shape[-1] ** -0.5
    group = x.q.shape[2] // x.k_cache.shape[1]
    part_o = torch.empty(splits, *x.q.shape, dtype=torch.float32, device="cuda")
    part_lse = torch.empty(splits, *x.q.shape[:3], dtype=torch.float32, device="cuda")
    o = torch.empty_like(x.q)
    lse = torch.empty(x.q.shape[:3], dtype=torch.float32, device="cuda")

    def split_pass():
        launch_prefix_split(
            x.q, x.k_cache, x.v_cache, x.cache_len, part_o, part_lse, scale, -1,
            store_empty_o=False,
        )  # fmt: skip

    def merge_pass():
        launch_branch(
            x.q, x.k_local, x.v_local, None, True, part_o, part_lse, o, lse, scale, -1, group=group
        )

    def both():
        split_pass()
        merge_pass()

    both()  # autotune both kernels outside the timings
    return {
        "model": model, "B": batch, "T": seq, "L": x.prefix_len, "S": splits,
        "chosen": "*" if splits == chosen else "",
        "split_us": time_us(split_pass, cuda_graph=True, rep_ms=20)["us"],
        "merge_us": time_us(merge_pass, cuda_graph=True, rep_ms=20)["us"],
        "total_us": time_us(both, cuda_graph=True, rep_ms=20)["us"],
    }  # fmt: skip


def sweep() -> list[dict]:
    rows = []
    for model, batch, seq in SHAPES:
        for prefix_len in PREFIX_LENS:
            x = make_inputs(model, batch, seq, prefix_len)
            chosen = prefix_splits(x.q, x.k_cache)
            # a split gets at least min_split_keys keys: more splits than this would idle
            limit = math.ceil(x.k_cache.shape[0] / min_split_keys(x.q.device))
            for splits in sorted({s for s in SPLITS if s <= limit} | {chosen}):
                rows.append(_row(x, model, splits, chosen))
            del x
            torch.cuda.empty_cache()
    return rows


def best_by_shape(rows: Sequence[dict]) -> list[dict]:
    """Per (model, B, T, L): the chosen S and the fastest S, with their totals."""
    out = []
    keys = sorted({(r["model"], r["B"], r["T"], r["L"]) for r in rows}, key=str)
    for key in keys:
        group = [r for r in rows if (r["model"], r["B"], r["T"], r["L"]) == key]
        best = min(group, key=lambda r: r["total_us"])
        chosen = next(r for r in group if r["chosen"])
        out.append({
            "model": key[0], "B": key[1], "T": key[2], "L": key[3],
            "chosen_S": chosen["S"], "chosen_us": chosen["total_us"],
            "best_S": best["S"], "best_us": best["total_us"],
        })  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = cuda_sweep_args("prefix_splits", __doc__, argv)
    if args is None:
        return 2
    rows = sweep()
    print_table("cascade_attention launches per KV split count (bf16, CUDA graph)", rows, COLUMNS)
    summary = best_by_shape(rows)
    print_table(
        "chosen vs best S",
        summary,
        ("model", "B", "T", "L", "chosen_S", "chosen_us", "best_S", "best_us"),
    )
    path = write_results("prefix_splits", {"rows": rows, "summary": summary}, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
