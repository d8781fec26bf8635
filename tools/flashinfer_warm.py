"""Compile the FlashInfer kernel variants D2SD's tests and benchmarks use, all at once.

FlashInfer JIT-compiles each kernel variant on first use (70-85 s per prefill variant on an H200)
and the tests would meet them one after another. This starts one process per variant so that
they compile side by side on the machine's cores; FlashInfer's own file locks make a test that
needs a variant still being built wait for it instead of building it twice.

    python tools/flashinfer_warm.py [--head-dims 64,128]      # then run the tests/benchmarks
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time


def _variant(kind: str, head_dim: int) -> str:
    import flashinfer
    import torch

    from bench._flashinfer_ref import MultiLevelCascade

    start = time.perf_counter()
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(16, 4, head_dim, device=dev, dtype=dt)
    kv = torch.randn(32, 2, head_dim, device=dev, dtype=dt)
    if kind == "single_prefill":
        flashinfer.single_prefill_with_kv_cache(q, kv, kv, causal=True, return_lse=True)
    elif kind == "merge_state":
        lse = torch.zeros(16, 4, device=dev)
        flashinfer.merge_state(q, lse, q.clone(), lse.clone())
    else:  # the two-level cascade wrapper: a paged batch-prefill variant
        local = torch.randn(2, 16, 2, head_dim, device=dev, dtype=dt)
        MultiLevelCascade(kv, kv, local, local, 4, causal=True).run(q.repeat(2, 1, 1))
    torch.cuda.synchronize()
    return f"{kind} head_dim={head_dim}: {time.perf_counter() - start:.0f} s"


def _run(job: tuple[str, int]) -> str:
    try:
        return _variant(*job)
    except Exception as exc:  # report and go on: the tests will show the same failure in full
        return f"{job[0]} head_dim={job[1]}: FAILED {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="64,128", help="comma-separated (default 64,128)")
    parser.add_argument("--no-cascade", action="store_true", help="skip the paged cascade wrapper")
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.head_dims.split(",") if d]
    kinds = ["single_prefill"] + ([] if args.no_cascade else ["multilevel_cascade"])
    jobs = [(kind, d) for kind in kinds for d in dims] + [("merge_state", dims[0])]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        for line in pool.imap_unordered(_run, jobs):
            print(f"flashinfer warm: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ".")
    raise SystemExit(main())
