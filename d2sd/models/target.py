"""TargetModel: our own layer loop over an HF causal LM's weights, with static caches and taps.

The HF modules (embeddings, projections, norms, MLP or GPT-OSS MoE, lm_head) are called as they
are; RoPE, q/k-norm placement, attention (through a pluggable backend), attention sinks and the
caches are ours (`d2sd.models.layers`, `d2sd.attention`). Per-family switches come from
`ModelSpec` (a table), not from copies of the forward.

A forward over new tokens input_ids [B, T] at absolute positions [B, T]:
- computes each layer's K/V into `cache.k_local / v_local` rows b * T + t (never the cache itself),
- attends the shared prefix (cache rows [0, cache_len)) plus its own branch's tokens (causal, a
  tree mask, or all) via `backend.cascade`, merging the two by lse,
- returns logits [B, T, V] in the model dtype and the hidden-state taps [B, T, n_taps * H].

Taps (DFlash convention, checked against z-lab's `extract_context_feature`, offset = 1): tap layer
id l is the output of decoder layer l (0-based), i.e. HF `output_hidden_states[l + 1]`; the taps of
several ids are concatenated along the hidden dim in the given order. As in HF, the output of the
last layer (l = num_layers - 1) is taken after the final norm.

GPT-OSS MoE: the HF MLP dispatches on `config._experts_implementation`; HF's default `grouped_mm`
has no host sync, "eager" loops over the hit experts with a sync (fine for eager runs, not for
CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from d2sd.attention import AttentionBackend, get_backend
from d2sd.models.cache import Cache
from d2sd.models.layers import Rope, apply_norm, decoder_layer
from d2sd.models.spec import ModelSpec

LN2 = math.log(2.0)


class TargetModel(nn.Module):
    """An HF causal LM run through our layer loop (see the module docstring).

    Attributes: `spec` (ModelSpec), `backend`, `tap_layer_ids` (default taps), `tokenizer`
    (set by `from_hf` when loaded from a path, else None), `hf` (the wrapped HF model).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        backend: AttentionBackend | str = "torch",
        *,
        spec: ModelSpec | None = None,
        tap_layer_ids: Sequence[int] = (),
        tokenizer=None,
    ) -> None:
        super().__init__()
        self.hf = hf_model
        self.spec = spec or ModelSpec.from_hf_config(hf_model.config)
        device = next(hf_model.parameters()).device
        # built on the CPU in fp32, then placed with the weights: a CPU table would be copied to
        # the GPU on every forward, which CUDA graph capture forbids
        self.rope = Rope.from_hf_rotary(hf_model.model.rotary_emb).to(device)
        self.backend = get_backend(backend, device) if isinstance(backend, str) else backend
        self.tap_layer_ids = tuple(tap_layer_ids)
        self.tokenizer = tokenizer

    @classmethod
    def from_hf(
        cls,
        model_or_path: nn.Module | str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: AttentionBackend | str = "auto",
        tap_layer_ids: Sequence[int] = (),
    ) -> TargetModel:
        """Wrap an HF model object, or load one: "default", an HF dir, a hub id or a .gguf file.

        A loaded model defaults to float32 on the CPU; a model object keeps its dtype and device
        unless they are given. Loading errors (missing path, unreadable checkpoint, unsupported
        family) raise D2SDError.
        """
        from d2sd.models.loading import load_hf_target

        tokenizer = None
        if isinstance(model_or_path, str):
            model_or_path, tokenizer = load_hf_target(
                model_or_path, dtype=dtype or torch.float32, device=device or "cpu"
            )
        else:
            model_or_path = model_or_path.to(device=device, dtype=dtype)
        model_or_path.eval()
        return cls(model_or_path, backend, tap_layer_ids=tap_layer_ids, tokenizer=tokenizer)

    # -- shapes and shared modules -------------------------------------------------------------

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.model.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def allocate_cache(self, max_len: int, batch: int = 1, tokens: int = 1) -> Cache:
        """Zeroed static cache of max_len rows, with local rows for forwards of batch * tokens."""
        spec = self.spec
        return Cache.allocate(
            spec.num_layers,
            max_len,
            batch * tokens,
            spec.num_kv_heads,
            spec.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        *,
        causal: bool = True,
        mask: torch.Tensor | None = None,
        taps: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run new tokens against the committed prefix; no cache write, no host sync.

        input_ids [B, T] int64, positions [B, T] int32 or int64 (absolute; query (b, t) is at
        cache_len + t for causality/windows, `positions` only drive RoPE). mask: int32 [T, W] or
        [B, T, W] bit mask over the branch's own tokens (pass causal=False with it). taps: layer
        ids to tap (default `self.tap_layer_ids`).
        Returns logits [B, T, V] and taps [B, T, len(taps) * H] ([B, T, 0] without taps), both in
        the model dtype: the samplers read logits exactly in float32, and a float32 copy would cost
        a launch and twice the bytes that acceptance reads. Side effect: cache.k_local / v_local
        rows [0, B * T) hold this step's K/V.
        """
        batch, num_tokens = input_ids.shape
        rows = batch * num_tokens
        assert rows <= cache.local_rows, f"{rows} local rows needed, cache has {cache.local_rows}"
        spec = self.spec
        tap_ids = self.tap_layer_ids if taps is None else tuple(taps)
        last = spec.num_layers - 1
        block = spec.block
        cos, sin = self.rope(positions)
        x = self.embed_tokens(input_ids)
        tapped: dict[int, torch.Tensor] = {}

        for index, layer in enumerate(self.hf.model.layers):

            def attend(q, k, v, index=index, layer=layer):
                out = cache.attend(
                    self.backend,
                    index,
                    q,
                    k,
                    v,
                    causal=causal,
                    mask=mask,
                    sm_scale=spec.sm_scale,
                    window_left=spec.window_left[index],
                    return_lse=spec.attention_sinks,
                )
                if not spec.attention_sinks:
                    return out
                o, lse = out
                sink = layer.self_attn.sinks.float()
                return (o.float() * torch.sigmoid(lse * LN2 - sink)[..., None]).to(o.dtype)

            kv_out = cache.local_kv(index, (batch, num_tokens, spec.num_kv_heads, spec.head_dim))
            x = decoder_layer(layer, x, cos, sin, attend, block, kv_out)
            if index in tap_ids and index != last:
                tapped[index] = x
        x = apply_norm(self.hf.model.norm, x, block)
        if last in tap_ids:
            tapped[last] = x
        logits = self.lm_head(x)
        if tap_ids:
            hidden = torch.cat([tapped[i] for i in tap_ids], dim=-1)
        else:
            hidden = x.new_zeros(batch, num_tokens, 0)
        return logits, hidden

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        cache: Cache,
        *,
        chunk: int | None = None,
        taps: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a prompt input_ids [1, P] after the committed rows and commit its K/V.

        Chunks of `chunk` tokens (default and maximum: cache.local_rows) are run causally against
        what is already committed, then copied into the cache; cache_len advances by P.
        Syncs with the host (reads cache_len once): call it outside captured steps.
        Returns the last position's logits [1, V] (model dtype) and the taps of every prompt position
        [P, len(taps) * H].
        """
        assert input_ids.dim() == 2 and input_ids.shape[0] == 1, "prefill takes one prompt [1, P]"
        chunk = min(chunk or cache.local_rows, cache.local_rows)
        start = int(cache.cache_len.item())
        num_prompt = input_ids.shape[1]
        assert start + num_prompt <= cache.max_len, "prompt does not fit into the cache"
        logits, all_taps = None, []
        for offset in range(0, num_prompt, chunk):
            ids = input_ids[:, offset : offset + chunk]
            size = ids.shape[1]
            first = start + offset
            positions = torch.arange(first, first + size, device=ids.device)[None]
            logits, hidden = self.forward(ids, positions, cache, causal=True, taps=taps)
            cache.k_cache[:, first : first + size] = cache.k_local[:, :size]
            cache.v_cache[:, first : first + size] = cache.v_local[:, :size]
            cache.cache_len += size
            all_taps.append(hidden[0])
        return logits[:, -1], torch.cat(all_taps)
