"""Shared benchmark harness: timing, rooflines, environment stamp and JSON results.

Every microbenchmark (`bench/bench_<op>.py`) exposes `run(quick: bool) -> list[dict]`; `bench.kernels`
runs them all, prints one table per kernel and writes `bench/results/kernels-<gpu>-<date>.json`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# H200 ceilings measured on our machine (see ../shared/device and the device tool's KINDS.md):
# device-to-device copy ~4.3 TB/s, bf16 dense matmul ~790 TFLOP/s.
HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS_PER_S = 790e12


def roofline_us(bytes_moved: float, flops: float) -> float:
    """Lower bound in microseconds: max(bytes / HBM bandwidth, FLOPs / bf16 tensor-core rate)."""
    return max(bytes_moved / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S) * 1e6


def time_us(fn: Callable[[], object], *, cuda_graph: bool = False, rep_ms: int = 100) -> dict:
    """Median, p20 and p80 of one call of `fn`, in microseconds (triton.testing.do_bench*).

    `cuda_graph=True` replays `fn` inside a CUDA graph, which removes launch overhead: use it for
    launch-bound kernels and to time the graphed form of a multi-launch sequence.
    """
    import triton.testing as tt

    q = [0.5, 0.2, 0.8]
    if cuda_graph:
        med, p20, p80 = tt.do_bench_cudagraph(fn, rep=rep_ms, quantiles=q)
    else:
        med, p20, p80 = tt.do_bench(fn, rep=rep_ms, quantiles=q)
    return {"us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def environment() -> dict:
    """GPU, library versions and date, stamped into every results file."""
    env = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for name in ("triton", "transformers", "flashinfer"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # not installed here: recorded as absent, not an error
            env[name] = None
    return env


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table; floats with 3 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_results(name: str, results: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write `{"env": environment(), **results}` to `<out_dir>/<name>-<gpu>-<date>.json`."""
    env = environment()
    gpu = (env["gpu"] or "cpu").replace(" ", "-")
    out = Path(out_dir or os.environ.get("D2SD_RESULTS_DIR") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{gpu}-{env['date'][:10]}.json"
    path.write_text(json.dumps({"env": env, **results}, indent=1) + "\n")
    return path
