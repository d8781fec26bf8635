"""emit (one launch) vs emit_ref (the torch ops it replaces), on the interpreter and the GPU: the
output bookkeeping alone (what an AR step without a cache would do), with the target cache's
length, and with the drafters' pending context rows too (a d2sd cycle)."""

from __future__ import annotations

import pytest
import torch

from kernels.emit import emit, emit_ref
from tests.conftest import interpreting

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


NAMES = ("out_tokens", "out_len", "cycle", "report", "anchor", "cache_len", "ctx_positions")
NAMES += ("ctx_num_valid",)


def _state(capacity: int, length: int, out_len: int, cycle: int, cache: str = "none"):
    """The buffers emit writes; cache: "none", "length" (cache_len) or "context" (and the ctx)."""
    out_tokens = torch.randint(0, 1000, (capacity,), device=DEVICE)
    report = torch.randint(0, 1000, (1 + length + 2,), device=DEVICE)
    out_len_t = torch.tensor([out_len], dtype=torch.int32, device=DEVICE)
    cycle_t = torch.tensor([cycle], dtype=torch.int32, device=DEVICE)
    anchor = torch.full((1,), -7, device=DEVICE)
    state = [out_tokens, out_len_t, cycle_t, report, anchor]
    if cache != "none":
        state.append(torch.tensor([1000 + length], dtype=torch.int32, device=DEVICE))
    if cache == "context":
        state.append(torch.full((length,), -3, device=DEVICE))
        state.append(torch.zeros(1, dtype=torch.int32, device=DEVICE))
    return tuple(state)


@pytest.mark.parametrize(
    "length, num_new, out_len, capacity",
    [
        (1, 1, 0, 8),  # an AR step
        (16, 5, 37, 80),  # a verify block, partly accepted
        (17, 17, 10, 27),  # every token accepted, the buffer exactly full
        (3, 1, 0, 3),  # L = capacity
    ],
)
@pytest.mark.parametrize("cache", ["none", "length", "context"])
def test_matches_reference(
    length: int, num_new: int, out_len: int, capacity: int, cache: str
) -> None:
    tokens = torch.randint(0, 50_000, (length,), device=DEVICE)
    num_new_t = torch.tensor([num_new], dtype=torch.int32, device=DEVICE)
    got = _state(capacity, length, out_len, 4, cache)
    ref = tuple(t.clone() for t in got)
    emit(tokens, num_new_t, *got)
    emit_ref(tokens, num_new_t, *ref)
    for name, g, r in zip(NAMES, got, ref):
        assert torch.equal(g, r), (name, g, r)
    assert int(got[1]) == out_len + num_new and int(got[2]) == 5
    assert int(got[4]) == int(tokens[num_new - 1])
    if cache != "none":
        assert int(got[5]) == 1000 + length + num_new
    if cache == "context":
        assert got[6].tolist() == list(range(1000 + length, 1000 + 2 * length))
        assert int(got[7]) == num_new


def test_skips_rows_past_the_buffer() -> None:
    # the scratch tail may run past the buffer: those rows are dropped, the rest written
    tokens = torch.arange(6, device=DEVICE)
    out_tokens, out_len, cycle, report, anchor = _state(8, 6, 5, 0)
    before = out_tokens.clone()
    num_new = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    emit(tokens, num_new, out_tokens, out_len, cycle, report, anchor)
    assert torch.equal(out_tokens[:5], before[:5]) and out_tokens[5:].tolist() == [0, 1, 2]
    assert int(out_len) == 7 and report[:7].tolist() == [2, 0, 1, 2, 3, 4, 5]
    assert int(anchor) == 1


@pytest.mark.gpu
def test_gpu_cuda_graph_replays() -> None:
    tokens = torch.zeros(4, dtype=torch.int64, device="cuda")
    num_new = torch.ones(1, dtype=torch.int32, device="cuda")
    out_tokens, out_len, cycle, report, anchor = _state(64, 4, 0, 0)
    emit(tokens, num_new, out_tokens, out_len, cycle, report, anchor)  # compile outside capture
    out_len.zero_()
    cycle.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        emit(tokens, num_new, out_tokens, out_len, cycle, report, anchor)
    out_len.zero_()
    cycle.zero_()
    for step in range(5):
        tokens.copy_(torch.arange(4, device="cuda") + 10 * step)
        num_new.fill_(step % 3 + 1)
        graph.replay()
    assert int(cycle) == 5 and int(out_len) == sum(s % 3 + 1 for s in range(5))
    assert int(anchor) == 41  # the last replay: tokens 40..43, num_new 2: tokens[1]
