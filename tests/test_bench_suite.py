"""`python -m d2sd.bench` on a tiny target: files, consistency of results.json / table.md / plots,
resume recomputes only the missing cell, bad input is one line and exit 2; the 8B cycle
benchmark's logic on a tiny config (`bench/cycle_8b.py --tiny`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from d2sd import bench
from tests.tiny_models import install_tiny_default_target

GSM8K = [
    {"question": "What is 2 + 3?", "answer": "#### 5"},
    {"question": "Add 4 and 4.", "answer": "#### 8"},
    {"question": "Unused third prompt.", "answer": "#### 0"},
]
MT_BENCH = [
    {"question_id": 81, "turns": ["Say hi.", "Say it again."]},
    {"question_id": 82, "turns": ["Name a color.", "Another one."]},
]
# two tiny datasets (one multi-turn), ar + d2sd, greedy and sampled; 8 cells
ARGV = [
    "--datasets", "gsm8k,mt-bench", "--methods", "ar,d2sd", "--temperatures", "0,1",
    "--max-samples", "2", "--max-new-tokens", "6", "--block-size", "4", "--topk", "2",
    "--device", "cpu",
]  # fmt: skip
GENERATIONS_PER_CELL = {"gsm8k": 2, "mt-bench": 4}  # prompts x turns


def write_datasets(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("gsm8k_test.jsonl", GSM8K), ("mt_bench.jsonl", MT_BENCH)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, float]]:
    """Tiny target + data dir; returns the log of generate calls (mode, temperature)."""
    from d2sd.generate import Decoder

    install_tiny_default_target(monkeypatch.setattr)
    calls: list[tuple[str, float]] = []
    original = Decoder.generate

    def counting(self, prompt_ids, config):
        calls.append((config.mode, config.temperature))
        return original(self, prompt_ids, config)

    monkeypatch.setattr(Decoder, "generate", counting)
    write_datasets(tmp_path / "data")
    return calls


def _run(tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, str]:
    argv = [*ARGV, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra]
    code = bench.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _table_cells(table: str) -> dict[tuple[str, str, str], str]:
    """(temperature label, row, column) -> cell text of table.md."""
    cells, temperature, header = {}, None, None
    for line in table.splitlines():
        if line.startswith("## Temperature "):
            temperature, header = line.split()[2], None
        elif line.startswith("| Dataset |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and header and not line.startswith("|---"):
            row = [c.strip() for c in line.strip("|").split("|")]
            for column, text in zip(header[1:], row[1:]):
                cells[(temperature, row[0], column)] = text
    return cells


def _ms_per_token(cell: dict) -> float:
    turns = [t for p in cell["prompts"] for t in p["turns"]]
    return 1e3 * sum(t["wall_s"] for t in turns) / sum(len(t["tokens"]) for t in turns)


def test_suite_files_consistency_and_resume(
    tiny: list[tuple[str, float]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = _run(tmp_path, capsys)
    assert code == 0, err
    folder = tmp_path / "out"
    for name in ("results.json", "table.md", "tau_hist.png", "stages.png", "speedup.png"):
        assert (folder / name).is_file(), name
    for name in ("tau_hist.png", "stages.png", "speedup.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((folder / "results.json").read_text())
    cells = results["cells"]
    expected = {
        bench.cell_key(m, d, t)
        for m in ("ar", "d2sd")
        for d in ("gsm8k", "mt-bench")
        for t in (0, 1)
    }
    assert set(cells) == expected
    # one untimed warm-up per cell, then every turn of every prompt
    assert len(tiny) == 2 * 2 * (2 + sum(GENERATIONS_PER_CELL.values()))
    assert results["settings"]["max_new_tokens"] == 6 and results["environment"]["torch"]
    assert results["prompts"]["mt-bench"] == ["mt-bench/81", "mt-bench/82"]
    for key, cell in cells.items():
        turns = [t for p in cell["prompts"] for t in p["turns"]]
        assert len(turns) == GENERATIONS_PER_CELL[cell["dataset"]], key
        assert all(1 <= len(t["tokens"]) <= 6 for t in turns), key
        summary = cell["summary"]
        # every cycle commits >= 1 token, at most a verify block (γ2 = 4); ar commits exactly 1
        assert 1 <= summary["tau"] <= 4, key
        if cell["method"] == "ar":
            assert summary["tau"] == 1 and summary["speedup"] == pytest.approx(1.0)
        ar = cells[bench.cell_key("ar", cell["dataset"], cell["temperature"])]
        assert summary["speedup"] == pytest.approx(_ms_per_token(ar) / _ms_per_token(cell))
        assert summary["tokens"] == sum(len(t["tokens"]) for t in turns)
        if cell["temperature"] == 0 and cell["method"] == "d2sd":
            # fp32 on the CPU: greedy d2sd is lossless, every turn equals ar's
            assert summary["greedy_equal_ar"] == [len(turns), len(turns)], key
        if cell["temperature"] == 0 and cell["method"] != "ar":
            # every greedy output was checked against the target itself, teacher-forced
            assert all(t["lost_tokens"] == 0 for t in turns), key
            assert summary["greedy_target_choice"] == [len(turns), len(turns)], key
        else:
            assert all("lost_tokens" not in t for t in turns), key
    # table.md: every cell and the average row carry the JSON's numbers
    table = (folder / "table.md").read_text()
    assert table in out
    shown = _table_cells(table)
    for temperature in ("0", "1"):
        for method, label in (("ar", "AR"), ("d2sd", "D2SD")):
            values = []
            for dataset in ("gsm8k", "mt-bench"):
                summary = cells[bench.cell_key(method, dataset, float(temperature))]["summary"]
                values.append((summary["speedup"], summary["tau"]))
                text = f"{summary['speedup']:.2f}x / {summary['tau']:.2f}"
                assert shown[(temperature, dataset, label)] == text
            mean = [sum(v[i] for v in values) / 2 for i in (0, 1)]
            assert shown[(temperature, "**Average**", label)] == f"{mean[0]:.2f}x / {mean[1]:.2f}"
    assert "Greedy outputs equal to AR's (turns): D2SD 6/6" in table
    assert "greedy choice, teacher-forced up to its dtype's rounding (turns): D2SD 6/6." in table

    # resume: drop one cell; the rerun computes that cell only, and the same tokens
    dropped = bench.cell_key("d2sd", "mt-bench", 1.0)
    before = cells.pop(dropped)
    (folder / "results.json").write_text(json.dumps(results))
    tiny.clear()
    code, _, err = _run(tmp_path, capsys)
    assert code == 0, err
    assert tiny == [("d2sd", 1.0)] * (1 + GENERATIONS_PER_CELL["mt-bench"])
    again = json.loads((folder / "results.json").read_text())["cells"]
    assert set(again) == expected
    tokens = lambda cell: [t["tokens"] for p in cell["prompts"] for t in p["turns"]]
    assert tokens(again[dropped]) == tokens(before)
    # a finished run reruns nothing
    tiny.clear()
    code, _, _ = _run(tmp_path, capsys)
    assert code == 0 and tiny == []

    # resuming with other settings is refused
    code, out, err = _run(tmp_path, capsys, "--max-new-tokens", "5")
    assert code == 2 and out == ""
    _assert_one_line_error(err, "max_new_tokens", "--out")


def test_interrupt_keeps_the_finished_cells(
    tiny: list[tuple[str, float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from d2sd.generate import Decoder

    counting = Decoder.generate
    stop_at = 2 * (1 + GENERATIONS_PER_CELL["gsm8k"]) + 2  # inside the third cell (ar/mt-bench/t=0)

    def interrupted(self, prompt_ids, config):
        if len(tiny) + 1 == stop_at:
            raise KeyboardInterrupt
        return counting(self, prompt_ids, config)

    monkeypatch.setattr(Decoder, "generate", interrupted)
    code, out, err = _run(tmp_path, capsys)
    assert code == 130
    assert "interrupted: 2 finished cell(s) kept" in err
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["cells"]) == {"ar/gsm8k/t=0", "d2sd/gsm8k/t=0"}
    assert "| gsm8k | 1.00x / 1.00 |" in (tmp_path / "out" / "table.md").read_text()
    assert "| mt-bench | – | – |" in out


def test_sigterm_keeps_the_finished_cells_and_report_only_redraws(
    tiny: list[tuple[str, float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """`timeout` stops a run with SIGTERM: same exit as Ctrl-C, the table written; later
    --report-only rewrites table.md from results.json without loading or running anything."""
    import os
    import signal

    from d2sd.generate import Decoder

    counting = Decoder.generate
    stop_at = 2 * (1 + GENERATIONS_PER_CELL["gsm8k"]) + 2

    def terminated(self, prompt_ids, config):
        if len(tiny) + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return counting(self, prompt_ids, config)

    monkeypatch.setattr(Decoder, "generate", terminated)
    code, out, err = _run(tmp_path, capsys)
    assert code == 130 and "interrupted: 2 finished cell(s) kept" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handler back
    table = tmp_path / "out" / "table.md"
    written = table.read_text()
    table.unlink()
    calls = len(tiny)
    code, out, err = _run(tmp_path, capsys, "--report-only", "--no-plots")
    assert code == 0 and len(tiny) == calls
    assert table.read_text() == written and out.strip() == written.strip()
    code, out, err = (
        bench.main(["--report-only", "--out", str(tmp_path / "nothing")]),
        *capsys.readouterr(),
    )
    assert code == 2 and "cannot read" in err and err.count("\n") == 1


def test_help_states_every_default() -> None:
    actions = [a for a in bench.build_parser()._actions if a.dest != "help"]
    assert all("(default:" in (a.help or "") for a in actions), [
        a.dest for a in actions if "(default:" not in (a.help or "")
    ]
    text = bench.build_parser().format_help()
    assert "torchrun --nproc_per_node" in text and "exit codes" in text


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("d2sd.bench: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--methods", "ar,turbo"], ["--methods", "'turbo'", "d2sd"]),
        (["--methods", ","], ["--methods", "empty"]),
        (["--datasets", "gsm9k"], ["--datasets", "'gsm9k'", "gsm8k"]),
        (["--temperatures", "0,hot"], ["--temperatures", "'hot'"]),
        (["--temperatures", "-1"], ["--temperatures", ">= 0"]),
        (["--max-samples", "0"], ["--max-samples"]),
        (["--topk", "4"], ["--topk", "K = 4"]),  # K > γ-1 = 3 with --block-size 4
        (["--block-size-2", "2"], ["--block-size-2"]),
        (["--max-new-tokens", "lots"], ["--max-new-tokens", "invalid int"]),
        (["--datasets", "humaneval"], ["humaneval.jsonl"]),  # not in the data dir
        (["--device", "tpu"], ["--device"]),
    ],
)
def test_bad_input(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], fragments: list[str]
) -> None:
    code, out, err = _run(tmp_path, capsys, *args)
    assert code == 2 and out == ""
    _assert_one_line_error(err, *fragments)
    assert tiny == [] and not (tmp_path / "out").exists()


def test_non_default_target_needs_drafters(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = bench.main(["--target", "Org/model", "--methods", "dflash", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2
    _assert_one_line_error(err, "--methods dflash need --draft")


def test_table_marks_missing_cells() -> None:
    summary = lambda s, t: {"speedup": s, "tau": t}
    results = {
        "cells": {
            "ar/a/t=0": {"summary": summary(1.0, 1.0)},
            "d2sd/a/t=0": {"summary": summary(2.5, 4.25)},
            "ar/b/t=0": {"summary": summary(1.0, 1.0)},
        }
    }
    table = bench.format_bench_table(results, ["ar", "d2sd"], ["a", "b"], [0.0])
    shown = _table_cells(table)
    assert shown[("0", "a", "D2SD")] == "2.50x / 4.25"
    assert shown[("0", "b", "D2SD")] == "–"
    assert shown[("0", "**Average**", "D2SD")] == "2.50x / 4.25"  # the mean of what exists
    assert shown[("0", "**Average**", "AR")] == "1.00x / 1.00"
    assert re.search(r"## Temperature 0 \(greedy\)", table)


def test_summary_counts_turns_with_a_lost_token() -> None:
    def turn(lost: int | None) -> dict:
        record = {"tokens": [1, 2], "accept_lengths": [2], "stage_ms": {"prefill": 1.0},
                  "wall_s": 0.01, "num_cycles": 1}  # fmt: skip
        return record if lost is None else {**record, "lost_tokens": lost}

    def cell(method: str, *turns: dict) -> dict:
        return {"method": method, "temperature": 0.0, "prompts": [{"turns": list(turns)}]}

    ar = cell("ar", turn(None), turn(None), turn(None))
    summary = bench.summarize_cell(cell("d2sd", turn(0), turn(2), turn(0)), ar)
    assert summary["greedy_target_choice"] == [2, 3]
    assert summary["greedy_equal_ar"] == [3, 3]
    # results.json files from before the check have no lost_tokens: no count, no table line
    assert "greedy_target_choice" not in bench.summarize_cell(cell("d2sd", turn(None)), ar)
    table = bench.format_bench_table(
        {"cells": {"ar/a/t=0": {"summary": {"speedup": 1.0, "tau": 1.0}},
                   "d2sd/a/t=0": {"summary": summary}}},
        ["ar", "d2sd"], ["a"], [0.0],
    )  # fmt: skip
    assert "up to its dtype's rounding (turns): D2SD 2/3." in table


# ---------------------------------------------------------------------------------------------
# bench/cycle_8b.py on its tiny config
# ---------------------------------------------------------------------------------------------


def test_filled_prefix_fakes_the_prompt_and_restores_prefill() -> None:
    from bench import cycle_8b as b8

    target = b8.build_target(b8.TINY, torch.device("cpu"), torch.float32, "torch")
    cache = target.allocate_cache(64, 1, 16)
    with b8.filled_prefix(target):
        logits, taps = target.prefill(torch.zeros(1, 40, dtype=torch.int64), cache, taps=(0, 2))
    assert "prefill" not in vars(target)  # the real method is back
    assert int(cache.cache_len) == 40
    assert logits.shape == (1, 512) and taps.shape == (40, 2 * 64)
    assert cache.k_cache[:, :40].std() > 0.5 and cache.v_cache[:, :40].std() > 0.5
    assert not cache.k_cache[:, 40:].any()  # rows past the prefix untouched


def test_8b_cycle_tiny_times_the_decoders_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from bench import cycle_8b as b8
    from d2sd import steps

    # the timed cycles are the Decoder's own steps, run against a cache of the asked prefix
    seen: dict[str, list[int]] = {"verify": [], "ar": []}
    verify, ar_step = steps.verify, steps.ar_step

    def counting_verify(target, cache, *args, **kwargs):
        seen["verify"].append(int(cache.cache_len))
        return verify(target, cache, *args, **kwargs)

    def counting_ar(target, sampling, state):
        seen["ar"].append(int(state.target_cache.cache_len))
        return ar_step(target, sampling, state)

    monkeypatch.setattr(steps, "verify", counting_verify)
    monkeypatch.setattr(steps, "ar_step", counting_ar)
    argv = ["--tiny", "--prefixes", "16,64", "--cycles", "3", "--repeats", "1", "--tau", "6"]
    assert b8.main([*argv, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "proj_d2sd@7.05" in out
    # per mode and prefix: one untimed + one timed generation of <= 3 cycles, each cycle at a
    # cache of prefix + the tokens committed since (>= 1 per cycle, at most 3 cycles of 16)
    for prefix in (16, 64):
        lens = [n for n in seen["verify"] if prefix <= n < prefix + 3 * 16]
        assert len(lens) >= 2 * 2, prefix  # dflash and d2sd, two generations each
        assert any(n == prefix for n in seen["ar"])
    assert set(seen["verify"]) <= set(range(16, 16 + 48)) | set(range(64, 64 + 48))

    (path,) = tmp_path.glob("8b_cycle-tiny-*.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["gamma"] == 16 and saved["config"]["topk"] == 4
    rows = saved["rows"]
    assert [(r["backend"], r["prefix"]) for r in rows] == [("torch", 16), ("torch", 64)]
    for row in rows:
        stages = row["d2sd_stages_ms"]
        assert set(stages) == {"draft1", "select", "draft2", "verify", "accept_commit"}
        assert set(row["dflash_stages_ms"]) == {"draft1", "verify", "accept_commit"}
        assert all(ms > 0 for ms in stages.values())
        assert row["T_d2sd_ms"] == pytest.approx(sum(stages.values()))
        assert row["T_ar_ms"] > 0 and row["d2sd/ar"] == pytest.approx(
            row["T_d2sd_ms"] / row["T_ar_ms"]
        )
        assert row["proj_d2sd@tau"] == pytest.approx(6 * row["T_ar_ms"] / row["T_d2sd_ms"])
        assert row["proj_d2sd@7.05"] == pytest.approx(7.05 * row["T_ar_ms"] / row["T_d2sd_ms"])
        assert row["proj_dflash@5.31"] == pytest.approx(5.31 * row["T_ar_ms"] / row["T_dflash_ms"])


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA defaults (bf16, triton, CUDA graphs, warm-up) through the suite and the 8B script
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_suite_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    install_tiny_default_target(monkeypatch.setattr, cuda=True)
    data = write_datasets(tmp_path / "data")
    argv = [a for a in ARGV if a not in ("--device", "cpu")]
    argv = [*argv, "--methods", "ar,dflash,d2sd", "--max-new-tokens", "24"]
    code = bench.main([*argv, "--data-dir", str(data), "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["device_type"] == "cuda"
    assert results["settings"]["backend"] == "triton"
    assert results["settings"]["dtype"] == "bfloat16"
    assert len(results["cells"]) == 3 * 2 * 2
    for key, cell in results["cells"].items():
        summary = cell["summary"]
        assert 1 <= summary["tau"] <= 4 and summary["speedup"] > 0, key
        assert {"prefill"} < set(summary["stage_ms"]), key


@pytest.mark.gpu
def test_8b_cycle_tiny_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bench import cycle_8b as b8

    argv = ["--tiny", "--backends", "triton", "--prefixes", "64,1024", "--cycles", "4"]
    assert b8.main([*argv, "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    (path,) = tmp_path.glob("8b_cycle-tiny-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["backend"], r["prefix"], r["cuda_graphs"]) for r in rows] == [
        ("triton", 64, True),
        ("triton", 1024, True),
    ]
    for row in rows:
        assert row["T_ar_ms"] > 0 and row["T_d2sd_ms"] > row["verify_ms"] > 0
