"""`make bench-kernels`: run every `bench/bench_<op>.py` on the GPU and write one JSON file.

python -m bench.kernels [--quick] [--only lse_merge,cascade_attention] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

import torch

import bench
from bench._harness import write_results


def _bench_modules() -> list[str]:
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench-kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n] or _bench_modules()
    results, failed = {}, []
    for name in names:
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            results[name] = module.run(quick=args.quick)
        except Exception:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            failed.append(name)
    # a run of some kernels names them, so that runs of other kernels beside it keep their files
    name = "-".join(["kernels", *names]) if args.only else "kernels"
    path = write_results(name, {"kernels": results, "failed": failed}, args.out)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
