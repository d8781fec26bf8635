"""prefix_attention against the fp32 torch reference (interpreter and GPU) and FlashInfer (GPU)."""

import pytest
import torch

from kernels._attention import num_kv_splits
from kernels.prefix_attention import prefix_attention, prefix_attention_ref
from tests._attention_cases import (
    DEVICE,
    LOW_DTYPES,
    assert_close_by_dtype,
    assert_lse_close,
    make_problem,
)

LOW = LOW_DTYPES[0]

# (B, T, Hq, Hkv, D, prefix_len, max_len, window_left, dtype): what each case exercises
CASES = [
    (2, 5, 4, 2, 64, 0, 40, -1, torch.float32),  # empty prefix: o = 0, lse = -inf, all splits idle
    (1, 1, 1, 1, 64, 1, 1, -1, torch.float32),  # one key, one query, group 1, full cache, 1 split
    (2, 5, 3, 1, 64, 37, 60, -1, torch.float32),  # odd length, group 3, several splits, tail tile
    (1, 16, 4, 1, 128, 100, 300, -1, LOW),  # group 4, D 128, 16-bit, splits with several tiles
    (16, 1, 8, 1, 64, 23, 30, -1, torch.float32),  # 16 branches of 1 token, group 8
    (1, 33, 2, 2, 64, 50, 64, 3, torch.float32),  # window 3 < T: rows t > 3 see no prefix key
    (3, 5, 4, 2, 64, 100, 120, 40, LOW),  # window edge inside the prefix: masked edge + full tiles
    (2, 16, 4, 2, 64, 9, 12, -1, LOW),  # max_len < 2 splits' worth: the single-split direct path
    (1, 5, 2, 1, 64, 0, 12, -1, torch.float32),  # single-split path with an empty prefix
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_prefix_attention_matches_reference(case):
    batch, seq, hq, hkv, head_dim, prefix_len, max_len, window, dtype = case
    p = make_problem(batch, seq, hq, hkv, head_dim, prefix_len, dtype, max_len=max_len)
    o, lse = prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window)
    o_ref, lse_ref = prefix_attention_ref(
        p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window
    )
    o_low = None
    if dtype != torch.float32:
        o_low, _ = prefix_attention_ref(
            p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window, compute_dtype=dtype
        )
    assert o.dtype == torch.float32 and o.shape == p.q.shape
    assert_close_by_dtype(o, o_ref, o_low, dtype)
    assert_lse_close(lse, lse_ref)
    empty = lse_ref == float("-inf")
    assert (o[empty] == 0).all(), "rows that see no key must be exactly 0"


def test_prefix_split_counts_cover_both_paths():
    # the cases above take both the multi-split path and the direct single-split path
    assert num_kv_splits(60, 1, 30, 64, torch.device("cpu")) > 1
    assert num_kv_splits(12, 2, 160, 64, torch.device("cpu")) == 1


def test_prefix_attention_strided_q_and_sm_scale():
    # q as a strided view (heads of a fused qkv projection) and a non-default sm_scale
    p = make_problem(2, 5, 4, 2, 64, 30, torch.float32, max_len=40)
    fused = torch.randn(2, 5, 4 + 2 * 2, 64, device=DEVICE)
    q = fused[:, :, :4]
    o, lse = prefix_attention(q, p.k_cache, p.v_cache, p.cache_len, sm_scale=0.3)
    o_ref, lse_ref = prefix_attention_ref(q, p.k_cache, p.v_cache, p.cache_len, sm_scale=0.3)
    assert_close_by_dtype(o, o_ref, None, torch.float32)
    assert_lse_close(lse, lse_ref)


def test_prefix_attention_reads_length_from_device():
    # same tensors, new cache_len value: the result follows the device length (no host copy)
    p = make_problem(1, 5, 2, 1, 64, 48, torch.float32, max_len=48)
    for length in (48, 17, 0, 40):
        p.cache_len.fill_(length)
        o, lse = prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len)
        o_ref, lse_ref = prefix_attention_ref(p.q, p.k_cache, p.v_cache, p.cache_len)
        assert_close_by_dtype(o, o_ref, None, torch.float32, f"o at len {length}")
        assert_lse_close(lse, lse_ref, f"lse at len {length}")


def test_prefix_attention_rejects_bad_inputs():
    p = make_problem(1, 5, 3, 2, 64, 4, torch.float32)
    with pytest.raises(AssertionError, match="multiple"):
        prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len)  # 3 q heads over 2 kv heads
    with pytest.raises(AssertionError, match="int32"):
        q = p.q[:, :, :2]
        prefix_attention(q, p.k_cache, p.v_cache, p.cache_len.long())


def test_prefix_attention_opcheck():
    p = make_problem(1, 3, 2, 1, 16, 5, torch.float32, max_len=8)
    torch.library.opcheck(
        torch.ops.d2sd.prefix_attention.default,
        (p.q, p.k_cache, p.v_cache, p.cache_len, 0.25, -1),
    )


# ----------------------------------------------------------------------------- GPU

# (name, Hq, Hkv, D): the model shapes we serve
GPU_HEADS = [("qwen3-8b", 32, 8, 128), ("smollm2", 9, 3, 64), ("group1", 4, 4, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", GPU_HEADS, ids=lambda h: h[0])
@pytest.mark.parametrize("prefix_len", [0, 1, 511, 2048, 8195])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefix_attention_gpu_matches_reference(heads, prefix_len, dtype):
    _, hq, hkv, head_dim = heads
    p = make_problem(
        5, 16, hq, hkv, head_dim, prefix_len, dtype, max_len=prefix_len + 300, device="cuda"
    )
    o, lse = prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len)
    o_ref, lse_ref = prefix_attention_ref(p.q, p.k_cache, p.v_cache, p.cache_len)
    o_low, _ = prefix_attention_ref(p.q, p.k_cache, p.v_cache, p.cache_len, compute_dtype=dtype)
    assert_close_by_dtype(o, o_ref, o_low, dtype)
    assert_lse_close(lse, lse_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 100, 4000])
def test_prefix_attention_gpu_window(window):
    p = make_problem(3, 16, 32, 8, 128, 5000, torch.bfloat16, max_len=6000, device="cuda")
    o, lse = prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window)
    o_ref, lse_ref = prefix_attention_ref(
        p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window
    )
    o_low, _ = prefix_attention_ref(
        p.q, p.k_cache, p.v_cache, p.cache_len, window_left=window, compute_dtype=torch.bfloat16
    )
    assert_close_by_dtype(o, o_ref, o_low, torch.bfloat16)
    assert_lse_close(lse, lse_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefix_attention_matches_flashinfer(head_dim):
    pytest.importorskip("flashinfer")
    from bench._flashinfer_ref import prefix_prefill

    hq, hkv = (32, 8) if head_dim == 128 else (9, 3)
    p = make_problem(5, 16, hq, hkv, head_dim, 3000, torch.bfloat16, max_len=3100, device="cuda")
    o, lse = prefix_attention(p.q, p.k_cache, p.v_cache, p.cache_len)
    o_fi, lse_fi = prefix_prefill(p.q, p.k_cache[:3000], p.v_cache[:3000])
    o_ref, lse_ref = prefix_attention_ref(p.q, p.k_cache, p.v_cache, p.cache_len)
    # our o is fp32; FlashInfer's is bf16: both must be within bf16 rounding of the fp32 reference
    assert_close_by_dtype(o, o_ref, o_fi, torch.bfloat16, "o (bound: FlashInfer's error)")
    assert_lse_close(lse, lse_fi, "lse vs FlashInfer")
    assert_lse_close(lse, lse_ref)
