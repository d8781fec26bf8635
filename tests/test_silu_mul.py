"""silu_mul vs silu_mul_ref, and silu_mul_ref vs HF LlamaMLP's `act_fn(gate_proj(x)) * up_proj(x)`.

Tolerances come from the rounding order both sides share (see kernels/silu_mul.py):
* fp32: exp's last bits (Triton's exp vs torch's, a few ulp for |gate| ~ 10), then 1 + e, the
  division and the product (0.5 ulp each side): <= FP32_ULPS (tests/test_rms_norm.py) in all.
* fp16/bf16: act = silu(gate) is rounded to the dtype from fp32 values a few fp32 ulp apart, so it
  differs from torch's only where they straddle a rounding boundary (well under 1% of elements),
  and then by 1 ulp. The mul by up rounds once more: with a power-of-two up it is exact, so out
  stays within 1 ulp; with a general up, two products one input-ulp apart can round up to 2
  output-ulp apart. So: >= 99% of elements exactly equal, <= 1 ulp (power-of-two up) or <= 2 ulp
  (general up) everywhere.

Edge cases: rows 0, 1 (decode), 5, 80 (verify, 5 x 16); I 64, 1000 (not a power of two: masked
tail), 1536 (SmolLM2), 12288 (Qwen3-8B: several column blocks per row); gates up to +-10, and
+-30 / +-100 / +-inf (exp(-gate) overflows to inf or underflows to 0); leading dims 3-D and a
row-strided slice.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from kernels.silu_mul import silu_mul, silu_mul_ref
from tests.test_rms_norm import assert_matches_rounding


def make_gate_up(
    rows: int, inter: int, dtype: torch.dtype, device: str = "cpu", *, pow2_up: bool = False
) -> torch.Tensor:
    # reaches silu's flat tails; |gate| <= 10 keeps silu(gate) a normal fp16 number (the ulp
    # bounds assume normal numbers: a subnormal's ulp is absolute); extremes: test_extreme_gates
    gate = (4 * torch.randn(rows, inter, device=device)).clamp(-10, 10)
    if pow2_up:  # +-1, 2, 4: the product is exact (never subnormal, never overflows)
        signs = torch.randint(0, 2, (rows, inter), device=device) * 2 - 1
        up = signs * 2.0 ** torch.randint(0, 3, (rows, inter), device=device)
    else:
        up = torch.randn(rows, inter, device=device)
    return torch.cat([gate, up], dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter): fp32 and fp16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [64, 1000, 1536, 12288])
@pytest.mark.parametrize("rows", [0, 1, 5, 80])
def test_silu_mul_matches_reference(rows, inter, dtype) -> None:
    gate_up = make_gate_up(rows, inter, dtype)
    out = silu_mul(gate_up)
    assert out.shape == (rows, inter) and out.is_contiguous()
    assert_matches_rounding(out, silu_mul_ref(gate_up), max_ulps=2)


@pytest.mark.parametrize("inter", [1000, 1536])
def test_power_of_two_up_within_one_ulp(inter) -> None:
    # the mul is exact, so only silu's 1-ulp rounding difference is left
    gate_up = make_gate_up(80, inter, torch.float16, pow2_up=True)
    assert_matches_rounding(silu_mul(gate_up), silu_mul_ref(gate_up), max_ulps=1)


@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # the interpreter's numpy exp overflows, as meant
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_gates(dtype) -> None:
    # exp(-gate) = inf gives act = -0 (as torch's x / (1 + exp(-x))); exp(-gate) = 0 gives gate
    gate = torch.tensor([-float("inf"), -100.0, -30.0, 30.0, 100.0, float("inf"), 0.0])
    up = torch.tensor([1.5, -2.0, 3.0, 0.5, -1.0, 2.0, 7.0])
    gate_up = torch.cat([gate, up]).to(dtype)
    got, want = silu_mul(gate_up), silu_mul_ref(gate_up)
    assert torch.equal(got[1:-1], want[1:-1]) and torch.equal(got.signbit(), want.signbit())
    # -inf / inf = nan and inf * 2 = inf in both (torch's formula, kept on purpose)
    assert got[0].isnan() and want[0].isnan() and got[5] == want[5] == float("inf")
    assert got[-1] == 0


def test_leading_dims_and_row_strided_slices() -> None:
    gate_up = make_gate_up(2 * 7, 96, torch.float16)
    out = silu_mul(gate_up.view(2, 7, 192))
    assert out.shape == (2, 7, 96)
    assert_matches_rounding(out, silu_mul_ref(gate_up.view(2, 7, 192)), max_ulps=2)
    wide = torch.cat([make_gate_up(5, 96, torch.float16), torch.randn(5, 40).half()], dim=-1)
    sliced = wide[:, :192]  # row stride 232
    assert_matches_rounding(silu_mul(sliced), silu_mul_ref(sliced), max_ulps=2)


def test_rejects_bad_layouts() -> None:
    with pytest.raises(AssertionError, match="even"):
        silu_mul(torch.randn(3, 7))
    with pytest.raises(AssertionError, match="last dim"):
        silu_mul(torch.randn(8, 4).t())
    with pytest.raises(AssertionError, match="flatten"):
        silu_mul(torch.randn(4, 3, 8).transpose(0, 1))


def test_silu_mul_opcheck() -> None:
    torch.library.opcheck(torch.ops.d2sd.silu_mul.default, (make_gate_up(5, 64, torch.float32),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_hf_mlp(dtype) -> None:
    # silu_mul_ref on [gate_proj(x); up_proj(x)] is HF's act_fn(gate_proj(x)) * up_proj(x)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="silu")
    mlp = LlamaMLP(config).to(dtype)
    x = torch.randn(2, 7, 64).to(dtype)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        fused = silu_mul_ref(torch.cat([gate, up], dim=-1))
        assert torch.equal(fused, mlp.act_fn(gate) * up)
        assert torch.equal(mlp.down_proj(fused), mlp(x))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at the model shapes, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [1000, 1536, 12288])
@pytest.mark.parametrize("rows", [1, 16, 80, 4096])
def test_gpu_matches_reference(rows, inter, dtype) -> None:
    gate_up = make_gate_up(rows, inter, dtype, "cuda")
    assert_matches_rounding(silu_mul(gate_up), silu_mul_ref(gate_up), max_ulps=2)
    gate_up = make_gate_up(rows, inter, dtype, "cuda", pow2_up=True)
    assert_matches_rounding(silu_mul(gate_up), silu_mul_ref(gate_up), max_ulps=1)


@pytest.mark.gpu
def test_gpu_cuda_graph() -> None:
    gate_up = make_gate_up(16, 1536, torch.bfloat16, "cuda")
    silu_mul(gate_up)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_mul(gate_up)
    for _ in range(3):
        gate_up.copy_(make_gate_up(16, 1536, torch.bfloat16, "cuda"))
        graph.replay()
        assert_matches_rounding(out, silu_mul_ref(gate_up), max_ulps=2)


@pytest.mark.gpu
def test_gpu_torch_compile() -> None:
    gate_up = make_gate_up(16, 1536, torch.bfloat16, "cuda")
    compiled = torch.compile(lambda t: silu_mul(t * 2), fullgraph=True)
    # the compiled graph calls the same kernel: bit-equal to the eager call
    assert torch.equal(compiled(gate_up), silu_mul(gate_up * 2))
