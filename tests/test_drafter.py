"""DFlashDrafter: z-lab semantics, cache path = training path, z-lab checkpoint format, errors.

The reference (`zlab_reference`) restates z-lab's `DFlashDraftModel.forward` with HF's own Qwen3
pieces: context = hidden_norm(fc(taps)) projected by each layer's k_proj / v_proj without the
input_layernorm, k_norm on context and block keys alike, RoPE at [context positions, block
positions], non-causal SDPA, final norm, the target's lm_head.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from d2sd.attention import available_backends
from d2sd.errors import D2SDError
from d2sd.models import DFlashDrafter, default_target_layer_ids
from tests.tiny_models import tiny_drafter, tiny_target

VOCAB = 320
GAMMA = 8


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def zlab_reference(drafter, block_ids, block_pos, ctx_hidden, ctx_pos):
    """Logits [B, gamma, V] of blocks [B, gamma] at block_pos [gamma] over context [S, n_taps*H]."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, rotate_half

    config = drafter.config
    batch, gamma = block_ids.shape
    heads, kv_heads, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    rotary = Qwen3RotaryEmbedding(config.to_qwen3_config()).to(block_ids.device)
    x = drafter.embed_tokens(block_ids)
    target_hidden = drafter.hidden_norm(drafter.fc(ctx_hidden))[None].expand(batch, -1, -1)
    positions = torch.cat([ctx_pos, block_pos])[None].expand(batch, -1)
    cos, sin = rotary(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(batch, gamma, heads, head_dim)).transpose(1, 2)
        k = torch.cat([attn.k_proj(target_hidden), attn.k_proj(h)], dim=1)
        v = torch.cat([attn.v_proj(target_hidden), attn.v_proj(h)], dim=1)
        k = attn.k_norm(k.view(batch, -1, kv_heads, head_dim)).transpose(1, 2)
        v = v.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        q = q * cos[..., -gamma:, :] + rotate_half(q) * sin[..., -gamma:, :]
        k = k * cos + rotate_half(k) * sin
        group = heads // kv_heads
        o = F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale=head_dim**-0.5
        )
        x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, gamma, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.lm_head(drafter.norm(x)).float()


def _sdpa_attend(visible: torch.Tensor | None = None):
    """The training path's `attend(q [M, Hq, D], k, v [S + M, Hkv, D])`: SDPA over the GQA groups,
    with `visible` bool [M, S + M] (every key when None)."""

    def attend(q, k, v):
        group = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1),
            attn_mask=visible,
        )
        return o.transpose(0, 1)

    return attend


def _setup(family="qwen3", num_layers=2, seed=0):
    _hf, target = tiny_target(family, VOCAB, tap_layer_ids=(0, 2))
    drafter = tiny_drafter(target, GAMMA, num_layers=num_layers, seed=seed)
    prompt = torch.randint(0, VOCAB, (1, 11))
    cache = target.allocate_cache(32, 1, 16)
    _, ctx_hidden = target.prefill(prompt, cache)  # real taps [11, 2 * H]
    return target, drafter, ctx_hidden


def _blocks(drafter, batch, anchor_pos):
    ids = torch.full((batch, GAMMA), drafter.mask_token_id)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,))
    ids[1:, 1:3] = torch.randint(0, VOCAB, (batch - 1, 2))  # VP-style visible prefixes
    return ids, anchor_pos + torch.arange(GAMMA)


def _fill_context(drafter, ctx_hidden, cache):
    """Two fixed-size (8-row) extend_context calls with 6 and 5 valid rows; garbage past them."""
    chunks = [(0, 6), (6, 5)]
    for start, valid in chunks:
        rows = torch.full((8, ctx_hidden.shape[1]), float("nan"))
        rows[:valid] = ctx_hidden[start : start + valid]
        positions = torch.arange(start, start + 8)
        drafter.extend_context(rows, positions, cache, torch.tensor([valid], dtype=torch.int32))


@pytest.mark.parametrize("family", ["qwen3", "llama", "gpt_oss"])
def test_cache_path_matches_zlab_reference(family):
    _target, drafter, ctx_hidden = _setup(family)
    cache = drafter.allocate_cache(32, batch=3)
    _fill_context(drafter, ctx_hidden, cache)
    assert int(cache.cache_len) == 11
    ids, pos = _blocks(drafter, 3, 11)
    logits = drafter(ids, pos.expand(3, -1), cache)
    ref = zlab_reference(drafter, ids, pos, ctx_hidden, torch.arange(11))
    assert logits.shape == (3, GAMMA, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_forward_packed_matches_cache_path():
    """Training path (packed blocks, caller's block mask) = decoding path (static cache)."""
    _target, drafter, ctx_hidden = _setup()
    cache = drafter.allocate_cache(32, batch=2)
    _fill_context(drafter, ctx_hidden, cache)
    ids, pos = _blocks(drafter, 2, 11)
    cached = drafter(ids, pos.expand(2, -1), cache)

    num_ctx, num_noise = 11, 2 * GAMMA
    block_of = torch.arange(num_noise) // GAMMA
    visible = torch.cat(
        [torch.ones(num_noise, num_ctx, dtype=torch.bool), block_of[:, None] == block_of[None, :]],
        1,
    )

    attend = _sdpa_attend(visible)

    hidden = drafter.forward_packed(
        ids.reshape(-1), pos.repeat(2), ctx_hidden, torch.arange(num_ctx), attend
    )
    assert hidden.shape == (num_noise, drafter.config.hidden_size)
    packed = drafter.logits(hidden).view(2, GAMMA, VOCAB)
    torch.testing.assert_close(packed, cached, rtol=1e-5, atol=1e-5 * cached.abs().max().item())


def test_forward_packed_has_gradients():
    target, drafter, ctx_hidden = _setup(num_layers=1)
    ids, pos = _blocks(drafter, 2, 11)

    attend = _sdpa_attend()

    with torch.enable_grad():
        hidden = drafter.forward_packed(ids[0], pos, ctx_hidden, torch.arange(11), attend)
        drafter.logits(hidden).logsumexp(-1).sum().backward()
    assert (
        drafter.fc.weight.grad is not None
        and drafter.layers[0].self_attn.k_norm.weight.grad is not None
    )
    assert target.embed_tokens.weight.grad is not None  # shared, trainable only if the caller wants


@pytest.mark.parametrize("after_inference", [False, True])
def test_save_load_roundtrip(tmp_path, after_inference):
    target, drafter, ctx_hidden = _setup()
    if after_inference:  # stacks q|k|v and gate|up into shared tensors (layers.fused_linear)
        cache = drafter.allocate_cache(32, batch=2)
        _fill_context(drafter, ctx_hidden, cache)
        ids, pos = _blocks(drafter, 2, 11)
        with torch.no_grad():
            drafter(ids, pos.expand(2, -1), cache)
        assert "_d2sd_fused" in drafter.layers[0].self_attn.__dict__
    drafter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] == GAMMA and config["num_target_layers"] == 3
    assert config["dflash_config"] == {"mask_token_id": 259, "target_layer_ids": [0, 2]}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight"} <= names
    assert (
        "layers.1.self_attn.q_proj.weight" in names and "layers.0.self_attn.k_norm.weight" in names
    )
    assert "layers.0.mlp.down_proj.weight" in names and "layers.0.input_layernorm.weight" in names
    assert not any("embed" in n or "lm_head" in n or "rotary" in n for n in names)

    loaded = DFlashDrafter.from_pretrained(tmp_path, target)
    assert loaded.config == drafter.config
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, pos = _blocks(drafter, 2, 11)
    outs = []
    for model in (drafter, loaded):
        cache = model.allocate_cache(32, batch=2)
        _fill_context(model, ctx_hidden, cache)
        outs.append(model(ids, pos.expand(2, -1), cache))
    assert torch.equal(outs[0], outs[1])


def test_reads_zlab_config(tmp_path):
    """A config.json written the way z-lab ships it (rope_theta, top-level block_size, auto_map)."""
    target, drafter, _ = _setup()
    drafter.save_pretrained(tmp_path)
    zlab = {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": 16,
        "bos_token_id": 151643,
        "dflash_config": {"mask_token_id": 7, "target_layer_ids": [2, 0]},
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 96,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 40960,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 6,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_target_layers": 3,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    (tmp_path / "config.json").write_text(json.dumps(zlab))
    loaded = DFlashDrafter.from_pretrained(tmp_path, target, dtype=torch.float64)
    config = loaded.config
    assert (config.block_size, config.mask_token_id, config.target_layer_ids) == (16, 7, (2, 0))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1000000}
    assert (config.max_position_embeddings, config.num_target_layers) == (40960, 3)
    assert loaded.fc.weight.dtype == torch.float64
    torch.testing.assert_close(loaded.rope.inv_freq, drafter.rope.inv_freq)  # same theta 1e6


def test_checkpoint_errors(tmp_path):
    target, drafter, _ = _setup(num_layers=1)
    with pytest.raises(D2SDError, match="no such drafter directory"):
        DFlashDrafter.from_pretrained(tmp_path / "missing", target)
    with pytest.raises(D2SDError, match="no config"):
        DFlashDrafter.from_pretrained(tmp_path, target)
    drafter.save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())

    def load_with(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**good, **changes}))
        return DFlashDrafter.from_pretrained(tmp_path, target)

    with pytest.raises(D2SDError, match=f"drafter vocabulary 1000 != target vocabulary {VOCAB}"):
        load_with(vocab_size=1000)
    with pytest.raises(D2SDError, match="drafter hidden size 128 != target hidden size 96"):
        load_with(hidden_size=128)
    with pytest.raises(D2SDError, match="36-layer target"):
        load_with(num_target_layers=36)
    with pytest.raises(D2SDError, match=r"taps target layers \[5\]"):
        load_with(dflash_config={"mask_token_id": 1, "target_layer_ids": [0, 5]})
    with pytest.raises(D2SDError, match="unsupported drafter architecture"):
        load_with(architectures=["DFlash2DraftModel"])
    with pytest.raises(D2SDError, match="weights do not match"):
        load_with(num_hidden_layers=2)  # layer 1's tensors are missing
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in good.items() if k != "hidden_size"})
    )
    with pytest.raises(D2SDError, match="lacks the field 'hidden_size'"):
        DFlashDrafter.from_pretrained(tmp_path, target)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(D2SDError, match="unreadable"):
        DFlashDrafter.from_pretrained(tmp_path, target)
    (tmp_path / "config.json").write_text(json.dumps(good))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(D2SDError, match="unreadable"):
        DFlashDrafter.from_pretrained(tmp_path, target)


def test_random_defaults():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)  # z-lab's Qwen3-4B drafter
    assert default_target_layer_ids(28, 1) == (14,)
    _, target = tiny_target("llama", VOCAB)
    drafter = DFlashDrafter.random(target, block_size=16, num_layers=2)
    assert drafter.mask_token_id == 259  # the tiny tokenizer's <|mask|>
    assert drafter.config.num_attention_heads == 6 and drafter.config.num_hidden_layers == 2
    assert drafter.config.rope_parameters["rope_theta"] == 10000.0  # follows the target
    _, bare = tiny_target("llama", 256)  # no tokenizer: every row is a token -> the last id
    assert DFlashDrafter.random(bare, num_layers=1).mask_token_id == 255
    again = DFlashDrafter.random(target, block_size=16, num_layers=2)
    assert all(torch.equal(a, b) for a, b in zip(drafter.parameters(), again.parameters()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer"])
def test_drafter_bf16_on_gpu(backend):
    """bf16 cache path per backend vs the fp32 z-lab reference; bar: the reference run in bf16."""
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable on this machine")
    shapes = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    _, target = tiny_target("qwen3", VOCAB, tap_layer_ids=(0, 2), backend="torch", **shapes)
    target = target.cuda()
    drafter32 = tiny_drafter(target, GAMMA, num_layers=2)
    ctx_hidden = torch.randn(37, 2 * 256, device="cuda")
    ids, pos = _blocks(drafter32, 4, 37)
    ids, pos = ids.cuda(), pos.cuda()
    ref = zlab_reference(drafter32, ids, pos, ctx_hidden, torch.arange(37, device="cuda"))

    target16 = copy.deepcopy(target).to(torch.bfloat16)
    drafter16 = copy.deepcopy(drafter32)
    object.__setattr__(drafter16, "_embed", target16.embed_tokens)
    object.__setattr__(drafter16, "_lm_head", target16.lm_head)
    drafter16 = drafter16.to(torch.bfloat16)
    from d2sd.attention import get_backend

    drafter16.backend = get_backend(backend, "cuda")
    ref16 = zlab_reference(
        drafter16, ids, pos, ctx_hidden.bfloat16(), torch.arange(37, device="cuda")
    )
    cache = drafter16.allocate_cache(64, batch=4)
    drafter16.extend_context(
        ctx_hidden.bfloat16(),
        torch.arange(37, device="cuda"),
        cache,
        torch.tensor([37], dtype=torch.int32, device="cuda"),
    )
    ours = drafter16(ids, pos.expand(4, -1), cache)
    budget = 2 * (ref16 - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= budget


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_draft_step_is_graph_capturable(backend):
    """extend_context (fixed 16 rows) + a 4-block forward capture and replay like eager."""
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable on this machine")
    shapes = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    _, target = tiny_target("qwen3", VOCAB, tap_layer_ids=(0, 2), backend=backend, **shapes)
    target = target.to("cuda", torch.bfloat16)
    drafter = tiny_drafter(target, GAMMA, num_layers=2)
    cache = drafter.allocate_cache(256, batch=4)
    ctx = torch.randn(16, 2 * 256, device="cuda", dtype=torch.bfloat16)
    ctx_pos = torch.arange(16, device="cuda")
    num_valid = torch.tensor([7], dtype=torch.int32, device="cuda")
    ids, pos = _blocks(drafter, 4, 0)
    ids, pos = ids.cuda(), pos.cuda().expand(4, -1).contiguous()

    def step():
        drafter.extend_context(ctx, ctx_pos, cache, num_valid)
        return drafter(ids, pos, cache)

    from tests.test_models import _capture

    graph, logits = _capture(step)  # the two warm-up runs advanced cache_len
    cache.reset()
    graph.replay()
    assert int(cache.cache_len) == 7
    cache.reset()
    eager = step()
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
