"""Tiny random models for tests (offline, CPU-fast); imported by the loop and training tests too.

Stable API:
- `FAMILY_NAMES`: the supported target families ("llama", "qwen2", "qwen3", "gpt_oss").
- `tiny_config(family, vocab_size=320, **overrides) -> PretrainedConfig`: hidden 96, 3 layers,
  6 query / 2 kv heads of head_dim 16 (GQA group 3), eager attention. llama ties its embeddings
  (like SmolLM2); gpt_oss has 4 experts (top-2), sinks, yarn RoPE and alternating sliding (W = 4) /
  full layers.
- `tiny_hf_model(family, vocab_size=320, seed=0, **overrides) -> PreTrainedModel`: fp32, eval, every
  parameter random (norm weights near 1, biases, sinks and routers non-zero) so that a missing
  bias / norm / sink shows up in parity tests. Deterministic in `seed`, global RNG untouched.
- `tiny_target(family, vocab_size=320, seed=0, backend="torch", tap_layer_ids=(0, 2), **overrides)
  -> (hf_model, TargetModel)`: the TargetModel wraps the same HF modules; its tokenizer is
  `tiny_tokenizer()` when vocab_size >= TINY_TOKENIZER_SIZE.
- `tiny_drafter(target, block_size=8, num_layers=1, target_layer_ids=None, seed=0,
  mask_token_id=None) -> DFlashDrafter`: random drafter (taps default to the target's
  `tap_layer_ids`; norms perturbed so they matter).
- `tiny_tokenizer() -> PreTrainedTokenizerFast`: byte-level, id = byte value for 0..255, then
  <|endoftext|> 256 (pad), <|im_start|> 257, <|im_end|> 258 (eos), <|mask|> 259 (mask); ChatML
  chat template. No download.
"""

from __future__ import annotations

import torch

from d2sd.models import DFlashDrafter, TargetModel

FAMILY_NAMES = ("llama", "qwen2", "qwen3", "gpt_oss")
TINY_TOKENIZER_SIZE = 260
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(family: str, vocab_size: int = 320, **overrides):
    """A tiny HF config of `family` (see the module docstring); `overrides` replace fields."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    per_family = {
        "llama": dict(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "gpt_oss": dict(
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attention_bias=True,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        ),
    }
    if family not in per_family:
        raise ValueError(f"no tiny config for {family!r}")
    fields = {**common, **per_family[family], **overrides}
    if (
        "layer_types" in fields
        and "num_hidden_layers" in overrides
        and "layer_types" not in overrides
    ):
        fields["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(overrides["num_hidden_layers"])
        ]
    return AutoConfig.for_model(family, **fields)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise of a sensible scale (norms near 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or "sinks" in name:
                param.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif param.dim() == 3:  # MoE experts [E, in, out]
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def tiny_hf_model(family: str, vocab_size: int = 320, seed: int = 0, **overrides):
    """A tiny random HF causal LM of `family` in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def tiny_tokenizer():
    """Offline byte-level tokenizer with ChatML specials (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        mask_token="<|mask|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (the alphabet of ByteLevel pre-tokenizers)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tiny_target(
    family: str,
    vocab_size: int = 320,
    seed: int = 0,
    *,
    backend: str = "torch",
    tap_layer_ids: tuple[int, ...] = (0, 2),
    **overrides,
):
    """(hf_model, TargetModel) of a tiny random `family` model sharing the same modules."""
    hf = tiny_hf_model(family, vocab_size, seed, **overrides)
    tokenizer = tiny_tokenizer() if vocab_size >= TINY_TOKENIZER_SIZE else None
    target = TargetModel(hf, backend, tap_layer_ids=tap_layer_ids, tokenizer=tokenizer)
    return hf, target


def tiny_drafter(
    target: TargetModel,
    block_size: int = 8,
    num_layers: int = 1,
    target_layer_ids: tuple[int, ...] | None = None,
    seed: int = 0,
    mask_token_id: int | None = None,
) -> DFlashDrafter:
    """A random DFlashDrafter for `target` (taps default to target.tap_layer_ids)."""
    ids = target_layer_ids if target_layer_ids is not None else target.tap_layer_ids or (0,)
    drafter = DFlashDrafter.random(
        target, block_size, num_layers, ids, mask_token_id, intermediate_size=96, seed=seed
    )
    # unit norms and 0.02-scale weights make a near-identity drafter; give every piece weight
    _randomize(drafter, seed + 1)
    return drafter


def install_tiny_default_target(setattr_, *, cuda: bool = False):
    """Make `--target default` (d2sd.run, d2sd.bench) load a tiny llama (hidden 96, context 512,
    byte tokenizer) with no shipped drafters, so the default drafters are random ones for it.

    `setattr_(obj, name, value)` is monkeypatch.setattr in a test or plain setattr in a spawned
    process. cuda=False: one CPU target (torch backend) and torch.cuda.is_available() -> False, so
    the CPU defaults apply everywhere; returns that target. cuda=True: the tiny HF model moved to
    the device, dtype and backend the CLI asks for (its CUDA defaults); returns None.
    """
    from pathlib import Path

    from d2sd import models, run

    if cuda:
        hf = tiny_hf_model("llama", vocab_size=320)
        tokenizer = tiny_tokenizer()

        def from_hf(cls, source, *, dtype, device, backend):
            return cls(hf.to(device=device, dtype=dtype), backend, tokenizer=tokenizer)

        target = None
    else:
        _, target = tiny_target("llama", vocab_size=320)
        setattr_(torch.cuda, "is_available", lambda: False)

        def from_hf(cls, *args, **kwargs):
            return target

    setattr_(models.TargetModel, "from_hf", classmethod(from_hf))
    setattr_(models.loading, "resolve_target_source", lambda source: None)
    setattr_(run, "SHIPPED_DRAFTS", {role: Path("/nonexistent") for role in run.SHIPPED_DRAFTS})
    return target
