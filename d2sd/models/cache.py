"""Static KV cache of one model (target or drafter): all layers in one tensor per role.

Layout (ARCHITECTURE.md, "Caches"):

    k_cache, v_cache : [num_layers, max_len, Hkv, D]  model dtype; rows [0, cache_len) are valid
    cache_len        : int32 [1] on the device
    k_local, v_local : [num_layers, R, Hkv, D]         this step's K/V, row b * T + t (R >= B * T)

Keys are stored after RoPE (and after k_norm where the family has it). A forward over new tokens
writes only the local rows; `commit` (kernels.commit, or a plain copy outside captured steps)
moves accepted rows into the cache at cache_len and advances cache_len on the device.
Buffers start zeroed so that rows past cache_len are finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Cache:
    """Static per-model KV cache plus the local (uncommitted) K/V of the current step."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_len: torch.Tensor
    k_local: torch.Tensor
    v_local: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        max_len: int,
        local_rows: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Cache:
        """Zeroed cache [num_layers, max_len, Hkv, D] and local rows [num_layers, local_rows, Hkv, D]."""
        shape = (num_layers, max_len, num_kv_heads, head_dim)
        local = (num_layers, local_rows, num_kv_heads, head_dim)
        return cls(
            k_cache=torch.zeros(shape, dtype=dtype, device=device),
            v_cache=torch.zeros(shape, dtype=dtype, device=device),
            cache_len=torch.zeros(1, dtype=torch.int32, device=device),
            k_local=torch.zeros(local, dtype=dtype, device=device),
            v_local=torch.zeros(local, dtype=dtype, device=device),
        )

    @property
    def num_layers(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[1]

    @property
    def local_rows(self) -> int:
        return self.k_local.shape[1]

    def reset(self) -> None:
        """Forget every committed row (device-side; the buffers are kept)."""
        self.cache_len.zero_()

    def local_kv(
        self, layer: int, shape: torch.Size | tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, T, Hkv, D] (`shape`) of layer `layer`'s local K and V rows [0, B * T)."""
        rows = shape[0] * shape[1]
        return self.k_local[layer, :rows].view(shape), self.v_local[layer, :rows].view(shape)

    def attend(
        self,
        backend: Any,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        **cascade_options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s attention of this step: write k, v [B, T, Hkv, D] into local rows
        [0, B * T) (unless they are already `local_kv`'s views: a fused block wrote them there)
        and attend q [B, T, Hq, D] to the committed prefix and those rows through
        `backend.cascade` (its options passed on: causal, mask, sm_scale, ...)."""
        k_local, v_local = self.local_kv(layer, k.shape)
        # one strided copy each (k and v may be views into a fused q|k|v projection)
        if k.data_ptr() != k_local.data_ptr():
            k_local.copy_(k)
        if v.data_ptr() != v_local.data_ptr():
            v_local.copy_(v)
        return backend.cascade(
            q,
            self.k_cache[layer],
            self.v_cache[layer],
            self.cache_len,
            k_local,
            v_local,
            **cascade_options,
        )
