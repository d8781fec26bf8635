"""The shared layer code of targets and drafters: RoPE, q/k projections, the decoder block.

One decoder block, written once: HF's modules compute it with autograd (training) and for GPT-OSS;
at inference the dense families run it on fused kernels (`fused_decoder_layer`, same math):

    h   = x + o_proj(attend(q, k, v))        q, k, v from input_layernorm(x)
    out = h + mlp(post_attention_layernorm(h))

with q = rope(q_norm(q_proj(.))) and k = rope(k_norm(k_proj(.))) (q/k norm only where the family
has it, per head over head_dim, before RoPE, as Qwen3 does). `attend(q, k, v) -> o` is supplied by
the caller: the target writes k/v into its local cache rows and calls the backend's cascade; the
drafter's training path concatenates the context K/V and applies the caller's block mask.

Layouts: x [..., T, hidden]; q [..., T, Hq, D]; k, v [..., T, Hkv, D]; o [..., T, Hq, D].

RoPE: inv_freq and the attention scaling come from HF's own rotary module (which uses HF's rope
init functions: default, linear, llama3, yarn, ...). cos/sin are computed in fp32 from int64
absolute positions, cast to the activations' dtype and applied in the rotate-half convention
(first half / second half of head_dim), exactly as HF does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from d2sd import ops
from d2sd.models.spec import BlockSpec
from kernels.rope import rotate_half_ref as apply_rope  # the model's RoPE, written once

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Rope(nn.Module):
    """RoPE tables: positions (int32 or int64, any shape) -> (cos, sin) [..., D / 2] float32
    (`kernels.rope_tables` on CUDA: one launch; its torch reference on the CPU)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_hf_rotary(cls, rotary: nn.Module) -> Rope:
        """inv_freq and attention_scaling of an HF `*RotaryEmbedding` module, recomputed in fp32.

        A fresh module is built from `rotary.config` (HF's rope init functions run again), since
        the live one's inv_freq may have been rounded by a `.to(bfloat16)`.
        """
        with torch.device("cpu"):
            fresh = type(rotary)(rotary.config)
        return cls(fresh.inv_freq, getattr(fresh, "attention_scaling", 1.0))

    def _apply(self, fn, recurse=True):
        # follow device moves but never dtype casts: RoPE frequencies rounded to bf16 drift
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # integer positions (int32 or int64) promote to float32 in the multiply by the frequencies
        # (exact up to 2^24); on CUDA kernels.rope_tables does it all in one launch
        inv_freq = self.inv_freq.to(positions.device)
        tables = ops.kernel_or_reference("rope_tables", positions.device)
        return tables(positions, inv_freq, self.attention_scaling)


def project_kv(
    attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: BlockSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """k (normed, rotated) and v [..., T, Hkv, D] of x [..., T, hidden] through HF `attn`'s weights."""
    k = attn.k_proj(x).unflatten(-1, (spec.num_kv_heads, spec.head_dim))
    v = attn.v_proj(x).unflatten(-1, (spec.num_kv_heads, spec.head_dim))
    if spec.qk_norm:
        k = attn.k_norm(k)
    return apply_rope(k, cos, sin), v


def project_qkv(
    attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: BlockSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [..., T, Hq, D] and k, v [..., T, Hkv, D] of x (q/k norm where the family has it, RoPE)."""
    q = attn.q_proj(x).unflatten(-1, (spec.num_heads, spec.head_dim))
    if spec.qk_norm:
        q = attn.q_norm(q)
    k, v = project_kv(attn, x, cos, sin, spec)
    return apply_rope(q, cos, sin), k, v


def decoder_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: Attend,
    spec: BlockSpec,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One pre-norm decoder block over HF `layer`'s weights; attention is `attend(q, k, v) -> o`.

    Inference on a dense family runs the fused kernels (`fused_decoder_layer`); training (autograd
    through HF's modules) and GPT-OSS run HF's modules (`module_decoder_layer`). Both compute the
    same function; in fp32 on the CPU they agree to rounding (the fused GEMMs reduce alike).
    kv_out: where `attend` keeps k and v ([..., T, Hkv, D] contiguous, a cache's local rows); the
    fused block writes them there itself and passes these tensors to `attend` as k and v."""
    # HF's dense MLPs keep their config; act_fn's class changes across transformers versions
    silu_mlp = getattr(getattr(layer.mlp, "config", None), "hidden_act", None) in ("silu", "swish")
    if spec.fused_block and silu_mlp and not torch.is_grad_enabled():
        return fused_decoder_layer(layer, x, cos, sin, attend, spec, kv_out)
    return module_decoder_layer(layer, x, cos, sin, attend, spec)


def module_decoder_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: Attend,
    spec: BlockSpec,
) -> torch.Tensor:
    """`decoder_layer` through HF's own modules (autograd, GPT-OSS)."""
    attn = layer.self_attn
    q, k, v = project_qkv(attn, layer.input_layernorm(x), cos, sin, spec)
    h = x + attn.o_proj(attend(q, k, v).flatten(-2))
    mlp_out = layer.mlp(layer.post_attention_layernorm(h))
    if spec.mlp_returns_tuple:
        mlp_out = mlp_out[0]
    return h + mlp_out


def fused_decoder_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: Attend,
    spec: BlockSpec,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`decoder_layer` in 7 launches besides attention (a graphed step is launch-bound: HF's
    modules take 49): RMSNorm, q|k|v GEMM, q/k-norm + RoPE (+ the K/V write into `kv_out`),
    o_proj, residual add + RMSNorm, gate|up GEMM, SiLU * up, down_proj with the residual added by
    the GEMM itself (beta = 1). Kernels on CUDA, their torch references on the CPU (d2sd.ops).
    Layouts as `decoder_layer`; no grad."""
    attn, mlp = layer.self_attn, layer.mlp
    input_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    rms_norm = ops.kernel_or_reference("rms_norm", x.device)
    normed = rms_norm(x, input_norm.weight, input_norm.variance_epsilon)
    qkv = nn.functional.linear(normed, *fused_linear(attn, ("q_proj", "k_proj", "v_proj")))
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
    q = q.unflatten(-1, (spec.num_heads, spec.head_dim))
    k = k.unflatten(-1, (spec.num_kv_heads, spec.head_dim))
    v = v.unflatten(-1, (spec.num_kv_heads, spec.head_dim))
    norms, eps = _qk_norms(attn, spec)
    if kv_out is None:
        q, k = ops.kernel_or_reference("rope_qk", x.device)(q, k, cos, sin, *norms, eps)
    else:
        k_out, v_out = kv_out
        rope_store = ops.kernel_or_reference("rope_qk_store", x.device)
        q, k, v = rope_store(q, k, v, cos, sin, k_out, v_out, *norms, eps), k_out, v_out
    o = attn.o_proj(attend(q, k, v).flatten(-2))
    normed, h = rms_norm(o, post_norm.weight, post_norm.variance_epsilon, residual=x)
    gate_up = nn.functional.linear(normed, *fused_linear(mlp, ("gate_proj", "up_proj")))
    act = ops.kernel_or_reference("silu_mul", x.device)(gate_up)
    if mlp.down_proj.bias is not None:
        return h + mlp.down_proj(act)
    # h is this block's own fresh sum: the GEMM accumulates into it (one launch, no add)
    rows = h.view(-1, h.shape[-1])
    return rows.addmm_(act.view(-1, act.shape[-1]), mlp.down_proj.weight.t()).view(h.shape)


def write_kv(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    spec: BlockSpec,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
) -> None:
    """`project_kv`'s k (normed, rotated) and v of x [..., T, hidden] written into k_out, v_out
    [..., T, Hkv, D] (contiguous; a cache's local rows) in 2 launches: one k|v GEMM over a view of
    the block's fused q|k|v weight (`fused_linear`, the same stack the fused block uses) and one
    `rope_qk_store` with no query heads. HF's modules take ~15 here (Qwen3). Inference only, dense
    families (`spec.fused_block`); kernels on CUDA, references on the CPU (d2sd.ops)."""
    weight, bias = fused_linear(attn, ("q_proj", "k_proj", "v_proj"))
    q_width = spec.num_heads * spec.head_dim
    kv = nn.functional.linear(x, weight[q_width:], None if bias is None else bias[q_width:])
    k, v = kv.unflatten(-1, (2 * spec.num_kv_heads, spec.head_dim)).chunk(2, dim=-2)
    (_, k_norm), eps = _qk_norms(attn, spec)
    rope_store = ops.kernel_or_reference("rope_qk_store", x.device)
    rope_store(k[..., :0, :], k, v, cos, sin, k_out, v_out, k_norm, k_norm, eps)  # no q heads


def _qk_norms(
    attn: nn.Module, spec: BlockSpec
) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], float]:
    """The rope kernels' norm arguments: ((q_norm weight, k_norm weight), eps), or
    ((None, None), 1e-6) for a family without q/k norm."""
    if not spec.qk_norm:
        return (None, None), 1e-6
    return (attn.q_norm.weight, attn.k_norm.weight), attn.q_norm.variance_epsilon


def apply_norm(norm: nn.Module, x: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """HF RMSNorm module `norm` applied to x [..., H]: one `rms_norm` launch where the blocks run
    fused (inference, dense families: the kernel is HF's forward op for op, which takes ~6
    launches), else the module itself."""
    if spec.fused_block and not torch.is_grad_enabled() and hasattr(norm, "variance_epsilon"):
        return ops.kernel_or_reference("rms_norm", x.device)(x, norm.weight, norm.variance_epsilon)
    return norm(x)


def fused_linear(
    module: nn.Module, names: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the Linear layers `module.<name>` stacked along the output dim, for one
    GEMM instead of len(names).

    The first call concatenates them and points each layer's weight (and bias) Parameter at a view
    of the stack (`.data`, so the Parameter objects an optimizer holds stay the module's), so no
    memory is added and HF's modules keep working on the same numbers; later calls return the
    stack while the views still live in it (a `.to()` replaces them: it is rebuilt). Run it
    outside CUDA-graph capture first (the warm-up does)."""
    linears = [getattr(module, name) for name in names]
    cached = module.__dict__.get("_d2sd_fused", {}).get(names)
    if cached is not None and all(_inside(lin.weight, cached[0]) for lin in linears):
        return cached
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError(f"{names}: some have a bias and some not; cannot stack them")
        bias = torch.cat([lin.bias for lin in linears]) if all(has_bias) else None
        if weight.is_cuda:
            # the first call may run on a side stream (graph warm-up): keep the old blocks from
            # being reused by the allocator until that stream's copy has read them
            stream = torch.cuda.current_stream(weight.device)
            for lin in linears:
                for old in (lin.weight, lin.bias):
                    if old is not None:
                        old.data.record_stream(stream)
        first = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[first : first + rows]
            if bias is not None:
                lin.bias.data = bias[first : first + rows]
            first += rows
    module.__dict__.setdefault("_d2sd_fused", {})[names] = (weight, bias)
    return weight, bias


def _inside(view: torch.Tensor, stack: torch.Tensor) -> bool:
    return view.device == stack.device and view.untyped_storage().data_ptr() == (
        stack.untyped_storage().data_ptr()
    )
