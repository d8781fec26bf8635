"""Decoding: `GenerationConfig`, `GenerationResult` and the `Decoder` with its generators.

Modes (`GenerationConfig.mode`):
- `ar`: the honest baseline. Static-cache autoregressive decoding, one 1-token target step per
  token, sampled with kernels.sample_tokens (the sampler verification uses too).
- `dflash`: one DFlash draft of gamma = `block_size` per cycle, verified as one causal block
  (B = 1, T = gamma).
- `d2sd`: dual draft. DFlash draft, top-K branch points by r(i), K VP-drafter branches of
  gamma2 = `block_size_2`, all K+1 verified in one target forward (`verify_layout` "branches":
  B = K+1 causal blocks over the shared prefix; "tree": the deduplicated tree, B = 1, T = (K+1)*gamma2;
  targets with sliding-window layers always verify as "branches", see `Decoder.sliding_window`).
- `dflash+samples` (ablation): as d2sd, but the K branches keep t_1 .. t_i and then sample each later
  position from the first draft's distribution at temperature 1 (from a generator independent of the
  target's draws) instead of running the VP drafter.
- `dflash-dflash` (ablation): as d2sd, with the DFlash drafter reused as the second drafter.

Lossless: drafts are deterministic (argmax; the ablation's samples never read the target's draws)
and the target is sampled at every depth of the tree with one fresh uniform per depth per cycle,
with the same warpers as `ar` (d2sd/sampling.py, kernels.accept). Greedy output equals `ar`'s
exactly in fp32; in bf16 use `assert_greedy_equal_up_to_near_tie`.

Generation: prefill (eager; the first new token is sampled from the prompt's last logits), then
cycles of fixed-shape steps (d2sd/steps.py) until a stop (d2sd/sampling.py). On CUDA each step is a
CUDA graph (d2sd/graphs.py), captured on the first generation of a configuration in a dry cycle,
and the host reads a cycle's report (tokens emitted) while the next cycle already runs: the host
syncs once per cycle, between steps, and the run-ahead cycle is discarded at a stop. On the CPU the
same steps run eagerly, one cycle at a time.

Timing: `stage_ms` totals per stage of the counted cycles (CUDA events around each stage, read at
the end; `time.perf_counter` on the CPU): draft1 (drafter context extension + first draft),
select, draft2 (VP context extension + second draft, or the ablation's sampling), verify (tree
construction + target forward), accept_commit; `ar`: step. `prefill` is the prompt's forward
and the drafters' context extension. `wall_s` covers the whole call.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from d2sd import ops, steps
from d2sd.errors import D2SDError
from d2sd.graphs import StepGraphs
from d2sd.sampling import (
    StopChecker,
    branch_uniforms,
    encode_prompt,
    eos_token_ids,
    target_uniforms,
)

__all__ = [
    "LAYOUTS",
    "MODES",
    "Decoder",
    "GenerationConfig",
    "GenerationResult",
    "assert_greedy_equal_up_to_near_tie",
    "encode_prompt",
    "greedy_top2_gaps",
    "near_tie_noise",
    "non_greedy_tokens",
]

MODES = ("ar", "dflash", "d2sd", "dflash+samples", "dflash-dflash")
DUAL_MODES = ("d2sd", "dflash+samples", "dflash-dflash")
LAYOUTS = ("branches", "tree")
# the first token comes from the prefill; row 0 of the target's uniforms draws it, cycle c reads row c
FIRST_CYCLE_ROW = 1
# prompt chunk of the eager prefill (the target cache keeps at least this many local rows)
PREFILL_CHUNK = 256
# Triton autotunes the attention kernels per power-of-two bucket of query rows, up to 1024 rows
# (kernels._attention.rows_bucket); prefill chunks and drafter context extensions of these lengths
# meet every bucket a prompt can: 1, 2, 3, 4, 6, 8, 12, ..., 768, 1024 (consecutive lengths differ
# by at most 2x, so each bucket of n x group rows holds one of them, whatever the GQA group)
WARM_UP_PROMPT_LENS = tuple(sorted(n for k in range(11) for n in (1 << k, 3 << k) if n <= 1024))
WARM_UP_TOKENS = 32


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode (see the module docstring for the modes). `block_size` is gamma,
    `block_size_2` gamma2 (>= gamma), `topk` the number K of second-draft branches (< gamma).
    `cuda_graphs` replays each step from a CUDA graph on CUDA; steps run eagerly anyway on the
    CPU and with a backend that cannot be captured (FlashInfer's)."""

    mode: str = "d2sd"
    block_size: int = 16
    block_size_2: int = 16
    topk: int = 4
    verify_layout: str = "branches"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.verify_layout not in LAYOUTS:
            problems.append(f"verify_layout must be one of {', '.join(LAYOUTS)}")
        if self.mode != "ar" and self.block_size < 2:
            problems.append("block_size must be >= 2")
        if self.mode in DUAL_MODES:
            if self.block_size_2 < self.block_size:
                problems.append("block_size_2 must be >= block_size")
            if not 1 <= self.topk < self.block_size:
                problems.append(
                    "topk must be in [1, block_size - 1] (one branch per prefix length)"
                )
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be >= 1")
        if problems:
            raise D2SDError("bad generation config: " + "; ".join(problems))


@dataclass
class GenerationResult:
    """One generation: the new tokens (up to and including the first stop), tokens committed per
    cycle, total milliseconds per stage, wall seconds and the number of cycles (ar: steps)."""

    tokens: list[int]
    accept_lengths: list[int]
    stage_ms: dict[str, float]
    wall_s: float
    num_cycles: int

    @property
    def mean_accept_length(self) -> float:
        """tau: tokens committed per cycle (0 when no cycle ran)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0


@dataclass(frozen=True)
class _Plan:
    """The fixed shapes and switches of one configuration: the key of its CUDA graphs."""

    mode: str
    gamma: int  # first-draft block (0 for ar)
    length: int  # verify block length T (1 for ar)
    num_branches: int  # K (0 unless dual)
    layout: str
    sampling: steps.Sampling

    @classmethod
    def of(cls, config: GenerationConfig, *, tree_ok: bool = True) -> _Plan:
        sampling = steps.Sampling(config.temperature, config.top_k, config.top_p)
        if config.mode == "ar":
            return cls("ar", 0, 1, 0, "branches", sampling)
        if config.mode == "dflash":
            # one block: the tree of a single branch is the causal chain
            return cls("dflash", config.block_size, config.block_size, 0, "branches", sampling)
        return cls(
            config.mode,
            config.block_size,
            config.block_size_2,
            config.topk,
            config.verify_layout if tree_ok else "branches",
            sampling,
        )

    @property
    def stages(self) -> tuple[str, ...]:
        if self.mode == "ar":
            return ("step",)
        if self.mode == "dflash":
            return ("draft1", "verify", "accept_commit")
        return ("draft1", "select", "draft2", "verify", "accept_commit")

    @property
    def shape_key(self) -> tuple:
        """What the step graphs except the sampling-dependent ones depend on."""
        return (self.mode, self.gamma, self.length, self.num_branches, self.layout)

    def stage_key(self, stage: str) -> tuple:
        sampled = stage in ("step", "accept_commit")
        return (*self.shape_key, stage, self.sampling if sampled else None)

    @property
    def verify_rows(self) -> int:
        return max(1, self.num_branches + 1) * self.length


class _StageTimer:
    """Marks stage boundaries of each cycle: CUDA events (read at the end) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cycles: list[list[tuple[str, Any]]] = []

    def start_cycle(self) -> None:
        self.cycles.append([("", self._now())])

    def mark(self, stage: str) -> None:
        self.cycles[-1].append((stage, self._now()))

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def totals_ms(self, num_cycles: int) -> dict[str, float]:
        """Milliseconds per stage over the first `num_cycles` cycles (after a device sync)."""
        totals: dict[str, float] = {}
        for marks in self.cycles[:num_cycles]:
            for (_, begin), (stage, end) in itertools.pairwise(marks):
                elapsed = begin.elapsed_time(end) if self.cuda else (end - begin) * 1e3
                totals[stage] = totals.get(stage, 0.0) + elapsed
        return totals


class _ReportReader:
    """Reads each cycle's report to the host; on CUDA without blocking the stream (pinned
    double buffers + an event), so the next cycle can be queued before the report is read."""

    def __init__(self, report: torch.Tensor, depth: int) -> None:
        self.report = report
        self.cuda = report.is_cuda
        count = depth + 1
        self._buffers = [
            torch.empty(report.shape, dtype=report.dtype, pin_memory=self.cuda)
            for _ in range(count)
        ]
        self._next = 0

    def submit(self) -> Any:
        if not self.cuda:
            return self.report.tolist()
        buffer = self._buffers[self._next]
        self._next = (self._next + 1) % len(self._buffers)
        buffer.copy_(self.report, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buffer, event

    def fetch(self, handle: Any) -> list[int]:
        if not self.cuda:
            return handle
        buffer, event = handle
        event.synchronize()
        return buffer.tolist()


class Decoder:
    """Generates with a target and optional drafters; `generate(prompt_ids, config)`.

    `draft` is the DFlash drafter (needed by every mode but `ar`), `vp_draft` the VP drafter
    (`d2sd` only; the two must tap the same target layers). Caches hold `max_len` rows
    (prompt + new tokens + two cycles of slack). Buffers and CUDA graphs are kept across calls.
    """

    def __init__(
        self,
        target: Any,
        tokenizer: Any = None,
        draft: Any = None,
        vp_draft: Any = None,
        *,
        max_len: int = 4096,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.vp_draft = vp_draft
        self.max_len = max_len
        self.device = torch.device(target.device)
        self.eos_ids = eos_token_ids(
            tokenizer, getattr(getattr(target, "hf", None), "generation_config", None)
        )
        # tree verification places node t at index position cache_len + t for the attention
        # window (ARCHITECTURE.md), not at cache_len + depth: with sliding-window layers it would
        # hide keys that AR sees, so such targets verify in the branches layout
        spec = getattr(target, "spec", None)
        self.sliding_window = any(w >= 0 for w in getattr(spec, "window_left", ()))
        # cycles queued ahead of the host's reading of the reports: on CUDA the GPU then never
        # waits for the host between cycles; on the CPU every step runs synchronously anyway
        self.run_ahead = 1 if self.device.type == "cuda" else 0
        # a backend that reads device values on the host (FlashInfer's) cannot be captured
        self.graph_capturable = all(
            getattr(getattr(model, "backend", None), "graph_capturable", True)
            for model in (target, draft, vp_draft)
        )
        self._graphs: dict[bool, StepGraphs] = {}
        self._caches: dict[str, Any] = {}
        self._states: dict[tuple, steps.LoopState] = {}
        self._warmed_modes: set[str] = set()  # modes whose prefill row buckets are tuned
        self._taps: tuple[int, ...] = ()
        self._mask_id = 0
        if draft is not None:
            self._mask_id = int(draft.mask_token_id)
            self._taps = tuple(draft.target_layer_ids)
        if vp_draft is not None and draft is not None:
            vp_taps = tuple(vp_draft.target_layer_ids)
            if vp_taps != self._taps:
                raise D2SDError(
                    f"the drafters tap different target layers: {self._taps} vs {vp_taps}"
                )

    # -- public --------------------------------------------------------------------------------

    @torch.no_grad()
    def warm_up(self, prompt_ids: Sequence[int], config: GenerationConfig) -> None:
        """Untimed generations after which a timed one of `config` compiles, captures and
        autotunes nothing: one short generation on `prompt_ids` (kernels, graphs, buffers), and
        on CUDA, once per mode, a 2-token generation per prompt length of WARM_UP_PROMPT_LENS
        that fits (any ids: tuning depends on shapes only). Without these, the first prompt whose
        prefill meets a new row bucket pays Triton's autotuning inside its timing, and whichever
        method runs first on a dataset looks slower (measured on the H200: ~25 ms per prompt)."""
        short = replace(config, max_new_tokens=min(WARM_UP_TOKENS, config.max_new_tokens))
        self.generate(prompt_ids, short)
        if self.device.type != "cuda" or config.mode in self._warmed_modes:
            return
        two = replace(config, max_new_tokens=2)
        for length in self.warm_up_prompt_lens(two):
            self.generate(list(itertools.islice(itertools.cycle(prompt_ids), length)), two)
        self._warmed_modes.add(config.mode)

    def warm_up_prompt_lens(self, config: GenerationConfig) -> list[int]:
        """The lengths of WARM_UP_PROMPT_LENS that a generation of `config` fits in max_len."""
        slack = self._slack(_Plan.of(config, tree_ok=not self.sliding_window))
        room = self.max_len - config.max_new_tokens - slack
        return [length for length in WARM_UP_PROMPT_LENS if length <= room]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        """Decode `prompt_ids` under `config`; see the module docstring."""
        plan = _Plan.of(config, tree_ok=not self.sliding_window)
        self._check(plan, len(prompt_ids), config)
        state = self._state(plan)
        graphs = self._graph_runner(config.cuda_graphs and self.graph_capturable)
        self._capture(plan, state, graphs)
        checker = StopChecker(
            eos_ids=self.eos_ids,
            stop_strings=config.stop_strings,
            max_new_tokens=config.max_new_tokens,
            tokenizer=self.tokenizer,
        )
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        wall_start = time.perf_counter()
        prefill_start = time.perf_counter()
        tokens = [self._prefill(plan, state, prompt_ids, config)]
        stage_ms = {"prefill": (time.perf_counter() - prefill_start) * 1e3}
        stop = checker.first_stop(tokens, 0)
        timer = _StageTimer(self.device)
        accept_lengths: list[int] = []
        if stop is None:
            stop = self._decode_cycles(plan, state, graphs, timer, checker, tokens, accept_lengths)
        del tokens[stop:]
        if cuda:
            torch.cuda.synchronize(self.device)
        wall_s = time.perf_counter() - wall_start
        stage_ms.update(timer.totals_ms(len(accept_lengths)))
        return GenerationResult(tokens, accept_lengths, stage_ms, wall_s, len(accept_lengths))

    # -- the loop ------------------------------------------------------------------------------

    def _decode_cycles(
        self,
        plan: _Plan,
        state: steps.LoopState,
        graphs: StepGraphs,
        timer: _StageTimer,
        checker: StopChecker,
        tokens: list[int],
        accept_lengths: list[int],
    ) -> int:
        """Run cycles until a stop; returns the output length to keep. `self.run_ahead` cycles run
        ahead of the host's reading of the reports (their results are dropped at a stop)."""
        run_ahead = self.run_ahead
        reader = _ReportReader(state.report, run_ahead)
        in_flight: deque = deque()
        while True:
            timer.start_cycle()
            self._cycle(plan, state, graphs, timer)
            in_flight.append(reader.submit())
            if len(in_flight) <= run_ahead:
                continue
            report = reader.fetch(in_flight.popleft())
            num_new = report[0]
            checked = len(tokens)
            tokens.extend(report[1 : 1 + num_new])
            accept_lengths.append(num_new)
            stop = checker.first_stop(tokens, checked)
            if stop is not None:
                return stop

    def _cycle(
        self, plan: _Plan, state: steps.LoopState, graphs: StepGraphs, timer: _StageTimer | None
    ) -> None:
        """Queue one cycle's steps (graph replays on CUDA), marking each stage's end.

        Each step is a zero-argument callable over static tensors; `run` returns its outputs, which
        under graphs are the capture's static tensors, so the closures of the later steps (called
        only when they are captured or run eagerly) read exactly the tensors every replay rewrites.
        """
        target, draft, state_cache = self.target, self.draft, state.target_cache
        mask_id, sampling = self._mask_id, plan.sampling

        def run(stage: str, step: Callable[[], Any]) -> Any:
            outputs = graphs.run(plan.stage_key(stage), step)
            if timer is not None:
                timer.mark(stage)
            return outputs

        if plan.mode == "ar":
            run("step", lambda: steps.ar_step(target, sampling, state))
            return

        def first_draft() -> torch.Tensor:
            steps.extend_context(draft, state.draft_cache, state)
            return steps.draft(
                draft, state.draft_cache, state.anchor, state_cache.cache_len, mask_id, plan.gamma
            )

        if plan.mode == "dflash":
            cand_tokens = run(
                "draft1",
                lambda: steps.candidates(
                    state.anchor, first_draft()[0, 1:].argmax(dim=-1), None, plan.length, mask_id
                ),
            )
            branch_len = None
        else:
            draft_logits = run("draft1", first_draft)
            selection = run(
                "select",
                lambda: steps.select(
                    draft_logits, state.anchor, plan.num_branches, plan.length, mask_id
                ),
            )
            cand_tokens = run(
                "draft2", lambda: self._second_draft(plan, state, draft_logits, selection)
            )
            branch_len = selection.branch_len
        verified = run(
            "verify",
            lambda: steps.verify(
                target,
                state_cache,
                cand_tokens,
                layout=plan.layout,
                branch_len=branch_len,
                taps=self._taps,
            ),
        )
        run(
            "accept_commit",
            lambda: steps.commit(verified, steps.accept(verified, sampling, state), state),
        )

    def _second_draft(
        self,
        plan: _Plan,
        state: steps.LoopState,
        draft_logits: torch.Tensor,
        selection: steps.Selection,
    ) -> torch.Tensor:
        """cand_tokens [K+1, gamma2] of a dual mode: the padded first draft and the K branches."""
        cache_len = state.target_cache.cache_len
        if plan.mode == "d2sd":
            steps.extend_context(self.vp_draft, state.vp_cache, state)
            branches = steps.draft2(self.vp_draft, state.vp_cache, selection, cache_len)
        elif plan.mode == "dflash-dflash":
            branches = steps.draft2(self.draft, state.draft_cache, selection, cache_len)
        else:  # dflash+samples
            branches = steps.sample_branches(
                draft_logits, selection, state.branch_uniforms, state.cycle, self._mask_id
            )
        return steps.candidates(
            state.anchor, selection.draft_tokens, branches, plan.length, self._mask_id
        )

    # -- prefill, buffers, graphs --------------------------------------------------------------

    def _prefill(
        self,
        plan: _Plan,
        state: steps.LoopState,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
    ) -> int:
        """Reset the state, commit the prompt, extend the drafters' contexts, draw the uniforms and
        sample the first new token (the first anchor). Eager, with host syncs."""
        device = self.device
        state.reset()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
        taps = self._taps if plan.mode != "ar" else ()
        last_logits, prompt_taps = self.target.prefill(ids, state.target_cache, taps=taps)
        if plan.mode != "ar":
            positions = torch.arange(ids.shape[1], device=device)
            count = torch.tensor([ids.shape[1]], dtype=torch.int32, device=device)
            for drafter, cache in self._drafter_caches(plan, state):
                drafter.extend_context(prompt_taps, positions, cache, count)
        # a cycle emits >= 1 token: max_new_tokens - 1 cycles at most, plus the run-ahead ones
        rows = FIRST_CYCLE_ROW + config.max_new_tokens + self.run_ahead
        first_uniform = None
        if not plan.sampling.greedy:
            table = target_uniforms(config.seed, rows, plan.length, device)
            state.uniforms[:rows].copy_(table)
            first_uniform = table[0, :1]
        if state.branch_uniforms is not None:
            state.branch_uniforms[:rows].copy_(
                branch_uniforms(config.seed, rows, *state.branch_uniforms.shape[1:], device)
            )
        first = ops.sample_tokens(
            last_logits.reshape(1, -1),
            first_uniform,
            temperature=plan.sampling.temperature,
            top_k=plan.sampling.top_k,
            top_p=plan.sampling.top_p,
        )
        state.anchor.copy_(first)
        state.out_tokens[:1].copy_(first)
        state.out_len.fill_(1)
        state.cycle.fill_(FIRST_CYCLE_ROW)
        return int(first.item())

    def _drafter_caches(self, plan: _Plan, state: steps.LoopState) -> list[tuple[Any, Any]]:
        """(drafter, cache) of every drafter whose context the cycles extend."""
        pairs = [(self.draft, state.draft_cache)]
        if plan.mode == "d2sd":
            pairs.append((self.vp_draft, state.vp_cache))
        return pairs

    def _check(self, plan: _Plan, prompt_len: int, config: GenerationConfig) -> None:
        if prompt_len < 1:
            raise D2SDError("the prompt must hold at least one token")
        if plan.mode != "ar" and self.draft is None:
            raise D2SDError(f"mode {plan.mode!r} needs a DFlash drafter (draft=...)")
        if plan.mode == "d2sd" and self.vp_draft is None:
            raise D2SDError("mode 'd2sd' needs a VP drafter (vp_draft=...)")
        slack = self._slack(plan)
        if prompt_len + config.max_new_tokens + slack > self.max_len:
            raise D2SDError(
                f"prompt ({prompt_len}) + max_new_tokens ({config.max_new_tokens}) + slack "
                f"({slack}) exceeds the decoder's max_len {self.max_len}"
            )

    def _slack(self, plan: _Plan) -> int:
        """Cache rows past prompt + max_new_tokens: the last counted cycle and each run-ahead one
        may commit a whole block past the stop."""
        return (1 + self.run_ahead) * plan.length + 1

    def _graph_runner(self, enabled: bool) -> StepGraphs:
        if enabled not in self._graphs:
            self._graphs[enabled] = StepGraphs(self.device, enabled=enabled)
        return self._graphs[enabled]

    def _capture(self, plan: _Plan, state: steps.LoopState, graphs: StepGraphs) -> None:
        """Capture the plan's missing step graphs in one dry cycle on a throwaway state (warm-up
        and capture execute the steps), then reset the state."""
        if not graphs.enabled or all(plan.stage_key(s) in graphs for s in plan.stages):
            return
        state.reset()
        self._cycle(plan, state, graphs, None)
        torch.cuda.synchronize(self.device)
        state.reset()

    def _cache(self, role: str, model: Any, batch: int, tokens: int) -> Any:
        """The role's cache ("target", "draft", "vp"), reallocated (dropping every state and graph
        built on the old one) when a configuration needs more local rows than it has."""
        cache = self._caches.get(role)
        if cache is None or cache.local_rows < batch * tokens:
            if cache is not None:
                self._states.clear()
                for graphs in self._graphs.values():
                    graphs.clear()
            cache = self._caches[role] = model.allocate_cache(self.max_len, batch, tokens)
        return cache

    def _state(self, plan: _Plan) -> steps.LoopState:
        """The plan's loop state (kept per shape, with its caches)."""
        target_cache = self._cache("target", self.target, 1, max(plan.verify_rows, PREFILL_CHUNK))
        draft_cache = vp_cache = None
        if plan.mode != "ar":
            draft_rows = plan.gamma
            if plan.mode == "dflash-dflash":
                draft_rows = max(draft_rows, plan.num_branches * plan.length)
            draft_cache = self._cache("draft", self.draft, 1, draft_rows)
        if plan.mode == "d2sd":
            vp_cache = self._cache("vp", self.vp_draft, plan.num_branches, plan.length)
        # a reallocation above clears the states: look up afterwards
        state = self._states.get(plan.shape_key)
        if state is not None:
            return state
        device, length = self.device, plan.length
        zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)
        rows = self.max_len + 1 + self.run_ahead
        state = steps.LoopState(
            anchor=zeros(1, dtype=torch.int64),
            target_cache=target_cache,
            draft_cache=draft_cache,
            vp_cache=vp_cache,
            ctx_hidden=zeros(
                length, self.target.hidden_size * len(self._taps), dtype=self.target.dtype
            ),
            ctx_positions=zeros(length, dtype=torch.int64),
            ctx_num_valid=zeros(1, dtype=torch.int32),
            out_tokens=zeros(self.max_len + 2 * length + 1, dtype=torch.int64),
            out_len=zeros(1, dtype=torch.int32),
            cycle=zeros(1, dtype=torch.int32),
            uniforms=zeros(rows, length, dtype=torch.float32),
            branch_uniforms=(
                zeros(rows, plan.num_branches, plan.gamma - 1, dtype=torch.float32)
                if plan.mode == "dflash+samples"
                else None
            ),
            report=zeros(1 + length, dtype=torch.int64),
        )
        self._states[plan.shape_key] = state
        return state


# -- bf16 greedy equality ------------------------------------------------------------------------


def near_tie_noise(dtype: torch.dtype, logit_scale: float) -> float:
    """The logit difference a `dtype` forward may show between two equivalent computations (a
    1-token step vs a many-token verify): 4 ulp-sized relative errors of the largest logit.
    fp32 gives ~1e-6 * scale; bf16 (eps 2^-7) ~0.03 * scale."""
    return 4.0 * torch.finfo(dtype).eps * logit_scale


@torch.no_grad()
def _teacher_forced_logits(
    target: Any, prompt_ids: Sequence[int], tokens: Sequence[int]
) -> torch.Tensor:
    """The target's logits [n, V] at the positions that predict tokens[0 .. n-1], from one eager
    teacher-forced pass over prompt + tokens[:-1] (chunked prefill into a scratch cache)."""
    sequence = list(prompt_ids) + list(tokens)
    cache = target.allocate_cache(len(sequence) + 1, 1, min(len(sequence), PREFILL_CHUNK))
    ids = torch.tensor([sequence[:-1]], dtype=torch.int64, device=target.device)
    chunks = []
    for start in range(0, ids.shape[1], cache.local_rows):
        chunk = ids[:, start : start + cache.local_rows]
        positions = torch.arange(start, start + chunk.shape[1], device=ids.device)[None]
        logits, _ = target.forward(chunk, positions, cache, causal=True, taps=())
        chunks.append(logits[0])
        rows = chunk.shape[1]
        cache.k_cache[:, start : start + rows] = cache.k_local[:, :rows]
        cache.v_cache[:, start : start + rows] = cache.v_local[:, :rows]
        cache.cache_len += rows
    return torch.cat(chunks)[len(prompt_ids) - 1 :]


def greedy_top2_gaps(
    target: Any, prompt_ids: Sequence[int], tokens: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced top-1 minus top-2 logit at each new position, and the largest |logit| there.

    Returns (gap [n], scale [n]) float32 on the CPU for the positions that predict tokens[0 .. n-1].
    """
    logits = _teacher_forced_logits(target, prompt_ids, tokens)
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).float().cpu(), logits.abs().amax(dim=-1).float().cpu()


def non_greedy_tokens(target: Any, prompt_ids: Sequence[int], tokens: Sequence[int]) -> int:
    """How many of `tokens` the target would not pick greedily after prompt + the tokens before
    them, up to its dtype's rounding: teacher-forced, a token counts when its logit is below the
    top-1 logit by more than `near_tie_noise` at that position.

    This is losslessness checked on the output itself: unlike a comparison with a separate AR run,
    it stays meaningful after a bf16 near tie has (legitimately) sent the two runs apart."""
    logits = _teacher_forced_logits(target, prompt_ids, tokens).float()
    chosen = logits.gather(1, torch.tensor(list(tokens), device=logits.device)[:, None])[:, 0]
    margin = logits.amax(dim=-1) - chosen
    noise = near_tie_noise(target.dtype, 1.0) * logits.abs().amax(dim=-1)
    return int((margin > noise).sum())


def assert_greedy_equal_up_to_near_tie(
    reference: Sequence[int],
    candidate: Sequence[int],
    gaps: torch.Tensor,
    noise: torch.Tensor | float,
) -> int:
    """Assert that `candidate` equals the greedy `reference` up to the first near tie.

    gaps [n]: the reference's top-2 logit gap at each position (greedy_top2_gaps); noise: scalar or
    [n] (near_tie_noise). Positions are compared in order while the gap is at least the noise; the
    first near tie ends the comparison (there either token is a valid greedy choice, and the two
    continuations legitimately diverge after it). A shorter output (a stop) ends it as well.
    Returns the number of positions compared.
    """
    noise = torch.as_tensor(noise, dtype=torch.float32).expand(len(gaps))
    limit = min(len(reference), len(candidate), len(gaps))
    for index in range(limit):
        if gaps[index] < noise[index]:
            return index
        assert candidate[index] == reference[index], (
            f"greedy mismatch at new token {index}: {candidate[index]} != {reference[index]} "
            f"(top-2 gap {float(gaps[index]):.4g} >= noise {float(noise[index]):.4g}); "
            f"reference {list(reference[: index + 1])}, candidate {list(candidate[: index + 1])}"
        )
    return limit
