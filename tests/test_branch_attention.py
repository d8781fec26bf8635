"""branch_attention against the fp32 torch reference (interpreter and GPU) and FlashInfer (GPU)."""

import pytest
import torch

from kernels.branch_attention import branch_attention, branch_attention_ref
from tests._attention_cases import (
    DEVICE,
    LOW_DTYPES,
    assert_close_by_dtype,
    assert_lse_close,
    make_problem,
    random_tree_mask,
)

LOW = LOW_DTYPES[0]
NEG_INF = float("-inf")


def _prefix_state(batch, seq, num_heads, head_dim, dtype=torch.float32, *, empty_rows=True):
    """A random incoming prefix state; a few rows empty (lse = -inf, o = NaN: must not be read)."""
    o = torch.randn(batch, seq, num_heads, head_dim, device=DEVICE).to(dtype)
    lse = torch.randn(batch, seq, num_heads, device=DEVICE) * 3 + 4
    if empty_rows:
        lse[0, 0] = NEG_INF
        o[0, 0] = float("nan")
    return o, lse


# (B, T, Hq, Hkv, D, local, window_left, with_prefix, dtype): what each case exercises
# local: "causal" | "bidir" | "tree" (shared [T, W] mask) | "tree_b" (per-branch [B, T, W] mask)
CASES = [
    (1, 1, 1, 1, 64, "causal", -1, True, torch.float32),  # one token, group 1
    (2, 5, 3, 1, 64, "causal", -1, True, torch.float32),  # odd T, group 3
    (2, 5, 3, 1, 64, "bidir", -1, False, torch.float32),  # drafter layout, no prefix state
    (3, 16, 4, 1, 128, "causal", -1, True, LOW),  # group 4, D 128, 16-bit, fp32 prefix state
    (2, 16, 8, 1, 64, "tree", -1, True, torch.float32),  # shared tree mask with a fully masked row
    (3, 33, 2, 2, 64, "tree_b", -1, True, LOW),  # per-branch masks, T > 32: two mask words
    (1, 33, 4, 2, 64, "causal", 4, True, torch.float32),  # sliding window inside the branch
    (2, 16, 4, 2, 64, "bidir", 2, False, LOW),  # window with bidirectional (left bound only)
    (16, 5, 2, 1, 64, "tree", -1, False, torch.float32),  # 16 branches, masked row, no prefix
]


def _mask(local, seq, batch):
    if local == "tree":
        return random_tree_mask(seq, empty_row=seq - 1)[0]
    if local == "tree_b":
        return random_tree_mask(seq, batch, empty_row=1)[0]
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_branch_attention_matches_reference(case):
    batch, seq, hq, hkv, head_dim, local, window, with_prefix, dtype = case
    p = make_problem(batch, seq, hq, hkv, head_dim, 0, dtype)
    mask = _mask(local, seq, batch)
    causal = local == "causal"
    prefix_o, prefix_lse = _prefix_state(batch, seq, hq, head_dim) if with_prefix else (None, None)
    kwargs = dict(causal=causal, mask=mask, prefix_o=prefix_o, prefix_lse=prefix_lse)
    o, lse = branch_attention(
        p.q, p.k_local, p.v_local, window_left=window, return_lse=True, **kwargs
    )
    o_ref, lse_ref = branch_attention_ref(
        p.q, p.k_local, p.v_local, window_left=window, return_lse=True, **kwargs
    )
    o_low = None
    if dtype != torch.float32:
        o_low = branch_attention_ref(
            p.q, p.k_local, p.v_local, window_left=window, compute_dtype=dtype, **kwargs
        )
    assert o.dtype == dtype and o.shape == p.q.shape
    assert_close_by_dtype(o, o_ref.nan_to_num(), o_low, dtype)
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
def test_fully_masked_rows_keep_the_prefix_state_exactly(dtype):
    # tree row with no visible key: o is the prefix state rounded to q's dtype, lse bit for bit;
    # without a prefix state: o = 0, lse = -inf
    batch, seq, hq, hkv = 2, 16, 4, 2
    p = make_problem(batch, seq, hq, hkv, 64, 0, dtype)
    mask, dense = random_tree_mask(seq, batch, empty_row=3)
    prefix_o, prefix_lse = _prefix_state(batch, seq, hq, 64, empty_rows=False)
    o, lse = branch_attention(
        p.q, p.k_local, p.v_local, causal=False, mask=mask,
        prefix_o=prefix_o, prefix_lse=prefix_lse, return_lse=True,
    )  # fmt: skip
    assert not dense[:, 3].any()
    assert torch.equal(o[:, 3], prefix_o[:, 3].to(dtype))
    assert torch.equal(lse[:, 3], prefix_lse[:, 3])
    o, lse = branch_attention(p.q, p.k_local, p.v_local, causal=False, mask=mask, return_lse=True)
    assert (o[:, 3] == 0).all() and (lse[:, 3] == NEG_INF).all()


def test_empty_prefix_rows_give_local_attention():
    # prefix rows with lse = -inf (e.g. windowed out) and NaN in o: the local state alone
    p = make_problem(2, 5, 2, 1, 64, 0, torch.float32)
    prefix_o = torch.full((2, 5, 2, 64), float("nan"), device=DEVICE)
    prefix_lse = torch.full((2, 5, 2), NEG_INF, device=DEVICE)
    o = branch_attention(
        p.q, p.k_local, p.v_local, causal=True, prefix_o=prefix_o, prefix_lse=prefix_lse
    )
    o_ref = branch_attention_ref(p.q, p.k_local, p.v_local, causal=True)
    assert_close_by_dtype(o, o_ref, None, torch.float32)


def test_branch_attention_rejects_bad_inputs():
    p = make_problem(2, 5, 2, 1, 64, 0, torch.float32)
    mask = random_tree_mask(5)[0]
    with pytest.raises(AssertionError, match="replaces causal"):
        branch_attention(p.q, p.k_local, p.v_local, causal=True, mask=mask)
    with pytest.raises(AssertionError, match="W = ceil"):
        branch_attention(p.q, p.k_local, p.v_local, causal=False, mask=mask[:, :0])
    with pytest.raises(AssertionError, match="together"):
        branch_attention(p.q, p.k_local, p.v_local, causal=True, prefix_o=p.q.float())


def test_branch_attention_opcheck():
    p = make_problem(1, 3, 2, 1, 16, 0, torch.float32)
    prefix_o, prefix_lse = _prefix_state(1, 3, 2, 16, empty_rows=False)
    mask = random_tree_mask(3)[0]
    op = torch.ops.d2sd.branch_attention.default
    torch.library.opcheck(
        op, (p.q, p.k_local, p.v_local, True, None, prefix_o, prefix_lse, 0.25, -1)
    )
    torch.library.opcheck(op, (p.q, p.k_local, p.v_local, False, mask, None, None, 0.25, 1))


# ----------------------------------------------------------------------------- GPU

GPU_HEADS = [("qwen3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", GPU_HEADS, ids=lambda h: h[0])
@pytest.mark.parametrize("shape", [(1, 16), (5, 16), (9, 32), (16, 64), (4, 33)], ids=str)
@pytest.mark.parametrize("local", ["causal", "bidir", "tree_b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_branch_attention_gpu_matches_reference(heads, shape, local, dtype):
    _, hq, hkv, head_dim = heads
    batch, seq = shape
    p = make_problem(batch, seq, hq, hkv, head_dim, 0, dtype, device="cuda")
    mask = _mask(local, seq, batch)
    mask = None if mask is None else mask.cuda()
    prefix_o = torch.randn(batch, seq, hq, head_dim, device="cuda")
    prefix_lse = torch.randn(batch, seq, hq, device="cuda") * 3 + 4
    kwargs = dict(causal=local == "causal", mask=mask, prefix_o=prefix_o, prefix_lse=prefix_lse)
    o, lse = branch_attention(p.q, p.k_local, p.v_local, return_lse=True, **kwargs)
    o_ref, lse_ref = branch_attention_ref(p.q, p.k_local, p.v_local, return_lse=True, **kwargs)
    o_low = branch_attention_ref(p.q, p.k_local, p.v_local, compute_dtype=dtype, **kwargs)
    assert_close_by_dtype(o, o_ref, o_low, dtype)
    assert_lse_close(lse, lse_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_branch_attention_matches_flashinfer(head_dim, causal):
    pytest.importorskip("flashinfer")
    from bench._flashinfer_ref import branch_sequence

    hq, hkv = (32, 8) if head_dim == 128 else (9, 3)
    batch, seq = 5, 16
    p = make_problem(batch, seq, hq, hkv, head_dim, 0, torch.bfloat16, device="cuda")
    prefix_o = torch.randn(batch, seq, hq, head_dim, device="cuda").bfloat16()
    prefix_lse = torch.randn(batch, seq, hq, device="cuda") * 3 + 4
    kwargs = dict(causal=causal, prefix_o=prefix_o, prefix_lse=prefix_lse)
    o, lse = branch_attention(p.q, p.k_local, p.v_local, return_lse=True, **kwargs)
    o_fi, lse_fi = branch_sequence(p.q, p.k_local, p.v_local, prefix_o, prefix_lse, causal=causal)
    o_ref, lse_ref = branch_attention_ref(p.q, p.k_local, p.v_local, return_lse=True, **kwargs)
    assert_close_by_dtype(o, o_ref, o_fi, torch.bfloat16, "o (bound: FlashInfer's error)")
    assert_lse_close(lse, lse_fi, "lse vs FlashInfer")
    assert_lse_close(lse, lse_ref)
