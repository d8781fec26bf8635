"""8B-scale cost of a D2SD cycle and its stages vs one AR step, from random Qwen3-8B-shaped weights.

What is timed: the Decoder's own graphed steps (d2sd/steps.py under d2sd/graphs.py), through a
short `Decoder.generate` per (backend, prefix, mode); its `GenerationResult.stage_ms` holds CUDA-event
times per stage of the counted cycles (the run-ahead cycle excluded), so nothing of the cycle is
re-implemented here. Modes: `ar` (one graphed 1-token step), `dflash` (draft1, verify,
accept_commit) and `d2sd` (draft1, select, draft2, verify, accept_commit).

Shapes: target = Qwen3-8B (36 layers, hidden 4096, 32 / 8 heads of 128, intermediate 12288, vocab
151936, q/k norm), built as HF `Qwen3ForCausalLM` directly on the GPU in bf16 with HF's random init
(~16 GB, no checkpoint); drafters = `DFlashDrafter.random` with 5 layers (z-lab's Qwen3-8B DFlash
shape, taps 1, 9, 17, 25, 33) for both the DFlash and the VP drafter. γ = 16, K = 4, γ2 = 16.

Prefix: instead of running 32k tokens through the model, the target's `prefill` is replaced for the
run by one that fills cache rows [0, P) with N(0, 1) K/V, sets cache_len = P and returns random
last logits and random taps [P, 5 · 4096]; the Decoder then extends both drafters' contexts with
those taps as usual (P rows each). Attention cost depends on P, not on the values. Random weights
give τ ≈ 1, so each cycle commits about one token and the prefix stays P to within the few tokens
generated; the cost of a cycle does not depend on how many tokens it accepts (fixed shapes).

Numbers per (backend, prefix): T_ar = ms per AR step, T_cycle = ms per cycle = the sum of its
stages' medians (GPU time between stage events; host gaps between cycles excluded: the host runs one
cycle ahead), the ratio T_cycle / T_ar, and the projected speedup τ · T_ar / T_cycle for the paper's τ
(D2SD 7.05 with T_d2sd, DFlash 5.31 with T_dflash) and for `--tau` (with T_d2sd). `wall_*` columns
are host wall ms per cycle ((wall - prefill) / cycles) for comparison. Median over `--repeats`
generations of `--cycles` cycles each, after one untimed generation per mode (capture, autotune).

Backends: triton (graphed) and flashinfer (if importable; it reads cache_len on the host, so it runs
eagerly without CUDA graphs and its stage times include launch gaps: the reference code's path).

    python -m bench.cycle_8b [--backends triton,flashinfer] [--prefixes 1024,8192,32768]
                                   [--tau 6.5] [--cycles 32] [--repeats 5] [--out-dir DIR]
    python -m bench.cycle_8b --tiny      # tiny Qwen3 on the CPU: checks the logic only
    python -m bench.cycle_8b --shape smollm2 --backends triton --profile ar,d2sd
                                         # the default target's shape (random weights), per kernel
    python -m bench.kernels --only 8b_cycle [--quick]

Writes `<out-dir>/8b_cycle-<gpu>-<date>.json` (bench/_harness.write_results; `--tiny`:
`8b_cycle-tiny-...`, `--shape smollm2`: `smollm2_cycle-...`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import print_table, write_results

QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
    attention_bias=False,
)
TINY = dict(
    QWEN3_8B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
# SmolLM2-135M-Instruct's shape (a Llama: no q/k norm, tied embeddings): the default target's
# decode step without its GGUF, for a per-kernel profile of the launch-bound regime
SMOLLM2 = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
)
SHAPES = {"8b": QWEN3_8B, "smollm2": SMOLLM2, "tiny": TINY}
SHAPE_NAMES = {"8b": "qwen3-8b", "smollm2": "smollm2-135m", "tiny": "tiny"}
DRAFT_LAYERS = {"8b": 5, "smollm2": 1, "tiny": 1}  # smollm2: as the shipped drafters
PREFIXES = {"8b": (1024, 8192, 32768), "smollm2": (512, 2048), "tiny": (32, 128, 512)}
PAPER_TAU = {"d2sd": 7.05, "dflash": 5.31}  # Qwen3-8B, H200, γ = 16, K = 4, greedy
MODES = ("ar", "dflash", "d2sd")
COLUMNS = [
    "backend",
    "prefix",
    "T_ar_ms",
    "T_dflash_ms",
    "T_d2sd_ms",
    "draft1_ms",
    "select_ms",
    "draft2_ms",
    "verify_ms",
    "accept_commit_ms",
    "d2sd/ar",
    "dflash/ar",
    "proj_dflash@5.31",
    "proj_d2sd@7.05",
    "proj_d2sd@tau",
    "wall_d2sd_ms",
]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_target(shape: dict, device: torch.device, dtype: torch.dtype, backend: str) -> Any:
    """A TargetModel over an HF Qwen3ForCausalLM of `shape` with HF's random init, created
    directly on `device` in `dtype` (no fp32 copy, no checkpoint) and without EOS ids (random
    tokens must not stop a timed generation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from d2sd.models import TargetModel

    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type", "qwen3"), **shape)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = None
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    hf.generation_config.eos_token_id = None
    return TargetModel(hf, backend)


def build_drafters(target: Any, num_layers: int, gamma: int, gamma2: int) -> tuple[Any, Any]:
    """Random DFlash and VP drafters (DFlashDrafter.random: z-lab's tap spread, the target's
    dtype and device; weights drawn on the CPU from fixed seeds, then moved)."""
    from d2sd.models import DFlashDrafter

    draft = DFlashDrafter.random(target, block_size=gamma, num_layers=num_layers, seed=1)
    vp_draft = DFlashDrafter.random(target, block_size=gamma2, num_layers=num_layers, seed=2)
    return draft, vp_draft


def set_backend(backend: Any, *models: Any) -> None:
    """Point every model's attention at `backend` (the layers read `model.backend` per call)."""
    for model in models:
        model.backend = backend


@contextlib.contextmanager
def filled_prefix(target: Any) -> Iterator[None]:
    """Within the block, `target.prefill(ids [1, P], cache, taps=...)` does not run the model: it
    fills cache rows [0, P) of every layer with N(0, 1) K/V, sets cache_len = P (the Decoder resets
    it to 0 first) and returns random last logits [1, V] f32 and random taps [P, n_taps * H]."""

    def prefill(input_ids: torch.Tensor, cache: Any, *, chunk=None, taps=None):
        num_prompt = input_ids.shape[1]
        cache.k_cache[:, :num_prompt].normal_()
        cache.v_cache[:, :num_prompt].normal_()
        cache.cache_len.fill_(num_prompt)
        device, hidden = cache.k_cache.device, target.hidden_size
        logits = torch.randn(1, target.vocab_size, device=device)
        width = len(taps or ()) * hidden
        prompt_taps = torch.randn(num_prompt, width, device=device, dtype=target.dtype)
        return logits, prompt_taps

    target.prefill = prefill  # an instance attribute shadows the method
    try:
        yield
    finally:
        del target.prefill


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _config(mode: str, *, gamma: int, gamma2: int, topk: int, cycles: int, cuda_graphs: bool):
    from d2sd.generate import GenerationConfig

    return GenerationConfig(
        mode=mode,
        block_size=gamma,
        block_size_2=gamma2,
        topk=topk,
        max_new_tokens=cycles + 1,  # the prefill emits the first token; τ ≈ 1 afterwards
        cuda_graphs=cuda_graphs,
    )


def time_mode(
    decoder: Any,
    mode: str,
    prefix: int,
    *,
    gamma: int,
    gamma2: int,
    topk: int,
    cycles: int,
    repeats: int,
    cuda_graphs: bool,
) -> dict[str, Any]:
    """Median ms per cycle of each stage of `mode` at a `prefix`-row cache, from `repeats` timed
    generations of ~`cycles` cycles after one untimed one. Returns {"stages": {stage: ms},
    "cycle_ms": sum of the stages, "wall_ms": host ms per cycle, "cycles": cycles timed}."""
    config = _config(
        mode, gamma=gamma, gamma2=gamma2, topk=topk, cycles=cycles, cuda_graphs=cuda_graphs
    )
    prompt = [0] * prefix
    with filled_prefix(decoder.target):
        decoder.generate(prompt, config)  # capture / compile / autotune, untimed
        results = [decoder.generate(prompt, config) for _ in range(repeats)]
    stages = [k for k in results[0].stage_ms if k != "prefill"]
    per_cycle = {
        stage: statistics.median(r.stage_ms[stage] / r.num_cycles for r in results)
        for stage in stages
    }
    wall = statistics.median(
        (1e3 * r.wall_s - r.stage_ms["prefill"]) / r.num_cycles for r in results
    )
    return {
        "stages": per_cycle,
        "cycle_ms": sum(per_cycle.values()),
        "wall_ms": wall,
        "cycles": sum(r.num_cycles for r in results),
    }


def kernel_profile(
    decoder: Any, mode: str, prefix: int, *, top: int = 25, **config_args: Any
) -> dict[str, Any]:
    """Where one generation's GPU time goes, per kernel (torch.profiler, CUDA activity, graph
    replays included): the `top` kernels by total time with calls and µs per cycle. Run after
    `time_mode` of the same mode (graphs captured, autotuning done)."""
    from torch.profiler import ProfilerActivity, profile

    config = _config(mode, **config_args)
    cuda = torch.cuda.is_available()
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU  # CPU: the --tiny check
    with filled_prefix(decoder.target), profile(activities=[activity]) as prof:
        result = decoder.generate([0] * prefix, config)
        if cuda:
            torch.cuda.synchronize()
    cycles = max(result.num_cycles, 1)
    kernels = []
    for event in prof.key_averages():
        total = event.self_device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            kernels.append({"kernel": event.key[:120], "calls": event.count, "total_us": total})
    kernels.sort(key=lambda k: -k["total_us"])
    gpu_us = sum(k["total_us"] for k in kernels)
    for k in kernels:
        k["us_per_cycle"] = k["total_us"] / cycles
        k["share"] = k["total_us"] / gpu_us if gpu_us else 0.0
    return {
        "mode": mode,
        "prefix": prefix,
        "cycles": result.num_cycles,
        "gpu_us_per_cycle": gpu_us / cycles,
        "top": kernels[:top],
    }


def project(tau: float, t_ar_ms: float, t_cycle_ms: float) -> float:
    """Projected speedup over AR: τ tokens per cycle of t_cycle, against one token per t_ar."""
    return tau * t_ar_ms / t_cycle_ms


def measure(
    *,
    size: str,
    backends: Sequence[str],
    prefixes: Sequence[int],
    tau: float | None,
    cycles: int,
    repeats: int,
    gamma: int = 16,
    topk: int = 4,
    gamma2: int = 16,
    device: torch.device | None = None,
    profile_modes: Sequence[str] = (),
) -> tuple[list[dict], list[str], dict]:
    """Build the models once, time every (backend, prefix, mode); returns (rows, notes, config)."""
    from d2sd.attention import get_backend
    from d2sd.errors import D2SDError
    from d2sd.generate import Decoder

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[size]
    notes: list[str] = []
    runnable = []
    for name in backends:
        if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
            notes.append("flashinfer: not importable here (pip install flashinfer-python); skipped")
            continue
        try:
            runnable.append((name, get_backend(name, device)))
        except D2SDError as exc:
            notes.append(f"{name}: {exc}; skipped")
    if not runnable:
        return [], notes, {}
    target = build_target(shape, device, dtype, runnable[0][0])
    draft, vp_draft = build_drafters(target, DRAFT_LAYERS[size], gamma, gamma2)
    max_len = max(prefixes) + cycles + 4 * gamma2 + 64
    rows: list[dict] = []
    profiles: list[dict] = []
    for name, backend in runnable:
        set_backend(backend, target, draft, vp_draft)
        graphs = device.type == "cuda" and name != "flashinfer"
        backend_cycles, backend_repeats = cycles, repeats
        if device.type == "cuda" and not graphs:
            # an eager 8B cycle is host-bound (~10x a graphed one): fewer cycles say as much
            backend_cycles, backend_repeats = min(cycles, 8), min(repeats, 2)
            notes.append(
                f"{name}: eager (no CUDA graphs: the backend syncs on cache_len), "
                f"{backend_cycles} cycles x {backend_repeats} generations"
            )
        decoder = Decoder(target, None, draft, vp_draft, max_len=max_len)
        try:
            for prefix in prefixes:
                timed = {
                    mode: time_mode(
                        decoder,
                        mode,
                        prefix,
                        gamma=gamma,
                        gamma2=gamma2,
                        topk=topk,
                        cycles=backend_cycles,
                        repeats=backend_repeats,
                        cuda_graphs=graphs,
                    )
                    for mode in MODES
                }
                rows.append(_row(name, prefix, graphs, timed, tau))
                if prefix == prefixes[0]:
                    for mode in profile_modes:
                        profiles.append({"backend": name, **kernel_profile(
                            decoder, mode, prefix, gamma=gamma, gamma2=gamma2, topk=topk,
                            cycles=backend_cycles, cuda_graphs=graphs,
                        )})  # fmt: skip
        except Exception as exc:  # one failing backend must not lose the other's rows
            if not rows:
                raise
            notes.append(f"{name}: failed ({type(exc).__name__}: {exc}); rows so far kept")
        del decoder  # its caches and graphs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    config = {
        "shape": SHAPE_NAMES[size],
        "target": {k: v for k, v in shape.items() if k != "rope_parameters"},
        "draft_layers": DRAFT_LAYERS[size],
        "draft_taps": list(draft.target_layer_ids),
        "gamma": gamma,
        "topk": topk,
        "gamma2": gamma2,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "cycles": cycles,
        "repeats": repeats,
        "paper_tau": PAPER_TAU,
        "tau": tau,
    }
    if profiles:
        config["kernel_profiles"] = profiles
    return rows, notes, config


def _row(backend: str, prefix: int, graphs: bool, timed: dict, tau: float | None) -> dict:
    t_ar = timed["ar"]["cycle_ms"]
    t_dflash = timed["dflash"]["cycle_ms"]
    t_d2sd = timed["d2sd"]["cycle_ms"]
    row = {
        "backend": backend,
        "prefix": prefix,
        "cuda_graphs": graphs,
        "T_ar_ms": t_ar,
        "T_dflash_ms": t_dflash,
        "T_d2sd_ms": t_d2sd,
        **{f"{stage}_ms": ms for stage, ms in timed["d2sd"]["stages"].items()},
        "d2sd/ar": t_d2sd / t_ar,
        "dflash/ar": t_dflash / t_ar,
        "proj_dflash@5.31": project(PAPER_TAU["dflash"], t_ar, t_dflash),
        "proj_d2sd@7.05": project(PAPER_TAU["d2sd"], t_ar, t_d2sd),
        "proj_d2sd@tau": project(tau, t_ar, t_d2sd) if tau is not None else None,
        "wall_ar_ms": timed["ar"]["wall_ms"],
        "wall_dflash_ms": timed["dflash"]["wall_ms"],
        "wall_d2sd_ms": timed["d2sd"]["wall_ms"],
        "dflash_stages_ms": timed["dflash"]["stages"],
        "d2sd_stages_ms": timed["d2sd"]["stages"],
        "cycles_timed": {mode: timed[mode]["cycles"] for mode in MODES},
    }
    return row


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(quick: bool) -> list[dict]:
    """`python -m bench.kernels` hook: triton only, prefixes 1k and 8k when `quick`."""
    rows, notes, _ = measure(
        size="8b",
        backends=("triton",) if quick else ("triton", "flashinfer"),
        prefixes=(1024, 8192) if quick else PREFIXES["8b"],
        tau=None,
        cycles=16 if quick else 32,
        repeats=3 if quick else 5,
    )
    print_table("8B cycle vs AR step (Qwen3-8B shape, random bf16 weights)", rows, COLUMNS)
    for note in notes:
        print(f"note: {note}")
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny Qwen3 config (CPU logic check; default: 8B)"
    )
    parser.add_argument(
        "--shape",
        choices=("8b", "smollm2"),
        default="8b",
        help="8b: Qwen3-8B (default); smollm2: SmolLM2-135M's shape, random weights, 1-layer "
        "drafters (prefixes 512,2048)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: triton,flashinfer on CUDA; torch on the CPU)",
    )
    parser.add_argument(
        "--prefixes", default=None, help="comma-separated cache lengths (default: 1024,8192,32768)"
    )
    parser.add_argument(
        "--tau", type=float, default=None, help="also project the speedup at this τ (default: no)"
    )
    parser.add_argument("--cycles", type=int, default=None, help="cycles per generation (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations (5)")
    parser.add_argument("--block-size", type=int, default=16, help="γ (default: 16)")
    parser.add_argument("--topk", type=int, default=4, help="K (default: 4)")
    parser.add_argument("--block-size-2", type=int, default=16, help="γ2 (default: 16)")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated modes (ar,dflash,d2sd) to profile per kernel at the first prefix; "
        "the top kernels are printed and kept in the JSON (default: none)",
    )
    parser.add_argument(
        "--out-dir", default=None, help="JSON folder (default: $D2SD_RESULTS_DIR or bench/results)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            f"cycle_8b: the {args.shape} shape needs a CUDA GPU (--tiny runs on the CPU)",
            file=sys.stderr,
        )
        return 2
    size = "tiny" if args.tiny else args.shape
    backends = args.backends.split(",") if args.backends else None
    backends = backends or (["triton", "flashinfer"] if cuda else ["torch"])
    rows, notes, config = measure(
        size=size,
        backends=backends,
        prefixes=_ints(args.prefixes) if args.prefixes else PREFIXES[size],
        tau=args.tau,
        cycles=args.cycles or (4 if args.tiny else 32),
        repeats=args.repeats or (2 if args.tiny else 5),
        gamma=args.block_size,
        topk=args.topk,
        gamma2=args.block_size_2,
        profile_modes=[m for m in args.profile.split(",") if m],
    )
    title = f"cycle vs AR step ({config.get('shape', size)}, {config.get('dtype', '')})"
    print_table(title, rows, COLUMNS)
    for note in notes:
        print(f"note: {note}")
    for prof in config.get("kernel_profiles", ()):
        print_table(
            f"kernels of one {prof['mode']} cycle ({prof['backend']}, prefix {prof['prefix']}): "
            f"{prof['gpu_us_per_cycle']:.0f} us of GPU time per cycle",
            prof["top"],
            ("kernel", "calls", "us_per_cycle", "share"),
        )
    name = {"8b": "8b_cycle", "smollm2": "smollm2_cycle", "tiny": "8b_cycle-tiny"}[size]
    path = write_results(name, {"config": config, "rows": rows, "notes": notes}, args.out_dir)
    print(f"\nwrote {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
