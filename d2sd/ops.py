"""Kernel-or-reference dispatch for the decode loop's non-attention ops (the one place that decides).

On CUDA tensors the loop calls the Triton launchers of `kernels/` (graph-capturable, no host sync);
on CPU tensors it calls their fp32 torch references `<op>_ref`, which run eagerly. Inside
`cpu_kernels()` (used by tests under `TRITON_INTERPRET=1`) the CPU path calls the launchers too.

Signatures and semantics are those of ARCHITECTURE.md ("Selection, tree, acceptance, commit
kernels"); this module adds nothing to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

import kernels

__all__ = [
    "accept",
    "commit",
    "constant",
    "cpu_kernels",
    "emit",
    "kernel_or_reference",
    "sample_tokens",
    "topk_confidence",
    "tree_mask",
]

_cpu_kernels = False


@contextlib.contextmanager
def cpu_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors go through the Triton launchers (the interpreter must be on)."""
    global _cpu_kernels
    previous, _cpu_kernels = _cpu_kernels, enabled
    try:
        yield
    finally:
        _cpu_kernels = previous


_CONSTANTS: dict[tuple[torch.device, str, int, int], torch.Tensor] = {}


def constant(device: torch.device, kind: str, size: int, value: int = 0) -> torch.Tensor:
    """A tensor that never changes, made once per device (a graph's warm-up makes it eagerly), so
    that a step does not spend a launch on it: kind "arange" int64 [size] = 0 .. size-1, "int32"
    int32 [size] and "int64" int64 [size] filled with `value`."""
    key = (device, kind, size, value)
    if key not in _CONSTANTS:
        if kind == "arange":
            _CONSTANTS[key] = torch.arange(size, device=device)
        else:
            dtype = torch.int32 if kind == "int32" else torch.int64
            _CONSTANTS[key] = torch.full((size,), value, dtype=dtype, device=device)
    return _CONSTANTS[key]


def kernel_or_reference(name: str, device: torch.device) -> Callable:
    """The callable that implements op `name` for tensors on `device`."""
    use_kernel = device.type == "cuda" or _cpu_kernels
    return getattr(kernels, name if use_kernel else f"{name}_ref")


def topk_confidence(
    logits: torch.Tensor, anchor: torch.Tensor, num_branches: int, gamma2: int, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft tokens, confidences, r(i), the top-K branch lengths and the VP drafter's input ids.

    logits [G, V] (draft positions 1..G), anchor int64 [1] -> (draft_tokens [G] int64,
    confidence [G] f32, r [G] f32, branch_len [K] int32, vp_input_ids [K, gamma2] int64).
    """
    fn = kernel_or_reference("topk_confidence", logits.device)
    return fn(logits, anchor, num_branches, gamma2, mask_token_id)


def tree_mask(first_tokens: torch.Tensor, branch_tokens: torch.Tensor, branch_len: torch.Tensor):
    """The deduplicated verification tree of the first draft and K branches (a `kernels.Tree`).

    first_tokens [gamma2] int64, branch_tokens [K, gamma2] int64, branch_len [K] int32.
    """
    fn = kernel_or_reference("tree_mask", first_tokens.device)
    return fn(first_tokens, branch_tokens, branch_len)


def accept(
    cand_tokens: torch.Tensor,
    logits: torch.Tensor,
    *,
    row_of: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
):
    """Walk the candidates against the target's samples (a `kernels.Accept`).

    cand_tokens [B, T] int64, logits [R, V] f32, row_of [B, T] int32 | None, uniforms [T] f32.
    """
    fn = kernel_or_reference("accept", cand_tokens.device)
    return fn(
        cand_tokens,
        logits,
        row_of=row_of,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        uniforms=uniforms,
    )


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """One token per row: logits [R, V], uniforms [R] f32 | None -> [R] int64 (argmax at T=0)."""
    fn = kernel_or_reference("sample_tokens", logits.device)
    return fn(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p)


def commit(
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_len: torch.Tensor,
    num_new: torch.Tensor,
    hidden_src: torch.Tensor | None = None,
    hidden_dst: torch.Tensor | None = None,
    *,
    advance: bool = True,
) -> None:
    """Copy local K/V rows `rows[:num_new]` into the cache at `cache_len`, advance `cache_len` by
    `num_new` (unless `advance` is False: `emit` then does), and gather `hidden_src[rows[:num_new]]`
    into `hidden_dst[:num_new]` (all on device).

    k_local/v_local [L, R, Hkv, D], k_cache/v_cache [L, max_len, Hkv, D], rows [T] int32,
    cache_len/num_new int32 [1], hidden_src [R, Hh], hidden_dst [T, Hh].
    """
    fn = kernel_or_reference("commit", k_local.device)
    fn(
        k_local, v_local, k_cache, v_cache, rows, cache_len, num_new, hidden_src, hidden_dst,
        advance=advance,
    )  # fmt: skip


def emit(
    tokens: torch.Tensor,
    num_new: torch.Tensor,
    out_tokens: torch.Tensor,
    out_len: torch.Tensor,
    cycle: torch.Tensor,
    report: torch.Tensor,
    anchor: torch.Tensor,
    cache_len: torch.Tensor | None = None,
    ctx_positions: torch.Tensor | None = None,
    ctx_num_valid: torch.Tensor | None = None,
) -> None:
    """Append tokens [L] at out_len in out_tokens, advance out_len by num_new and cycle by one,
    write [num_new, tokens...] into report and tokens[num_new - 1] into anchor; with cache_len,
    write the committed rows' positions cache_len + [0, P) into ctx_positions and num_new into
    ctx_num_valid (when given), then advance cache_len by num_new (all on the device; see
    kernels.emit)."""
    fn = kernel_or_reference("emit", tokens.device)
    fn(
        tokens, num_new, out_tokens, out_len, cycle, report, anchor, cache_len, ctx_positions,
        ctx_num_valid,
    )  # fmt: skip
