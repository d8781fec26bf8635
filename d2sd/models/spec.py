"""ModelSpec: what our layer loop needs to know about a target, read from its HF config by a table.

Per-family differences live in `FAMILIES`, not in per-family copies of the forward:

| family  | q/k/v bias        | q/k RMSNorm (per head, before RoPE) | attention sinks | MLP                     |
|---------|-------------------|-------------------------------------|-----------------|-------------------------|
| llama   | config.attention_bias | no                              | no              | dense (gate/up/down)    |
| qwen2   | yes (q, k, v)     | no                                  | no              | dense                   |
| qwen3   | config.attention_bias | yes                             | no              | dense                   |
| gpt_oss | config.attention_bias | no                              | yes (per head)  | MoE, returns (out, scores) |

The dense families run each block on fused kernels (`Family.fused_block`: one launch per RMSNorm
with its residual add, one GEMM for q|k|v and one for gate|up, one for q/k-norm + RoPE, one for
SiLU(gate) * up); GPT-OSS, whose RMSNorm multiplies the weight before the cast, keeps HF's modules.

Biases live inside the HF Linear modules that we call, so they need no entry. Sliding windows
come from `config.layer_types` ("sliding_attention" layers use `config.sliding_window = W`, i.e.
`window_left = W - 1`), which covers qwen2/qwen3 (use_sliding_window) and gpt_oss alike.

Attention sinks (GPT-OSS): the softmax denominator of head h gains exp(sink_h), so with
Z = sum_j exp(s_j) the output becomes o * Z / (Z + e^sink) = o * sigmoid(ln Z - sink), where
ln Z = lse * ln 2 for our base-2 lse.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2sd.errors import D2SDError


@dataclass(frozen=True)
class Family:
    """Per-family switches of the shared layer code."""

    qk_norm: bool  # q_norm / k_norm RMSNorm over head_dim, applied before RoPE
    attention_sinks: bool  # per-head sink logit in the softmax denominator
    mlp_returns_tuple: bool  # HF MLP returns (hidden, router_scores)
    # Llama-convention RMSNorms (weight applied after the cast back) and a dense gated MLP: the
    # block can run on the fused kernels (d2sd.models.layers); GPT-OSS keeps its HF modules
    fused_block: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family(qk_norm=False, attention_sinks=False, mlp_returns_tuple=False),
    "qwen2": Family(qk_norm=False, attention_sinks=False, mlp_returns_tuple=False),
    "qwen3": Family(qk_norm=True, attention_sinks=False, mlp_returns_tuple=False),
    "gpt_oss": Family(
        qk_norm=False, attention_sinks=True, mlp_returns_tuple=True, fused_block=False
    ),
}

# RoPE variants whose frequencies change with the sequence length at run time: our tables are static.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class BlockSpec:
    """Shapes and switches of one attention + MLP block (shared by target and drafter layers)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    mlp_returns_tuple: bool = False
    fused_block: bool = True  # see Family.fused_block


@dataclass(frozen=True)
class ModelSpec:
    """A target's shapes and per-family switches (one per model, immutable)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    qk_norm: bool
    attention_sinks: bool
    mlp_returns_tuple: bool
    window_left: tuple[int, ...]  # per layer; -1 = full attention
    rope_type: str
    fused_block: bool = True  # see Family.fused_block

    @property
    def block(self) -> BlockSpec:
        return BlockSpec(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.qk_norm,
            self.mlp_returns_tuple,
            self.fused_block,
        )

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        """Read a spec from an HF `PretrainedConfig`; D2SDError for families we do not support."""
        family_name = getattr(config, "model_type", None)
        if family_name not in FAMILIES:
            raise D2SDError(
                f"unsupported model family {family_name!r}; supported: {', '.join(FAMILIES)}"
            )
        family = FAMILIES[family_name]
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope = (
            getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in _DYNAMIC_ROPE:
            raise D2SDError(
                f"unsupported RoPE type {rope_type!r} (frequencies depend on the sequence length)"
            )
        layer_types = (
            getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        )
        sliding = getattr(config, "sliding_window", None)
        window_left = tuple(
            sliding - 1 if kind == "sliding_attention" and sliding else -1 for kind in layer_types
        )
        return cls(
            family=family_name,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            sm_scale=head_dim**-0.5,
            qk_norm=family.qk_norm,
            attention_sinks=family.attention_sinks,
            mlp_returns_tuple=family.mlp_returns_tuple,
            fused_block=family.fused_block,
            window_left=window_left,
            rope_type=rope_type,
        )
