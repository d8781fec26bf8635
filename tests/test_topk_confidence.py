"""kernels/topk_confidence.py against its fp32 torch reference (CPU interpreter and GPU).

Integer outputs (draft tokens, branch_len, vp_input_ids) must match exactly. The confidences may
differ from the reference by summation order and exp rounding only; r must then be bit-identical
to the reference formula applied to the kernel's own confidences (same fp32 operations, same
order), which also fixes branch_len exactly. Random logits have a single peak per row with the
confidence spread over (0.05, 0.98), so their r values are far apart and the top-K choice cannot
flip on rounding. Ties are built from exactly representable confidences: c = 1/n from n equal
maxima, every other logit 200 below (exp underflows to exactly 0 in fp32).
"""

import math

import pytest
import torch

from kernels.topk_confidence import select_branches_ref, topk_confidence, topk_confidence_ref

MASK_TOKEN = 151669
ANCHOR = 4242
EPS32 = torch.finfo(torch.float32).eps
# The CPU interpreter runs small vocabularies; (block_v, tiles_per_program) = (0, 0) is the
# default launch, (128, 3) forces several tiles per program and several chunks per row.
CPU_LAUNCHES = [(0, 0), (128, 3)]


def peaked_logits(num_rows: int, vocab: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """N(0, 1) logits plus one peak per row that puts max softmax near a random c in (0.05, 0.98)."""
    x = torch.randn(num_rows, vocab, dtype=torch.float64)
    target = torch.rand(num_rows, dtype=torch.float64) * 0.93 + 0.05
    # sum_v exp(x_v) ~ vocab * e^{1/2} for N(0, 1): the peak b gives c ~ e^b / (e^b + that)
    peak = math.log(vocab * math.exp(0.5)) + torch.log(target / (1 - target))
    cols = torch.randint(0, vocab, (num_rows,))
    x[torch.arange(num_rows), cols] = peak
    return x.to(dtype).to(device)


def exact_logits(
    maxima: list[int], vocab: int, dtype: torch.dtype, device: str, spread: bool = True
) -> torch.Tensor:
    """Row g has maxima[g] logits at 0.0 (evenly spread or at the front) and the rest at -200."""
    x = torch.full((len(maxima), vocab), -200.0)
    for g, n in enumerate(maxima):
        cols = torch.linspace(vocab - 1, 3, n).round().long() if spread else torch.arange(n)
        x[g, cols] = 0.0
    return x.to(dtype).to(device)


def run_and_check(
    logits: torch.Tensor, num_branches: int, gamma2: int, launch: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, ...]:
    """Run the kernel, check every output against the reference, return the kernel's outputs."""
    anchor = torch.tensor([ANCHOR], device=logits.device)
    block_v, tiles = launch
    out = topk_confidence(
        logits, anchor, num_branches, gamma2, MASK_TOKEN, block_v=block_v, tiles_per_program=tiles
    )
    tokens, conf, r, branch_len, vp_ids = out
    ref_tokens, ref_conf, ref_r, ref_len, ref_vp = topk_confidence_ref(
        logits, anchor, num_branches, gamma2, MASK_TOKEN
    )
    num_rows = logits.shape[0]
    assert tokens.shape == (num_rows,) and tokens.dtype == torch.int64
    assert conf.shape == r.shape == (num_rows,) and conf.dtype == r.dtype == torch.float32
    assert branch_len.shape == (num_branches,) and branch_len.dtype == torch.int32
    assert vp_ids.shape == (num_branches, gamma2) and vp_ids.dtype == torch.int64
    assert torch.equal(tokens, ref_tokens)
    # confidence vs fp64: at most 2x the fp32 reference's own error plus a few ulp of exp2 rounding
    conf64 = 1.0 / torch.exp(logits.double() - logits.double().amax(1, keepdim=True)).sum(1)
    torch_err = (ref_conf.double() - conf64).abs()
    assert ((conf.double() - conf64).abs() <= 2 * torch_err + 16 * EPS32 * conf64).all()
    # r from c: the same fp32 operations in the same order as the reference, hence bit-identical
    r_from_conf, len_from_conf = select_branches_ref(conf, num_branches)
    assert torch.equal(r, r_from_conf)
    assert torch.equal(branch_len, len_from_conf)
    assert torch.equal(branch_len, ref_len)
    assert torch.equal(r, ref_r) or not torch.equal(conf, ref_conf)
    assert torch.equal(vp_ids, ref_vp)
    return out


# ---------------------------------------------------------------- CPU interpreter (and GPU too)


F32, F16 = torch.float32, torch.float16
MULTI_TILE = CPU_LAUNCHES[1]


@pytest.mark.parametrize(
    "num_rows, vocab, num_branches, gamma2, dtype, launch",
    [
        (15, 1000, 4, 16, F32, (0, 0)),  # γ = 16, K = 4, γ2 = γ: the default shape, odd vocabulary
        (15, 1000, 4, 16, F16, MULTI_TILE),  # the same through several tiles and chunks
        (15, 4099, 4, 32, F16, (0, 0)),  # γ2 = 2γ, vocabulary not a multiple of any block
        (15, 1000, 8, 32, F32, MULTI_TILE),  # the largest K
        (15, 1000, 1, 16, F16, (0, 0)),  # K = 1
        (7, 777, 8, 8, F32, MULTI_TILE),  # K > G: the ranking repeats cyclically
        (1, 300, 4, 2, F16, (0, 0)),  # γ = 2: one draft position, every branch point is 0
        (31, 515, 4, 32, F32, MULTI_TILE),  # γ = 32
    ],
)
def test_random_logits(num_rows, vocab, num_branches, gamma2, dtype, launch):
    for _ in range(3):
        logits = peaked_logits(num_rows, vocab, dtype, "cpu")
        run_and_check(logits, num_branches, gamma2, launch)


@pytest.mark.parametrize("launch", CPU_LAUNCHES)
@pytest.mark.parametrize("value", [0.0, 3.5, -7.25])
def test_all_equal_logits(value, launch):
    # every token ties: t = 0, c = 1/V exactly, r(i) = c^i (1 - c) strictly decreasing
    vocab = 1000
    logits = torch.full((15, vocab), value)
    tokens, conf, _, branch_len, vp_ids = run_and_check(logits, 4, 16, launch)
    assert (tokens == 0).all()
    assert (conf == torch.tensor(1.0) / vocab).all()
    assert branch_len.tolist() == [0, 1, 2, 3]
    assert vp_ids[3].tolist() == [ANCHOR, 0, 0, 0] + [MASK_TOKEN] * 12


@pytest.mark.parametrize("launch", CPU_LAUNCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_ties_go_to_the_smaller_id(dtype, launch):
    vocab = 1000
    logits = peaked_logits(6, vocab, dtype, "cpu")
    top = logits.float().amax(1) + 4
    pairs = [(5, 900), (900, 901), (17, 18), (0, vocab - 1), (130, 129), (640, 7)]
    for g, (a, b) in enumerate(pairs):  # same tile, different chunks, first and last token
        logits[g, a] = logits[g, b] = top[g].to(dtype)
    tokens = run_and_check(logits, 4, 8, launch)[0]
    assert tokens.tolist() == [min(p) for p in pairs]


@pytest.mark.parametrize("launch", CPU_LAUNCHES)
@pytest.mark.parametrize(
    "maxima, expected_len",
    [
        # every c = 1: every r = 0, all tied -> the smallest i first
        ([1] * 15, [0, 1, 2, 3]),
        # c_3 = 1/2 alone: r(2) = 1/2, the rest tie at 0
        ([1, 1, 2] + [1] * 12, [2, 0, 1, 3]),
        # c = 1/2 everywhere: r(i) = 2^-(i+1)
        ([2] * 15, [0, 1, 2, 3]),
        # the branch point γ - 2 = 14 (only c_15 < 1) wins, then the ties at 0
        ([1] * 14 + [4], [14, 0, 1, 2]),
        # r(1) = 1/2, r(4) = 1/2 * 3/4 = 3/8, r(5..) = 0 ties after r(0) = 0
        ([1, 2, 1, 1, 4] + [1] * 10, [1, 4, 0, 2]),
        # c_1 = 1/8: r(0) = 7/8 first; then r(1) = 1/8 * 1/2, r(2) = 1/16 * 1/2, ...
        ([8, 2, 2] + [1] * 12, [0, 1, 2, 3]),
    ],
)
def test_exact_confidences_and_ties(maxima, expected_len, launch):
    logits = exact_logits(maxima, 1000, torch.float32, "cpu")
    tokens, conf, _, branch_len, vp_ids = run_and_check(logits, 4, 16, launch)
    assert torch.equal(conf, 1.0 / torch.tensor(maxima, dtype=torch.float32))
    assert branch_len.tolist() == expected_len
    assert tokens.tolist() == [3 if n > 1 else 999 for n in maxima]  # linspace(999, 3, n)[-1]
    i = expected_len[0]
    assert vp_ids[0].tolist() == [ANCHOR, *tokens[:i].tolist()] + [MASK_TOKEN] * (15 - i)


def test_k_larger_than_g_repeats_the_ranking():
    # G = 3 branch points ranked [2, 0, 1]; 8 slots take them cyclically
    logits = exact_logits([1, 1, 2], 500, torch.float32, "cpu", spread=False)
    _, _, r, branch_len, vp_ids = run_and_check(logits, 8, 4)
    assert r.tolist() == [0.0, 0.0, 0.5]
    assert branch_len.tolist() == [2, 0, 1, 2, 0, 1, 2, 0]
    assert vp_ids[0].tolist() == [ANCHOR, 0, 0, MASK_TOKEN]
    assert vp_ids[1].tolist() == [ANCHOR] + [MASK_TOKEN] * 3


@pytest.mark.parametrize("launch", CPU_LAUNCHES)
def test_masked_vocabulary_chunks(launch):
    # whole chunks of -inf (a suppressed vocabulary range) contribute nothing and make no NaN
    logits = peaked_logits(15, 1000, torch.float32, "cpu")
    logits[:, 100:900] = -float("inf")
    logits[3, :] = -float("inf")
    logits[3, 950] = 1.0  # a row with a single finite logit: c = 1
    _, conf, _, _, _ = run_and_check(logits, 4, 16, launch)
    assert conf[3] == 1.0 and torch.isfinite(conf).all()


def test_torch_compile_traces_the_op():
    # the custom op's fake implementation lets dynamo trace a decode step without a graph break
    logits = peaked_logits(15, 600, torch.float32, "cpu")
    anchor = torch.tensor([ANCHOR])
    step = torch.compile(
        lambda x, a: topk_confidence(x, a, 4, 16, MASK_TOKEN), backend="eager", fullgraph=True
    )
    for got, want in zip(step(logits, anchor), topk_confidence(logits, anchor, 4, 16, MASK_TOKEN)):
        assert torch.equal(got, want)


def test_strided_rows():
    # the first draft's logits are a view of the drafter's [B, γ, V] output (row stride > V)
    full = peaked_logits(2 * 16, 700, torch.float32, "cpu").view(2, 16, 700)
    run_and_check(full[0, 1:], 4, 16)
    run_and_check(full[:, 3, :300], 1, 3)


# ---------------------------------------------------------------- GPU: real shapes, bf16, graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [151936, 49152, 49152 + 7, 262144])
@pytest.mark.parametrize("gamma2", [16, 32])
def test_gpu_real_shapes(vocab, gamma2, dtype):
    for _ in range(4):
        logits = peaked_logits(15, vocab, dtype, "cuda")
        run_and_check(logits, 4, gamma2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_branches", [1, 4, 8, 20])
def test_gpu_adversarial(num_branches):
    for vocab in (151936, 49152 + 7):
        for maxima in ([1] * 15, [1, 2, 1, 1, 4] + [1] * 10, [2] * 15, [1] * 14 + [4]):
            run_and_check(exact_logits(maxima, vocab, torch.bfloat16, "cuda"), num_branches, 32)
        run_and_check(torch.zeros(15, vocab, dtype=torch.bfloat16, device="cuda"), num_branches, 16)
        logits = peaked_logits(15, vocab, torch.bfloat16, "cuda")
        logits[:, 1000:60000] = -float("inf")
        run_and_check(logits, num_branches, 16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "launch", [(1024, 0), (2048, 0), (4096, 1), (8192, 1), (16384, 1), (1024, 3), (2048, 2)]
)
def test_gpu_launch_configs(launch):
    run_and_check(peaked_logits(15, 151936, torch.bfloat16, "cuda"), 4, 16, launch)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    vocab, gamma2 = 151936, 32
    static_logits = peaked_logits(15, vocab, torch.bfloat16, "cuda")
    anchor = torch.tensor([ANCHOR], device="cuda")
    topk_confidence(static_logits, anchor, 4, gamma2, MASK_TOKEN)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        topk_confidence(static_logits, anchor, 4, gamma2, MASK_TOKEN)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = topk_confidence(static_logits, anchor, 4, gamma2, MASK_TOKEN)
    for step in range(3):  # new inputs each replay, as in a decode loop
        static_logits.copy_(peaked_logits(15, vocab, torch.bfloat16, "cuda"))
        anchor.fill_(ANCHOR + step)
        graph.replay()
        torch.cuda.synchronize()
        want = topk_confidence_ref(static_logits, anchor, 4, gamma2, MASK_TOKEN)
        for i in (0, 3, 4):  # tokens, branch_len, vp_input_ids
            assert torch.equal(outs[i], want[i])
        assert torch.allclose(outs[1], want[1], rtol=16 * EPS32, atol=0)
