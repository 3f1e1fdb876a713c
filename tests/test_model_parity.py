"""Parity with transformers (the oracle) on the same weights: HF saves -> we load, we save -> HF loads,
single-file and sharded, causal LM and sequence classification, Llama (with and without llama3 RoPE
scaling, GQA and MHA, attention bias) and Qwen2 (q/k/v biases, tied embeddings)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minihuatuo.engine.checkpoint import load_model, save_model  # noqa: E402
from minihuatuo.engine.model import build_model, preset  # noqa: E402

TOL = 1e-4  # fp32; observed differences are ~1e-6 (different but equivalent op orders)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
V = 211


def llama_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                pad_token_id=0)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def qwen_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, pad_token_id=0)
    base.update(kw)
    return transformers.Qwen2Config(**base)


CAUSAL = {
    "llama-gqa-llama3-rope": lambda: transformers.LlamaForCausalLM(llama_cfg(rope_scaling=LLAMA3_SCALING,
                                                                             rope_theta=500000.0)),
    "llama-mha": lambda: transformers.LlamaForCausalLM(llama_cfg(num_key_value_heads=4)),
    "llama-attention-bias-tied": lambda: transformers.LlamaForCausalLM(llama_cfg(attention_bias=True,
                                                                                 tie_word_embeddings=True)),
    "qwen2-tied": lambda: transformers.Qwen2ForCausalLM(qwen_cfg()),
    "qwen2-untied-mha": lambda: transformers.Qwen2ForCausalLM(qwen_cfg(tie_word_embeddings=False,
                                                                       num_key_value_heads=4)),
}
CLASSIFIERS = {
    "llama-cls": lambda: transformers.LlamaForSequenceClassification(llama_cfg(num_labels=2)),
    "qwen2-cls": lambda: transformers.Qwen2ForSequenceClassification(qwen_cfg(num_labels=2)),
    "llama-value": lambda: transformers.LlamaForSequenceClassification(llama_cfg(num_labels=1)),
}


def randomize(model, seed=0):
    """HF initialises biases to 0 and norms to 1; random values make those code paths visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def batch(seed=1, B=3, T=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :11] = 0  # left padding
    mask[2, :T - 3] = 0  # a 3-token prompt
    ids[mask == 0] = 0
    return ids, mask


def hf_load(path, cls):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_checkpoint_loads_with_equal_logits(name, sharded, tmp_path):
    torch.manual_seed(0)
    hf = randomize(CAUSAL[name]())
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = load_model(tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("sharded", [False, True])
def test_our_checkpoint_loads_in_transformers(name, sharded, tmp_path):
    torch.manual_seed(0)
    hf_src = randomize(CAUSAL[name]())
    hf_src.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src").eval()
    # Perturb every weight so the comparison is of what *we* wrote, not a copy of HF's file.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model(ours, tmp_path / "ours", max_shard_bytes=40_000 if sharded else 5 * 2**30)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == sharded
    hf = hf_load(tmp_path / "ours", type(hf_src))
    ids, mask = batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask)[mask.bool()],
                                   hf(ids, attention_mask=mask).logits[mask.bool()], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_preset_shapes_round_trip_through_transformers(name, tmp_path):
    """A preset scaled down in depth/width but with its family's features (llama3 RoPE scaling, tied
    embeddings, Qwen biases) is written by us and read by transformers with equal logits."""
    cfg = preset(name, vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ours = build_model(cfg, seed=3).eval()
    save_model(ours, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    cls = getattr(transformers, hf_cfg["architectures"][0])
    hf = hf_load(tmp_path, cls)
    ids, _ = batch(seed=4, T=200)  # beyond original_max_position_embeddings' low-frequency band
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_sequence_classifier_parity_both_directions(name, tmp_path):
    torch.manual_seed(0)
    hf = randomize(CLASSIFIERS[name]())
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    assert ours.lm_head is None and ours.score.weight.shape[0] == hf.config.num_labels
    ids, mask = batch(seed=5)
    right = torch.ones_like(mask)  # right padding: last row padded at the end instead
    right[2, 5:] = 0
    ids_right = ids.clone()
    ids_right[2, 5:] = 0
    with torch.no_grad():
        for x, m in ((ids, mask), (ids_right, right)):
            torch.testing.assert_close(ours.classify(x, m), hf(x, attention_mask=m).logits, atol=TOL, rtol=0)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        save_model(ours, tmp_path / "ours")
        back = hf_load(tmp_path / "ours", type(hf))
        torch.testing.assert_close(ours.classify(ids, mask), back(ids, attention_mask=mask).logits, atol=TOL,
                                   rtol=0)
    if hf.config.num_labels == 1:
        # Value-model use (TRL layout): the same score head applied at every position.
        out = back.model(ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            torch.testing.assert_close(ours.values(ids, mask)[mask.bool()],
                                       back.score(out).squeeze(-1)[mask.bool()], atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_close_to_fp32(dtype, tol, tmp_path):
    """bf16/fp16 forward against fp32 on the same weights (tolerances: ~3 and ~11 mantissa bits through
    2 layers on logits of magnitude ~1), and against transformers in the same dtype."""
    torch.manual_seed(0)
    hf = randomize(CAUSAL["qwen2-tied"]())
    hf.save_pretrained(tmp_path)
    ids, mask = batch(seed=6)
    full = load_model(tmp_path).eval()
    half = load_model(tmp_path, dtype=dtype).eval()
    hf_half = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():
        ref = full(ids)
        got = half(ids)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=0)
        torch.testing.assert_close(got.float(), hf_half(ids).logits.float(), atol=tol / 2, rtol=0)
