"""The drafter training loop: frozen target -> tapped hidden states -> blocks -> weighted CE.

One step (all shapes fixed per run, so compiled kernels see one shape):
1. take B records (prompt + the target's response, cut to T = ``max_len`` tokens) from the shards;
   the records of step s are a fixed function of (seed, s): epochs are seeded permutations;
2. run the frozen target over the right-padded [B, T] batch under no_grad (our ``TargetModel``
   layer loop, so the taps are exactly the ones decoding uses; attention by causal SDPA where the
   family allows) and keep its taps at the drafter's ``target_layer_ids`` -> ctx_hidden [B*T, n*H];
3. draw A anchors per record (and VP prefix lengths) from a generator seeded by (seed, s), build
   the blocks (``objectives.build_blocks``) and run the drafter over all B*A blocks in one
   ``forward_packed`` with the block mask (flex_attention on CUDA, dense SDPA on the CPU);
4. ``sum(w * CE) / sum(w)`` on the supervised positions, AdamW (fp32 master weights; bf16 autocast
   on CUDA), linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping.

Outputs:
- ``out/`` (the shipped checkpoint, small): the drafter in z-lab format (``save_pretrained``,
  bf16, without the target's embeddings/lm_head), ``train_meta.json`` (config, data metadata,
  sizes, final metrics) and ``train_log.jsonl`` (one line per ``log_every`` steps: loss,
  per-position accuracy, mean accepted run, lr, throughput).
- ``state_dir/train_state.pt`` (large, not shipped; default ``runs/<out name>``): fp32 master
  weights, optimizer, scheduler and step, written with every save. ``resume=True`` continues from
  it and, because batches depend only on (seed, step), reproduces the uninterrupted run.

Size of the default SmolLM2 drafters (hidden 576, 9/3 heads x 64, vocab 49152), in bf16:
``fc`` (n_taps*576 x 576) + per layer [q, o: 576x576; k, v: 576x192; MLP 3 x 576 x I; norms]
+ norms. One layer, I = 1024, 3 taps: 0.995M + 0.885M + 1.769M + ~2k = 3.65M params = 7.3 MB
(<= 8 MB, the shipping limit). I = 1536 (the target's width) would be 9.1 MB, two layers at
I = 512 9.1 MB, 5 taps at I = 1024 8.6 MB; so 1 layer, I = 1024, taps (1, 14, 27)
(DFlash's spread of tap ids over 30 layers) is the default. The embeddings (28M params) and
lm_head are the target's and are not saved.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from d2sd.train.data import ResponseData, load_response_data
from d2sd.train.objectives import (
    BlockBatch,
    build_blocks,
    default_gamma_decay,
    dense_attend,
    drafter_loss,
    expected_acceptance,
    flex_attend,
)


@dataclass
class TrainConfig:
    """Every knob of a training run (the CLI's flags map one to one; see ``--help``)."""

    objective: str = "dflash"  # "dflash" | "vp"
    target: str = "default"
    data: str = "runs/data-smollm2"
    out: str = "d2sd/checkpoints/smollm2-dflash"
    state_dir: str | None = None  # default runs/<out name>
    block_size: int = 16
    num_layers: int = 1
    intermediate_size: int | None = 1024  # None: the target's
    target_layer_ids: tuple[int, ...] | None = None  # None: z-lab's spread of num_taps ids
    num_taps: int = 3
    mask_token_id: int | None = None  # None: the drafter's default
    steps: int = 2000
    batch_size: int = 64
    batch_tokens: int | None = None  # overrides batch_size: batch_tokens // max_len records
    max_len: int = 512
    anchors_per_seq: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gamma_decay: float | None = None  # None: default_gamma_decay(block_size)
    beta: float = 0.9
    tau: float | None = None  # None: default_gamma_decay(block_size)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # the target's dtype: bf16 on CUDA, fp32 on the CPU
    attention: str = "auto"  # "flex" (CUDA default) | "dense"
    resume: bool = False
    log_every: int = 20
    save_every: int = 500
    init_from_target: bool = False
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def records_per_step(self) -> int:
        if self.batch_tokens:
            return max(1, self.batch_tokens // self.max_len)
        return self.batch_size


# ----------------------------------------------------------------------------- target taps


class CausalSdpaBackend:
    """Attention backend for the target's training forward: B independent sequences, empty
    prefix (cache_len = 0, never read), causal over each branch's own tokens, by SDPA (flash
    attention on CUDA). Only for families without windows or sinks; others use "torch"."""

    name = "sdpa-train"

    def cascade(self, q, k_cache_l, v_cache_l, cache_len, k_local, v_local, **kw):
        assert kw.get("causal") and kw.get("mask") is None and kw.get("window_left", -1) < 0
        group = q.shape[2] // k_local.shape[2]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_local.transpose(1, 2).repeat_interleave(group, dim=1),
            v_local.transpose(1, 2).repeat_interleave(group, dim=1),
            is_causal=True,
            scale=kw.get("sm_scale"),
        )
        return o.transpose(1, 2)


class TargetTaps:
    """The frozen target and a reusable cache for [B, T] training forwards."""

    def __init__(self, target: torch.nn.Module, layer_ids: Sequence[int], batch: int, seq_len: int):
        spec = target.spec
        plain = not spec.attention_sinks and all(w < 0 for w in spec.window_left)
        self.backend = CausalSdpaBackend() if plain else None
        self.target = target
        self.layer_ids = tuple(layer_ids)
        self.cache = target.allocate_cache(1, batch, seq_len)
        self.positions = torch.arange(seq_len, device=target.device)[None].expand(batch, -1)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> ctx_hidden [B*T, n_taps*H] (the target's dtype)."""
        self.cache.reset()
        saved = self.target.backend
        if self.backend is not None:  # borrowed for the call: the target keeps its own backend
            self.target.backend = self.backend
        try:
            _, taps = self.target(
                input_ids, self.positions, self.cache, causal=True, taps=self.layer_ids
            )
        finally:
            self.target.backend = saved
        return taps.reshape(-1, taps.shape[-1])


# ----------------------------------------------------------------------------- data stream


class RecordSampler:
    """Records for step s: epoch e = (s*B) // n uses permutation randperm(n, seed=(seed, e)), so
    the stream is a pure function of (seed, step) and resumes exactly."""

    def __init__(self, data: ResponseData, max_len: int, per_step: int, seed: int):
        lengths = data.lengths.clamp(max=max_len)
        keep = (lengths - data.prompt_lens >= 2).nonzero().squeeze(1)
        if keep.numel() == 0:
            raise ValueError(f"no record has 2+ response tokens within max_len={max_len}")
        self.data, self.keep, self.max_len = data, keep, max_len
        self.per_step, self.seed = per_step, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.keep.numel()

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self), generator=gen))
        return self._perm[1]

    def records(self, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B sequences cut to max_len, their prompt lengths int64 [B]) for ``step``."""
        n = len(self)
        picks = []
        for i in range(step * self.per_step, (step + 1) * self.per_step):
            picks.append(int(self.keep[self._permutation(i // n)[i % n]]))
        seqs = [self.data.record(i)[: self.max_len] for i in picks]
        return seqs, self.data.prompt_lens[picks]


# ----------------------------------------------------------------------------- drafter


def make_drafter(cfg: TrainConfig, target: torch.nn.Module) -> torch.nn.Module:
    """A randomly initialised ``DFlashDrafter`` for ``target`` with the config's shapes (see
    ``DFlashDrafter.random``), its final norm copied from the target's; ``init_from_target`` also
    copies the target's last layers' attention weights and norms into the drafter's layers where
    the shapes agree (the MLP is narrower, Qwen3's q/k norms have no Llama counterpart)."""
    from d2sd.models.drafter import DFlashDrafter, default_target_layer_ids

    layer_ids = cfg.target_layer_ids or default_target_layer_ids(target.num_layers, cfg.num_taps)
    drafter = DFlashDrafter.random(
        target,
        block_size=cfg.block_size,
        num_layers=cfg.num_layers,
        target_layer_ids=layer_ids,
        mask_token_id=cfg.mask_token_id,
        intermediate_size=cfg.intermediate_size,
        seed=cfg.seed,
        backend="torch",
        dtype=torch.float32,  # fp32 master weights
    )
    with torch.no_grad():
        # the drafter's output goes through its final norm and the target's lm_head, like the
        # target's last hidden state: start from the target's final norm so that the first
        # logits have the target's scale (with unit weights SmolLM2's first loss is ~70)
        drafter.norm.weight.copy_(target.hf.model.norm.weight.float())
    if cfg.init_from_target:
        copy_target_layers(drafter, target)
    return drafter


def copy_target_layers(drafter: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy parameters of the target's last ``len(drafter.layers)`` decoder layers into the
    drafter's layers wherever name and shape agree. Returns the copied names."""
    copied = []
    t_layers = target.hf.model.layers
    d_layers = drafter.layers
    offset = len(t_layers) - len(d_layers)
    with torch.no_grad():
        for i, d_layer in enumerate(d_layers):
            t_params = dict(t_layers[offset + i].named_parameters())
            for name, p in d_layer.named_parameters():
                src = t_params.get(name)
                if src is not None and src.shape == p.shape:
                    p.copy_(src.to(p.dtype))
                    copied.append(f"layers.{i}.{name}")
    return copied


def trainable_parameters(
    drafter: torch.nn.Module, target: torch.nn.Module
) -> dict[str, torch.nn.Parameter]:
    """The drafter's own parameters (not the target's shared embeddings / lm_head)."""
    shared = {id(p) for p in target.parameters()}
    return {n: p for n, p in drafter.named_parameters() if id(p) not in shared}


def checkpoint_bytes(params: dict[str, torch.nn.Parameter], bytes_per_value: int = 2) -> int:
    """Bytes of the saved weights at ``bytes_per_value`` (bf16: 2), without the file header."""
    return sum(p.numel() for p in params.values()) * bytes_per_value


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- the loop


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }[name]


class Trainer:
    """Holds the target, drafter, optimizer and data stream of one run (see module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        target: torch.nn.Module | None = None,
        data: ResponseData | None = None,
    ):
        from d2sd.models.target import TargetModel

        if cfg.objective not in ("dflash", "vp"):
            raise ValueError(f"objective must be 'dflash' or 'vp', got {cfg.objective!r}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)
        if target is None:
            target = TargetModel.from_hf(
                cfg.target, dtype=self.dtype, device=self.device, backend="torch"
            )
        target.requires_grad_(False)
        self.target = target
        self.data = data if data is not None else load_response_data(Path(cfg.data))
        self.per_step = cfg.records_per_step
        self.sampler = RecordSampler(self.data, cfg.max_len, self.per_step, cfg.seed)
        self.drafter = make_drafter(cfg, target).to(self.device)
        self.params = trainable_parameters(self.drafter, target)
        for p in self.params.values():
            p.requires_grad_(True)
        self.taps = TargetTaps(target, self.drafter.target_layer_ids, self.per_step, cfg.max_len)
        fused = self.device.type == "cuda"
        decay = [p for p in self.params.values() if p.dim() >= 2]
        no_decay = [p for p in self.params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            fused=fused,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio),
        )
        self.step = 0
        self.out = Path(cfg.out)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else Path("runs") / self.out.name
        self.attention = cfg.attention
        if self.attention == "auto":
            self.attention = "flex" if self.device.type == "cuda" else "dense"
        if cfg.resume:
            self.load_state()

    def weights_bytes(self) -> int:
        """Bytes of the drafter's own weights in bf16 (the shipped checkpoint, minus headers)."""
        return checkpoint_bytes(self.params)

    # -- one step ------------------------------------------------------------------------------

    def batch(self, step: int) -> BlockBatch:
        """The blocks of ``step`` (a pure function of seed and step), on the device."""
        cfg = self.cfg
        seqs, prompt_lens = self.sampler.records(step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
        batch = build_blocks(
            seqs,
            prompt_lens,
            seq_len=cfg.max_len,
            block_size=cfg.block_size,
            blocks_per_seq=cfg.anchors_per_seq,
            mask_token_id=self.drafter.mask_token_id,
            objective=cfg.objective,
            gamma_decay=cfg.gamma_decay,
            beta=cfg.beta,
            tau=cfg.tau,
            generator=gen,
        )
        return batch.to(self.device)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, batch: BlockBatch) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step on one batch. Returns device tensors (no sync)."""
        ctx_hidden = self.taps(batch.input_ids)
        attend = flex_attend(batch) if self.attention == "flex" else dense_attend(batch)
        with self.autocast():
            stats = drafter_loss(self.drafter, batch, ctx_hidden, attend)
        stats.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": stats.loss.detach(),
            "correct": stats.correct,
            "counted": stats.counted,
            "accepted": stats.accepted,
            "grad_norm": grad_norm.detach(),
        }

    # -- run -----------------------------------------------------------------------------------

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run until ``cfg.steps`` (or stop early at step ``until``, as an interruption would);
        log, save every ``save_every`` and at the end. Returns the final metrics (also in
        ``out/train_meta.json``)."""
        cfg = self.cfg
        stop = cfg.steps if until is None else min(until, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        log_file = self.out / "train_log.jsonl"
        if log_file.exists():
            # a fresh run starts a new log; a resumed one drops lines past the restored step
            keep = [] if not cfg.resume else log_file.read_text().splitlines()
            keep = [line for line in keep if json.loads(line)["step"] <= self.step]
            log_file.write_text("".join(line + "\n" for line in keep))
        window: dict[str, torch.Tensor] = {}
        window_steps, window_start, tokens = 0, time.perf_counter(), 0
        metrics: dict[str, Any] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.objective, disable=cfg.quiet)
        start_step, wall = self.step, time.perf_counter()
        while self.step < stop:
            batch = self.batch(self.step)
            out = self.train_step(batch)
            tokens += int(batch.lengths.sum())
            for k, v in out.items():
                window[k] = window.get(k, 0) + v
            window_steps += 1
            bar.update(1)
            last = self.step == stop
            if self.step % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                metrics = self._log_line(window, window_steps, tokens / max(elapsed, 1e-9))
                with open(log_file, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if not cfg.quiet:
                    bar.write(
                        f"step {self.step}: loss {metrics['loss']:.4f} acc@1 {metrics['acc'][0]:.3f} "
                        f"accepted {metrics['accepted']:.2f} lr {metrics['lr']:.2e} "
                        f"{metrics['tokens_per_s']:.0f} tok/s"
                    )
                window, window_steps, window_start, tokens = {}, 0, time.perf_counter(), 0
            if self.step % cfg.save_every == 0 or last:
                self.save(metrics)
        bar.close()
        metrics["train_seconds_this_run"] = time.perf_counter() - wall
        metrics["steps_this_run"] = self.step - start_step
        self.save(metrics)
        return metrics

    def _log_line(
        self, window: dict[str, torch.Tensor], steps: int, tok_per_s: float
    ) -> dict[str, Any]:
        correct, counted = window["correct"].cpu(), window["counted"].cpu()
        acc = correct / counted.clamp(min=1)
        return {
            "step": self.step,
            "loss": float(window["loss"]) / steps,
            # block positions 1..gamma-1 (VP: distance k - l past the visible prefix)
            "acc": [round(float(a), 4) for a in acc[1:]],
            "accepted": float(window["accepted"]) / steps,
            "expected_tau": expected_acceptance(correct, counted),
            "grad_norm": float(window["grad_norm"]) / steps,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tok_per_s,
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        """Write the bf16 z-lab checkpoint + meta into ``out`` and the resume state into
        ``state_dir`` (atomically)."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_drafter_bf16(self.drafter, self.params, self.out)
        meta = {
            "objective": self.cfg.objective,
            "step": self.step,
            "config": {k: v for k, v in asdict(self.cfg).items()},
            "target_layer_ids": list(self.drafter.target_layer_ids),
            "mask_token_id": self.drafter.mask_token_id,
            "params": sum(p.numel() for p in self.params.values()),
            "weights_bytes_bf16": checkpoint_bytes(self.params),
            "data": _data_meta(Path(self.cfg.data)),
            "metrics": metrics or {},
        }
        (self.out / "train_meta.json").write_text(json.dumps(meta, indent=1, default=str))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.cfg),
        }
        tmp = self.state_dir / "train_state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.state_dir / "train_state.pt")

    def load_state(self) -> bool:
        """Restore weights, optimizer, scheduler and step from ``state_dir`` if a state exists."""
        path = self.state_dir / "train_state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        for key in (
            "objective",
            "block_size",
            "num_layers",
            "intermediate_size",
            "max_len",
            "seed",
        ):
            if state["config"][key] != getattr(self.cfg, key):
                raise ValueError(
                    f"resume: {key} differs ({state['config'][key]} saved vs {getattr(self.cfg, key)})"
                )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        return True


def _data_meta(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_drafter_bf16(
    drafter: torch.nn.Module, params: dict[str, torch.nn.Parameter], out: Path
) -> None:
    """``drafter.save_pretrained(out)`` with the own weights cast to bf16 for the write, then
    restored to the fp32 masters."""
    masters = {n: p.data for n, p in params.items()}
    try:
        for p in params.values():
            p.data = p.data.to(torch.bfloat16)
        drafter.save_pretrained(out)
    finally:
        for n, p in params.items():
            p.data = masters[n]


def train(
    cfg: TrainConfig, target: torch.nn.Module | None = None, data: ResponseData | None = None
) -> dict[str, Any]:
    """Build a ``Trainer`` and run it; returns the final metrics."""
    return Trainer(cfg, target=target, data=data).train()


__all__ = ["TrainConfig", "Trainer", "default_gamma_decay", "train"]
