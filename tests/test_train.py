"""Drafter training: the block mask, samplers, weights, loss, shards, checkpoints and resume.

All CPU tests use the tiny random targets of tests/tiny_models.py (no hub, no GGUF) and finish in
seconds; the one `gpu` test checks the compiled flex_attention executor against the dense one.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from d2sd.train.data import (
    Prompt,
    ResponseData,
    SamplingConfig,
    _split_counts,
    assert_no_benchmark_leak,
    eos_token_ids,
    generate_responses,
    iter_json_array_objects,
    load_response_data,
    load_training_prompts,
    shard_path,
    write_shards,
)
from d2sd.train.objectives import (
    IGNORE,
    BlockBatch,
    build_blocks,
    default_gamma_decay,
    dense_attend,
    dense_mask,
    dflash_position_weights,
    flex_attend,
    prefix_length_probs,
    sample_anchors,
    sample_prefix_lengths,
    tile_columns,
    tiled_dense_mask,
    weighted_cross_entropy,
)
from d2sd.train.trainer import TrainConfig, Trainer, lr_factor
from tests.tiny_models import tiny_target

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


# ----------------------------------------------------------------------------- helpers


def hand_batch(anchors: list[int], seq_len: int, blocks_per_seq: int, gamma: int) -> BlockBatch:
    """A BlockBatch with given anchors (only the mask fields matter)."""
    num_blocks = len(anchors)
    num_seqs = num_blocks // blocks_per_seq
    m = num_blocks * gamma
    return BlockBatch(
        input_ids=torch.zeros(num_seqs, seq_len, dtype=torch.long),
        lengths=torch.full((num_seqs,), seq_len),
        ctx_pos=torch.arange(seq_len).repeat(num_seqs),
        anchors=torch.tensor(anchors),
        block_valid=torch.ones(num_blocks, dtype=torch.bool),
        prefix_len=torch.zeros(num_blocks, dtype=torch.long),
        noise_ids=torch.zeros(m, dtype=torch.long),
        noise_pos=torch.zeros(m, dtype=torch.long),
        labels=torch.full((m,), IGNORE),
        weights=torch.zeros(m),
        block_size=gamma,
        blocks_per_seq=blocks_per_seq,
    )


@pytest.fixture(scope="module")
def tiny():
    """A tiny llama target (byte tokenizer, ChatML) and a few chat prompts."""
    _, target = tiny_target("llama", tap_layer_ids=(0, 2))
    # the tiny model's tied unit-scale embeddings make logits so peaked that every response is
    # one repeated byte; a smaller scale gives varied sampled text to learn
    with torch.no_grad():
        target.hf.lm_head.weight.mul_(0.15)
    tok = target.tokenizer
    from d2sd.data import encode_chat

    texts = ["Hello there", "What is 2+2?", "Write code", "Tell me a story", "Why?", "abc"]
    prompts = [Prompt("gsm8k", t, t) for t in texts]
    ids = [encode_chat(tok, [{"role": "user", "content": t}]) for t in texts]
    return target, prompts, ids


def response_data(target, ids, max_new_tokens=24) -> ResponseData:
    """The target's sampled (temperature 1) answers to ``ids``, as one ResponseData."""
    tok = target.tokenizer
    responses = generate_responses(
        target.hf,
        ids,
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=1),
    )
    records = [p + r for p, r in zip(ids, responses)]
    lengths = torch.tensor([len(r) for r in records])
    return ResponseData(
        tokens=torch.tensor([t for r in records for t in r], dtype=torch.int32),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        prompt_lens=torch.tensor([len(p) for p in ids]),
        sources=["gsm8k"] * len(records),
    )


def small_config(tmp_path: Path, objective: str = "dflash", **over) -> TrainConfig:
    values = dict(
        objective=objective,
        target="tiny",
        data=str(tmp_path / "data"),
        out=str(tmp_path / f"out-{objective}"),
        state_dir=str(tmp_path / f"state-{objective}"),
        block_size=4,
        num_layers=1,
        intermediate_size=64,
        target_layer_ids=(0, 2),
        steps=30,
        batch_size=3,
        max_len=64,
        anchors_per_seq=4,
        lr=3e-3,
        warmup=2,
        log_every=10,
        save_every=1000,
        device="cpu",
        quiet=True,
    )
    values.update(over)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- the block mask


def test_block_mask_hand_example():
    # 2 sequences of T = 5 context rows, A = 2 blocks of gamma = 2 each; anchors (2, 4) and (0, 3).
    # Keys: ctx rows 0-4 (seq 0), 5-9 (seq 1), then noise rows 10.. (block j owns 10+2j, 11+2j).
    batch = hand_batch([2, 4, 0, 3], seq_len=5, blocks_per_seq=2, gamma=2)
    ctx_of = {0: [0, 1], 1: [0, 1, 2, 3], 2: [], 3: [5, 6, 7]}  # strictly before the anchor
    expected = torch.zeros(8, 18, dtype=torch.bool)
    for q in range(8):
        block = q // 2
        for key in ctx_of[block]:
            expected[q, key] = True
        expected[q, 10 + 2 * block] = expected[q, 11 + 2 * block] = True  # own block, both ways
    assert torch.equal(dense_mask(batch), expected)


def test_tiles_cover_everything_visible():
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (20, 9, 16)]
    batch = build_blocks(
        seqs, torch.tensor([4, 2, 15]), seq_len=20, block_size=4, blocks_per_seq=3,
        mask_token_id=49, objective="dflash", generator=gen,
    )  # fmt: skip
    full = dense_mask(batch)
    rebuilt = torch.zeros_like(full)
    per_seq = 3 * 4
    for b, cols in enumerate(tile_columns(batch)):
        rebuilt[b * per_seq : (b + 1) * per_seq][:, cols] = tiled_dense_mask(batch)[b]
    assert torch.equal(rebuilt, full)  # nothing visible outside the per-sequence tiles
    # sequence 2 has one response position < 14 = length - 2? no: prompt 15 > 14, so no anchors
    assert not batch.block_valid[6:].any() and (batch.labels.view(3, -1)[2] == IGNORE).all()


def _reference_attention(q, k, v, mask):
    """fp32 softmax attention with a bool mask [M, N]; GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("executor", ["dense", "flex"])
def test_executors_match_reference(executor):
    # both executors apply the one mask rule: compare with a plain masked softmax (fp32)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (16, 11)]
    batch = build_blocks(
        seqs, torch.tensor([3, 2]), seq_len=16, block_size=4, blocks_per_seq=3,
        mask_token_id=49, objective="vp", generator=gen,
    )  # fmt: skip
    m, n = batch.noise_ids.numel(), batch.noise_ids.numel() + batch.ctx_pos.numel()
    q, k, v = torch.randn(m, 6, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    attend = dense_attend(batch) if executor == "dense" else flex_attend(batch, compile=False)
    ref = _reference_attention(q, k, v, dense_mask(batch))
    torch.testing.assert_close(attend(q, k, v), ref, atol=2e-6, rtol=2e-5)


# ----------------------------------------------------------------------------- blocks, samplers


def test_prefix_sampler_is_truncated_geometric():
    # chi-square goodness of fit of 40k draws for gamma = 8, beta = 0.9 (l = 0..6, 6 dof);
    # 22.46 is the 0.999 quantile of chi2(6): a correct sampler fails with probability 1e-3
    gamma, beta, n = 8, 0.9, 40_000
    probs = prefix_length_probs(gamma, beta)
    assert probs.numel() == gamma - 1
    torch.testing.assert_close(
        probs[1:] / probs[:-1], torch.full((gamma - 2,), beta, dtype=torch.float64)
    )
    draws = sample_prefix_lengths(n, gamma, beta, torch.Generator().manual_seed(3))
    observed = torch.bincount(draws, minlength=gamma - 1).double()
    assert observed.numel() == gamma - 1  # never l > gamma - 2
    expected = probs * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 22.46, chi2


def test_anchor_sampler_range_and_distinct():
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([30, 12, 7, 5])
    prompt_lens = torch.tensor([10, 3, 4, 4])
    anchors, valid = sample_anchors(lengths, prompt_lens, 32, 6, gen)
    for b in range(4):
        got = anchors[b][valid[b]].tolist()
        candidates = list(range(int(prompt_lens[b]), int(lengths[b]) - 1))
        assert len(got) == min(6, len(candidates)) and len(set(got)) == len(got)
        assert all(a in candidates for a in got) and got == sorted(got)
    assert valid.sum(1).tolist() == [6, 6, 2, 0]
    assert (anchors[~valid] == 0).all()


@pytest.mark.parametrize("objective", ["dflash", "vp"])
def test_blocks_labels_and_weights(objective):
    gen = torch.Generator().manual_seed(5)
    gamma, mask_id = 6, 999
    seqs = [torch.arange(100, 140), torch.arange(200, 222)]
    prompt_lens = torch.tensor([8, 5])
    batch = build_blocks(
        seqs, prompt_lens, seq_len=40, block_size=gamma, blocks_per_seq=5,
        mask_token_id=mask_id, objective=objective, beta=0.7, generator=gen,
    )  # fmt: skip
    decay = default_gamma_decay(gamma)
    ids, labels = batch.noise_ids.view(-1, gamma), batch.labels.view(-1, gamma)
    weights = batch.weights.view(-1, gamma)
    for j in range(10):
        seq, a, vis = seqs[j // 5], int(batch.anchors[j]), int(batch.prefix_len[j])
        assert batch.block_valid[j] and int(prompt_lens[j // 5]) <= a <= len(seq) - 2
        assert torch.equal(batch.noise_pos.view(-1, gamma)[j], torch.arange(a, a + gamma))
        if objective == "dflash":
            assert vis == 0
        for k in range(gamma):
            inside = a + k < len(seq)
            assert ids[j, k] == (seq[a + k] if k <= vis else mask_id)
            supervised = k > vis and inside
            assert labels[j, k] == (seq[a + k] if supervised else IGNORE)
            want = math.exp(-(k - vis - 1) / decay) if supervised else 0.0
            assert weights[j, k] == pytest.approx(want, rel=1e-6)
    if objective == "vp":
        assert batch.prefix_len.max() > 0  # visible prefixes really occur


def test_weight_tables():
    # DFlash: 7 for gamma 16, 4 for gamma 8; w_0 = 0, w_1 = 1, w_k = exp(-(k-1)/decay)
    assert default_gamma_decay(16) == 7.0 and default_gamma_decay(8) == 4.0
    w = dflash_position_weights(16, 7.0)
    assert w[0] == 0 and w[1] == 1
    torch.testing.assert_close(w[1:], torch.exp(-torch.arange(15.0) / 7.0))


def test_weighted_cross_entropy_normalisation():
    logits = torch.randn(5, 11)
    labels = torch.tensor([3, 0, 7, IGNORE, 10])
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0, 2.0])
    ce = torch.nn.functional.cross_entropy(
        logits[[0, 1, 2, 4]], labels[[0, 1, 2, 4]], reduction="none"
    )
    want = (ce * weights[[0, 1, 2, 4]]).sum() / weights.sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights), want)
    # uniform logits: every CE is log V, so the normalised loss is log V whatever the weights
    flat = weighted_cross_entropy(torch.zeros(5, 11), labels, weights)
    torch.testing.assert_close(flat, torch.tensor(math.log(11.0)))


def test_lr_schedule():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert lr_factor(20, warmup=4, total=20, min_ratio=0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- data


def test_truncated_json_array():
    text = '[\n  {"a": 1},\n  {"a": [2, 3]}, {"a": "x"}\n, {"a": "cut'
    assert list(iter_json_array_objects(text)) == [{"a": 1}, {"a": [2, 3]}, {"a": "x"}]
    assert list(iter_json_array_objects('[{"a": 1}]')) == [{"a": 1}]


def test_split_counts():
    mix = {"sharegpt": 0.5, "gsm8k": 0.3, "mbpp": 0.2}
    assert _split_counts(100, mix, {"sharegpt": 1000, "gsm8k": 1000, "mbpp": 1000}) == {
        "sharegpt": 50, "gsm8k": 30, "mbpp": 20,
    }  # fmt: skip
    # no sharegpt and a short mbpp: gsm8k takes the rest
    got = _split_counts(100, mix, {"gsm8k": 1000, "mbpp": 7})
    assert got == {"gsm8k": 93, "mbpp": 7}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_decontamination_synthetic(tmp_path):
    # a training file that (wrongly) contains a test question and an MBPP test task
    _write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "Test  Q one?", "answer": "1"}])
    _write_jsonl(
        tmp_path / "gsm8k_train.jsonl",
        [{"question": "test q ONE?", "answer": "1"}, {"question": "train q", "answer": "2"}],
    )
    mbpp = [
        {"task_id": i, "text": f"task {i}", "code": "", "test_list": [f"assert f({i})"],
         "test_setup_code": "", "challenge_test_list": []}
        for i in (12, 601, 602)
    ]  # fmt: skip
    mbpp[2]["text"] = "task 12"  # a train task whose text equals a test task's
    _write_jsonl(tmp_path / "mbpp.jsonl", mbpp)
    prompts = load_training_prompts(tmp_path, 10, {"gsm8k": 0.5, "mbpp": 0.5})
    assert sorted(p.question for p in prompts) == ["task 601", "train q"]
    assert all("Please reason step by step" in p.text for p in prompts if p.source == "gsm8k")
    with pytest.raises(AssertionError, match="gsm8k_test"):
        assert_no_benchmark_leak([Prompt("sharegpt", "Test Q one?", "x")], tmp_path)
    with pytest.raises(AssertionError, match="mbpp_test"):
        assert_no_benchmark_leak([Prompt("mbpp", "task 12", "x")], tmp_path)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets")
def test_real_training_prompts_exclude_benchmarks():
    prompts = load_training_prompts(SHARED, 3000, {"gsm8k": 0.6, "mbpp": 0.4}, seed=1)
    test_q = {json.loads(x)["question"] for x in _lines(SHARED / "gsm8k_test.jsonl")}
    mbpp = [json.loads(x) for x in _lines(SHARED / "mbpp.jsonl")]
    mbpp_test = {r["text"].strip() for r in mbpp if 11 <= r["task_id"] <= 510}
    # 374 train tasks, minus 602, 704 and 872 whose text is also a test task's
    assert len(prompts) == 3000 and sum(p.source == "mbpp" for p in prompts) == 371
    for p in prompts:
        assert p.question not in test_q and p.question not in mbpp_test
        assert not any(q in p.text for q in mbpp_test if len(q) > 40)


def test_shards_resume(tmp_path, tiny):
    target, prompts, ids = tiny
    tok = target.tokenizer
    kw = dict(
        eos_ids=eos_token_ids(target.hf, tok), pad_id=tok.pad_token_id,
        sampling=SamplingConfig(max_new_tokens=12), target_name="tiny", batch_size=2, shard_size=2,
    )  # fmt: skip
    out = tmp_path / "data"
    meta = write_shards(out, target.hf, prompts, ids, **kw)
    assert meta["complete"] and meta["records"] == 6 and len(meta["shards"]) == 3
    first = load_response_data(out)
    for i in range(6):  # records are prompt + response, prompts intact and in order
        assert first.record(i)[: len(ids[i])].tolist() == ids[i]
        assert 1 <= first.lengths[i] - len(ids[i]) <= 12
    kept = {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 2)}
    shard_path(out, 1).unlink()
    write_shards(out, target.hf, prompts, ids, **kw)  # regenerates only shard 1
    assert {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 2)} == kept
    again = load_response_data(out)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.offsets, first.offsets)
    with pytest.raises(ValueError, match="another config"):
        write_shards(out, target.hf, prompts, ids, **{**kw, "sampling": SamplingConfig(13)})


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("objective", ["dflash", "vp"])
def test_loss_falls_on_fixed_batch(tmp_path, tiny, objective):
    target, _, ids = tiny
    data = response_data(target, ids)
    trainer = Trainer(small_config(tmp_path, objective), target=target, data=data)
    batch = trainer.batch(0)
    assert (batch.labels != IGNORE).sum() >= 16
    assert len(set(batch.labels[batch.labels != IGNORE].tolist())) > 4  # varied text, not one byte
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip_and_resume(tmp_path, tiny):
    from d2sd.models import DFlashDrafter

    target, _, ids = tiny
    data = response_data(target, ids)
    straight = Trainer(small_config(tmp_path / "a", steps=6, log_every=2), target=target, data=data)
    straight.train()
    first = Trainer(small_config(tmp_path / "b", steps=6, log_every=2), target=target, data=data)
    first.train(until=3)  # interrupted after step 3
    resumed = Trainer(
        small_config(tmp_path / "b", steps=6, log_every=2, resume=True), target=target, data=data
    )
    assert resumed.step == 3
    resumed.train()
    assert resumed.step == 6
    for name, p in straight.params.items():  # same batches, same optimizer state: same weights
        torch.testing.assert_close(resumed.params[name], p, atol=1e-6, rtol=1e-5)
    log = [json.loads(x) for x in _lines(Path(resumed.cfg.out) / "train_log.jsonl")]
    assert [r["step"] for r in log] == [2, 3, 4, 6]  # run 1 logs 2 and its last step, run 2 goes on
    # the z-lab checkpoint loads back and holds the bf16 weights
    loaded = DFlashDrafter.from_pretrained(resumed.cfg.out, target, dtype=torch.float32)
    state = loaded.state_dict()
    assert set(state) == set(resumed.params)
    for name, p in resumed.params.items():
        assert torch.equal(state[name], p.detach().to(torch.bfloat16).float())
    assert loaded.block_size == 4 and loaded.target_layer_ids == (0, 2)
    meta = json.loads((Path(resumed.cfg.out) / "train_meta.json").read_text())
    assert meta["step"] == 6 and meta["weights_bytes_bf16"] == 2 * meta["params"]


def test_default_smollm2_drafter_fits_8mb():
    # the shipped defaults (1 layer, MLP 1024, 3 taps) on SmolLM2-135M's shapes, bf16
    from d2sd.models import DFlashConfig, DFlashDrafter, default_target_layer_ids

    cfg = TrainConfig()
    taps = default_target_layer_ids(30, cfg.num_taps)
    assert taps == (1, 14, 27)
    config = DFlashConfig(
        hidden_size=576, num_hidden_layers=cfg.num_layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=cfg.intermediate_size,
        vocab_size=49152, target_layer_ids=taps, mask_token_id=49151, num_target_layers=30,
    )  # fmt: skip
    with torch.device("meta"):
        embed = torch.nn.Embedding(49152, 576)
        drafter = DFlashDrafter(config, embed, torch.nn.Linear(576, 49152, bias=False))
    params = sum(p.numel() for p in drafter.parameters())
    assert params * 2 <= 8_000_000, params * 2
    assert params * 2 > 7_000_000  # and the budget is used (a wider MLP would not fit)


def test_cli_parses_every_knob():
    from d2sd.train.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(
        ["vp", "--target", "t", "--data", "d", "--out", "o", "--block-size", "8",
         "--num-layers", "2", "--intermediate-size", "0", "--target-layer-ids", "1,5,9",
         "--steps", "7", "--batch-tokens", "4096", "--lr", "1e-4", "--warmup", "3",
         "--anchors-per-seq", "5", "--gamma-decay", "4", "--beta", "0.8", "--tau", "3",
         "--seed", "9", "--device", "cpu", "--dtype", "fp32", "--resume", "--log-every", "2",
         "--save-every", "4", "--max-len", "256"]
    )  # fmt: skip
    cfg = config_from_args(args, "vp")
    assert cfg.objective == "vp" and cfg.block_size == 8 and cfg.intermediate_size is None
    assert cfg.target_layer_ids == (1, 5, 9) and cfg.records_per_step == 16
    assert (cfg.beta, cfg.tau, cfg.gamma_decay, cfg.resume, cfg.max_len) == (
        0.8,
        3.0,
        4.0,
        True,
        256,
    )


@pytest.mark.gpu
def test_flex_matches_dense_on_cuda():
    # the compiled flex_attention executor (the CUDA default) against the dense SDPA one, bf16
    gen = torch.Generator().manual_seed(6)
    seqs = [
        torch.randint(0, 500, (int(n),), generator=gen)
        for n in torch.randint(40, 256, (8,), generator=gen)
    ]
    batch = build_blocks(
        seqs, torch.full((8,), 20), seq_len=256, block_size=16, blocks_per_seq=8,
        mask_token_id=499, objective="dflash", generator=gen,
    ).to("cuda")  # fmt: skip
    m, n = batch.noise_ids.numel(), batch.noise_ids.numel() + batch.ctx_pos.numel()
    q = torch.randn(m, 9, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 3, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, 3, 64, device="cuda", dtype=torch.bfloat16)
    ref = _reference_attention(q.float(), k.float(), v.float(), dense_mask(batch))
    dense = dense_attend(batch)(q, k, v).float()
    flex = flex_attend(batch)(q, k, v).float()
    torch.testing.assert_close(flex, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dense, ref, atol=2e-2, rtol=2e-2)


def test_init_from_target_copies_matching_shapes(tmp_path, tiny):
    from d2sd.train.trainer import copy_target_layers, make_drafter

    target = tiny[0]
    drafter = make_drafter(small_config(tmp_path), target)
    # the final norm always starts as the target's (the lm_head input has the target's scale)
    assert torch.equal(drafter.norm.weight, target.hf.model.norm.weight)
    copied = copy_target_layers(drafter, target)
    last = target.hf.model.layers[-1]
    assert (
        "layers.0.self_attn.q_proj.weight" in copied and "layers.0.input_layernorm.weight" in copied
    )
    assert not any("mlp" in name for name in copied)  # the drafter's MLP is narrower (64 vs 128)
    assert torch.equal(drafter.layers[0].self_attn.k_proj.weight, last.self_attn.k_proj.weight)


def test_shipped_smollm2_drafters_are_small_zlab_checkpoints():
    """d2sd/checkpoints holds the trained defaults: z-lab format, bf16, <= 8 MB each, the taps and
    block size `python -m d2sd.run` expects, trained on the target's own answers."""
    import json

    from safetensors import safe_open

    from d2sd.run import CHECKPOINTS

    for name, objective in (("smollm2-dflash", "dflash"), ("smollm2-vp", "vp")):
        folder = CHECKPOINTS / name
        config = json.loads((folder / "config.json").read_text())
        assert config["dflash_config"]["target_layer_ids"] == [1, 14, 27]
        assert config["dflash_config"]["mask_token_id"] == 49151
        assert config["block_size"] == 16 and config["num_target_layers"] == 30
        weights = folder / "model.safetensors"
        assert weights.stat().st_size <= 8_000_000
        with safe_open(str(weights), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (no __iter__)
        assert dtypes == {"BF16"}
        meta = json.loads((folder / "train_meta.json").read_text())
        assert meta["objective"] == objective and meta["step"] == meta["config"]["steps"] > 0
        data = json.loads((folder / "data_meta.json").read_text())
        assert data["complete"] and data["records"] >= 1000
