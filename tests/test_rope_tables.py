"""rope_tables (one launch) vs rope_tables_ref (torch's multiply, cos, sin[, scaling]) on the
interpreter and the GPU, and Rope.forward's dispatch to it.

Tolerances: the kernel does torch's float32 ops in torch's order (position to float32, one multiply,
cos, sin, one scaling multiply, FMA contraction off). On the GPU both use libdevice-style cosf/sinf
(within an ulp of each other, bounded here by 2 ulp); on the CPU the interpreter's numpy cos/sin
and torch's vectorised CPU ones may differ in the last ulps (|cos|, |sin| <= 1: 2^-23 of absolute
error per ulp; bounded by 4).
"""

from __future__ import annotations

import pytest
import torch

from d2sd import ops
from d2sd.models.layers import Rope
from kernels.rope import rope_tables, rope_tables_ref
from tests.conftest import interpreting

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
ULP = 2.0**-23  # of values in [0.5, 1]; smaller values have finer ulps


def _tolerance(positions: torch.Tensor, scaling: float) -> float:
    return (2 if positions.is_cuda else 4) * ULP * max(scaling, 1.0)


def _inv_freq(head_dim: int, theta: float = 100_000.0) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return (1.0 / theta**exponents).to(DEVICE)


def _check(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
    cos, sin = rope_tables(positions, inv_freq, scaling)
    cos_ref, sin_ref = rope_tables_ref(positions, inv_freq, scaling)
    assert cos.shape == sin.shape == (*positions.shape, inv_freq.shape[0])
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
    tol = _tolerance(positions, scaling)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=tol)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "shape, head_dim",
    [
        ((1, 1), 64),  # an AR step: cache_len.view(1, 1)
        ((16,), 128),  # a drafter's context rows
        ((3, 5, 7), 64),  # more leading dims than the kernel walks
        ((2, 70), 32),  # rows spanning several programs
    ],
)
def test_matches_reference(shape, head_dim, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 40_000, shape, generator=gen, dtype=dtype).to(DEVICE)
    _check(positions, _inv_freq(head_dim))


def test_expanded_positions_and_scaling() -> None:
    # a verify's positions: cache_len + [0, T) expanded over B branches (stride 0), YaRN-like scale
    positions = (torch.arange(16, device=DEVICE) + 1234).view(1, 16).expand(5, 16)
    _check(positions, _inv_freq(64), 1.0)
    _check(positions, _inv_freq(128, 1_000_000.0), 1.25)


def test_rope_module_dispatches_to_the_kernel() -> None:
    rope = Rope(_inv_freq(64).cpu(), attention_scaling=1.5).to(DEVICE)
    positions = torch.arange(9, device=DEVICE).view(1, 9) * 1000
    with ops.cpu_kernels():
        cos, sin = rope(positions)
    cos_ref, sin_ref = rope_tables_ref(positions, rope.inv_freq, 1.5)
    tol = _tolerance(positions, 1.5)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=tol)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "change, message",
    [
        ("float_positions", "positions: int"),
        ("odd_half", "power of two"),
    ],
)
def test_rejects_bad_inputs(change: str, message: str) -> None:
    positions = torch.arange(4, device=DEVICE)
    inv_freq = _inv_freq(64)
    if change == "float_positions":
        positions = positions.float()
    else:
        inv_freq = inv_freq[:24].contiguous()
    with pytest.raises(AssertionError, match=message):
        rope_tables(positions, inv_freq)


def test_opcheck() -> None:
    positions = torch.arange(6, device=DEVICE).view(2, 3)
    torch.library.opcheck(torch.ops.d2sd.rope_tables.default, (positions, _inv_freq(32), 1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_gpu_matches_reference(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 200_000, (7, 33), generator=gen, dtype=dtype).cuda()
    for head_dim in (64, 128):
        _check(positions, _inv_freq(head_dim).cuda())
        _check(positions[:1].expand(5, 33), _inv_freq(head_dim).cuda(), 0.75)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_new_positions() -> None:
    positions = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    inv_freq = _inv_freq(64)
    rope_tables(positions, inv_freq)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cos, sin = rope_tables(positions, inv_freq)
    for position in (0, 17, 8191, 123_456):
        positions.fill_(position)
        graph.replay()
        cos_ref, sin_ref = rope_tables_ref(positions, inv_freq)
        torch.testing.assert_close(cos, cos_ref, rtol=0, atol=2 * ULP, msg=str(position))
        torch.testing.assert_close(sin, sin_ref, rtol=0, atol=2 * ULP, msg=str(position))
