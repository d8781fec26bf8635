"""emit (one launch) vs emit_ref (the torch ops it replaces), on the interpreter and the GPU."""

from __future__ import annotations

import pytest
import torch

from kernels.emit import emit, emit_ref
from tests.conftest import interpreting

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _state(capacity: int, length: int, out_len: int, cycle: int):
    out_tokens = torch.randint(0, 1000, (capacity,), device=DEVICE)
    report = torch.randint(0, 1000, (1 + length + 2,), device=DEVICE)
    out_len_t = torch.tensor([out_len], dtype=torch.int32, device=DEVICE)
    cycle_t = torch.tensor([cycle], dtype=torch.int32, device=DEVICE)
    return out_tokens, out_len_t, cycle_t, report


@pytest.mark.parametrize(
    "length, num_new, out_len, capacity",
    [
        (1, 1, 0, 8),  # an AR step
        (16, 5, 37, 80),  # a verify block, partly accepted
        (17, 17, 10, 27),  # every token accepted, the buffer exactly full
        (3, 1, 0, 3),  # L = capacity
    ],
)
def test_matches_reference(length: int, num_new: int, out_len: int, capacity: int) -> None:
    tokens = torch.randint(0, 50_000, (length,), device=DEVICE)
    num_new_t = torch.tensor([num_new], dtype=torch.int32, device=DEVICE)
    got = _state(capacity, length, out_len, 4)
    ref = tuple(t.clone() for t in got)
    emit(tokens, num_new_t, *got)
    emit_ref(tokens, num_new_t, *ref)
    for name, g, r in zip(("out_tokens", "out_len", "cycle", "report"), got, ref):
        assert torch.equal(g, r), (name, g, r)
    assert int(got[1]) == out_len + num_new and int(got[2]) == 5


def test_skips_rows_past_the_buffer() -> None:
    # the scratch tail may run past the buffer: those rows are dropped, the rest written
    tokens = torch.arange(6, device=DEVICE)
    out_tokens, out_len, cycle, report = _state(8, 6, 5, 0)
    before = out_tokens.clone()
    emit(
        tokens,
        torch.tensor([2], dtype=torch.int32, device=DEVICE),
        out_tokens,
        out_len,
        cycle,
        report,
    )
    assert torch.equal(out_tokens[:5], before[:5]) and out_tokens[5:].tolist() == [0, 1, 2]
    assert int(out_len) == 7 and report[:7].tolist() == [2, 0, 1, 2, 3, 4, 5]


@pytest.mark.gpu
def test_gpu_cuda_graph_replays() -> None:
    tokens = torch.zeros(4, dtype=torch.int64, device="cuda")
    num_new = torch.ones(1, dtype=torch.int32, device="cuda")
    out_tokens, out_len, cycle, report = _state(64, 4, 0, 0)
    emit(tokens, num_new, out_tokens, out_len, cycle, report)  # compile outside the capture
    out_len.zero_()
    cycle.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        emit(tokens, num_new, out_tokens, out_len, cycle, report)
    out_len.zero_()
    cycle.zero_()
    for step in range(5):
        tokens.copy_(torch.arange(4, device="cuda") + 10 * step)
        num_new.fill_(step % 3 + 1)
        graph.replay()
    assert int(cycle) == 5 and int(out_len) == sum(s % 3 + 1 for s in range(5))
