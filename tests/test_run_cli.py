"""`python -m d2sd.run`: bad input is one stderr line and exit 2 (before loading where it can be);
--help documents every option; runs print texts and the report (fake decoder: fast and independent
of the loop; tiny real models: greedy d2sd equals ar); the no-argument run works end to end with the
real default model; the report's tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from d2sd import run
from d2sd.report import RunStats, format_histogram, format_stage_table, format_throughput_table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "d2sd.run", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,  # a CI harness's open stdin pipe must not become a prompt
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("d2sd.run: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------
# --help and bad input
# ---------------------------------------------------------------------------------------------


def test_help_documents_every_option() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for option in (
        "--target", "--model-name-or-path", "--draft", "--draft-name-or-path", "--vp-draft",
        "--dta-name-or-path", "--mode", "--block-size", "--block-size-2", "--topk",
        "--verify-layout", "--temperature", "--top-k", "--top-p", "--backend", "--device",
        "--dtype", "--prompt", "--dataset", "--max-samples", "--max-new-tokens", "--seed",
        "--data-dir", "--no-ar-baseline", "--json",
    ):  # fmt: skip
        assert option in text, option
    # every option's help states its default (argparse's own -h aside)
    actions = [a for a in run.build_parser()._actions if a.dest != "help"]
    assert all("(default:" in (a.help or "") for a in actions), [
        a.dest for a in actions if "(default:" not in (a.help or "")
    ]
    assert "examples:" in text and "python -m d2sd.run --prompt" in text


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--block-size", "8", "--block-size-2", "4"], ["--block-size-2", "γ2 = 4", "γ = 8"]),
        (["--mode", "turbo"], ["--mode", "'turbo'"]),  # argparse's complaint, as one line
        (["--draft", "/nonexistent/drafter"], ["--draft", "no such file"]),
        (["--block-size", "lots"], ["--block-size", "invalid int"]),
    ],
)
def test_bad_input_subprocess(args: list[str], fragments: list[str]) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    _assert_one_line_error(proc.stderr, *fragments)
    assert proc.stdout == ""


def _main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = run.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--topk", "16"], ["--topk", "K = 16", "<= --block-size - 1 = 15"]),  # K > γ-1
        (["--block-size", "4", "--topk", "4"], ["K = 4", "= 3"]),
        (["--topk", "0"], ["--topk", ">= 1"]),  # K < 1
        (["--block-size", "1"], ["--block-size", ">= 2"]),
        (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
        (["--temperature", "nan"], ["--temperature"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--top-p", "1.01"], ["--top-p", "(0, 1]"]),
        (["--top-k", "-1"], ["--top-k", ">= 0"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--dataset", "gsm9k"], ["unknown dataset 'gsm9k'", "gsm8k"]),
        (["--dataset", "gsm8k", "--max-samples", "0"], ["--max-samples"]),
        (["--prompt", "hi", "--dataset", "gsm8k"], ["--prompt or --dataset"]),
        (["--prompt", " "], ["--prompt is empty"]),
        (["--target", "/nonexistent/model"], ["--target", "no such file"]),
        (["--target", "Org/model", "--mode", "d2sd"], ["--mode d2sd needs --draft"]),
        (["--target", "Org/model", "--draft", "Org/d", "--mode", "d2sd"], ["needs --vp-draft"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--backend", "cuda"], ["--backend", "invalid choice"]),
        (["--no-such-option"], ["unrecognized arguments: --no-such-option"]),
        (["--json", "/nonexistent/dir/r.json"], ["--json", "cannot write into /nonexistent/dir"]),
    ],
)
def test_bad_input_in_process(
    args: list[str], fragments: list[str], capsys: pytest.CaptureFixture
) -> None:
    code, out, err = _main(args, capsys)
    assert code == 2
    _assert_one_line_error(err, *fragments)
    assert out == ""


def test_cuda_requested_without_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on the GPU machine
    code, _, err = _main(["--device", "cuda"], capsys)
    assert code == 2
    _assert_one_line_error(err, "--device cuda", "no CUDA device")


def test_flashinfer_backend_without_flashinfer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from d2sd import cli_checks

    real_find_spec = cli_checks.importlib.util.find_spec
    monkeypatch.setattr(
        cli_checks.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flashinfer" else real_find_spec(name, *a),
    )
    code, _, err = _main(["--backend", "flashinfer"], capsys)
    assert code == 2
    _assert_one_line_error(err, "flashinfer", "pip install flashinfer-python")


def test_triton_on_cpu_needs_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = _main(["--device", "cpu", "--backend", "triton"], capsys)
    assert code == 2
    _assert_one_line_error(err, "TRITON_INTERPRET=1")


def test_missing_dataset_file_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _main(["--dataset", "math500", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    _assert_one_line_error(err, "math500.jsonl", str(tmp_path))


def test_unreadable_target_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text("{ not json")
    code, _, err = _main(["--target", str(tmp_path), "--mode", "ar"], capsys)
    assert code == 2
    _assert_one_line_error(err, "--target", str(tmp_path))


def test_validates_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(run, "load_models", lambda p: pytest.fail("models loaded before checks"))
    for args in (["--topk", "0"], ["--dataset", "nope"], ["--top-p", "2"]):
        code, _, _ = _main(args, capsys)
        assert code == 2


# ---------------------------------------------------------------------------------------------
# Tiny models (loaders patched): model checks, prompt length, a real greedy d2sd run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch):
    """`--target default` loads a tiny llama (hidden 96, context 512, byte tokenizer); no shipped
    drafters, so the default drafters are random ones for it."""
    from tests.tiny_models import install_tiny_default_target

    target = install_tiny_default_target(monkeypatch.setattr)
    return target


def _save_drafter_for(tmp_path: Path, **target_overrides) -> Path:
    from tests import tiny_models

    _, other = tiny_models.tiny_target("llama", **target_overrides)
    path = tmp_path / "drafter"
    tiny_models.tiny_drafter(other, block_size=4).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"vocab_size": 320, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16},
            "hidden size",
        ),
        ({"vocab_size": 300}, "vocabulary"),
    ],
)
def test_drafter_not_matching_the_target(
    tiny, tmp_path: Path, overrides: dict, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    path = _save_drafter_for(tmp_path, **overrides)
    code, _, err = _main(["--draft", str(path), "--mode", "dflash", "--block-size", "4"], capsys)
    assert code == 2
    _assert_one_line_error(err, "--draft", fragment)


def test_drafter_dir_without_config(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _main(["--draft", str(tmp_path), "--mode", "dflash"], capsys)
    assert code == 2
    _assert_one_line_error(err, "--draft", "config.json")


def test_prompt_longer_than_the_context(tiny, capsys: pytest.CaptureFixture) -> None:
    # byte tokenizer: 600 characters are > 512 tokens, the tiny target's context
    code, _, err = _main(["--mode", "ar", "--prompt", "x" * 600], capsys)
    assert code == 2
    _assert_one_line_error(err, "longer than the context", "512")
    code, _, err = _main(["--mode", "ar", "--prompt", "x" * 300, "--max-new-tokens", "400"], capsys)
    assert code == 2
    _assert_one_line_error(err, "--max-new-tokens 400", "exceed the context")


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ([], "d2sd"),  # the default mode: both (random) drafters, branches layout
        (["--verify-layout", "tree", "--block-size-2", "6"], "d2sd"),
        (["--mode", "dflash"], "dflash"),
        (["--mode", "dflash-dflash"], "dflash-dflash"),
        (["--mode", "dflash+samples"], "dflash+samples"),
    ],
)
def test_tiny_greedy_run_equals_ar(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], mode: str
) -> None:
    out_json = tmp_path / "r.json"
    argv = ["--block-size", "4", "--topk", "2", "--max-new-tokens", "6", "--json", str(out_json)]
    code, out, err = _main([*argv, *extra], capsys)
    assert code == 0, err
    assert "drafters are untrained" in err
    assert out.count("=== [") == 3  # the three bundled prompts
    # fp32 on the CPU: the speculative modes are lossless
    assert f"greedy check: {mode} output equals ar output on 3/3 generations" in out
    result = json.loads(out_json.read_text())
    assert result["settings"]["mode"] == mode
    summary = result["summary"]
    assert (
        summary[mode]["tokens"]
        == summary["ar"]["tokens"]
        == sum(len(t[mode]["tokens"]) for s in result["samples"] for t in s["turns"])
    )
    most = 4 if mode == "dflash" else int(result["settings"]["block_size_2"])
    assert 1 <= summary[mode]["tau"] <= most


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["branches", "tree"])
def test_tiny_run_on_cuda(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture, layout: str
) -> None:
    # the CUDA defaults: bf16, the triton backend, CUDA graphs, a warm-up before the timed runs
    from tests.tiny_models import install_tiny_default_target

    install_tiny_default_target(monkeypatch.setattr, cuda=True)
    out_json = tmp_path / "r.json"
    argv = ["--block-size", "4", "--topk", "2", "--max-new-tokens", "24"]
    code, out, err = _main([*argv, "--verify-layout", layout, "--json", str(out_json)], capsys)
    assert code == 0, err
    assert "cuda bfloat16, backend triton" in err
    assert out.count("=== [") == 3 and "stages of d2sd" in out and "greedy check" in out
    settings = json.loads(out_json.read_text())["settings"]
    assert (settings["device"], settings["backend"]) == ("cuda", "triton")


# ---------------------------------------------------------------------------------------------
# Fake decoder: printing, report, JSON, multi-turn, Ctrl-C (independent of the decode loop)
# ---------------------------------------------------------------------------------------------


class _FakeTokenizer:
    """Characters as ids; a template that shows the roles."""

    chat_template = "roles"
    eos_token_id = None

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class _FakeDecoder:
    """Mode runs answer "ok<n>" in 2 cycles; ar answers the same in 3 steps, three times slower."""

    def __init__(self, interrupt_on_call: int | None = None) -> None:
        self.prompts: list[str] = []
        self.calls = 0
        self.interrupt_on_call = interrupt_on_call
        self.interrupt_by_sigterm = False  # as `timeout` stops a run, instead of Ctrl-C

    def generate(self, prompt_ids, config):
        from d2sd.generate import GenerationResult

        self.calls += 1
        if self.calls == self.interrupt_on_call:
            if self.interrupt_by_sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        if config.mode != "ar":
            self.prompts.append("".join(map(chr, prompt_ids)))
        tokens = [ord(c) for c in f"ok{len(self.prompts)}"]
        if config.mode == "ar":
            return GenerationResult(tokens, [1, 1, 1], {"prefill": 1.0, "step": 20.0}, 0.03, 3)
        stages = {
            "prefill": 1.0,
            "draft1": 2.0,
            "select": 0.5,
            "draft2": 2.5,
            "verify": 4.0,
            "accept_commit": 0.5,
        }
        return GenerationResult(tokens, [1, 2], stages, 0.01, 2)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    decoder = _FakeDecoder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA warm-up calls
    target = SimpleNamespace(
        hf=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    )
    monkeypatch.setattr(run, "load_models", lambda p: run.Models(target, _FakeTokenizer()))
    monkeypatch.setattr(run, "check_models", lambda p, m: None)
    monkeypatch.setattr(run, "make_decoder", lambda models, max_len: decoder)
    from d2sd import models

    monkeypatch.setattr(models.loading, "resolve_target_source", lambda source: None)
    monkeypatch.setattr(
        run, "SHIPPED_DRAFTS", {role: Path("/nonexistent") for role in run.SHIPPED_DRAFTS}
    )
    return decoder


def test_run_prints_text_and_report(fake, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "run.json"
    code, out, err = _main(["--prompt", "Say ok.", "--json", str(out_json)], capsys)
    assert code == 0, err
    assert fake.prompts == ["<user>Say ok.<assistant>"]
    assert "=== [1/1] prompt ===" in out and "\nok1\n" in out
    # throughput: 3 tokens in 10 ms vs 30 ms -> 300 vs 100 tokens/s, 3.00x
    d2sd_row = next(line for line in out.splitlines() if line.startswith("d2sd "))
    assert d2sd_row.split() == ["d2sd", "3", "0.01", "300.0", "3.33", "1.50", "3.00x"]
    assert "τ (tokens committed per cycle) = 1.50 over 2 cycles" in out
    assert "(at most 16 per cycle)" in out and "  1 | " in out and "  2 | " in out
    assert "draft 2" in out and "accept/commit" in out and "stages of ar" in out
    assert "greedy check: d2sd output equals ar output on 1/1 generations" in out
    saved = json.loads(out_json.read_text())
    assert saved["summary"]["speedup"] == pytest.approx(3.0)
    assert saved["samples"][0]["turns"][0]["text"] == "ok1"
    assert saved["settings"]["drafts"] == {"draft": "random", "vp_draft": "random"}


def test_no_ar_baseline(fake, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _main(["--prompt", "x", "--no-ar-baseline", "--mode", "dflash"], capsys)
    assert code == 0
    assert fake.calls == 1
    assert "\nar " not in out and "stages of dflash" in out


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"offline datasets not present at {SHARED}")
def test_multi_turn_dataset_feeds_answers_back(fake, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _main(
        ["--dataset", "mt-bench", "--max-samples", "2", "--data-dir", str(SHARED)], capsys
    )
    assert code == 0
    assert len(fake.prompts) == 4  # 2 samples x 2 turns
    assert "<assistant>ok1<user>" in fake.prompts[1]  # turn 2 carries turn 1's answer
    assert "<assistant>ok1" not in fake.prompts[2]  # a new sample starts a new chat
    assert "=== [2/2] mt-bench/82 ===" in out and "(turn 2)" in out


@pytest.mark.parametrize("sigterm", [False, True])
def test_ctrl_c_prints_partial_results(fake, capsys: pytest.CaptureFixture, sigterm: bool) -> None:
    fake.interrupt_on_call = 4  # the second bundled prompt's ar run
    fake.interrupt_by_sigterm = sigterm
    code, out, err = _main([], capsys)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handler back
    assert code == 130
    assert "interrupted" in err
    assert "=== [1/3]" in out and "=== [2/3]" not in out
    assert "greedy check: d2sd output equals ar output on 1/1 generations" in out


def test_stdin_prompt(fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(run, "_read_stdin", lambda: "from a pipe")
    code, _, _ = _main(["--mode", "ar"], capsys)
    assert code == 0
    monkeypatch.setattr(run, "_read_stdin", lambda: None)
    code, _, err = _main(["--prompt", "-"], capsys)
    assert code == 2
    _assert_one_line_error(err, "stdin")


def test_stdin_pipe_subprocess() -> None:
    # a piped prompt is read, so the run gets as far as loading (an offline hub id fails there);
    # /dev/null is no prompt
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "d2sd.run", "--target", "Org/model", "--mode", "ar"]
    piped = subprocess.run(
        [*argv, "--prompt", "-"], cwd=REPO, env=env, input="hello", capture_output=True, text=True
    )
    assert piped.returncode == 2
    _assert_one_line_error(piped.stderr, "Org/model")
    empty = _cli("--target", "Org/model", "--mode", "ar", "--prompt", "-")
    assert empty.returncode == 2
    _assert_one_line_error(empty.stderr, "stdin is empty")


# ---------------------------------------------------------------------------------------------
# The real default model, no arguments (but few new tokens)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_end_to_end() -> None:
    pytest.importorskip("gguf")
    proc = _cli("--max-new-tokens", "4", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for i in (1, 2, 3):
        assert f"=== [{i}/3] default/" in out
    assert "new tokens:" in out
    header = next(line for line in out.splitlines() if line.startswith("mode "))
    assert header.split() == ["mode", "tokens", "time", "s", "tokens/s", "ms/token", "τ", "speedup"]
    assert any(line.startswith("d2sd ") for line in out.splitlines())
    assert any(line.startswith("ar ") for line in out.splitlines())
    assert "stages of d2sd" in out and "verify" in out
    # fp32 on the CPU: lossless means identical greedy outputs
    assert "greedy check: d2sd output equals ar output on 3/3 generations" in out
    if not (run.CHECKPOINTS / "smollm2-dflash" / "config.json").is_file():
        assert "drafters are untrained" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Report tables
# ---------------------------------------------------------------------------------------------


def _result(tokens: int, lengths: list[int], stage_ms: dict, wall_s: float):
    return SimpleNamespace(
        tokens=[0] * tokens, accept_lengths=lengths, stage_ms=stage_ms, wall_s=wall_s,
        num_cycles=len(lengths),
    )  # fmt: skip


def test_run_stats_pool_and_tau_definitions() -> None:
    stats = RunStats.from_results(
        "d2sd",
        [_result(4, [1, 3], {"verify": 2.0}, 0.01), _result(6, [6], {"verify": 1.0}, 0.02)],
    )
    assert (stats.num_tokens, stats.num_cycles, stats.stage_ms) == (10, 3, {"verify": 3.0})
    assert stats.tau == pytest.approx(10 / 3)  # pooled over cycles
    assert stats.tau_per_generation == pytest.approx((2 + 6) / 2)  # the reference's
    assert stats.tokens_per_s == pytest.approx(10 / 0.03)
    assert stats.to_dict()["accept_histogram"] == {1: 1, 3: 1, 6: 1}


def test_throughput_speedup_and_histogram() -> None:
    mode = RunStats.from_results("dflash", [_result(8, [4, 4], {}, 0.01)])
    ar = RunStats.from_results("ar", [_result(8, [1] * 8, {}, 0.04)])
    rows = format_throughput_table(mode, ar).splitlines()
    assert rows[2].split()[-1] == "4.00x" and rows[3].split()[-1] == "1.00x"
    hist = format_histogram([1, 1, 1, 3], max_length=4, width=6).splitlines()
    assert hist == [
        "  1 | ######  75.0% (3)",
        "  2 |          0.0% (0)",
        "  3 | ##      25.0% (1)",
        "  4 |          0.0% (0)",
    ]


def test_stage_table_shares() -> None:
    stats = RunStats.from_results(
        "d2sd",
        [_result(10, [5, 5], {"prefill": 5.0, "draft1": 10.0, "verify": 30.0}, 0.05)],
    )
    rows = {
        line.split()[0]: line.split()[1:] for line in format_stage_table(stats).splitlines()[2:]
    }
    assert rows["draft"] == ["1", "25.0", "20.0", "5.000", "1.000"]
    assert rows["verify"] == ["75.0", "60.0", "15.000", "3.000"]
    assert rows["cycle"] == ["100.0", "80.0", "20.000", "4.000"]  # the cycle stages' sum
    assert rows["prefill"] == ["10.0", "2.500", "0.500"]
    assert rows["other"] == ["10.0", "2.500", "0.500"]
    assert rows["total"] == ["100.0", "25.000", "5.000"]


def test_greedy_check_tells_a_lost_token_from_a_rounding_split() -> None:
    """Where greedy outputs differ from AR's, the check asks the target itself (teacher-forced):
    an output with a token off its argmax is reported as a lost token."""
    from tests.test_generate import byte_target, prompt_and_ar

    target = byte_target()
    prompt, ar_tokens = prompt_and_ar()
    wrong = list(ar_tokens)
    wrong[3] = (wrong[3] + 1) % 256

    def check(outputs):
        runner = SimpleNamespace(
            models=SimpleNamespace(target=target),
            prompts=[prompt] * len(outputs),
            mode_results=[SimpleNamespace(tokens=t) for t in outputs],
            ar_results=[SimpleNamespace(tokens=ar_tokens) for _ in outputs],
        )
        return run._greedy_check(SimpleNamespace(mode="d2sd"), runner)

    assert check([ar_tokens, ar_tokens]) == (
        "greedy check: d2sd output equals ar output on 2/2 generations"
    )
    line = check([ar_tokens, wrong])
    assert "equals ar output on 1/2 generations" in line
    assert "greedy choice up to float32 rounding on 1/2" in line and "a lost token" in line
