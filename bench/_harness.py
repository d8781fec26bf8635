"""Shared benchmark harness: timing, rooflines, environment stamp and JSON results.

Every microbenchmark (`bench/bench_<op>.py`) exposes `run(quick: bool) -> list[dict]`; `bench.kernels`
runs them all, prints one table per kernel and writes `bench/results/kernels-<gpu>-<date>.json`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
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


def baseline(measure: Callable[[], object]) -> object | None:
    """Run a baseline measurement; a failing baseline (API drift, out of memory) prints one line
    and gives None instead of losing the whole table. Our own kernel is never wrapped."""
    try:
        return measure()
    except Exception as err:  # report and continue: the columns of that baseline stay empty
        print(f"  baseline failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        torch.cuda.synchronize()
        return None


def _ratio(theirs: dict | None, ours_us: float) -> float | None:
    return None if theirs is None else theirs["us"] / ours_us


def time_ours(fn: Callable[[], object], *, bytes_moved: float, flops: float, rep_ms: int) -> dict:
    """Row columns of our op: `us`/`p20_us`/`p80_us` replayed in a CUDA graph, `eager_us` launched
    from Python, `GB/s` (`bytes_moved` over the graphed time), `roof%` (roofline / `us`) and
    `roofline_us`. Call `fn` once before (compile and autotune stay outside the timings)."""
    graph = time_us(fn, cuda_graph=True, rep_ms=rep_ms)
    eager = time_us(fn, rep_ms=rep_ms)
    roof = roofline_us(bytes_moved, flops)
    return {
        "us": graph["us"], "p20_us": graph["p20_us"], "p80_us": graph["p80_us"],
        "eager_us": eager["us"], "GB/s": bytes_moved / graph["us"] * 1e-3,
        "roof%": 100 * roof / graph["us"], "roofline_us": roof,
    }  # fmt: skip


def time_baseline(
    name: str,
    ours: dict,
    fn: Callable[[], object] | None = None,
    *,
    build: Callable[[], Callable[[], object]] | None = None,
    rep_ms: int,
    graphed: bool = False,
) -> dict:
    """Row columns of a baseline that may fail: `<name>_us` launched eagerly and `x_<name>` = its
    time / our `eager_us`; with `graphed`, also `<name>_graph_us` replayed in a CUDA graph and
    `x_<name>_graph` against our graphed `us`. `ours` is `time_ours`'s row.

    The baseline is `fn`, or the call `build()` returns (its setup stays outside the timings and
    may fail like the timings themselves, see `baseline`). Failed columns are None, as are all
    where neither is given (the baseline is not available).
    """
    if build is not None:
        fn = baseline(build)
    eager = graph = None
    if fn is not None:
        eager = baseline(lambda: time_us(fn, rep_ms=rep_ms))
        if graphed:
            graph = baseline(lambda: time_us(fn, cuda_graph=True, rep_ms=rep_ms))
    columns = {f"{name}_us": eager and eager["us"], f"x_{name}": _ratio(eager, ours["eager_us"])}
    if graphed:
        columns[f"{name}_graph_us"] = graph and graph["us"]
        columns[f"x_{name}_graph"] = _ratio(graph, ours["us"])
    return columns


# The timing columns of `time_vs_ref`'s rows, in table order (the speedup column follows).
VS_REF_COLUMNS = ("us", "p20_us", "p80_us", "GB/s", "roofline_us", "ref_us")


def time_vs_ref(
    fn: Callable[[], object],
    ref_fn: Callable[[], object],
    bytes_moved: float,
    *,
    ref_cuda_graph: bool = True,
    speedup_key: str = "speedup_vs_ref",
) -> dict:
    """Row columns of a launch-bound op against its torch reference: ours replayed in a CUDA graph
    (`us`/`p20_us`/`p80_us`), `GB/s` = `bytes_moved` / `us`, `roofline_us` (bytes only), `ref_us`
    (the reference graphed, or eager where `ref_cuda_graph` is False, e.g. one that syncs) and
    `speedup_key` = `ref_us` / `us`."""
    ours = time_us(fn, cuda_graph=True)
    ref = time_us(ref_fn, cuda_graph=ref_cuda_graph)
    return {
        **ours,
        "GB/s": bytes_moved / ours["us"] * 1e-3,
        "roofline_us": roofline_us(bytes_moved, 0.0),
        "ref_us": ref["us"],
        speedup_key: ref["us"] / ours["us"],
    }


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


def cuda_sweep_args(
    name: str, doc: str, argv: Sequence[str] | None, parts: Sequence[str] = ()
) -> argparse.Namespace | None:
    """The command line of a CUDA-only sweep script (`--out-dir`; `--only` among `parts`, the
    sweeps it runs, default all), or None (after one line on stderr) when there is no GPU: the
    caller then exits with code 2."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="JSON folder (default: bench/results)")
    if parts:
        parser.add_argument(
            "--only", nargs="+", choices=parts, default=list(parts), help="run only these sweeps"
        )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU", file=sys.stderr)
        return None
    return args
