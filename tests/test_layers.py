"""The decoder block: fused kernels vs HF's modules, stacked projections, launches per block.

`decoder_layer` runs inference on the fused kernels (d2sd.models.layers.fused_decoder_layer) and
training / GPT-OSS on HF's modules; both must compute the same block. On the CPU the fused path
calls the kernels' torch references, and inside `ops.cpu_kernels()` (interpreter) the kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d2sd import ops
from d2sd.models import ModelSpec
from d2sd.models.cache import Cache
from d2sd.models.layers import (
    Rope,
    decoder_layer,
    fused_decoder_layer,
    fused_linear,
    module_decoder_layer,
    project_kv,
    write_kv,
)
from tests.conftest import interpreting
from tests.tiny_models import tiny_hf_model

DENSE = ["llama", "qwen2", "qwen3"]


def _block(family: str, seed: int = 0):
    hf = tiny_hf_model(family, seed=seed)
    spec = ModelSpec.from_hf_config(hf.config)
    rope = Rope.from_hf_rotary(hf.model.rotary_emb)
    return hf, spec, rope


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, T, Hq, D] over k, v [B, T, Hkv, D] (plain SDPA, GQA)."""
    group = q.shape[-2] // k.shape[-2]
    k, v = (t.repeat_interleave(group, dim=-2) for t in (k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def _inputs(hf, spec, rope, batch: int = 2, tokens: int = 5):
    x = torch.randn(batch, tokens, spec.hidden_size)
    positions = torch.arange(tokens).expand(batch, -1) + 7
    return x, *rope(positions)


@pytest.mark.parametrize("family", DENSE)
def test_fused_block_equals_hf_modules(family: str) -> None:
    hf, spec, rope = _block(family)
    x, cos, sin = _inputs(hf, spec, rope)
    for layer in hf.model.layers:
        reference = module_decoder_layer(layer, x, cos, sin, _attend, spec.block)
        with torch.no_grad():
            fused = fused_decoder_layer(layer, x, cos, sin, _attend, spec.block)
        # fp32, same math: only the stacked GEMMs may reduce in another order
        torch.testing.assert_close(fused, reference.detach(), rtol=1e-5, atol=1e-5)
        x = reference.detach()


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (the kernels on the CPU)")
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_fused_block_on_the_kernels_equals_hf_modules(family: str) -> None:
    hf, spec, rope = _block(family, seed=1)
    x, cos, sin = _inputs(hf, spec, rope, batch=1, tokens=3)
    layer = hf.model.layers[0]
    reference = module_decoder_layer(layer, x, cos, sin, _attend, spec.block).detach()
    with torch.no_grad(), ops.cpu_kernels():
        fused = fused_decoder_layer(layer, x, cos, sin, _attend, spec.block)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [False, True], ids=["refs", "kernels"])
@pytest.mark.parametrize("family", DENSE)
def test_write_kv_equals_project_kv(family: str, kernels: bool) -> None:
    # a drafter's context K/V: one k|v GEMM over the fused stack + rope_qk_store without q heads
    if kernels and not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (the kernels on the CPU)")
    hf, spec, rope = _block(family, seed=4)
    x, cos, sin = _inputs(hf, spec, rope, batch=1, tokens=6)
    x, cos, sin = x[0], cos[0], sin[0]  # context rows [T, H], tables [T, D / 2]
    attn = hf.model.layers[0].self_attn
    k_ref, v_ref = (t.detach() for t in project_kv(attn, x, cos, sin, spec.block))
    k_out = torch.full_like(k_ref, float("nan"))
    v_out = torch.full_like(v_ref, float("nan"))
    with torch.no_grad(), ops.cpu_kernels(kernels):
        write_kv(attn, x, cos, sin, spec.block, k_out, v_out)
    # fp32: the stacked GEMM may reduce in another order; the norm's statistics likewise
    torch.testing.assert_close(k_out, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_out, v_ref, rtol=1e-5, atol=1e-5)


def test_decoder_layer_picks_the_path() -> None:
    """Inference on a dense family: fused; with autograd on, or GPT-OSS: HF's modules."""
    hf, spec, rope = _block("qwen3")
    x, cos, sin = _inputs(hf, spec, rope)
    layer = hf.model.layers[0]
    with torch.no_grad():
        decoder_layer(layer, x, cos, sin, _attend, spec.block)
    assert "_d2sd_fused" in layer.self_attn.__dict__  # the fused path stacked q|k|v
    out = decoder_layer(layer, x.requires_grad_(), cos, sin, _attend, spec.block)
    out.sum().backward()  # the module path: gradients reach HF's parameters
    assert layer.self_attn.q_proj.weight.grad is not None
    oss, oss_spec, oss_rope = _block("gpt_oss")
    assert not oss_spec.block.fused_block
    x, cos, sin = _inputs(oss, oss_spec, oss_rope)
    with torch.no_grad():
        decoder_layer(oss.model.layers[0], x, cos, sin, _attend, oss_spec.block)
    assert "_d2sd_fused" not in oss.model.layers[0].self_attn.__dict__


def test_stacked_projections_share_memory_and_follow_moves() -> None:
    hf, spec, _ = _block("qwen2")  # q/k/v biases
    attn = hf.model.layers[0].self_attn
    names = ("q_proj", "k_proj", "v_proj")
    params = [getattr(attn, n).weight for n in names]
    expected = torch.cat([p.detach().clone() for p in params])
    bias_expected = torch.cat([getattr(attn, n).bias.detach().clone() for n in names])
    weight, bias = fused_linear(attn, names)
    assert torch.equal(weight, expected) and torch.equal(bias, bias_expected)
    # the module's own Parameter objects now view the stack (an optimizer holding them still
    # trains the module), and no second copy of the weights exists
    assert [getattr(attn, n).weight for n in names] == params
    assert all(
        p.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for p in params
    )
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # an in-place update shows in the stack
    assert torch.equal(weight[spec.num_heads * spec.head_dim :][:1], attn.k_proj.weight[:1])
    assert fused_linear(attn, names)[0] is weight  # cached
    hf.to(torch.float64)  # new tensors: the stack is rebuilt from them
    rebuilt, _ = fused_linear(attn, names)
    assert rebuilt is not weight and rebuilt.dtype == torch.float64


# allocations and metadata: no kernel on a GPU
_NO_LAUNCH = (
    "aten::empty",
    "aten::empty_like",
    "aten::new_empty",
    "aten::empty_strided",
    "aten::_unsafe_view",
)


class _CountLaunches(TorchDispatchMode):
    """Counts what would be GPU launches: each Triton kernel once (the interpreter's own torch
    calls inside it are not counted) and each other dispatched op that is not a view or an
    allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self._inside_kernel = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._run = InterpretedFunction.run
        counter = self

        def run(fn, *args, **kwargs):
            counter.launches.append(f"triton:{fn.fn.__name__}")
            counter._inside_kernel += 1
            try:
                return counter._run(fn, *args, **kwargs)
            finally:
                counter._inside_kernel -= 1

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not (self._inside_kernel or func.is_view or name in _NO_LAUNCH):
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


class _FixedOutput:
    """An attention backend stub: `cascade` returns a given output (no launch) and keeps the k/v
    rows it was handed (views: read them before the next step writes them)."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def cascade(self, q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **options):
        self.seen = (k_local, v_local)
        return self.out


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (the kernels on the CPU)")
def test_fused_block_launches() -> None:
    """A graphed decode step is launch-bound (H200: 3.0 ms for SmolLM2's 30 blocks), so the
    fused block's launch count is a contract: 7 besides attention through a cache (norm,
    q|k|v GEMM, q/k-norm + RoPE writing K/V into the cache's local rows, o_proj, add + norm,
    gate|up GEMM, SiLU * up, down + residual in one GEMM). HF's modules take 49 here (Qwen3, fp32;
    bf16 adds the norms' casts), and Cache.attend adds two copies to them."""
    hf, spec, rope = _block("qwen3", seed=2)
    x, cos, sin = _inputs(hf, spec, rope, batch=1, tokens=1)
    layer = hf.model.layers[0]
    attended = _attend(*(torch.randn(1, 1, h, spec.head_dim) for h in (6, 2, 2)))
    kv_shape = (1, 1, spec.num_kv_heads, spec.head_dim)
    cache = Cache.allocate(1, 8, 4, spec.num_kv_heads, spec.head_dim, dtype=x.dtype, device="cpu")
    backend = _FixedOutput(attended)

    def attend(q, k, v):
        return cache.attend(backend, 0, q, k, v)

    with torch.no_grad(), ops.cpu_kernels():
        fused_linear(layer.self_attn, ("q_proj", "k_proj", "v_proj"))
        fused_linear(layer.mlp, ("gate_proj", "up_proj"))
        with _CountLaunches() as fused:
            out = fused_decoder_layer(
                layer, x, cos, sin, attend, spec.block, cache.local_kv(0, kv_shape)
            )
        fused_k_v = tuple(t.clone() for t in backend.seen)
        # without kv_out the block hands k, v to attend, which copies them: the same rows
        cache.k_local.zero_()
        cache.v_local.zero_()
        plain = fused_decoder_layer(layer, x, cos, sin, attend, spec.block)
    assert torch.equal(out, plain)
    for written, copied in zip(fused_k_v, backend.seen):
        assert torch.equal(written, copied) and written.abs().sum() > 0
    unfused = copy.deepcopy(layer)
    with torch.no_grad(), _CountLaunches() as modules:
        module_decoder_layer(unfused, x, cos, sin, lambda q, k, v: attended, spec.block)
    assert fused.launches == [
        "triton:_rms_norm_kernel",
        "aten::mm",
        "triton:_rope_qk_kernel",
        "aten::mm",
        "triton:_rms_norm_kernel",
        "aten::mm",
        "triton:_silu_mul_kernel",
        "aten::addmm_",
    ], fused.launches
    assert len(modules.launches) == 49, modules.launches


@pytest.mark.gpu
@pytest.mark.parametrize("family", DENSE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_block_on_cuda(family: str, dtype: torch.dtype) -> None:
    """The fused block on the GPU kernels vs HF's modules in the same dtype, both against fp32:
    the fused error at most 2x the modules' own (plus a few ulp of the output's scale)."""
    hf, spec, rope = _block(family, seed=3)
    hf = hf.cuda()
    x, cos, sin = _inputs(hf, spec, rope, batch=5, tokens=16)
    x, cos, sin = x.cuda(), cos.cuda(), sin.cuda()
    low = copy.deepcopy(hf).to(dtype)
    for layer32, layer in zip(hf.model.layers, low.model.layers):
        with torch.no_grad():
            reference = module_decoder_layer(layer32, x, cos, sin, _attend, spec.block)
            modules = module_decoder_layer(layer, x.to(dtype), cos, sin, _attend, spec.block)
            fused = fused_decoder_layer(layer, x.to(dtype), cos, sin, _attend, spec.block)
        module_error = (modules.float() - reference).abs().max().item()
        fused_error = (fused.float() - reference).abs().max().item()
        slack = 4 * torch.finfo(dtype).eps * reference.abs().max().item()
        assert fused_error <= 2 * module_error + slack, (fused_error, module_error)
        x = reference
