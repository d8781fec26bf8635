"""commit vs commit_ref and vs an explicit loop: copies are exact, so every comparison is equality.

Edge cases: rows past max_len skipped (a nearly full cache), int32 and int64 rows, repeated rows,
hidden states on and off, strided layer/row layouts, one layer, Hkv = 1 / 3 / 8, head_dim 64 / 128.
"""

from __future__ import annotations

import pytest
import torch

from kernels.commit import commit, commit_ref


def make_case(
    layers: int,
    kv_heads: int,
    head_dim: int,
    depth: int,
    max_len: int,
    cache_len: int,
    num_new: int,
    *,
    hidden: int = 0,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    rows_dtype: torch.dtype = torch.int32,
):
    num_rows = 5 * depth  # R = B * T local rows
    k_local = torch.randn(layers, num_rows, kv_heads, head_dim, device=device).to(dtype)
    v_local = torch.randn_like(k_local)
    k_cache = torch.randn(layers, max_len, kv_heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    rows = torch.randint(0, num_rows, (depth,), device=device, dtype=rows_dtype)
    case = dict(
        k_local=k_local,
        v_local=v_local,
        k_cache=k_cache,
        v_cache=v_cache,
        rows=rows,
        cache_len=torch.tensor([cache_len], dtype=torch.int32, device=device),
        num_new=torch.tensor([num_new], dtype=torch.int32, device=device),
    )
    if hidden:
        case["hidden_src"] = torch.randn(num_rows, hidden, device=device).to(dtype)
        case["hidden_dst"] = torch.zeros(depth, hidden, device=device, dtype=dtype)
    return case


def clone_case(case: dict) -> dict:
    return {k: v.clone() for k, v in case.items()}


def loop_expectation(case: dict) -> dict:
    """The definition, one row at a time."""
    out = clone_case(case)
    start, max_len = int(case["cache_len"]), case["k_cache"].shape[1]
    for d, row in enumerate(case["rows"].tolist()):
        if start + d < max_len:
            out["k_cache"][:, start + d] = case["k_local"][:, row]
            out["v_cache"][:, start + d] = case["v_local"][:, row]
        if "hidden_src" in case:
            out["hidden_dst"][d] = case["hidden_src"][row]
    out["cache_len"] += case["num_new"]
    return out


def assert_cases_equal(a: dict, b: dict) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


# (layers, kv_heads, head_dim, depth, max_len, cache_len, num_new, hidden) and what each exercises
CASES = [
    (3, 8, 128, 16, 64, 10, 7, 0),  # Qwen3-like heads, no hidden states
    (2, 3, 64, 16, 64, 0, 16, 96),  # SmolLM2-like heads, an empty cache, hidden states
    (1, 1, 64, 5, 40, 33, 2, 40),  # one layer, one kv head, T not a power of two
    (2, 3, 64, 16, 40, 30, 9, 24),  # nearly full: rows 10..15 fall past max_len and are skipped
    (2, 8, 128, 1, 8, 7, 1, 0),  # T = 1 into the very last row
]


@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "layers, kv_heads, head_dim, depth, max_len, cache_len, num_new, hidden", CASES
)
def test_commit_matches_reference_and_loop(
    layers, kv_heads, head_dim, depth, max_len, cache_len, num_new, hidden, rows_dtype
) -> None:
    case = make_case(
        layers,
        kv_heads,
        head_dim,
        depth,
        max_len,
        cache_len,
        num_new,
        hidden=hidden,
        rows_dtype=rows_dtype,
    )
    expected = loop_expectation(case)
    got, ref = clone_case(case), clone_case(case)
    commit(**got)
    commit_ref(**ref)
    assert_cases_equal(got, expected)
    assert_cases_equal(ref, expected)


def test_strided_layouts_and_repeated_rows() -> None:
    # caches that are slices of larger buffers (layer and row strides are free; [Hkv, D] is not)
    big_cache = torch.randn(2, 2, 50, 3, 64).half()
    big_local = torch.randn(4, 20, 3, 64).half()
    case = dict(
        k_local=big_local[1:3],
        v_local=big_local[2:4],
        k_cache=big_cache[0, :, 5:45],
        v_cache=big_cache[1, :, 5:45],
        rows=torch.tensor([4, 4, 0, 19, 7], dtype=torch.int32),
        cache_len=torch.tensor([12], dtype=torch.int32),
        num_new=torch.tensor([3], dtype=torch.int32),
    )
    snapshot = big_cache.clone()
    expected = loop_expectation(case)
    commit(**case)
    assert_cases_equal(case, expected)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[5 + 12 : 5 + 17] = False  # the five committed rows of each cache view
    assert torch.equal(big_cache[:, :, untouched], snapshot[:, :, untouched])


def test_cache_len_advances_after_the_copy() -> None:
    # two commits in a row: the second lands right after the first one's num_new rows
    case = make_case(2, 3, 64, 6, 32, 4, 3, hidden=16)
    expected = loop_expectation(case)
    commit(**case)
    assert_cases_equal(case, expected)
    case["rows"] = torch.randint(0, 30, (6,), dtype=torch.int32)
    expected = loop_expectation(case)
    commit(**case)
    assert_cases_equal(case, expected)
    assert int(case["cache_len"]) == 4 + 3 + 3


@pytest.mark.parametrize("fn", [commit, commit_ref], ids=["kernel", "ref"])
def test_advance_false_leaves_the_length(fn) -> None:
    # the decode loop's form: emit advances cache_len after this launch
    case = make_case(2, 3, 64, 6, 32, 4, 3, hidden=16)
    expected = loop_expectation(case)
    fn(**case, advance=False)
    assert int(case["cache_len"]) == 4
    case["cache_len"] += case["num_new"]  # what emit does
    assert_cases_equal(case, expected)


# ---------------------------------------------------------------------------------------------
# GPU: real cache shapes in bf16, CUDA graphs
# ---------------------------------------------------------------------------------------------

# Qwen3-8B: 36 layers, 8 kv heads of 128, hidden 4096 (5 tapped layers); SmolLM2-135M: 30, 3 x 64, 576
REAL = [(36, 8, 128, 5 * 4096), (30, 3, 64, 5 * 576)]


@pytest.mark.gpu
@pytest.mark.parametrize("layers, kv_heads, head_dim, hidden", REAL)
@pytest.mark.parametrize("depth", [16, 32])
@pytest.mark.parametrize("cache_len", [1000, 4096 - 20])  # the second one skips 12 / 2 rows
def test_gpu_real_shapes(layers, kv_heads, head_dim, hidden, depth, cache_len) -> None:
    case = make_case(
        layers,
        kv_heads,
        head_dim,
        depth,
        4096,
        cache_len,
        9,
        hidden=hidden,
        dtype=torch.bfloat16,
        device="cuda",
    )
    got, ref = clone_case(case), clone_case(case)
    commit(**got)
    commit_ref(**ref)
    assert_cases_equal(got, ref)
    assert_cases_equal(got, loop_expectation(case))


@pytest.mark.gpu
def test_gpu_cuda_graph() -> None:
    case = make_case(36, 8, 128, 16, 4096, 100, 0, hidden=4096, dtype=torch.bfloat16, device="cuda")
    commit(**clone_case(case))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        commit(**case)
    for step in range(3):
        case["rows"].copy_(torch.randint(0, 80, (16,), device="cuda", dtype=torch.int32))
        case["num_new"].fill_(step + 2)
        case["k_local"].normal_()
        expected = loop_expectation(case)
        graph.replay()
        assert_cases_equal(case, expected)
    assert int(case["cache_len"]) == 100 + 2 + 3 + 4
