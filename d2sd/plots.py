"""PNG plots of a benchmark run (`d2sd.bench`'s results.json), drawn with matplotlib's Agg canvas.

Inputs are the results dict: `cells[key]` with `method`, `dataset`, `temperature` and a `summary`
(`d2sd.report.RunStats.to_dict()` + `speedup`). Every plot pools what the summaries hold, so it
can be redrawn from results.json alone (`plot_all`).

- `tau_hist.png`: per speculative method, the share of cycles that committed 1, 2, ... tokens,
  pooled over the datasets, one bar colour per temperature (the mean τ in the legend).
- `stages.png`: per temperature, stacked bars of milliseconds per new token and stage, per method
  (datasets pooled: the sum of stage times over the sum of tokens). Stages are those of
  `d2sd.report.STAGE_LABELS` plus prefill and "other" (wall time no stage accounts for).
- `speedup.png`: per temperature, grouped bars of speedup over AR per dataset (and their mean),
  one bar per method; a line at 1x.

matplotlib is imported on the first call (it is optional: `pip install matplotlib`); a missing one
raises D2SDError with that hint. The figures are drawn on `FigureCanvasAgg` directly, so pyplot's
global backend and figure registry are never touched.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from d2sd.errors import D2SDError

__all__ = ["plot_all", "plot_speedups", "plot_stage_breakdown", "plot_tau_histograms"]


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, list[Any]]:
    """A Figure on an Agg canvas and its axes, row-major."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise D2SDError(
            "the plots need matplotlib: pip install matplotlib (or --no-plots)"
        ) from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _label(method: str) -> str:
    from d2sd.bench import METHOD_LABELS

    return METHOD_LABELS.get(method, method)


def _cells_of(cells: Mapping[str, Any], *, method=None, temperature=None, dataset=None) -> list:
    return [
        c
        for c in cells.values()
        if (method is None or c["method"] == method)
        and (temperature is None or c["temperature"] == temperature)
        and (dataset is None or c["dataset"] == dataset)
        and c.get("summary")
    ]


def plot_tau_histograms(
    cells: Mapping[str, Any],
    methods: Sequence[str],
    temperatures: Sequence[float],
    path: str | os.PathLike,
    max_length: int | None = None,
) -> Path | None:
    """Accepted-length histograms, one panel per speculative method (None if there is none);
    the x axis runs 1 .. max(max_length, the longest seen)."""
    speculative = [m for m in methods if m != "ar"]
    if not speculative:
        return None
    figure, axes = _figure(4.2 * len(speculative), 3.4, 1, len(speculative))
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / max(len(temperatures), 1)
    longest = max_length or 1
    for ax, method in zip(axes, speculative):
        for j, temperature in enumerate(temperatures):
            counts: Counter[int] = Counter()
            for cell in _cells_of(cells, method=method, temperature=temperature):
                for length, n in cell["summary"]["accept_histogram"].items():
                    counts[int(length)] += int(n)
            total = sum(counts.values())
            if not total:
                continue
            lengths = sorted(counts)
            longest = max(longest, lengths[-1])
            tau = sum(k * n for k, n in counts.items()) / total
            ax.bar(
                [k + (j - (len(temperatures) - 1) / 2) * width for k in lengths],
                [counts[k] / total for k in lengths],
                width=width,
                label=f"T={temperature:g} (τ={tau:.2f})",
            )
        ax.set_title(_label(method))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tokens committed per cycle")
        ax.set_ylabel("share of cycles")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlim(0.5, longest + 0.5)
    return _save(figure, path)


def plot_stage_breakdown(
    cells: Mapping[str, Any],
    methods: Sequence[str],
    temperatures: Sequence[float],
    path: str | os.PathLike,
) -> Path:
    """Stacked ms per token and stage, one panel per temperature, one bar per method."""
    from d2sd.report import OUTSIDE_CYCLE, STAGE_LABELS

    stages = [*STAGE_LABELS, *OUTSIDE_CYCLE, "other"]
    figure, axes = _figure(1.6 + 1.3 * len(methods) * len(temperatures), 4.0, 1, len(temperatures))
    colors = {stage: f"C{i}" for i, stage in enumerate(stages)}
    handles: dict[str, Any] = {}
    for ax, temperature in zip(axes, temperatures):
        for x, method in enumerate(methods):
            tokens, wall_ms, stage_ms = 0, 0.0, Counter()
            for cell in _cells_of(cells, method=method, temperature=temperature):
                summary = cell["summary"]
                tokens += summary["tokens"]
                wall_ms += 1e3 * summary["wall_s"]
                stage_ms.update(summary["stage_ms"])
            if not tokens:
                continue
            stage_ms["other"] = max(wall_ms - sum(stage_ms.values()), 0.0)
            bottom = 0.0
            for stage in stages:
                if stage_ms.get(stage, 0.0) <= 0:
                    continue
                height = stage_ms[stage] / tokens
                bars = ax.bar(x, height, bottom=bottom, color=colors[stage], width=0.6)
                handles.setdefault(stage, bars)
                bottom += height
        ax.set_xticks(range(len(methods)), [_label(m) for m in methods], rotation=20)
        ax.set_ylabel("ms per new token")
        ax.set_title(f"T={temperature:g}")
    top_first = [stage for stage in reversed(stages) if stage in handles]
    axes[-1].legend(  # once, beside the last panel, in stacking order (top first)
        [handles[stage] for stage in top_first],
        [STAGE_LABELS.get(stage, stage) for stage in top_first],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    return _save(figure, path)


def plot_speedups(
    cells: Mapping[str, Any],
    methods: Sequence[str],
    datasets: Sequence[str],
    temperatures: Sequence[float],
    path: str | os.PathLike,
) -> Path:
    """Grouped bars: speedup over AR per dataset (and the mean), one panel per temperature."""
    groups = [*datasets, "average"]
    shown = [m for m in methods if m != "ar"] or list(methods)
    figure, axes = _figure(
        1.5 + 0.5 * len(groups) * len(shown), 3.8 * len(temperatures), len(temperatures), 1
    )
    width = 0.8 / len(shown)
    for ax, temperature in zip(axes, temperatures):
        for j, method in enumerate(shown):
            values = []
            for dataset in datasets:
                cell = _cells_of(cells, method=method, temperature=temperature, dataset=dataset)
                speedup = cell[0]["summary"].get("speedup") if cell else None
                values.append(float("nan") if speedup is None else speedup)
            present = [v for v in values if v == v]
            values.append(sum(present) / len(present) if present else float("nan"))
            offset = (j - (len(shown) - 1) / 2) * width
            ax.bar(
                [g + offset for g in range(len(groups))], values, width=width, label=_label(method)
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("speedup over AR (x)")
        ax.set_title(f"T={temperature:g}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(figure, path)


def plot_all(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    methods: Sequence[str],
    datasets: Sequence[str],
    temperatures: Sequence[float],
) -> list[Path]:
    """Draw tau_hist.png, stages.png and speedup.png into `out_dir`; returns the written paths."""
    cells = results["cells"]
    out = Path(out_dir)
    settings = results.get("settings", {})
    blocks = [settings.get(k) for k in ("block_size", "block_size_2") if settings.get(k)]
    max_length = max(blocks) if blocks else None
    paths = [
        plot_tau_histograms(cells, methods, temperatures, out / "tau_hist.png", max_length),
        plot_stage_breakdown(cells, methods, temperatures, out / "stages.png"),
        plot_speedups(cells, methods, datasets, temperatures, out / "speedup.png"),
    ]
    return [p for p in paths if p is not None]
