"""Attention backends (`d2sd.attention`) against a dense reference with an explicit mask.

Reference: the prefix rows [0, cache_len) and the branch's own keys concatenated into one key set,
an explicit boolean mask built from the contract (prefix visible up to the window; local keys by
causal / tree bits / all; window on index positions), then `F.scaled_dot_product_attention` (fp32,
GQA by repeating kv heads) and `logsumexp / ln 2` for the base-2 lse.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from d2sd.attention import available_backends, get_backend
from d2sd.errors import D2SDError
from kernels import lse_merge_ref, pack_mask, unpack_mask


def _random_tree_mask(batch: int, num_q: int, *, shared: bool, empty_rows: bool = False):
    """Ancestor masks of random trees (node i's parent < i); bool [B or 1, T, T]."""
    masks = []
    for _ in range(1 if shared else batch):
        visible = torch.zeros(num_q, num_q, dtype=torch.bool)
        for i in range(num_q):
            if i > 0:
                parent = int(torch.randint(0, i, ()))
                visible[i] = visible[parent]
            visible[i, i] = True
        masks.append(visible)
    visible = torch.stack(masks)
    if empty_rows:
        visible[:, 1::3] = False  # rows that see no local key (fully masked with an empty prefix)
    return visible


def _dense_keys(q, k_cache, v_cache, prefix_len, k_local, v_local, local_visible, window_left):
    """Keys and values [B, L + T, Hq, D] (kv heads repeated for GQA, in the inputs' dtype) and the
    bool visibility [B, T, L + T] of one explicit mask over prefix + local keys."""
    batch, num_q, num_heads, _ = q.shape
    group = num_heads // k_local.shape[2]
    keys = torch.cat([k_cache[:prefix_len].expand(batch, -1, -1, -1), k_local], dim=1)
    values = torch.cat([v_cache[:prefix_len].expand(batch, -1, -1, -1), v_local], dim=1)
    q_pos = prefix_len + torch.arange(num_q, device=q.device)
    k_pos = torch.arange(prefix_len + num_q, device=q.device)
    visible = torch.cat(
        [
            torch.ones(batch, num_q, prefix_len, dtype=torch.bool, device=q.device),
            local_visible.expand(batch, -1, -1),
        ],
        dim=-1,
    )
    if window_left >= 0:
        visible = visible & (q_pos[:, None] - k_pos[None, :] <= window_left)
    return keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2), visible


def _dense_reference(
    q, k_cache, v_cache, prefix_len, k_local, v_local, local_visible, window_left, sm_scale
):
    """fp32 o [B, T, Hq, D] and base-2 lse [B, T, Hq] from one explicit mask over prefix + local."""
    keys, values, visible = _dense_keys(
        q, k_cache, v_cache, prefix_len, k_local, v_local, local_visible, window_left
    )
    qh = q.float().transpose(1, 2)
    kh = keys.float().transpose(1, 2)
    vh = values.float().transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible[:, None], scale=sm_scale)
    scores = (qh @ kh.transpose(-1, -2)) * sm_scale
    lse = torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1) / math.log(
        2
    )
    empty = ~visible.any(-1)  # [B, T]
    o = o.transpose(1, 2).masked_fill(empty[..., None, None], 0.0)
    return o, lse.transpose(1, 2), empty


def _make_case(
    batch,
    num_q,
    prefix_len,
    num_heads,
    num_kv,
    head_dim,
    mode,
    *,
    max_len=64,
    device="cpu",
    dtype=torch.float32,
    garbage=float("nan"),
):
    q = torch.randn(batch, num_q, num_heads, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(max_len, num_kv, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(max_len, num_kv, head_dim, device=device, dtype=dtype)
    # rows past cache_len are not part of the prefix: poison them
    k_cache[prefix_len:] = garbage
    v_cache[prefix_len:] = garbage
    k_local = torch.randn(batch, num_q, num_kv, head_dim, device=device, dtype=dtype)
    v_local = torch.randn(batch, num_q, num_kv, head_dim, device=device, dtype=dtype)
    cache_len = torch.tensor([prefix_len], dtype=torch.int32, device=device)
    mask, causal = None, False
    idx = torch.arange(num_q, device=device)
    if mode == "causal":
        causal = True
        local_visible = (idx[None, :] <= idx[:, None])[None]
    elif mode == "full":
        local_visible = torch.ones(1, num_q, num_q, dtype=torch.bool, device=device)
    else:
        local_visible = _random_tree_mask(
            batch, num_q, shared=mode != "tree_batched", empty_rows=mode == "tree_empty"
        ).to(device)
        mask = pack_mask(local_visible)
        if mode in ("tree", "tree_empty"):
            mask = mask[0]  # [T, W] shared by every branch
    return q, k_cache, v_cache, cache_len, k_local, v_local, causal, mask, local_visible


def _run_with_reference(backend, case, prefix_len, window_left):
    """((o, lse) of `backend.cascade`, (o, lse, empty rows) of `_dense_reference`) on a
    `_make_case` case."""
    q, k_cache, v_cache, cache_len, k_local, v_local, causal, mask, local_visible = case
    o, lse = backend.cascade(
        q,
        k_cache,
        v_cache,
        cache_len,
        k_local,
        v_local,
        causal=causal,
        mask=mask,
        window_left=window_left,
        return_lse=True,
    )
    scale = q.shape[-1] ** -0.5
    reference = _dense_reference(
        q, k_cache, v_cache, prefix_len, k_local, v_local, local_visible, window_left, scale
    )
    return (o, lse), reference


CASES = [
    # batch, T, prefix, Hq, Hkv, D, local mode, window_left
    (1, 1, 0, 9, 3, 64, "causal", -1),  # one token, empty prefix (AR step at position 0)
    (1, 5, 1, 9, 3, 64, "causal", -1),  # prefix of one row, SmolLM2 groups 9/3
    (3, 16, 37, 9, 3, 64, "causal", -1),  # branches sharing a prefix that is not a block multiple
    (2, 7, 20, 4, 4, 16, "full", -1),  # drafter block: bidirectional, MHA
    (3, 16, 37, 8, 1, 32, "tree", -1),  # shared tree mask [T, W], MQA
    (2, 12, 10, 6, 2, 16, "tree_batched", 3),  # per-branch masks [B, T, W] plus a window
    (2, 16, 37, 9, 3, 64, "causal", 5),  # sliding window cutting into prefix and local keys
    (1, 40, 5, 4, 2, 16, "tree", -1),  # T > 32: two mask words
    (2, 9, 0, 4, 2, 16, "tree_empty", -1),  # fully masked rows: o = 0, lse = -inf
]


@pytest.mark.parametrize(
    ("batch", "num_q", "prefix_len", "num_heads", "num_kv", "head_dim", "mode", "window_left"),
    CASES,
)
def test_torch_backend_matches_dense_reference(
    batch, num_q, prefix_len, num_heads, num_kv, head_dim, mode, window_left
):
    case = _make_case(batch, num_q, prefix_len, num_heads, num_kv, head_dim, mode)
    q = case[0]
    (o, lse), (ref_o, ref_lse, empty) = _run_with_reference(
        get_backend("torch"), case, prefix_len, window_left
    )
    assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)
    assert (mode == "tree_empty") == bool(empty.any())
    assert torch.isneginf(lse[empty]).all() and (o[empty] == 0).all()


def test_mask_pack_roundtrip():
    visible = torch.rand(3, 5, 70) < 0.5
    visible[0, 0, 31] = True  # bit 31 is the int32 sign bit
    packed = pack_mask(visible)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 3)
    assert torch.equal(unpack_mask(packed, 70), visible)


def test_merge_equals_joint_softmax():
    """The merge of the torch backend (kernels.lse_merge_ref): two states = one joint softmax."""
    scores_a, scores_b = torch.randn(4, 3, 10), torch.randn(4, 3, 6)
    values_a, values_b = torch.randn(10, 8), torch.randn(6, 8)

    def state(scores, values):
        return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1) / math.log(2)

    o, lse = lse_merge_ref(*state(scores_a, values_a), *state(scores_b, values_b))
    ref_o, ref_lse = state(torch.cat([scores_a, scores_b], -1), torch.cat([values_a, values_b]))
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    # merging with an empty state is the identity
    empty = (torch.zeros_like(ref_o), torch.full_like(ref_lse, float("-inf")))
    o2, lse2 = lse_merge_ref(ref_o, ref_lse, *empty)
    torch.testing.assert_close(o2, ref_o)
    torch.testing.assert_close(lse2, ref_lse)


def test_backend_factory_errors():
    assert "torch" in available_backends("cpu")
    with pytest.raises(D2SDError, match="unknown attention backend"):
        get_backend("sdpa")
    with pytest.raises(D2SDError, match="flashinfer"):
        get_backend("flashinfer", "cpu")
    assert get_backend("auto", "cpu").name == "torch"


def _triton_or_skip(device):
    try:
        return get_backend("triton", device)
    except D2SDError as exc:
        pytest.skip(f"triton backend unavailable: {exc}")


@pytest.mark.parametrize(
    ("batch", "num_q", "prefix_len", "num_heads", "num_kv", "head_dim", "mode", "window_left"),
    [
        (1, 1, 0, 9, 3, 64, "causal", -1),
        (3, 16, 37, 9, 3, 64, "causal", -1),
        (2, 7, 20, 4, 4, 16, "full", -1),
        (2, 12, 10, 6, 2, 16, "tree_batched", 3),
    ],
)
def test_triton_backend_matches_torch_fp32(
    batch, num_q, prefix_len, num_heads, num_kv, head_dim, mode, window_left
):
    """Under TRITON_INTERPRET=1 on the CPU; fp32, so only summation order differs."""
    from tests.conftest import interpreting

    if not interpreting():
        pytest.skip("CPU run of the Triton kernel needs TRITON_INTERPRET=1")
    backend = _triton_or_skip("cpu")
    q, k_cache, v_cache, cache_len, k_local, v_local, causal, mask, _ = _make_case(
        batch, num_q, prefix_len, num_heads, num_kv, head_dim, mode, garbage=1e4
    )
    args = (q, k_cache, v_cache, cache_len, k_local, v_local)
    kwargs = dict(causal=causal, mask=mask, window_left=window_left, return_lse=True)
    o, lse = backend.cascade(*args, **kwargs)
    ref_o, ref_lse = get_backend("torch").cascade(*args, **kwargs)
    torch.testing.assert_close(o, ref_o, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton", "flashinfer"])
@pytest.mark.parametrize(
    ("batch", "num_q", "prefix_len", "num_heads", "num_kv", "head_dim", "mode", "window_left"),
    [
        (1, 1, 0, 32, 8, 128, "causal", -1),
        (5, 16, 1000, 32, 8, 128, "causal", -1),  # Qwen3-8B heads, K + 1 = 5 branches of 16
        (1, 80, 777, 9, 3, 64, "tree", -1),  # tree verify of 80 nodes, SmolLM2 heads
        (4, 16, 300, 32, 8, 128, "full", -1),  # drafter blocks
        (2, 16, 300, 64, 8, 64, "causal", 127),  # GPT-OSS-like window (W = 128)
    ],
)
def test_backends_bf16_on_gpu(
    backend_name, batch, num_q, prefix_len, num_heads, num_kv, head_dim, mode, window_left
):
    """bf16 output vs the fp32 reference of the same inputs: at most 2x torch SDPA's bf16 error."""
    if backend_name not in available_backends("cuda"):
        pytest.skip(f"{backend_name} backend unavailable on this machine")
    backend = get_backend(backend_name, "cuda")
    case = _make_case(
        batch,
        num_q,
        prefix_len,
        num_heads,
        num_kv,
        head_dim,
        mode,
        max_len=2048,
        device="cuda",
        dtype=torch.bfloat16,
        garbage=0.0,
    )
    (o, lse), (ref_o, ref_lse, _) = _run_with_reference(backend, case, prefix_len, window_left)
    # what torch itself makes in bf16: the same dense attention run in bf16
    q, k_cache, v_cache, _, k_local, v_local, _, _, local_visible = case
    keys, values, visible = _dense_keys(
        q, k_cache, v_cache, prefix_len, k_local, v_local, local_visible, window_left
    )
    scale = head_dim**-0.5
    torch_bf16 = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible[:, None],
        scale=scale,
    ).transpose(1, 2)
    budget = 2 * (torch_bf16.float() - ref_o).abs().max().item() + 1e-6
    assert (o.float() - ref_o).abs().max().item() <= budget
    assert (lse - ref_lse).abs().max().item() <= 1e-2  # lse from bf16 q.k: ~ |s| * 2^-8
