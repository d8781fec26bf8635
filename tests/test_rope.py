"""rope_qk vs rope_qk_ref (CPU interpreter: fp32, fp16; GPU: bf16, fp16, fp32, CUDA graph), and
rope_qk_ref vs the model's own path (layers.apply_rope after HF's Qwen3RMSNorm) on CPU;
rope_qk_store (the same math, k and v written into given buffers) vs rope_qk.

Why the tolerances: the kernel rounds to the dtype exactly where torch does (normed value, weight
product, cos/sin, each product, the difference and the sum; products of two bf16/fp16 values are
exact in float32, and FMA contraction is off), so without the norm the outputs are equal bit for
bit in every dtype. With the norm, only the float32 statistics differ (summation order of the mean
of squares; 1/sqrt vs torch's rsqrt): a few float32 ulp of the normed value, which change its
rounding to bf16/fp16 only rarely (>= 99% of elements exact) and then by one ulp of the normed
value; through the rotation that is at most ~1 ulp of the rotation's terms |first*cos| +
|second*sin| (the output itself may be smaller, by cancellation). So errors are measured in ulps
of that magnitude: <= 2 in bf16/fp16 (one flipped rounding + the output's), <= 8 in float32
(seen on CPU: 0.95 in fp16, 3 in fp32; ~20% of fp32 elements differ, < 0.01% of fp16 ones).
"""

from __future__ import annotations

import pytest
import torch

from d2sd.models.layers import Rope, apply_rope
from kernels.rope import rope_qk, rope_qk_ref, rope_qk_store, rope_qk_store_ref

# heads (Hq, Hkv, D) of the two target families
SMOLLM2 = (9, 3, 64)
QWEN3_8B = (32, 8, 128)
THETA = {64: 100_000.0, 128: 1_000_000.0}  # rope_theta of SmolLM2 / Qwen3
BASE_POSITION = 30_000  # large positions: fp32 cos/sin of big angles, cast to the dtype


def make_rope(head_dim: int) -> Rope:
    theta = THETA.get(head_dim, 10_000.0)
    return Rope(1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def make_case(
    heads: tuple[int, int, int],
    batch: int,
    tokens: int,
    *,
    dtype: torch.dtype,
    fused: bool = True,
    per_batch_positions: bool = False,
    norm: bool = False,
    device: str = "cpu",
) -> dict:
    """q, k [B, T, H, D] (column views of one fused [B, T, (Hq + 2 Hkv) D] projection when
    `fused`), cos/sin [B, T, D / 2] (`per_batch_positions`) or [1, T, D / 2], norm weights."""
    num_q_heads, num_kv_heads, head_dim = heads
    q_cols, kv_cols = num_q_heads * head_dim, num_kv_heads * head_dim
    if fused:
        proj = torch.randn(batch, tokens, q_cols + 2 * kv_cols, device=device).to(dtype)
        q = proj[..., :q_cols].unflatten(-1, (num_q_heads, head_dim))
        k = proj[..., q_cols : q_cols + kv_cols].unflatten(-1, (num_kv_heads, head_dim))
    else:
        q = torch.randn(batch, tokens, num_q_heads, head_dim, device=device).to(dtype)
        k = torch.randn(batch, tokens, num_kv_heads, head_dim, device=device).to(dtype)
    if per_batch_positions:
        starts = BASE_POSITION + 37 * torch.arange(batch, device=device)
        positions = starts[:, None] + torch.arange(tokens, device=device)
    else:
        positions = BASE_POSITION + torch.arange(tokens, device=device)[None]
    cos, sin = make_rope(head_dim).to(device)(positions)
    case = dict(q=q, k=k, cos=cos, sin=sin)
    if norm:
        case["q_norm_weight"] = (1 + 0.5 * torch.randn(head_dim, device=device)).to(dtype)
        case["k_norm_weight"] = (1 + 0.5 * torch.randn(head_dim, device=device)).to(dtype)
    return case


def term_magnitude(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight) -> torch.Tensor:
    """|first*cos| + |second*sin| (and |second*cos| + |first*sin|) per output element, in float64
    from the exactly normed x: the scale of the rotation's terms, the unit of its rounding error."""
    x = x.double()
    if weight is not None:
        x = weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    first, second = x.abs().chunk(2, dim=-1)
    cos, sin = cos.double().abs()[..., None, :], sin.double().abs()[..., None, :]
    return torch.cat((first * cos + second * sin, second * cos + first * sin), dim=-1)


def assert_matches_reference(case: dict, got: tuple, *, min_exact: float, max_ulps: float) -> None:
    ref = rope_qk_ref(**case)
    for name, x, out, expected in (
        ("q", case["q"], got[0], ref[0]),
        ("k", case["k"], got[1], ref[1]),
    ):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), name
        weight = case.get(f"{name}_norm_weight")
        magnitude = term_magnitude(x, case["cos"], case["sin"], weight)
        ulps = (out.double() - expected.double()).abs() / (torch.finfo(x.dtype).eps * magnitude)
        exact = (out == expected).double().mean().item()
        assert exact >= min_exact, f"{name}: only {exact:.4%} of elements equal the reference"
        assert ulps.max().item() <= max_ulps, f"{name}: {ulps.max().item():.2f} ulps"


def tolerances(dtype: torch.dtype, norm: bool) -> dict:
    if not norm:  # the same roundings, no reduction: bit for bit in every dtype
        return dict(min_exact=1.0, max_ulps=0.0)
    if dtype == torch.float32:  # statistics off by a few ulp (CUDA rsqrt: 2), + 3 roundings
        return dict(min_exact=0.0, max_ulps=8.0)
    return dict(min_exact=0.99, max_ulps=2.0)  # a flipped rounding of the normed value, + output


# (heads, batch, tokens, fused, per_batch_positions, norm) and what each exercises
CASES = [
    (SMOLLM2, 5, 1, True, False, False),  # AR step of 5 sequences, cos broadcast over the batch
    (SMOLLM2, 5, 16, True, True, True),  # verify block, per-sequence positions, q/k norm
    (SMOLLM2, 1, 80, False, False, True),  # 80 rows, contiguous q/k (row stride = H * D)
    (QWEN3_8B, 5, 1, True, False, True),  # Qwen3 heads with their norm
    (QWEN3_8B, 1, 16, True, True, False),  # D = 128 without norm
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, batch, tokens, fused, per_batch, norm", CASES)
def test_matches_reference(heads, batch, tokens, fused, per_batch, norm, dtype) -> None:
    case = make_case(
        heads, batch, tokens, dtype=dtype, fused=fused, per_batch_positions=per_batch, norm=norm
    )
    if fused:
        row_stride = case["q"].view(-1, *heads[::2]).stride(0)
        assert row_stride == (heads[0] + 2 * heads[1]) * heads[2], "q: a view into the fused row"
    assert_matches_reference(case, rope_qk(**case), **tolerances(dtype, norm))


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_other_head_dims(head_dim) -> None:
    # cos/sin without a batch dim ([T, D / 2]) for q [B, T, H, D], and 3 leading dims
    case = make_case((2, 1, head_dim), 2, 3, dtype=torch.float16, norm=True)
    case["q"], case["k"] = case["q"][None], case["k"][None]
    case["cos"], case["sin"] = case["cos"][0], case["sin"][0]
    assert_matches_reference(case, rope_qk(**case), **tolerances(torch.float16, True))


def test_empty_rows() -> None:
    case = make_case(SMOLLM2, 1, 0, dtype=torch.float32)
    q_out, k_out = rope_qk(**case)
    assert q_out.shape == case["q"].shape and k_out.shape == case["k"].shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(q=c["q"][..., :48], k=c["k"][..., :48]), "head_dim"),
        (lambda c: c.update(q_norm_weight=torch.ones(64)), "both or neither"),
        (lambda c: c.update(cos=c["cos"].half()), "float32"),
        (lambda c: c.update(cos=c["cos"].expand(3, -1, -1)), "suffix"),
        (lambda c: c.update(k=c["k"].half()), "one float dtype"),
        (lambda c: c.update(q=c["q"].transpose(0, 1), k=c["k"].transpose(0, 1)), "flatten"),
        (lambda c: c.update(q=torch.randn(2, 4, 9, 128)[..., :64]), "contiguous"),
    ],
)
def test_rejects_bad_inputs(change, message) -> None:
    case = make_case(SMOLLM2, 2, 4, dtype=torch.float32)
    change(case)
    with pytest.raises(AssertionError, match=message):
        rope_qk(**case)


@pytest.mark.parametrize("norm", [False, True])
def test_opcheck(norm) -> None:
    # the custom op's schema, fake impl and dispatch (what torch.compile / graphs go through)
    case = make_case(SMOLLM2, 1, 2, dtype=torch.float32, norm=norm)
    args = (*case.values(), *(() if norm else (None, None)), 1e-6)
    torch.library.opcheck(torch.ops.d2sd.rope_qk.default, args)


# ---------------------------------------------------------------------------------------------
# rope_qk_store: the same kernel writing k and v into a cache's local rows
# ---------------------------------------------------------------------------------------------


def store_case(heads: tuple[int, int, int], batch: int, tokens: int, **kwargs) -> dict:
    """make_case plus v (the third column slice of the fused projection) and NaN-filled k_out and
    v_out: views of rows [0, B * T) of a larger local buffer, as Cache.local_kv gives them."""
    case = make_case(heads, batch, tokens, fused=False, **kwargs)
    num_q_heads, num_kv_heads, head_dim = heads
    q_cols, kv_cols = num_q_heads * head_dim, num_kv_heads * head_dim
    proj = torch.cat([case["q"].flatten(-2), case["k"].flatten(-2)], dim=-1)
    proj = torch.cat([proj, torch.randn_like(proj[..., :kv_cols])], dim=-1)
    case["q"] = proj[..., :q_cols].unflatten(-1, (num_q_heads, head_dim))
    case["k"] = proj[..., q_cols : q_cols + kv_cols].unflatten(-1, (num_kv_heads, head_dim))
    case["v"] = proj[..., q_cols + kv_cols :].unflatten(-1, (num_kv_heads, head_dim))
    for name in ("k_out", "v_out"):
        local = torch.full(
            (batch * tokens + 3, num_kv_heads, head_dim),
            float("nan"),
            dtype=proj.dtype,
            device=proj.device,
        )
        case[name] = local[: batch * tokens].view(case["k"].shape)
    return case


def check_store(case: dict, q_out: torch.Tensor, dtype: torch.dtype, norm: bool) -> None:
    plain = {key: case[key] for key in case if key not in ("v", "k_out", "v_out")}
    # the same kernel body as rope_qk: bit-equal to it, hence within rope_qk's tolerances
    expected_q, expected_k = rope_qk(**plain)
    assert torch.equal(q_out, expected_q)
    assert torch.equal(case["k_out"], expected_k)
    assert torch.equal(case["v_out"], case["v"])
    assert_matches_reference(plain, (q_out, case["k_out"]), **tolerances(dtype, norm))
    ref_k, ref_v = torch.empty_like(case["k_out"]), torch.empty_like(case["v_out"])
    ref_q = rope_qk_store_ref(**{**case, "k_out": ref_k, "v_out": ref_v})
    assert torch.equal(ref_v, case["v"])
    assert torch.equal(ref_k, rope_qk_ref(**plain)[1]) and torch.equal(
        ref_q, rope_qk_ref(**plain)[0]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads, batch, tokens, norm",
    [(SMOLLM2, 1, 1, False), (SMOLLM2, 5, 16, True), (QWEN3_8B, 2, 3, True)],
)
def test_store_matches_rope_qk(heads, batch, tokens, norm, dtype) -> None:
    case = store_case(heads, batch, tokens, dtype=dtype, norm=norm)
    q_out = rope_qk_store(**case)
    check_store(case, q_out, dtype, norm)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(v_out=torch.empty(4, 2, 3, 64).transpose(0, 1)), "contiguous"),
        (lambda c: c.update(k_out=c["k_out"][..., :1, :]), "k_out must be"),
        (lambda c: c.update(v=c["v"].half()), "v must be"),
    ],
)
def test_store_rejects_bad_inputs(change, message) -> None:
    case = store_case(SMOLLM2, 2, 4, dtype=torch.float32)
    change(case)
    with pytest.raises(AssertionError, match=message):
        rope_qk_store(**case)


def test_store_opcheck() -> None:
    case = store_case(SMOLLM2, 1, 2, dtype=torch.float32, norm=True)
    args = tuple(case[key] for key in ("q", "k", "v", "cos", "sin", "k_out", "v_out"))
    args += (case["q_norm_weight"], case["k_norm_weight"], 1e-6)
    torch.library.opcheck(torch.ops.d2sd.rope_qk_store.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, norm", [(SMOLLM2, False), (QWEN3_8B, True)])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (5, 16)])
def test_gpu_store_matches_rope_qk(heads, norm, batch, tokens, dtype) -> None:
    case = store_case(heads, batch, tokens, dtype=dtype, norm=norm, device="cuda")
    check_store(case, rope_qk_store(**case), dtype, norm)


# ---------------------------------------------------------------------------------------------
# the reference is the model's path: apply_rope after HF's Qwen3RMSNorm, bit for bit (torch only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_reference_is_the_model_path(dtype, norm) -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    case = make_case(QWEN3_8B, 2, 16, dtype=dtype, per_batch_positions=True, norm=norm)
    q, k, cos, sin = case["q"], case["k"], case["cos"], case["sin"]
    if norm:
        q_norm, k_norm = Qwen3RMSNorm(128, eps=1e-6), Qwen3RMSNorm(128, eps=1e-6)
        q_norm.weight.data = case["q_norm_weight"].clone()
        k_norm.weight.data = case["k_norm_weight"].clone()
        q, k = q_norm(q), k_norm(k)
    q_ref, k_ref = rope_qk_ref(**case)
    assert torch.equal(q_ref, apply_rope(q, cos, sin))
    assert torch.equal(k_ref, apply_rope(k, cos, sin))


# ---------------------------------------------------------------------------------------------
# GPU: real shapes in bf16 / fp16 / fp32, CUDA graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads, norm", [(SMOLLM2, False), (QWEN3_8B, True), (QWEN3_8B, False)])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (1, 16), (1, 80), (5, 16)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_gpu_matches_reference(heads, norm, batch, tokens, per_batch, dtype) -> None:
    case = make_case(
        heads, batch, tokens, dtype=dtype, per_batch_positions=per_batch, norm=norm, device="cuda"
    )
    assert_matches_reference(case, rope_qk(**case), **tolerances(dtype, norm))


@pytest.mark.gpu
def test_gpu_cuda_graph() -> None:
    case = make_case(QWEN3_8B, 1, 16, dtype=torch.bfloat16, norm=True, device="cuda")
    rope_qk(**case)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = rope_qk(**case)
    rope = make_rope(128).to("cuda")
    for step in range(3):
        case["q"].normal_()
        case["k"].normal_()
        cos, sin = rope(1000 * step + torch.arange(16, device="cuda")[None])
        case["cos"].copy_(cos)
        case["sin"].copy_(sin)
        graph.replay()
        assert_matches_reference(case, (q_out, k_out), **tolerances(torch.bfloat16, True))


@pytest.mark.gpu
def test_gpu_torch_compile() -> None:
    case = make_case(SMOLLM2, 1, 16, dtype=torch.bfloat16, norm=True, device="cuda")
    compiled = torch.compile(rope_qk, fullgraph=True)
    assert_matches_reference(case, compiled(**case), **tolerances(torch.bfloat16, True))
