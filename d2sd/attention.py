"""Attention backends: one `cascade` method, three implementations (torch, triton, flashinfer).

Every model layer (target and drafter) attends through `backend.cascade(...)`:

    cascade(q [B, T, Hq, D], k_cache_l [max_len, Hkv, D], v_cache_l, cache_len int32 [1],
            k_local [B, T, Hkv, D], v_local, *, causal, mask=None, sm_scale=None,
            window_left=-1, return_lse=False) -> o [B, T, Hq, D] (q.dtype)[, lse [B, T, Hq] f32]

Semantics (ARCHITECTURE.md, "Attention kernels"):
- B branches of T queries share one prefix: rows [0, cache_len) of the layer's cache. Query (b, t)
  sits at absolute position cache_len + t, local key j (branch b's own K/V) at cache_len + j,
  prefix key j at j.
- Local visibility: `causal` (j <= t), or the bit mask `mask` (int32 [T, W] shared by all branches
  or [B, T, W], W = ceil(T / 32); bit j % 32 of word j // 32 in row t means query t sees local key j;
  pass causal=False with it), or everything (causal=False, mask=None: the drafter's block).
  The prefix is always visible, up to the window.
- `window_left = -1`: no window; otherwise a key is visible iff q_pos - k_pos <= window_left
  (FlashInfer's convention; HF `sliding_window = W` is `W - 1`). Positions are the index positions
  above, so with a tree mask the window counts node indices, not depths.
- GQA: query head h reads kv head h // (Hq // Hkv). `sm_scale` defaults to D ** -0.5.
- Attention states: o and lse with a **base-2** lse (log2 sum_j 2^(s_j * log2 e), s_j = q.k_j *
  sm_scale), float32. The prefix state and the local state are merged by their lse. A row that
  sees no key gets o = 0 and lse = -inf.

Backends:
- `torch`: pure PyTorch in fp32 (matmuls over the whole static cache, rows >= cache_len masked by a
  device comparison against arange(max_len)): no host sync, works on CPU and CUDA, graph-capturable.
  The reference for the others and the CPU path.
- `triton`: `kernels.cascade_attention` (the fused kernel; imported lazily).
- `flashinfer`: the reference code's path: `single_prefill_with_kv_cache` over the shared prefix, one
  local prefill per branch, `merge_state`. It slices the prefix by a host length (`cache_len.item()`),
  so it syncs and cannot be captured in a CUDA graph: use it as a reference and fallback only.
"""

from __future__ import annotations

import importlib
import math
from typing import Protocol

import torch

from d2sd.errors import D2SDError
from kernels import lse_merge_ref, unpack_mask

LOG2E = 1.0 / math.log(2.0)
BACKEND_NAMES = ("torch", "triton", "flashinfer")


class AttentionBackend(Protocol):
    """What a model layer needs from attention (see the module docstring for the semantics)."""

    name: str
    # False where `cascade` reads device values on the host: steps using it must run eagerly
    graph_capturable: bool

    def cascade(
        self,
        q: torch.Tensor,
        k_cache_l: torch.Tensor,
        v_cache_l: torch.Tensor,
        cache_len: torch.Tensor,
        k_local: torch.Tensor,
        v_local: torch.Tensor,
        *,
        causal: bool,
        mask: torch.Tensor | None = None,
        sm_scale: float | None = None,
        window_left: int = -1,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------
# Pure torch (fp32) pieces; also used by tests as the reference.
# --------------------------------------------------------------------------------------------


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention state in fp32.

    q [B, T, Hq, D]; k, v [B or 1, N, Hkv, D]; visible bool broadcastable to [B, T, N].
    Returns o [B, T, Hq, D] f32 and base-2 lse [B, T, Hq] f32 (o = 0, lse = -inf on empty rows).
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    group = num_heads // num_kv
    qf = q.float().view(batch, num_q, num_kv, group, head_dim)
    # scores [B, Hkv, G, T, N]
    scores = torch.einsum("bthgd,bnhd->bhgtn", qf, k.float()) * sm_scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(-1, keepdim=True)  # [B, Hkv, G, T, 1]
    out = torch.einsum("bhgtn,bnhd->bthgd", probs, v.float())
    denom_t = denom.squeeze(-1).permute(0, 3, 1, 2)  # [B, T, Hkv, G]
    out = out / denom_t.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    lse = (torch.log(denom_t) + row_max.squeeze(-1).permute(0, 3, 1, 2)) * LOG2E
    return out.reshape(batch, num_q, num_heads, head_dim), lse.reshape(batch, num_q, num_heads)


def prefix_attention_torch(
    q: torch.Tensor,
    k_cache_l: torch.Tensor,
    v_cache_l: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
    window_left: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, T, Hq, D] to cache rows [0, cache_len): (o, lse) in fp32, no host sync."""
    num_q, head_dim = q.shape[1], q.shape[3]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    key_pos = torch.arange(k_cache_l.shape[0], device=q.device)
    valid = key_pos < cache_len  # [max_len]
    visible = valid[None, :].expand(num_q, -1)
    if window_left >= 0:
        q_pos = cache_len + torch.arange(num_q, device=q.device)
        visible = visible & (q_pos[:, None] - key_pos[None, :] <= window_left)
    # rows past cache_len may hold anything (even NaN from an uninitialised buffer): zero them so
    # that 0 * garbage cannot poison the output
    v = torch.where(valid[:, None, None], v_cache_l.float(), 0.0)
    return _attend(q, k_cache_l[None], v[None], visible[None], scale)


def local_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, T, Hq, D] to each branch's own K/V [B, T, Hkv, D]: (o, lse) in fp32."""
    num_q, head_dim = q.shape[1], q.shape[3]
    num_k = k.shape[1]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q_idx = torch.arange(num_q, device=q.device)[:, None]
    k_idx = torch.arange(num_k, device=q.device)[None, :]
    if mask is not None:
        visible = unpack_mask(mask, num_k)
        if visible.dim() == 2:
            visible = visible[None]
    elif causal:
        visible = (k_idx <= q_idx)[None]
    else:
        visible = torch.ones(1, num_q, num_k, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        visible = visible & (q_idx - k_idx <= window_left)[None]
    return _attend(q, k, v, visible, scale)


def cascade_attention_torch(
    q: torch.Tensor,
    k_cache_l: torch.Tensor,
    v_cache_l: torch.Tensor,
    cache_len: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shared prefix + branch-local attention merged by lse, in fp32 torch (see module docstring)."""
    o_p, lse_p = prefix_attention_torch(
        q, k_cache_l, v_cache_l, cache_len, sm_scale=sm_scale, window_left=window_left
    )
    o_l, lse_l = local_attention_torch(
        q, k_local, v_local, causal=causal, mask=mask, sm_scale=sm_scale, window_left=window_left
    )
    o, lse = lse_merge_ref(o_p, lse_p, o_l, lse_l)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class TorchBackend:
    """Pure torch, fp32 math, no host sync (CPU path and reference)."""

    name = "torch"
    graph_capturable = True

    def cascade(self, q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **kwargs):
        return cascade_attention_torch(
            q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **kwargs
        )


class TritonBackend:
    """The fused Triton kernel `kernels.cascade_attention` (same signature and semantics)."""

    name = "triton"
    graph_capturable = True

    def __init__(self) -> None:
        try:
            self._cascade = importlib.import_module("kernels").cascade_attention
        except (ImportError, AttributeError) as exc:
            raise D2SDError(
                f"attention backend 'triton' is unavailable: kernels.cascade_attention cannot be "
                f"imported ({exc}); use --backend torch"
            ) from exc

    def cascade(self, q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **kwargs):
        return self._cascade(q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **kwargs)


class FlashInferBackend:
    """FlashInfer reference path: one prefill over the shared prefix, one per branch, merge_state.

    Reads `cache_len` on the host (one sync per call), so it cannot be graph-captured. Windows on
    the prefix are applied with a dense custom mask (FlashInfer aligns a window to the end of the
    keys, not to cache_len + t).
    """

    name = "flashinfer"
    graph_capturable = False

    def __init__(self) -> None:
        try:
            self._fi = importlib.import_module("flashinfer")
        except ImportError as exc:
            raise D2SDError(
                "attention backend 'flashinfer' needs FlashInfer: pip install flashinfer-python "
                "(CUDA only), or use --backend triton / torch"
            ) from exc

    def cascade(
        self,
        q,
        k_cache_l,
        v_cache_l,
        cache_len,
        k_local,
        v_local,
        *,
        causal,
        mask=None,
        sm_scale=None,
        window_left=-1,
        return_lse=False,
    ):
        fi = self._fi
        batch, num_q, num_heads, head_dim = q.shape
        scale = head_dim**-0.5 if sm_scale is None else sm_scale
        prefix_len = int(cache_len.item())  # host sync: this backend is a reference, not captured
        flat_q = q.reshape(batch * num_q, num_heads, head_dim)
        if prefix_len > 0:
            prefix_mask = None
            if window_left >= 0:
                q_pos = prefix_len + torch.arange(num_q, device=q.device).repeat(batch)
                k_pos = torch.arange(prefix_len, device=q.device)
                prefix_mask = q_pos[:, None] - k_pos[None, :] <= window_left
            o_p, lse_p = fi.single_prefill_with_kv_cache(
                flat_q,
                k_cache_l[:prefix_len],
                v_cache_l[:prefix_len],
                custom_mask=prefix_mask,
                causal=False,
                kv_layout="NHD",
                sm_scale=scale,
                return_lse=True,
            )
        outs, lses = [], []
        visible = None
        if mask is not None:
            visible = unpack_mask(mask, num_q)
            if window_left >= 0:
                idx = torch.arange(num_q, device=q.device)
                visible = visible & (idx[:, None] - idx[None, :] <= window_left)
        for b in range(batch):
            custom = None if visible is None else visible[b] if visible.dim() == 3 else visible
            o_b, lse_b = fi.single_prefill_with_kv_cache(
                q[b],
                k_local[b],
                v_local[b],
                custom_mask=custom,
                causal=causal and custom is None,
                kv_layout="NHD",
                sm_scale=scale,
                window_left=window_left if custom is None else -1,
                return_lse=True,
            )
            outs.append(o_b)
            lses.append(lse_b)
        o = torch.cat(outs)
        lse = torch.cat(lses).float()
        if prefix_len > 0:
            o, lse = fi.merge_state(o_p, lse_p.float(), o, lse)
        o = o.reshape(batch, num_q, num_heads, head_dim).to(q.dtype)
        lse = lse.reshape(batch, num_q, num_heads).float()
        return (o, lse) if return_lse else o


def get_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """The attention backend `name` ("torch", "triton", "flashinfer", or "auto") for `device`.

    "auto" is "triton" on CUDA when the kernel imports, else "torch". Unknown or unavailable
    backends raise D2SDError with one line saying what to do.
    """
    device = torch.device(device)
    if name == "auto":
        name = (
            "triton"
            if device.type == "cuda" and "triton" in available_backends(device)
            else "torch"
        )
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        return TritonBackend()
    if name == "flashinfer":
        if device.type != "cuda":
            raise D2SDError("attention backend 'flashinfer' runs on CUDA only; use --backend torch")
        return FlashInferBackend()
    raise D2SDError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backend names usable on `device` here (triton on CPU only under TRITON_INTERPRET=1)."""
    import os

    device = torch.device(device)
    names = ["torch"]
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            TritonBackend()
            names.append("triton")
        except D2SDError:
            pass
    if device.type == "cuda":
        try:
            FlashInferBackend()
            names.append("flashinfer")
        except D2SDError:
            pass
    return names
