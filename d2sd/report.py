"""Text tables for decoding runs: throughput and speedup, τ and its histogram, per-stage breakdown.

Shared by `python -m d2sd.run` and the benchmark suite. Inputs are `GenerationResult`s (see
ARCHITECTURE.md, "Decoding"), or anything with the same fields: `tokens`, `accept_lengths`,
`stage_ms`, `wall_s`, `num_cycles`. Results of one mode pool into one `RunStats`.

Definitions:
- tokens/s = new tokens / wall seconds, summed over all generations (prompts and turns) of a mode;
  ms/token is its inverse. Wall time is the whole `generate` call, prefill included, for every
  mode alike. Speedup = ms/token of `ar` / ms/token of the mode (same prompts, same run).
- τ (mean accepted length) = tokens committed per cycle, pooled over cycles: sum(accept_lengths) /
  number of cycles. The reference code (catnanami/D2-SD `benchmark.py`) averages per-generation
  means instead; `RunStats.tau_per_generation` gives that number too (equal when lengths are equal).
- Stage breakdown: `stage_ms` totals per stage (draft1, select, draft2, verify, accept_commit; `ar`
  has one stage, step; prefill runs once per generation, outside the cycles). "% of cycle" is a
  stage's share of the cycle stages' sum, "% of wall" its share of the wall time; "other" is the
  wall time no stage accounts for (host work between stages: stop checks, bookkeeping). ms/cycle
  divides by the number of cycles (ar: steps), ms/token by the new tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OUTSIDE_CYCLE",
    "STAGE_LABELS",
    "RunStats",
    "format_histogram",
    "format_report",
    "format_stage_table",
    "format_table",
    "format_throughput_table",
]

# stage keys timed outside the cycles (once per generation)
OUTSIDE_CYCLE = ("prefill",)
# stage key in GenerationResult.stage_ms -> row label, in cycle order
STAGE_LABELS = {
    "draft1": "draft 1",
    "select": "select",
    "draft2": "draft 2",
    "verify": "verify",
    "accept_commit": "accept/commit",
    "step": "step",
}


@dataclass
class RunStats:
    """Pooled statistics of one mode over several generations."""

    mode: str
    num_generations: int = 0
    num_tokens: int = 0
    wall_s: float = 0.0
    num_cycles: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    per_generation_tau: list[float] = field(default_factory=list)

    @classmethod
    def from_results(cls, mode: str, results: Iterable[Any]) -> RunStats:
        """Pool GenerationResult-like objects (fields: tokens, accept_lengths, stage_ms, wall_s,
        num_cycles)."""
        stats = cls(mode=mode)
        for result in results:
            stats.add(result)
        return stats

    def add(self, result: Any) -> None:
        """Pool one more generation."""
        self.num_generations += 1
        self.num_tokens += len(result.tokens)
        self.wall_s += float(result.wall_s)
        self.num_cycles += int(result.num_cycles)
        self.accept_lengths.extend(int(a) for a in result.accept_lengths)
        for stage, ms in result.stage_ms.items():
            self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + float(ms)
        if result.accept_lengths:
            self.per_generation_tau.append(sum(result.accept_lengths) / len(result.accept_lengths))

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.wall_s / self.num_tokens if self.num_tokens else float("nan")

    @property
    def tau(self) -> float:
        """Tokens committed per cycle, pooled over all cycles."""
        if not self.accept_lengths:
            return float("nan")
        return sum(self.accept_lengths) / len(self.accept_lengths)

    @property
    def tau_per_generation(self) -> float:
        """The reference code's τ: the mean over generations of each generation's mean."""
        if not self.per_generation_tau:
            return float("nan")
        return sum(self.per_generation_tau) / len(self.per_generation_tau)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the histogram as {length: count})."""
        return {
            "mode": self.mode,
            "generations": self.num_generations,
            "tokens": self.num_tokens,
            "wall_s": self.wall_s,
            "cycles": self.num_cycles,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_token": self.ms_per_token,
            "tau": self.tau,
            "tau_per_generation": self.tau_per_generation,
            "accept_histogram": dict(sorted(Counter(self.accept_lengths).items())),
            "stage_ms": dict(self.stage_ms),
        }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned; floats as given
    (format them before)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"  # x != x: NaN


def format_throughput_table(stats: RunStats, baseline: RunStats | None = None) -> str:
    """Tokens/s, ms/token and τ of `stats` and (when given) of the `ar` baseline, with the speedup."""
    rows = []
    for s in (stats, baseline):
        if s is None:
            continue
        speedup = "1.00x"
        if baseline is not None and s is stats and s is not baseline:
            speedup = f"{_fmt(baseline.ms_per_token / stats.ms_per_token)}x"
        elif baseline is None:
            speedup = "-"
        tau = _fmt(s.tau) if s.num_cycles else "-"
        rows.append(
            [
                s.mode,
                s.num_tokens,
                _fmt(s.wall_s),
                _fmt(s.tokens_per_s, 1),
                _fmt(s.ms_per_token),
                tau,
                speedup,
            ]
        )
    headers = ["mode", "tokens", "time s", "tokens/s", "ms/token", "τ", "speedup"]
    return format_table(headers, rows)


def format_histogram(
    accept_lengths: Sequence[int], max_length: int | None = None, width: int = 40
) -> str:
    """The distribution of tokens committed per cycle as text bars, one row per length 1..max."""
    if not accept_lengths:
        return "(no cycles)"
    counts = Counter(int(a) for a in accept_lengths)
    top = max(max(counts), max_length or 0)
    total = len(accept_lengths)
    peak = max(counts.values())
    lines = []
    for length in range(1, top + 1):
        n = counts.get(length, 0)
        bar = "#" * round(width * n / peak)
        lines.append(f"{length:>3} | {bar:<{width}} {100 * n / total:5.1f}% ({n})")
    return "\n".join(lines)


def format_stage_table(stats: RunStats) -> str:
    """Per-stage time: share of the cycle (cycle stages only) and of the wall time, ms per cycle,
    ms per token. Rows: the cycle stages, their sum, then prefill, "other" (the wall time no stage
    accounts for) and the wall total."""
    cycles = max(stats.num_cycles, 1)
    tokens = max(stats.num_tokens, 1)
    wall_ms = 1e3 * stats.wall_s
    cycle_keys = [k for k in STAGE_LABELS if k in stats.stage_ms]
    cycle_keys += [k for k in stats.stage_ms if k not in STAGE_LABELS and k not in OUTSIDE_CYCLE]
    cycle_ms = sum(stats.stage_ms[k] for k in cycle_keys)

    def row(label: str, ms: float, of_cycle: bool) -> list[str]:
        share = _fmt(100 * ms / cycle_ms, 1) if of_cycle and cycle_ms > 0 else ""
        wall = _fmt(100 * ms / wall_ms, 1) if wall_ms > 0 else "n/a"
        return [label, share, wall, _fmt(ms / cycles, 3), _fmt(ms / tokens, 3)]

    rows = [row(STAGE_LABELS.get(k, k), stats.stage_ms[k], True) for k in cycle_keys]
    if len(cycle_keys) > 1:
        rows.append(row("cycle", cycle_ms, True))
    outside = sum(stats.stage_ms.get(k, 0.0) for k in OUTSIDE_CYCLE)
    for key in OUTSIDE_CYCLE:
        if key in stats.stage_ms:
            rows.append(row(key, stats.stage_ms[key], False))
    if stats.stage_ms:
        rows.append(row("other", wall_ms - cycle_ms - outside, False))
    rows.append(row("total", wall_ms, False))
    headers = ["stage", "% of cycle", "% of wall", "ms/cycle", "ms/token"]
    return format_table(headers, rows)


def format_report(
    stats: RunStats, baseline: RunStats | None = None, block_size: int | None = None
) -> str:
    """The whole summary: throughput (+ speedup), τ with its histogram, stage breakdowns."""
    parts = [format_throughput_table(stats, baseline)]
    if stats.num_cycles and stats.mode != "ar":
        parts.append(
            f"τ (tokens committed per cycle) = {_fmt(stats.tau)} over {stats.num_cycles} cycles; "
            f"mean of per-generation means (the reference's) = {_fmt(stats.tau_per_generation)}"
        )
        most = f" (at most {block_size} per cycle)" if block_size else ""
        parts.append(
            f"histogram of tokens committed per cycle{most}:\n"
            + format_histogram(stats.accept_lengths)
        )
    parts.append(f"stages of {stats.mode}:\n{format_stage_table(stats)}")
    if baseline is not None and baseline is not stats and baseline.stage_ms:
        parts.append(f"stages of {baseline.mode}:\n{format_stage_table(baseline)}")
    return "\n\n".join(parts)


def run_environment(device: Any, world_size: int = 1) -> dict[str, Any]:
    """Where a run ran, for its JSON: bench/_harness.environment() (GPU, versions, date) where the
    repository's bench package is importable, plus the device and the number of processes."""
    try:
        from bench._harness import environment

        env = environment()
    except ImportError:  # an installed d2sd without the repository's bench/ folder
        import platform

        import torch

        env = {"python": platform.python_version(), "torch": torch.__version__}
    env["device"] = str(device)
    env["world_size"] = world_size
    return env
