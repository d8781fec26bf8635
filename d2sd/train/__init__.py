"""Drafter training: ``python -m d2sd.train {gen-data,dflash,vp}`` (see ``__main__`` for the CLI).

- ``d2sd.train.data``: training prompts (ShareGPT, GSM8K train, MBPP train; never benchmark test
  prompts), the target's own responses, resumable token shards.
- ``d2sd.train.objectives``: blocks, the block mask (one rule, flex_attention and dense SDPA
  executors), DFlash and VP (variable visible prefix) labels and loss weights.
- ``d2sd.train.trainer``: the loop (frozen target taps, AdamW with warmup + cosine, bf16 autocast,
  z-lab checkpoints, exact resume, JSONL logs).
"""

from d2sd.train.data import load_response_data, load_training_prompts, write_shards
from d2sd.train.objectives import build_blocks, default_gamma_decay, visible
from d2sd.train.trainer import TrainConfig, Trainer, train

__all__ = [
    "TrainConfig",
    "Trainer",
    "build_blocks",
    "default_gamma_decay",
    "load_response_data",
    "load_training_prompts",
    "train",
    "visible",
    "write_shards",
]
