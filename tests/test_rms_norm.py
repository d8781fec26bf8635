"""rms_norm vs rms_norm_ref, and rms_norm_ref vs HF's LlamaRMSNorm / Qwen3RMSNorm modules.

Tolerances come from the rounding order both sides share (see kernels/rms_norm.py):
* fp32: the kernel and torch differ in the order of the fp32 sum in the mean (a few ulp of the
  variance at most, half of it in rsqrt), the rsqrt's last bit (<= 1 ulp each side) and the two
  products (0.5 ulp each side): <= FP32_ULPS in all.
* fp16/bf16: the normalized row is rounded to the dtype from fp32 values that differ by those few
  fp32 ulp, so it differs from torch's only where the fp32 values straddle a rounding boundary
  (probability ~ a few 2^-24 / 2^-11 per element: well under 1% in fp16, far less in bf16), and
  then by 1 ulp. The weight product rounds once more: with a power-of-two weight it is exact, so
  out stays within 1 ulp; with a general weight, two products one input-ulp apart can round up to
  2 output-ulp apart. So: >= 99% of elements exactly equal, <= 1 ulp (power-of-two weights) or
  <= 2 ulp (general weights) everywhere. The residual sum s is one correctly rounded add on both
  sides: exactly equal.

Edge cases: rows 0 (nothing launched), 1 (a decode step), 5, 80 (a verify step of 5 x 16 tokens);
H 64 (per-head q/k norm, many rows per program), 576 (SmolLM2), 1000 (not a power of two, masked
tail), 4096 (Qwen3-8B); residual on/off; leading dims 3-D and a row-strided slice; H > 8192.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from kernels.rms_norm import rms_norm, rms_norm_ref

EPS = 1e-6
FP32_ULPS = 8
_BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their dtype (int64, elementwise; +0 and -0 are 0
    apart): the distance between the two values' positions on the ordered float line."""
    assert a.dtype == b.dtype and a.shape == b.shape

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(_BITS_DTYPE[t.dtype]).long()
        magnitude = bits & (2 ** (8 * t.element_size() - 1) - 1)
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def assert_matches_rounding(got: torch.Tensor, want: torch.Tensor, max_ulps: int) -> None:
    """fp32: within FP32_ULPS everywhere. fp16/bf16: >= 99% exactly equal, <= max_ulps everywhere
    (why these bounds: the module docstrings of this file and of tests/test_silu_mul.py)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all()
    if got.numel() == 0:
        return
    ulps = ulp_distance(got, want)
    if got.dtype == torch.float32:
        assert ulps.max() <= FP32_ULPS, f"{ulps.max()} fp32 ulp apart"
        return
    exact = (ulps == 0).double().mean().item()
    assert exact >= 0.99, f"only {exact:.4f} of the elements are exactly equal"
    assert ulps.max() <= max_ulps, f"{ulps.max()} ulp apart (at most {max_ulps} expected)"


def make_inputs(
    rows: int, hidden: int, dtype: torch.dtype, device: str = "cpu", *, pow2_weight: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, hidden, device=device).to(dtype)
    residual = torch.randn(rows, hidden, device=device).to(dtype)
    if pow2_weight:  # +-1, 2, 4: the weight product is exact (never subnormal, never overflows)
        signs = torch.randint(0, 2, (hidden,), device=device) * 2 - 1
        weight = (signs * 2.0 ** torch.randint(0, 3, (hidden,), device=device)).to(dtype)
    else:
        weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    return x, weight, residual


def check_against_ref(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, max_ulps: int
) -> None:
    if residual is None:
        assert_matches_rounding(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), max_ulps)
        return
    out, s = rms_norm(x, weight, EPS, residual)
    out_ref, s_ref = rms_norm_ref(x, weight, EPS, residual)
    assert torch.equal(s, s_ref)
    assert_matches_rounding(out, out_ref, max_ulps)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter): fp32 and fp16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 576, 1000, 4096])
@pytest.mark.parametrize("rows", [0, 1, 5, 80])
def test_rms_norm_matches_reference(rows, hidden, with_residual, dtype) -> None:
    x, weight, residual = make_inputs(rows, hidden, dtype)
    check_against_ref(x, weight, residual if with_residual else None, max_ulps=2)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 1000, 4096])
def test_power_of_two_weight_within_one_ulp(hidden, with_residual) -> None:
    # the weight product is exact, so only the normalized row's 1-ulp rounding difference is left
    x, weight, residual = make_inputs(80, hidden, torch.float16, pow2_weight=True)
    check_against_ref(x, weight, residual if with_residual else None, max_ulps=1)


def test_leading_dims_and_row_strided_slices() -> None:
    # [B, T, H] input, and x / residual that are column slices of wider buffers (row stride > H)
    x, weight, residual = make_inputs(2 * 7, 576, torch.float16)
    check_against_ref(x.view(2, 7, 576), weight, residual.view(2, 7, 576), max_ulps=2)
    wide_x = torch.randn(5, 3 * 576).half()
    wide_r = torch.randn(5, 2 * 576).half()
    check_against_ref(wide_x[:, 576 : 2 * 576], weight, wide_r[:, :576], max_ulps=2)
    out, s = rms_norm(wide_x[:, :576], weight, EPS, wide_r[:, 576:])
    assert out.is_contiguous() and s.is_contiguous() and out.shape == s.shape == (5, 576)


def test_one_dim_input_and_empty_leading_dims() -> None:
    x, weight, _ = make_inputs(1, 1000, torch.float32)
    check_against_ref(x[0], weight, None, max_ulps=2)  # [H]: one row
    out, s = rms_norm(torch.empty(3, 0, 64), torch.ones(64), EPS, torch.empty(3, 0, 64))
    assert out.shape == s.shape == (3, 0, 64)


def test_rejects_bad_layouts_and_sizes() -> None:
    weight = torch.ones(64)
    transposed = torch.randn(4, 3, 64).transpose(0, 1)  # [3, 4, 64], leading dims not flattenable
    with pytest.raises(AssertionError, match="flatten"):
        rms_norm(transposed, weight, EPS)
    with pytest.raises(AssertionError, match="last dim"):
        rms_norm(torch.randn(64, 4).t(), weight, EPS)
    with pytest.raises(AssertionError, match="dtype"):
        rms_norm(torch.randn(2, 64).half(), weight, EPS)
    with pytest.raises(ValueError, match="8192"):
        rms_norm(torch.randn(1, 8193), torch.ones(8193), EPS)


def test_rms_norm_opcheck() -> None:
    # schema, fake impls (torch.compile) and the real kernels agree
    x, weight, residual = make_inputs(5, 64, torch.float32)
    torch.library.opcheck(torch.ops.d2sd.rms_norm.default, (x, weight, EPS))
    torch.library.opcheck(torch.ops.d2sd.add_rms_norm.default, (x, residual, weight, EPS))


@pytest.mark.parametrize("module_cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_hf_module(module_cls, dtype) -> None:
    # rms_norm_ref is also the model's CPU path: it must be HF's forward, bit for bit
    x, weight, residual = make_inputs(7, 576, dtype)
    module = module_cls(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        assert torch.equal(rms_norm_ref(x, module.weight, 1e-5), module(x))
        out, s = rms_norm_ref(x, module.weight, 1e-5, residual)
        assert torch.equal(s, x + residual)
        assert torch.equal(out, module(x + residual))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at the model shapes, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 128, 576, 1000, 4096, 8192])
@pytest.mark.parametrize("rows", [1, 16, 80, 4096])
def test_gpu_matches_reference(rows, hidden, with_residual, dtype) -> None:
    x, weight, residual = make_inputs(rows, hidden, dtype, "cuda")
    check_against_ref(x, weight, residual if with_residual else None, max_ulps=2)
    x, weight, residual = make_inputs(rows, hidden, dtype, "cuda", pow2_weight=True)
    check_against_ref(x, weight, residual if with_residual else None, max_ulps=1)


@pytest.mark.gpu
def test_gpu_matches_hf_module_bf16() -> None:
    x, weight, residual = make_inputs(80, 576, torch.bfloat16, "cuda")
    module = LlamaRMSNorm(576, eps=1e-5).to("cuda", torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(weight)
        out, s = rms_norm(x, module.weight, 1e-5, residual)
        assert torch.equal(s, x + residual)
        assert_matches_rounding(out, module(x + residual), max_ulps=2)


@pytest.mark.gpu
def test_gpu_cuda_graph() -> None:
    x, weight, residual = make_inputs(16, 576, torch.bfloat16, "cuda")
    rms_norm(x, weight, EPS, residual)  # compile outside the capture
    rms_norm(x, weight, EPS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, s = rms_norm(x, weight, EPS, residual)
        out_plain = rms_norm(x, weight, EPS)
    for _ in range(3):
        x.normal_()
        residual.normal_()
        graph.replay()
        out_ref, s_ref = rms_norm_ref(x, weight, EPS, residual)
        assert torch.equal(s, s_ref)
        assert_matches_rounding(out, out_ref, max_ulps=2)
        assert_matches_rounding(out_plain, rms_norm_ref(x, weight, EPS), max_ulps=2)


@pytest.mark.gpu
def test_gpu_torch_compile() -> None:
    x, weight, residual = make_inputs(16, 576, torch.bfloat16, "cuda")

    @torch.compile(fullgraph=True)
    def pre_norm(x, residual):
        normed, h = rms_norm(x, weight, EPS, residual)
        return rms_norm(normed, weight, EPS), h

    got, h = pre_norm(x, residual)
    assert torch.equal(h, rms_norm_ref(x, weight, EPS, residual)[1])
    # the compiled graph calls the same kernels: bit-equal to the eager calls
    assert torch.equal(got, rms_norm(rms_norm(x, weight, EPS, residual)[0], weight, EPS))
