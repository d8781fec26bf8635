"""CUDA-graph capture and replay of the decode loop's fixed-shape steps; eager elsewhere.

A step is a zero-argument callable that reads and writes static device tensors (the `LoopState`,
the caches, and the outputs of the steps before it) and returns its outputs (any pytree of
tensors). `StepGraphs.run(key, step)` captures the step the first time it sees `key` and replays
the graph afterwards, returning the tensors the capture produced: they are rewritten in place by
every replay, so the next step can be captured against them. On the CPU, or with graphs off, `run`
simply calls the step.

Capture protocol (torch.cuda.graphs): the step first runs `warmup` times eagerly on a side stream
(Triton autotuning, cuBLAS workspaces and lazy allocations happen there, outside the capture), then
is captured, then replayed once so that its outputs hold real values before the next step's warm-up
reads them. Warm-up and that replay execute the step for real, so steps that advance state (commit,
context extension) must be captured on a throwaway state: the decoder captures all steps of a
configuration in one dry cycle and resets its state afterwards.

All graphs of one `StepGraphs` share a memory pool. That is safe because they are replayed in the
order they were captured (one cycle after another), and a step's outputs stay alive, so no later
capture reuses their memory; an earlier step's temporaries may alias a later step's outputs, which
the next cycle overwrites only after the current cycle has consumed them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["StepGraphs"]


class StepGraphs:
    """Per-key CUDA graphs of decode steps on `device` (eager when `enabled` is False or on CPU)."""

    def __init__(
        self, device: torch.device | str, *, enabled: bool = True, warmup: int = 2
    ) -> None:
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self.warmup = warmup
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def run(self, key: Hashable, step: Callable[[], Any]) -> Any:
        """Replay the graph of `key` (capturing `step` the first time); eager: call `step`."""
        if not self.enabled:
            return step()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(step)
        graph, outputs = entry
        graph.replay()
        return outputs

    def clear(self) -> None:
        """Drop every graph (e.g. after the buffers they were captured on were reallocated)."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def _capture(self, step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = step()
        return graph, outputs
