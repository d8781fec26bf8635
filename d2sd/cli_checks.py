"""Input validation for `python -m d2sd.run` (and the benchmark runner): one `D2SDError` line per
problem, checked as early as it can be.

Cheap checks run before any model is loaded: decoding options (γ2 ≥ γ, 1 ≤ K ≤ γ-1, sampling
ranges), device, dtype and backend availability, checkpoint paths. Model checks run right after
loading (drafter hidden size and vocabulary against the target), prompt checks after tokenizing
(prompt plus new tokens within the context).

Checkpoint names: "default" (the embedded target), an existing local path (file or directory), or a
hub id "org/name" (tried by the loader; on a machine without a hub it fails there, with one line).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from d2sd.errors import D2SDError

__all__ = [
    "BACKENDS",
    "DTYPES",
    "check_checkpoint",
    "check_decoding_options",
    "check_drafter_matches",
    "check_prompt_fits",
    "resolve_backend",
    "resolve_device",
    "resolve_dtype",
]

BACKENDS = ("triton", "flashinfer", "torch")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# "org/name" as on the hub: no leading dot or slash, exactly one slash
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_decoding_options(
    *,
    block_size: int,
    block_size_2: int,
    topk: int,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    branches: bool = True,
) -> None:
    """γ ≥ 2, γ2 ≥ γ, K ≥ 1, temperature ≥ 0, top-k ≥ 0, 0 < top-p ≤ 1, max_new_tokens ≥ 1, and,
    when the mode re-drafts branches (`branches`), K ≤ γ-1 (a first draft of γ offers γ-1 prefix
    lengths); a mode without branches ignores K, so a γ below the default K is fine there."""
    if block_size < 2:
        raise D2SDError(f"--block-size (γ) must be >= 2, got {block_size}")
    if block_size_2 < block_size:
        raise D2SDError(
            f"--block-size-2 (γ2 = {block_size_2}) must be >= --block-size (γ = {block_size})"
        )
    if topk < 1:
        raise D2SDError(f"--topk (K) must be >= 1, got {topk}")
    if branches and topk > block_size - 1:
        raise D2SDError(
            f"--topk (K = {topk}) must be <= --block-size - 1 = {block_size - 1} "
            "(a first draft of γ has γ-1 prefix lengths to branch at)"
        )
    if not temperature >= 0:  # also rejects NaN
        raise D2SDError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise D2SDError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise D2SDError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise D2SDError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


def resolve_device(name: str | None) -> torch.device:
    """`name` or, when None, "cuda" if there is a GPU else "cpu"; CUDA must exist if asked for."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise D2SDError(f"unknown --device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise D2SDError(f"--device {name} asked for CUDA, but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise D2SDError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type != "cpu":
        raise D2SDError(f"unsupported --device {name!r} (use cpu, cuda or cuda:N)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`name` (see DTYPES) or, when None, bfloat16 on CUDA and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise D2SDError(f"unknown --dtype {name!r}; choose from float32, float16, bfloat16")
    return DTYPES[name]


def resolve_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """`name` or, when None, "triton" on CUDA and "torch" on the CPU; checks that it can run."""
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise D2SDError(f"unknown --backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            raise D2SDError(
                "--backend flashinfer needs FlashInfer: pip install flashinfer-python "
                "(or use --backend triton)"
            )
        if device.type != "cuda":
            raise D2SDError(
                "--backend flashinfer runs on CUDA only (use --backend torch on the CPU)"
            )
    if name == "triton" and device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise D2SDError(
                "--backend triton on the CPU needs TRITON_INTERPRET=1 (or use --backend torch)"
            )
        if dtype == torch.bfloat16:
            raise D2SDError(
                "the Triton interpreter has no bfloat16: use --dtype float32 or float16 on the CPU"
            )
    return name


def check_checkpoint(option: str, value: str) -> None:
    """A checkpoint name is "default", an existing readable path, or a hub id (org/name)."""
    if value == "default":
        return
    path = Path(value).expanduser()
    if path.exists():
        need = os.R_OK | (os.X_OK if path.is_dir() else 0)
        if not os.access(path, need):
            raise D2SDError(f"{option} {value}: not readable (check its permissions)")
        return
    if _HUB_ID.match(value):
        return  # a hub id; the loader tries it and reports one line if it cannot
    raise D2SDError(f"{option} {value}: no such file or directory (and not a hub id org/name)")


def _first(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            return value
    return None


def check_drafter_matches(option: str, drafter: Any, target: Any) -> None:
    """The drafter reads the target's tapped hidden states and shares its vocabulary: its `fc`
    input width must be n_taps * target hidden size and its vocabulary the target's.

    Duck-typed on what the model classes expose (`spec.hidden_size` / `config.hidden_size`,
    `vocab_size`, `fc.in_features`, the tapped layer list), so a newer model class still checks.
    """
    hidden = _first(target, ("spec.hidden_size", "config.hidden_size", "hidden_size"))
    vocab = _first(target, ("spec.vocab_size", "config.vocab_size", "vocab_size"))
    d_vocab = _first(drafter, ("config.vocab_size", "vocab_size"))
    if vocab is not None and d_vocab is not None and int(d_vocab) != int(vocab):
        raise D2SDError(
            f"{option}: the drafter's vocabulary ({d_vocab}) does not match the target's ({vocab})"
        )
    fc_in = _first(drafter, ("fc.in_features",))
    taps = _first(
        drafter,
        ("target_layer_ids", "config.target_layer_ids", "config.dflash_config.target_layer_ids"),
    )
    if hidden is not None and fc_in is not None:
        n_taps = len(taps) if taps is not None else max(int(fc_in) // int(hidden), 1)
        if int(fc_in) != n_taps * int(hidden):
            raise D2SDError(
                f"{option}: the drafter reads {fc_in}-wide target features, but the target's "
                f"hidden size is {hidden} ({n_taps} tapped layers x {hidden} = {n_taps * int(hidden)})"
                "; the drafter was trained for another target"
            )
    d_hidden = _first(drafter, ("config.target_hidden_size",))
    if hidden is not None and d_hidden is not None and int(d_hidden) != int(hidden):
        raise D2SDError(
            f"{option}: the drafter was made for target hidden size {d_hidden}, "
            f"the target has {hidden}"
        )


def check_prompt_fits(
    sample_id: str, prompt_len: int, max_new_tokens: int, margin: int, context: int
) -> None:
    """A prompt plus its new tokens plus one verify block (`margin`) must fit in `context`."""
    if prompt_len + margin >= context:
        raise D2SDError(
            f"prompt {sample_id} has {prompt_len} tokens, longer than the context "
            f"({context} tokens, {margin} kept for a verify block)"
        )
    if prompt_len + max_new_tokens + margin > context:
        raise D2SDError(
            f"prompt {sample_id}: {prompt_len} tokens + --max-new-tokens {max_new_tokens} "
            f"exceed the context ({context} tokens); lower --max-new-tokens to "
            f"{context - prompt_len - margin} or less"
        )
