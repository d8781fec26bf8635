"""`python -m d2sd.bench`: the paper's table, speedup and τ per dataset, method and temperature.

One command reproduces it: every method (`ar`, `dflash`, `dflash+samples`, `dflash-dflash`, `d2sd`)
on every dataset (default: the offline sets gsm8k, humaneval, mbpp, mt-bench, alpaca) at every
temperature (default 0 and 1), on the first `--max-samples` prompts of each set. Models load as in
`python -m d2sd.run` (same options and defaults; its loading helpers are reused).

Cells. A cell is (method, dataset, temperature). It runs every prompt of the dataset; multi-turn
sets (mt-bench) feed each turn's answer back as the assistant message of the next turn
(`d2sd.data.run_turns`). Per turn it records the prompt length, the new tokens, the tokens committed
per cycle, the stage times (`GenerationResult.stage_ms`) and the wall time of the `generate` call.
The `ar` cell of each (dataset, temperature) runs once and is the baseline of every method there.

Numbers (`d2sd.report.RunStats`, pooled over the cell's turns):
- speedup = AR ms/token / method ms/token, both = 1e3 · sum(wall s) / sum(new tokens) over the same
  prompts in the same run (multi-turn: each method answers its own turns, so sampled second turns
  can differ in prompt; greedy ones agree wherever the outputs do);
- τ = tokens committed per cycle, pooled over cycles (`ar`: 1).
Each cell first runs one short untimed generation (compilation, graph capture, allocation). Steps
run as CUDA graphs on CUDA, except with `--backend flashinfer` (it syncs on cache_len: eager).

Files in `--out` (default `runs/bench-<date>`), written by rank 0:
- `results.json`: settings, environment (`bench/_harness.environment()`), prompt ids per dataset, and
  per cell its per-prompt records, when and where it ran, and a summary (RunStats.to_dict() +
  speedup + the greedy check). A cell is written, by an atomic rename, as soon as it finishes; a
  rerun with the same `--out` and settings skips the finished cells (resume), so an interrupted
  run loses at most the cell it was in. Summaries are recomputed from the records on every write
  (a rerun AR cell updates every speedup).
- `table.md`: rows = datasets + an average row (mean of the per-dataset numbers), columns = methods,
  each cell "speedup x / τ", one block per temperature; the numbers are the summaries', rounded.
- `tau_hist.png`, `stages.png`, `speedup.png` (d2sd.plots; skipped with a note without matplotlib).

Multi-GPU: under `torchrun --nproc_per_node=N`, rank r runs prompts r, r+N, ... of every cell on
`cuda:LOCAL_RANK` (or the CPU) and rank 0 gathers the records in prompt order (d2sd.distributed);
the speedup then pools the gathered per-prompt times.

Exit codes: 0 done, 2 bad input (one line on stderr, before any model is loaded where possible),
130 interrupted (finished cells are kept and tabulated).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2sd.errors import D2SDError

__all__ = [
    "DEFAULT_DATASETS",
    "DEFAULT_TEMPERATURES",
    "METHODS",
    "METHOD_LABELS",
    "BenchPlan",
    "ResultsFile",
    "build_parser",
    "cell_key",
    "format_bench_table",
    "main",
    "plan",
    "summarize_cell",
]

METHODS = ("ar", "dflash", "dflash+samples", "dflash-dflash", "d2sd")
METHOD_LABELS = {
    "ar": "AR",
    "dflash": "DFlash",
    "dflash+samples": "DFlash+samples",
    "dflash-dflash": "DFlash-DFlash",
    "d2sd": "D2SD",
}
DEFAULT_DATASETS = ("gsm8k", "humaneval", "mbpp", "mt-bench", "alpaca")
DEFAULT_TEMPERATURES = (0.0, 1.0)
RESULTS_NAME = "results.json"
TABLE_NAME = "table.md"
FORMAT_VERSION = 1
# what a resumed run must share with the results.json it extends (methods, datasets and
# temperatures may grow: new cells are added)
RESUME_KEYS = (
    "target",
    "drafts",
    "max_samples",
    "max_new_tokens",
    "block_size",
    "block_size_2",
    "topk",
    "verify_layout",
    "top_k",
    "top_p",
    "dtype",
    "backend",
    "device_type",
    "seed",
)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EXAMPLES = """\
examples:
  python -m d2sd.bench                                  # every method, dataset and temperature
  python -m d2sd.bench --methods ar,d2sd --datasets gsm8k --temperatures 0 --max-samples 8
  python -m d2sd.bench --target Qwen/Qwen3-8B --draft z-lab/Qwen3-8B-DFlash-b16 \\
      --vp-draft ./ckpt/qwen3-8b-vp --online --out runs/qwen3-8b
  torchrun --nproc_per_node=8 -m d2sd.bench --out runs/8gpu    # prompts split over 8 GPUs
  python -m d2sd.bench --out runs/8gpu --report-only            # table.md + plots from results.json

exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (finished cells kept)
"""


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The suite's options; model and decoding options mean what they mean in `d2sd.run`."""
    from d2sd.run import (
        OneLineParser,
        add_branch_options,
        add_data_options,
        add_hardware_options,
        add_model_options,
    )

    p = OneLineParser(
        prog="python -m d2sd.bench",
        description="Benchmark suite: speedup over autoregressive decoding of the same target "
        "(same prompts, same run) and mean accepted length τ for each method x dataset x "
        "temperature; writes results.json, table.md and plots, and resumes an interrupted run.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    s = p.add_argument_group("what to run")
    s.add_argument(
        "--methods",
        default=",".join(METHODS),
        metavar="LIST",
        help=f"comma-separated methods from {', '.join(METHODS)}; ar, the baseline, always runs "
        f"(default: {','.join(METHODS)})",
    )
    s.add_argument(
        "--datasets",
        default=",".join(DEFAULT_DATASETS),
        metavar="LIST",
        help=f"comma-separated prompt sets of d2sd.data (default: {','.join(DEFAULT_DATASETS)})",
    )
    s.add_argument(
        "--temperatures",
        default=",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES),
        metavar="LIST",
        help="comma-separated sampling temperatures, 0 = greedy (default: 0,1)",
    )
    s.add_argument(
        "--max-samples",
        type=int,
        default=40,
        help="the first N prompts of each dataset, in file order (default: 40)",
    )
    s.add_argument(
        "--max-new-tokens", type=int, default=256, help="new tokens per turn (default: 256)"
    )
    d = p.add_argument_group("decoding (as in python -m d2sd.run)")
    add_branch_options(d)
    d.add_argument(
        "--seed", type=int, default=0, help="seed of the sampler and random drafters (default: 0)"
    )
    add_hardware_options(p, device_note="; under torchrun cuda means cuda:LOCAL_RANK")
    o = p.add_argument_group("data and output")
    add_data_options(o)
    o.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="results folder; an existing results.json there is resumed (default: "
        "runs/bench-<date>)",
    )
    o.add_argument(
        "--no-plots", action="store_true", help="skip the PNG plots (default: draw them)"
    )
    o.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite table.md and the plots from --out's results.json (of a finished or "
        "interrupted run; its own settings decide the rows and columns); loads no model "
        "(default: run the suite)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# Options -> a checked plan (cheap: nothing is loaded)
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchPlan:
    """The suite's resolved, checked settings and prompts; no model is loaded yet."""

    args: argparse.Namespace
    world: Any  # d2sd.distributed.World
    methods: list[str]  # requested, in METHODS order; "ar" is run either way
    datasets: list[str]
    temperatures: list[float]
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    backend: str
    drafts: dict[str, str | None]
    samples: dict[str, list[Any]]  # dataset -> d2sd.data.Sample list
    out_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def max_new_tokens(self) -> int:
        return self.args.max_new_tokens

    @property
    def run_mode(self) -> str:
        """The richest method: it decides which drafters load and the cache slack."""
        return next(
            m
            for m in ("d2sd", "dflash-dflash", "dflash+samples", "dflash", "ar")
            if m in self.all_methods
        )

    @property
    def all_methods(self) -> list[str]:
        """The methods that run: the requested ones and the `ar` baseline."""
        return [m for m in METHODS if m == "ar" or m in self.methods]

    def run_plan(self) -> Any:
        """A d2sd.run.Plan over every prompt, for d2sd.run's loading and sizing helpers."""
        from d2sd import run

        args = argparse.Namespace(**vars(self.args), mode=self.run_mode)
        every = [s for name in self.datasets for s in self.samples[name]]
        return run.Plan(
            args,
            self.run_mode,
            self.device,
            self.dtype,
            self.backend,
            self.drafts,
            every,
            self.max_new_tokens,
            list(self.notes),
        )

    def config(self, method: str, temperature: float, max_new_tokens: int | None = None) -> Any:
        """The GenerationConfig of one cell."""
        from d2sd.generate import GenerationConfig

        a = self.args
        return GenerationConfig(
            mode=method,
            block_size=a.block_size,
            block_size_2=a.block_size_2,
            topk=a.topk,
            verify_layout=a.verify_layout,
            temperature=temperature,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            seed=a.seed,
        )

    def settings(self) -> dict[str, Any]:
        """What results.json records of the run (RESUME_KEYS among them)."""
        a = self.args
        return {
            "target": a.target,
            "drafts": dict(self.drafts),
            "methods": list(self.methods),
            "datasets": list(self.datasets),
            "temperatures": list(self.temperatures),
            "max_samples": a.max_samples,
            "max_new_tokens": a.max_new_tokens,
            "block_size": a.block_size,
            "block_size_2": a.block_size_2,
            "topk": a.topk,
            "verify_layout": a.verify_layout,
            "top_k": 0,
            "top_p": 1.0,
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": self.backend,
            "device": str(self.device),
            "device_type": self.device.type,
            "seed": a.seed,
            "data_dir": a.data_dir,
            "online": a.online,
            "world_size": self.world.size,
        }


def _methods(text: str) -> list[str]:
    names = _names(text)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        what = f"unknown method {unknown[0]!r}" if unknown else "empty list"
        raise D2SDError(f"--methods: {what}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def _datasets(text: str) -> list[str]:
    from d2sd.data import DATASETS

    names = _names(text)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        what = f"unknown dataset {unknown[0]!r}" if unknown else "empty list"
        raise D2SDError(f"--datasets: {what}; known: {', '.join(DATASETS)}")
    return list(dict.fromkeys(names))


def _temperatures(text: str) -> list[float]:
    values = []
    for part in _names(text) or [""]:
        try:
            value = float(part)
        except ValueError:
            raise D2SDError(f"--temperatures: {part!r} is not a number") from None
        if not (value >= 0 and math.isfinite(value)):
            raise D2SDError(f"--temperatures: each must be a finite number >= 0, got {part}")
        values.append(value)
    return list(dict.fromkeys(values))


def _check_drafts_given(args: argparse.Namespace, methods: Sequence[str]) -> None:
    """A non-default target has no fallback drafters: the methods must have theirs."""
    if args.target == "default":
        return
    speculative = [m for m in methods if m != "ar"]
    if speculative and args.draft is None:
        raise D2SDError(
            f"--methods {','.join(speculative)} need --draft (a DFlash drafter); give it, or run "
            "--methods ar"
        )
    if "d2sd" in methods and args.vp_draft is None:
        raise D2SDError("--methods d2sd needs --vp-draft (a VP drafter); give it, or drop d2sd")


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("runs") / f"bench-{_dt.date.today().isoformat()}"
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise D2SDError(f"--out {out}: exists and is not a directory")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise D2SDError(f"--out {out}: cannot write into {existing}")
    return out


def plan(argv: Sequence[str] | None, world: Any = None) -> BenchPlan:
    """Parse and check the options, resolve defaults, read the prompts; loads no model."""
    from d2sd import cli_checks, run
    from d2sd.data import load_dataset_prompts
    from d2sd.distributed import World, device_for_rank
    from d2sd.models.loading import resolve_target_source

    world = world or World()
    args = build_parser().parse_args(argv)
    if args.block_size_2 is None:
        args.block_size_2 = args.block_size
    methods = _methods(args.methods)
    datasets = _datasets(args.datasets)
    temperatures = _temperatures(args.temperatures)
    if args.max_samples < 1:
        raise D2SDError(f"--max-samples must be >= 1, got {args.max_samples}")
    device = cli_checks.resolve_device(device_for_rank(args.device, world))
    dtype = cli_checks.resolve_dtype(args.dtype, device)
    for temperature in temperatures:
        cli_checks.check_decoding_options(
            block_size=args.block_size,
            block_size_2=args.block_size_2,
            topk=args.topk,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            branches=any(m in run.DUAL_MODES for m in methods),
        )
    backend = cli_checks.resolve_backend(args.backend, device, dtype)
    _check_drafts_given(args, methods)
    out_dir = _out_dir(args)
    bench_plan = BenchPlan(
        args, world, methods, datasets, temperatures, device, dtype, backend, {}, {}, out_dir
    )
    _mode, drafts, notes = run.resolve_drafts(
        argparse.Namespace(**vars(args), mode=bench_plan.run_mode)
    )
    bench_plan.drafts, bench_plan.notes = drafts, notes
    if backend == "flashinfer":
        notes.append("--backend flashinfer runs eagerly (it syncs on cache_len: no CUDA graphs)")
    for name in datasets:
        bench_plan.samples[name] = load_dataset_prompts(
            name, data_dir=args.data_dir, max_samples=args.max_samples, online=args.online
        )
    try:
        resolve_target_source(args.target)
    except D2SDError as exc:
        raise D2SDError(f"--target: {exc}") from None
    return bench_plan


# ---------------------------------------------------------------------------------------------
# results.json: cells, summaries, resume
# ---------------------------------------------------------------------------------------------


def temperature_label(temperature: float) -> str:
    return f"t={temperature:g}"


def cell_key(method: str, dataset: str, temperature: float) -> str:
    """The cell's key in results.json, e.g. "d2sd/gsm8k/t=0"."""
    return f"{method}/{dataset}/{temperature_label(temperature)}"


class _Generation:
    """A recorded turn seen as a GenerationResult (the fields RunStats reads)."""

    def __init__(self, turn: Mapping[str, Any]) -> None:
        self.tokens = turn["tokens"]
        self.accept_lengths = turn["accept_lengths"]
        self.stage_ms = turn["stage_ms"]
        self.wall_s = turn["wall_s"]
        self.num_cycles = turn["num_cycles"]


def _turns(cell: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [turn for prompt in cell["prompts"] for turn in prompt["turns"]]


def summarize_cell(cell: Mapping[str, Any], ar_cell: Mapping[str, Any] | None) -> dict[str, Any]:
    """RunStats.to_dict() of the cell's turns, plus `speedup` (AR ms/token over the cell's, None
    without an AR cell) and, at temperature 0, `greedy_equal_ar` = [turns whose tokens equal
    AR's, turns compared] and, where the turns were checked (`lost_tokens`),
    `greedy_target_choice` = [turns whose every token is the target's greedy choice, turns]."""
    from d2sd.report import RunStats

    stats = RunStats.from_results(cell["method"], map(_Generation, _turns(cell)))
    summary = stats.to_dict()
    summary["speedup"] = None
    if ar_cell is not None:
        ar = RunStats.from_results("ar", map(_Generation, _turns(ar_cell)))
        summary["speedup"] = ar.ms_per_token / stats.ms_per_token
        if cell["temperature"] == 0:
            pairs = list(zip(_turns(cell), _turns(ar_cell)))
            same = sum(a["tokens"] == b["tokens"] for a, b in pairs)
            summary["greedy_equal_ar"] = [same, len(pairs)]
    checked = [t["lost_tokens"] for t in _turns(cell) if "lost_tokens" in t]
    if checked:
        summary["greedy_target_choice"] = [sum(lost == 0 for lost in checked), len(checked)]
    return summary


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or an
    interrupted run) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _same_setting(key: str, old: Any, new: Any) -> bool:
    """Equal, except that drafters compare per role loaded by both runs (a run with fewer methods
    loads fewer drafters)."""
    if key == "drafts" and isinstance(old, dict) and isinstance(new, dict):
        return all(old[r] == new[r] for r in old.keys() & new.keys() if old[r] and new[r])
    return old == new


class ResultsFile:
    """results.json of one `--out` folder: load (resume), add cells, write atomically."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    @classmethod
    def open(
        cls,
        path: Path,
        settings: dict[str, Any],
        environment: dict[str, Any],
        prompts: dict[str, list[str]],
        notes: Sequence[str] = (),
    ) -> ResultsFile:
        """Start a new results file, or resume the one at `path` if its settings and prompt ids
        match (D2SDError naming the first difference otherwise)."""
        fresh = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "environment": environment,
            "notes": list(notes),
            "prompts": prompts,
            "cells": {},
        }
        if not path.is_file():
            return cls(path, fresh)
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_settings, old_cells = old["settings"], old["cells"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise D2SDError(
                f"cannot resume {path}: not a results file ({exc}); move it away or use --out"
            ) from None
        for key in RESUME_KEYS:
            if not _same_setting(key, old_settings.get(key), settings.get(key)):
                raise D2SDError(
                    f"{path} was made with {key} = {old_settings.get(key)!r}, this run has "
                    f"{settings.get(key)!r}: use another --out (or the same settings) to resume"
                )
        for name, ids in prompts.items():
            old_ids = old.get("prompts", {}).get(name)
            if old_ids is not None and old_ids != ids:
                raise D2SDError(
                    f"{path}: dataset {name!r} had other prompts in the earlier run (another "
                    "--data-dir or --online source?): use another --out to start afresh"
                )
        fresh["cells"] = old_cells
        old_drafts = old_settings.get("drafts") or {}
        fresh["settings"]["drafts"] = {
            role: settings["drafts"].get(role) or old_drafts.get(role)
            for role in {**old_drafts, **settings["drafts"]}
        }
        fresh["prompts"] = {**old.get("prompts", {}), **prompts}
        return cls(path, fresh)

    def add_cell(self, key: str, cell: dict[str, Any]) -> None:
        """Store a finished cell, refresh every summary and write the file (atomically)."""
        self.cells[key] = cell
        self.refresh_summaries()
        self.write()

    def refresh_summaries(self) -> None:
        for cell in self.cells.values():
            ar_key = cell_key("ar", cell["dataset"], cell["temperature"])
            cell["summary"] = summarize_cell(cell, self.cells.get(ar_key))

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(self.data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _cell_text(summary: Mapping[str, Any] | None) -> str:
    if summary is None or summary.get("speedup") is None:
        return "–"
    return f"{summary['speedup']:.2f}x / {summary['tau']:.2f}"


def format_bench_table(
    results: Mapping[str, Any],
    methods: Sequence[str],
    datasets: Sequence[str],
    temperatures: Sequence[float],
) -> str:
    """table.md: per temperature a Markdown table, rows = datasets + Average, columns = methods,
    cells "speedup x / τ" from the cells' summaries (2 decimals; "–" where a cell is missing).
    The average is the mean of the per-dataset values that exist."""
    cells = results["cells"]
    settings = results.get("settings", {})
    env = results.get("environment", {})
    hardware = env.get("gpu") or settings.get("device", "cpu")
    lines = [
        "# D2SD benchmark",
        "",
        f"target `{settings.get('target')}`, {hardware}, {settings.get('dtype')}, backend "
        f"{settings.get('backend')}; γ = {settings.get('block_size')}, γ2 = "
        f"{settings.get('block_size_2')}, K = {settings.get('topk')}, "
        f"{settings.get('verify_layout')} verify; at most {settings.get('max_samples')} prompts "
        f"per dataset, {settings.get('max_new_tokens')} new tokens per turn.",
        "",
        "Each cell: speedup over AR (ms/token, same prompts, same run) / τ (tokens per cycle).",
    ]
    for temperature in temperatures:
        kind = "greedy" if temperature == 0 else "sampled"
        lines += ["", f"## Temperature {temperature:g} ({kind})", ""]
        lines.append("| Dataset | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        sums: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        for dataset in datasets:
            row = []
            for method in methods:
                cell = cells.get(cell_key(method, dataset, temperature))
                summary = cell.get("summary") if cell else None
                row.append(_cell_text(summary))
                if summary is not None and summary.get("speedup") is not None:
                    sums[method].append((summary["speedup"], summary["tau"]))
            lines.append(f"| {dataset} | " + " | ".join(row) + " |")
        average = []
        for method in methods:
            values = sums[method]
            if not values:
                average.append("–")
                continue
            speedup = sum(v[0] for v in values) / len(values)
            tau = sum(v[1] for v in values) / len(values)
            average.append(f"{speedup:.2f}x / {tau:.2f}")
        lines.append("| **Average** | " + " | ".join(average) + " |")
        if temperature == 0:
            for count_key, text in (
                ("greedy_equal_ar", "Greedy outputs equal to AR's (turns): {} (exact in fp32; "
                 "bf16 rounding may split near-ties)."),
                ("greedy_target_choice", "Greedy outputs whose every token is the target's "
                 "greedy choice, teacher-forced up to its dtype's rounding (turns): {}."),
            ):  # fmt: skip
                checks = _greedy_counts(cells, methods, datasets, count_key)
                if checks:
                    lines += ["", text.format(", ".join(checks))]
    return "\n".join(lines) + "\n"


def _greedy_counts(
    cells: Mapping[str, Any], methods: Sequence[str], datasets: Sequence[str], count_key: str
) -> list[str]:
    """ "<method> <passed>/<turns>" per speculative method, summed over the greedy cells'
    summary[count_key] ([passed, turns] pairs)."""
    checks = []
    for method in methods:
        counts = [
            cells[k]["summary"].get(count_key)
            for k in (cell_key(method, d, 0.0) for d in datasets)
            if k in cells and method != "ar"
        ]
        counts = [c for c in counts if c]
        if counts:
            same, total = (sum(c[i] for c in counts) for i in (0, 1))
            checks.append(f"{METHOD_LABELS[method]} {same}/{total}")
    return checks


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _turn_record(turn: Any, check: Callable[[list[int], list[int]], int] | None) -> dict[str, Any]:
    result = turn.result
    record = {
        "prompt_tokens": len(turn.prompt_ids),
        "tokens": list(result.tokens),
        "accept_lengths": list(result.accept_lengths),
        "stage_ms": dict(result.stage_ms),
        "wall_s": result.wall_s,
        "num_cycles": result.num_cycles,
    }
    if check is not None:  # after the timing: the teacher-forced pass is not part of decoding
        record["lost_tokens"] = check(list(turn.prompt_ids), list(result.tokens))
    return record


def run_share(
    generate: Callable[[list[int], Any], Any],
    tokenizer: Any,
    samples: Sequence[Any],
    indices: Sequence[int],
    config: Any,
    fits: Callable[[str, int], None],
    on_prompt: Callable[[], None] = lambda: None,
    check: Callable[[list[int], list[int]], int] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Run the prompts `indices` of `samples` turn by turn: [(index, {"id", "turns": [...]})].

    `generate(prompt_ids, config)` is the decoder's; `fits(sample_id, prompt_len)` raises
    D2SDError when a turn's prompt plus its new tokens does not fit the cache; `check(prompt_ids,
    tokens)`, if given, is stored per turn as `lost_tokens` (greedy cells: `non_greedy_tokens`).
    """
    from d2sd.data import run_turns

    share = []
    for index in indices:
        sample = samples[index]

        def one_turn(prompt_ids: list[int], sample_id: str = sample.id) -> Any:
            fits(sample_id, len(prompt_ids))
            return generate(prompt_ids, config)

        turns = run_turns(one_turn, tokenizer, sample)
        records = [_turn_record(t, check) for t in turns]
        share.append((index, {"id": sample.id, "turns": records}))
        on_prompt()
    return share


class _SharedError(D2SDError):
    """An error every rank raises alike (rank 0's verdict after a collective): printed once."""


class _Suite:
    """The loaded models and decoder of one rank, and the loop over cells."""

    def __init__(self, bench_plan: BenchPlan) -> None:
        from d2sd import run

        self.bp = bench_plan
        self.world = bench_plan.world
        if bench_plan.device.type == "cuda" and bench_plan.device.index is not None:
            import torch

            # graph capture streams and Triton launches use the current device
            torch.cuda.set_device(bench_plan.device)
        self.run_plan = bench_plan.run_plan()
        self.models = run.load_models(self.run_plan)
        run.check_models(self.run_plan, self.models)
        self.context = run.cache_len_needed(self.run_plan, self.models)
        self.decoder = run.make_decoder(self.models, self.context)

    def fits(self, sample_id: str, prompt_len: int) -> None:
        from d2sd.cli_checks import check_prompt_fits

        check_prompt_fits(
            sample_id, prompt_len, self.bp.max_new_tokens, self.run_plan.slack, self.context
        )

    def warm_up(self, samples: Sequence[Any], config: Any) -> None:
        """`Decoder.warm_up` of the cell's configuration: kernel compilation, graph capture,
        buffer allocation and (CUDA) autotuning of every prefill row bucket stay out of the timed
        runs. Also on the CPU, where the first call of a configuration pays its allocations and
        lazy imports."""
        if not samples:
            return
        from d2sd.data import encode_chat

        ids = encode_chat(self.models.tokenizer, [{"role": "user", "content": samples[0].turns[0]}])
        self.decoder.warm_up(ids, config)

    def _greedy_check(
        self, method: str, temperature: float
    ) -> Callable[[list[int], list[int]], int] | None:
        """For a greedy speculative cell, the count of a turn's tokens that the target would not
        pick greedily (teacher-forced, up to its dtype's rounding): losslessness checked on every
        output, where a comparison with AR's stops meaning much after a bf16 near tie."""
        if temperature != 0 or method == "ar":
            return None
        from d2sd.generate import non_greedy_tokens

        return functools.partial(non_greedy_tokens, self.models.target)

    def run_cell(self, method: str, dataset: str, temperature: float, bar: Any) -> dict | None:
        """Run this rank's prompts of the cell, gather on rank 0: the cell there, None elsewhere.
        A rank's D2SDError travels in the gather and is raised on every rank."""
        from d2sd.distributed import broadcast_from_main, gather_to_main, merge_shards, shard

        samples = self.bp.samples[dataset]
        config = self.bp.config(method, temperature)
        payload: dict[str, Any]
        try:
            self.warm_up(samples, config)
            share = run_share(
                self.decoder.generate,
                self.models.tokenizer,
                samples,
                shard(len(samples), self.world),
                config,
                self.fits,
                on_prompt=bar.update,
                check=self._greedy_check(method, temperature),
            )
            payload = {"share": share}
        except D2SDError as exc:
            where = f" (on rank {self.world.rank})" if self.world.distributed else ""
            payload = {"error": f"{exc}{where}"}
        parts = gather_to_main(payload, self.world)
        verdict = None
        if parts is not None:
            verdict = next((p["error"] for p in parts if "error" in p), None)
        verdict = broadcast_from_main(verdict, self.world)
        if verdict is not None:
            raise _SharedError(verdict)
        if parts is None:
            return None
        prompts = merge_shards([p["share"] for p in parts], count=len(samples))
        return {
            "method": method,
            "dataset": dataset,
            "temperature": temperature,
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": str(self.bp.device),
            "world_size": self.world.size,
            "prompts": prompts,
        }


def _todo(bench_plan: BenchPlan, finished: set[str]) -> list[tuple[str, str, float]]:
    """Unfinished cells in run order: per temperature and dataset, ar first, then the methods."""
    return [
        (method, dataset, temperature)
        for temperature in bench_plan.temperatures
        for dataset in bench_plan.datasets
        for method in bench_plan.all_methods
        if cell_key(method, dataset, temperature) not in finished
    ]


def _write_outputs(bench_plan: BenchPlan, results: ResultsFile) -> str:
    """table.md and the plots from results.json's cells; returns the table."""
    table = format_bench_table(
        results.data, bench_plan.methods, bench_plan.datasets, bench_plan.temperatures
    )
    _write_atomic(bench_plan.out_dir / TABLE_NAME, table)
    if not bench_plan.args.no_plots:
        from d2sd import plots

        try:
            paths = plots.plot_all(
                results.data,
                bench_plan.out_dir,
                bench_plan.all_methods,
                bench_plan.datasets,
                bench_plan.temperatures,
            )
            for path in paths:
                print(f"wrote {path}", file=sys.stderr)
        except D2SDError as exc:
            print(f"note: plots skipped: {exc}", file=sys.stderr)
    return table


def report_only(out_dir: Path, plots: bool) -> str:
    """table.md (returned) and the plots of `out_dir`/results.json, whose settings name the
    methods, datasets and temperatures; a missing or unreadable file is a D2SDError."""
    path = out_dir / RESULTS_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings = data["settings"]
        methods, datasets = settings["methods"], settings["datasets"]
        temperatures = [float(t) for t in settings["temperatures"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise D2SDError(f"--report-only: cannot read {path} ({exc})") from None
    table = format_bench_table(data, methods, datasets, temperatures)
    _write_atomic(out_dir / TABLE_NAME, table)
    if plots:
        from d2sd import plots as plotting

        all_methods = ["ar", *[m for m in methods if m != "ar"]]
        for written in plotting.plot_all(data, out_dir, all_methods, datasets, temperatures):
            print(f"wrote {written}", file=sys.stderr)
    return table


def execute(bench_plan: BenchPlan) -> int:
    """Load the models, run every unfinished cell, write results.json, table.md and plots."""
    from tqdm import tqdm

    from d2sd.distributed import broadcast_from_main
    from d2sd.report import run_environment

    world = bench_plan.world
    main_rank = world.is_main
    results = None
    finished: list[str] = []
    problem = None  # rank 0's D2SDError, sent to every rank so that none waits for rank 0
    if main_rank:
        try:
            results = ResultsFile.open(
                bench_plan.out_dir / RESULTS_NAME,
                bench_plan.settings(),
                run_environment(bench_plan.device, bench_plan.world.size),
                {name: [s.id for s in bench_plan.samples[name]] for name in bench_plan.datasets},
                bench_plan.notes,
            )
            finished = sorted(results.cells)
        except D2SDError as exc:
            problem = str(exc)
    problem, finished = broadcast_from_main((problem, finished), world)
    if problem is not None:
        raise _SharedError(problem)
    if main_rank:
        for note in bench_plan.notes:
            print(f"note: {note}", file=sys.stderr)
        bench_plan.out_dir.mkdir(parents=True, exist_ok=True)
    todo = _todo(bench_plan, set(finished))
    if main_rank:
        done = len(_todo(bench_plan, set())) - len(todo)
        print(
            f"{len(todo)} cell(s) to run, {done} already in {results.path}; target "
            f"{bench_plan.args.target}, {bench_plan.device} x {world.size} process(es), "
            f"{bench_plan.settings()['dtype']}, backend {bench_plan.backend}",
            file=sys.stderr,
        )
    suite = _Suite(bench_plan) if todo else None
    interrupted = False
    cells_bar = tqdm(
        total=len(todo),
        desc="cells",
        unit="cell",
        disable=not main_rank or not todo,
        file=sys.stderr,
    )
    try:
        for method, dataset, temperature in todo:
            key = cell_key(method, dataset, temperature)
            count = len(range(world.rank, len(bench_plan.samples[dataset]), world.size))
            with tqdm(
                total=count,
                desc=key,
                unit="prompt",
                leave=False,
                disable=not main_rank,
                file=sys.stderr,
            ) as bar:
                cell = suite.run_cell(method, dataset, temperature, bar)
            if cell is not None:
                results.add_cell(key, cell)
                summary = cell["summary"]
                cells_bar.write(
                    f"{key}: {_cell_text(summary)} ({summary['tokens']} tokens, "
                    f"{summary['tokens_per_s']:.1f} tokens/s)",
                    file=sys.stderr,
                )
            cells_bar.update()
    except KeyboardInterrupt:
        interrupted = True
        if main_rank:
            print(
                f"\ninterrupted: {len(results.cells)} finished cell(s) kept in {results.path}",
                file=sys.stderr,
            )
    finally:
        cells_bar.close()
    if main_rank:
        if not results.path.is_file():
            results.write()
        table = _write_outputs(bench_plan, results)
        print(table)
        print(f"wrote {results.path} and {bench_plan.out_dir / TABLE_NAME}", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (0, 2 for bad input, 130 when interrupted; SIGTERM counts as an
    interrupt: the finished cells and the table are written)."""
    from d2sd.run import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    from d2sd import distributed
    from d2sd.run import UsageError

    world = None
    planned = False  # options and prompts are checked alike on every rank: report those once
    try:
        args = build_parser().parse_args(argv)
        if args.report_only:
            print(report_only(_out_dir(args), plots=not args.no_plots))
            return 0
        world = distributed.world_from_env()
        bench_plan = plan(argv, world)
        planned = True
        distributed.init_process_group(world)
        try:
            return execute(bench_plan)
        finally:
            distributed.shutdown(world)
    except (D2SDError, UsageError) as exc:
        shared = not planned or isinstance(exc, _SharedError)
        if world is None or world.is_main or not shared:
            rank = f" (rank {world.rank})" if not shared and world.distributed else ""
            message = " ".join(str(exc).split("\n"))
            print(f"d2sd.bench: error{rank}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # while loading: nothing finished
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
