"""DFlash block-diffusion drafter (z-lab format); the VP drafter of D2SD is the same class.

Architecture (checked against z-lab/dflash `DFlashDraftModel` / `Qwen3DFlashAttention`):
- Qwen3-style decoder layers (q/k RMSNorm per head before RoPE), non-causal inside a block.
- Context: the target's tapped hidden states of the committed tokens, [n, n_taps * H] (taps
  concatenated in `target_layer_ids` order, tap l = output of target layer l = HF
  hidden_states[l + 1]), projected once: ctx = hidden_norm(fc(taps)).
- In every layer the context enters as extra K/V: k = rope(k_norm(k_proj(ctx))), v = v_proj(ctx),
  RoPE at the context tokens' own positions. The layer's input_layernorm is NOT applied to the
  context (z-lab projects `target_hidden` directly); the block tokens go through it as usual.
- The block [anchor, MASK x (gamma - 1)] at positions p .. p + gamma - 1 is embedded with the
  target's embed_tokens, attends the context and itself bidirectionally; hidden -> final `norm` ->
  the target's lm_head. logits[:, k] for k >= 1 predicts the token AT position p + k.
- embed_tokens and lm_head are the target's (shared, never saved).

Checkpoint format (z-lab, loaded and saved as is): a directory with
- config.json: Qwen3 fields (hidden_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta / rope_parameters,
  vocab_size, max_position_embeddings, ...), architectures ["DFlashDraftModel"], block_size,
  num_target_layers, dflash_config {mask_token_id, target_layer_ids}.
- model.safetensors: layers.N.self_attn.{q,k,v,o}_proj.weight, layers.N.self_attn.{q,k}_norm.weight,
  layers.N.{input_layernorm,post_attention_layernorm}.weight, layers.N.mlp.{gate,up,down}_proj.weight,
  fc.weight, hidden_norm.weight, norm.weight.

Decoding uses a static cache (`allocate_cache`) whose rows are context K/V per drafter layer:
`extend_context` appends a fixed number of rows (graph-capturable) and advances cache_len by the
number of valid ones; `forward` runs blocks against it through the attention backend
(`cascade(causal=False)`). Training uses `forward_packed` with the caller's attention and mask;
both run the same layer code (`d2sd.models.layers.decoder_layer`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from d2sd import ops
from d2sd.attention import AttentionBackend, get_backend
from d2sd.errors import D2SDError
from d2sd.models.cache import Cache
from d2sd.models.layers import Rope, apply_norm, decoder_layer, project_kv, write_kv
from d2sd.models.spec import BlockSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ARCHITECTURE = "DFlashDraftModel"


def default_target_layer_ids(num_target_layers: int, num_taps: int) -> tuple[int, ...]:
    """z-lab's default taps: the middle layer for one tap, else spread evenly over [1, L - 3]."""
    if num_taps == 1:
        return (num_target_layers // 2,)
    start, end = 1, num_target_layers - 3
    ids = [round(start + i * (end - start) / (num_taps - 1)) for i in range(num_taps)]
    return tuple(min(max(i, 0), num_target_layers - 1) for i in ids)


def default_mask_token_id(vocab_size: int, tokenizer=None) -> int:
    """The mask token for a target without a trained one.

    The tokenizer's own mask token if it has one; else the first embedding row past the tokenizer's
    vocabulary (Qwen3's DFlash drafters use exactly that row: 151669); else, when every row is a
    real token (SmolLM2: 49152 of 49152), the last id, vocab_size - 1 (a rare merge).
    """
    if tokenizer is not None:
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        if len(tokenizer) < vocab_size:
            return len(tokenizer)
    return vocab_size - 1


@dataclass(frozen=True)
class DFlashConfig:
    """A DFlash drafter's configuration (the fields of z-lab's config.json that matter)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_parameters: dict = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6}
    )
    attention_bias: bool = False
    hidden_act: str = "silu"
    input_embedding_scale: float = 1.0

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def block(self) -> BlockSpec:
        return BlockSpec(self.num_attention_heads, self.num_key_value_heads, self.head_dim, True)

    @classmethod
    def from_dict(cls, raw: dict) -> DFlashConfig:
        """Read z-lab's config.json dict (rope as rope_parameters or rope_theta + rope_scaling)."""
        dflash = raw.get("dflash_config") or {}
        architectures = raw.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in architectures:
            raise D2SDError(
                f"unsupported drafter architecture {architectures}; expected {ARCHITECTURE}"
            )
        if "sliding_attention" in (raw.get("layer_types") or []):
            raise D2SDError("drafters with sliding-window layers are not supported")
        rope = raw.get("rope_parameters")
        if not rope:
            rope = dict(raw.get("rope_scaling") or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = raw.get("rope_theta", 10000.0)
        num_layers = raw["num_hidden_layers"]
        target_layer_ids = dflash.get("target_layer_ids", raw.get("target_layer_ids"))
        if target_layer_ids is None:
            if raw.get("num_target_layers") is None:
                raise D2SDError(
                    "drafter config has neither dflash_config.target_layer_ids nor num_target_layers"
                )
            target_layer_ids = default_target_layer_ids(raw["num_target_layers"], num_layers)
        mask_token_id = dflash.get("mask_token_id", raw.get("mask_token_id"))
        if mask_token_id is None:
            raise D2SDError("drafter config has no dflash_config.mask_token_id")
        return cls(
            hidden_size=raw["hidden_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            target_layer_ids=tuple(int(i) for i in target_layer_ids),
            mask_token_id=int(mask_token_id),
            block_size=int(raw.get("block_size", dflash.get("block_size", 16))),
            num_target_layers=raw.get("num_target_layers"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rope_parameters=dict(rope),
            attention_bias=raw.get("attention_bias", False),
            hidden_act=raw.get("hidden_act", "silu"),
            input_embedding_scale=float(dflash.get("input_embedding_scale", 1.0)),
        )

    def to_dict(self, dtype: torch.dtype | None = None) -> dict:
        """z-lab's config.json (readable by z-lab's DFlashDraftModel with HF 4.x or 5.x)."""
        rope = dict(self.rope_parameters)
        theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        dflash = {
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
        }
        if self.input_embedding_scale != 1.0:
            dflash["input_embedding_scale"] = self.input_embedding_scale
        out = {
            "architectures": [ARCHITECTURE],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "model_type": "qwen3",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "block_size": self.block_size,
            "dflash_config": dflash,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_target_layers": self.num_target_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
            "rope_theta": theta,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        if dtype is not None:
            out["dtype"] = str(dtype).removeprefix("torch.")
        return out

    def to_qwen3_config(self):
        """The HF Qwen3Config that builds this drafter's layers and RoPE."""
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=dict(self.rope_parameters),
            attention_bias=self.attention_bias,
            hidden_act=self.hidden_act,
        )
        config._attn_implementation = "eager"
        return config


class DFlashDrafter(nn.Module):
    """A DFlash (or VP) drafter sharing the target's embed_tokens and lm_head (module docstring)."""

    def __init__(
        self,
        config: DFlashConfig,
        embed: nn.Module,
        lm_head: nn.Module,
        backend: AttentionBackend | str = "torch",
    ) -> None:
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import (
            Qwen3DecoderLayer,
            Qwen3RMSNorm,
            Qwen3RotaryEmbedding,
        )

        self.config = config
        qwen3 = config.to_qwen3_config()
        hidden = config.hidden_size
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(qwen3, index) for index in range(config.num_hidden_layers)
        )
        self.fc = nn.Linear(config.num_taps * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        with torch.device("cpu"):  # real tables even when the layers are built on "meta"
            self.rope = Rope.from_hf_rotary(Qwen3RotaryEmbedding(qwen3))
        # shared with the target: plain attributes, so they are neither saved nor moved with us
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_lm_head", lm_head)
        device = embed.weight.device
        self.backend = get_backend(backend, device) if isinstance(backend, str) else backend

    # -- construction, loading, saving ----------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    @property
    def embed_tokens(self) -> nn.Module:
        return self._embed

    @property
    def lm_head(self) -> nn.Module:
        return self._lm_head

    @classmethod
    def random(
        cls,
        target,
        block_size: int = 16,
        num_layers: int = 1,
        target_layer_ids: Sequence[int] | None = None,
        mask_token_id: int | None = None,
        *,
        intermediate_size: int | None = None,
        seed: int = 0,
        backend: AttentionBackend | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DFlashDrafter:
        """An untrained drafter for `target` (a TargetModel), e.g. to start training.

        Attention shapes, norm eps, RoPE and vocabulary follow the target (as z-lab's drafters
        do); target_layer_ids default to z-lab's spread (`default_target_layer_ids`), the mask
        token to `default_mask_token_id`. Weights: normal(0, 0.02) linears, unit norms, drawn from
        `seed` without touching the global RNG.
        """
        spec = target.spec
        hf_config = target.hf.config
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(spec.num_layers, num_layers)
        if mask_token_id is None:
            mask_token_id = default_mask_token_id(spec.vocab_size, target.tokenizer)
        config = DFlashConfig(
            hidden_size=spec.hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            intermediate_size=intermediate_size or hf_config.intermediate_size,
            vocab_size=spec.vocab_size,
            target_layer_ids=tuple(int(i) for i in target_layer_ids),
            mask_token_id=int(mask_token_id),
            block_size=block_size,
            num_target_layers=spec.num_layers,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_parameters=rope,
        )
        _validate(config, target)
        generator = torch.Generator().manual_seed(seed)
        drafter = cls(config, target.embed_tokens, target.lm_head, backend or target.backend)
        with torch.no_grad():
            for name, param in drafter.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return drafter.to(device=target.device, dtype=dtype or target.dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        target,
        *,
        dtype: torch.dtype | None = None,
        backend: AttentionBackend | str | None = None,
    ) -> DFlashDrafter:
        """Load a z-lab format drafter directory for `target` (a TargetModel).

        The drafter runs on the target's device, in `dtype` (default: the target's). D2SDError
        for a missing or unreadable checkpoint and for a drafter that does not fit the target.
        """
        from safetensors.torch import load_file

        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise D2SDError(f"{path}: no such drafter directory")
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
        except FileNotFoundError as exc:
            raise D2SDError(f"{path}: not a drafter checkpoint (no {CONFIG_NAME})") from exc
        except (OSError, ValueError) as exc:
            raise D2SDError(f"{path}/{CONFIG_NAME} is unreadable: {exc}") from exc
        try:
            config = DFlashConfig.from_dict(raw)
        except KeyError as exc:
            raise D2SDError(f"{path}/{CONFIG_NAME} lacks the field {exc.args[0]!r}") from exc
        _validate(config, target)
        if (folder / WEIGHTS_NAME).is_file():
            files = [folder / WEIGHTS_NAME]
        elif (folder / WEIGHTS_INDEX_NAME).is_file():
            index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        else:
            raise D2SDError(f"{path}: no {WEIGHTS_NAME} in the drafter directory")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state.update(load_file(str(file)))
            except Exception as exc:
                raise D2SDError(f"{file} is unreadable: {exc}") from exc
        with torch.device("meta"):
            drafter = cls(config, target.embed_tokens, target.lm_head, backend or target.backend)
        try:
            drafter.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise D2SDError(f"{path}: weights do not match the config: {detail}") from exc
        return drafter.to(device=target.device, dtype=dtype or target.dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors in z-lab's format (no embed / lm_head)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = self.fc.weight.dtype
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(dtype), indent=2) + "\n")
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    # -- decoding path ---------------------------------------------------------------------------

    def allocate_cache(self, max_len: int, batch: int = 1, block_size: int | None = None) -> Cache:
        """Static cache for max_len context rows and local rows for blocks of batch x block_size.

        Leave room for the fixed row count of `extend_context`: cache_len + n <= max_len.
        """
        config = self.config
        return Cache.allocate(
            config.num_hidden_layers,
            max_len,
            batch * (block_size or config.block_size),
            config.num_key_value_heads,
            config.head_dim,
            dtype=self.fc.weight.dtype,
            device=self.fc.weight.device,
        )

    def project_context(self, ctx_hidden: torch.Tensor) -> torch.Tensor:
        """Target taps [..., n_taps * H] -> the drafter's context hidden [..., H] (fc, hidden_norm)."""
        return apply_norm(self.hidden_norm, self.fc(ctx_hidden), self.config.block)

    def extend_context(
        self,
        ctx_hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        num_valid: torch.Tensor,
    ) -> None:
        """Append context K/V of n tokens: ctx_hidden [n, n_taps * H], positions [n] int64.

        All n rows are written at cache_len .. cache_len + n - 1 of every drafter layer (n is fixed
        so the step can be captured), then cache_len += num_valid (int32 [1]) on the device; rows
        past the valid ones are overwritten by the next call. No host sync. At inference on a dense
        family each layer's K/V goes into the cache's local rows (`write_kv`: 2 launches) and one
        `commit` copies every layer's rows (HF's modules take ~25 launches a layer here).
        """
        ctx = self.project_context(ctx_hidden)
        cos, sin = self.rope(positions)
        block = self.config.block
        num_rows = ctx.shape[0]
        if block.fused_block and not torch.is_grad_enabled() and num_rows <= cache.local_rows:
            # each layer's K/V into the local rows (2 launches), then one commit for every layer
            kv_shape = (1, num_rows, block.num_kv_heads, block.head_dim)
            for index, layer in enumerate(self.layers):
                k_out, v_out = cache.local_kv(index, kv_shape)
                write_kv(layer.self_attn, ctx, cos, sin, block, k_out[0], v_out[0])
            ops.commit(
                cache.k_local, cache.v_local, cache.k_cache, cache.v_cache,
                ops.constant(ctx.device, "arange", num_rows), cache.cache_len, num_valid,
            )  # fmt: skip
            return
        rows = cache.cache_len.long() + torch.arange(num_rows, device=ctx.device)
        for index, layer in enumerate(self.layers):
            k, v = project_kv(layer.self_attn, ctx, cos, sin, block)
            cache.k_cache[index].index_copy_(0, rows, k.to(cache.k_cache.dtype))
            cache.v_cache[index].index_copy_(0, rows, v.to(cache.v_cache.dtype))
        cache.cache_len.add_(num_valid)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Block token embeddings through the target's embed_tokens (times z-lab's optional scale)."""
        x = self._embed(input_ids)
        scale = self.config.input_embedding_scale
        return x * scale if scale != 1.0 else x

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """Blocks input_ids [B, gamma] at positions [B, gamma] -> hidden [B, gamma, H] (pre-norm).

        Each block attends the whole context in `cache` (rows [0, cache_len)) and itself,
        bidirectionally. Writes the blocks' K/V into cache.k_local / v_local only. No host sync.
        """
        batch, gamma = input_ids.shape
        rows = batch * gamma
        assert rows <= cache.local_rows, f"{rows} local rows needed, cache has {cache.local_rows}"
        block = self.config.block
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)
        kv_shape = (batch, gamma, block.num_kv_heads, block.head_dim)
        for index, layer in enumerate(self.layers):

            def attend(q, k, v, index=index):
                return cache.attend(self.backend, index, q, k, v, causal=False)

            x = decoder_layer(layer, x, cos, sin, attend, block, cache.local_kv(index, kv_shape))
        return x

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """Blocks input_ids [B, gamma] at positions [B, gamma] -> logits [B, gamma, V] in the model
        dtype (the selection kernels and argmax read it exactly; no float32 copy in a step)."""
        return self._head(self.forward_hidden(input_ids, positions, cache))

    # -- training path ---------------------------------------------------------------------------

    def forward_packed(
        self,
        noise_ids: torch.Tensor,
        noise_pos: torch.Tensor,
        ctx_hidden: torch.Tensor,
        ctx_pos: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Packed blocks for training -> hidden [M, H] (before the final norm / lm_head).

        noise_ids, noise_pos [M]: the block tokens (anchors, masks, visible prefixes) of all
        blocks, packed; ctx_hidden [S, n_taps * H], ctx_pos [S]: the context taps.
        `attend(q [M, Hq, D], k [S + M, Hkv, D], v [S + M, Hkv, D]) -> o [M, Hq, D]` applies the
        caller's block mask (keys 0..S-1 are the context, S.. the block tokens).
        """
        block = self.config.block
        ctx = self.project_context(ctx_hidden)
        ctx_cos, ctx_sin = self.rope(ctx_pos)
        cos, sin = self.rope(noise_pos)
        x = self.embed(noise_ids)
        for layer in self.layers:
            k_ctx, v_ctx = project_kv(layer.self_attn, ctx, ctx_cos, ctx_sin, block)

            def attend_layer(q, k, v, k_ctx=k_ctx, v_ctx=v_ctx):
                return attend(q, torch.cat([k_ctx, k]), torch.cat([v_ctx, v]))

            x = decoder_layer(layer, x, cos, sin, attend_layer, block)
        return x

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(apply_norm(self.norm, hidden, self.config.block))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] float32 (final norm, then the target's lm_head)."""
        return self._head(hidden).float()


def _validate(config: DFlashConfig, target) -> None:
    """D2SDError unless the drafter fits the target (hidden size, vocabulary, tapped layers)."""
    spec = target.spec
    if config.vocab_size != spec.vocab_size:
        raise D2SDError(
            f"drafter vocabulary {config.vocab_size} != target vocabulary {spec.vocab_size}"
        )
    if config.hidden_size != spec.hidden_size:
        raise D2SDError(
            f"drafter hidden size {config.hidden_size} != target hidden size {spec.hidden_size}"
        )
    if config.num_target_layers is not None and config.num_target_layers != spec.num_layers:
        raise D2SDError(
            f"drafter was made for a {config.num_target_layers}-layer target, "
            f"this target has {spec.num_layers} layers"
        )
    bad = [i for i in config.target_layer_ids if not 0 <= i < spec.num_layers]
    if bad:
        raise D2SDError(
            f"drafter taps target layers {bad}, the target has {spec.num_layers} layers"
        )
    if not 0 <= config.mask_token_id < spec.vocab_size:
        raise D2SDError(f"drafter mask token {config.mask_token_id} is outside the vocabulary")
