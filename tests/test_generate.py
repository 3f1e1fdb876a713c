"""KV-cache decoding: greedy output equals transformers' greedy `generate`, cached logits equal
uncached logits at every step, and the sampler's contract (seeds, top-k/top-p, log-probs, stops)."""
from __future__ import annotations

import pytest
import torch

from minihuatuo.engine.kv_cache import KVCache
from minihuatuo.engine.model import build_model, preset
from minihuatuo.engine.sample import SamplingConfig, filter_logits, generate, sample_next


def tiny(seed=0, **kw):
    model = build_model(preset("tiny", vocab_size=97, **kw), seed=seed).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init: greedy paths depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [12, 3], [60, 61, 62, 63, 1]]


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from minihuatuo.engine.checkpoint import save_model

    model = tiny(qkv_bias=True, o_bias=True)
    save_model(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    pad = 0
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=24, temperature=0), pad_id=pad)
    P = out.prompt_ids.shape[1]
    ref = hf.generate(out.prompt_ids, attention_mask=out.prompt_mask, max_new_tokens=24, do_sample=False,
                      pad_token_id=pad, eos_token_id=None)
    assert torch.equal(out.tokens, ref[:, P:])
    assert len(set(map(tuple, out.responses()))) == 3  # rows really differ: the prompt matters


def test_cached_logits_equal_uncached_logits_at_every_step():
    model = tiny(seed=1)
    B, P, N = 3, 7, 12
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=N, temperature=1.0, seed=0), pad_id=0)
    full = torch.cat([out.prompt_ids, out.tokens], dim=1)  # (B, P + N)
    mask = torch.cat([out.prompt_mask, torch.ones(B, N, dtype=torch.long)], dim=1)
    with torch.no_grad():
        uncached = model(full, attention_mask=mask)  # (B, P + N, V), one causal pass
        cache = KVCache.for_model(model, B, P + N)
        step_logits = [model(out.prompt_ids, attention_mask=mask[:, :P], cache=cache, cache_start=0)]
        for n in range(N - 1):
            step_logits.append(model(out.tokens[:, n:n + 1], attention_mask=mask[:, :P + n + 1], cache=cache,
                                     cache_start=P + n))
    cached = torch.cat(step_logits, dim=1)  # (B, P + N - 1, V)
    valid = mask[:, :P + N - 1].bool()
    torch.testing.assert_close(cached[valid], uncached[:, :P + N - 1][valid], atol=1e-5, rtol=0)
    # and the sampler's log-probs are log_softmax of those logits (temperature 1) at the sampled ids
    lp = torch.log_softmax(uncached[:, P - 1:P + N - 1].float(), -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.logprobs, lp, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_shot_prefill():
    """Cache slots filled in two chunks (T > 1 with cache_start > 0) give the same logits."""
    model = tiny(seed=2)
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        ref = model(ids)
        cache = KVCache.for_model(model, 2, 10)
        a = model(ids[:, :6], cache=cache, cache_start=0)
        b = model(ids[:, 6:], cache=cache, cache_start=6)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=0)


def test_logprobs_are_temperature_scaled_log_softmax():
    model = tiny(seed=3)
    T = 0.6
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=T, top_k=20, top_p=0.9, seed=7),
                   pad_id=0)
    full = torch.cat([out.prompt_ids, out.tokens], 1)
    mask = torch.cat([out.prompt_mask, torch.ones_like(out.tokens)], 1)
    P = out.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(full, attention_mask=mask)[:, P - 1:-1].float()
    expected = torch.log_softmax(logits / T, -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny(seed=4)
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=123)
    a = generate(model, PROMPTS, cfg, pad_id=0)
    b = generate(model, PROMPTS, cfg, pad_id=0)
    c = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=124), pad_id=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_top_k_and_top_p_never_sample_outside_the_allowed_set():
    # Hand-built distribution over 6 tokens: p = [0.05, 0.40, 0.10, 0.25, 0.15, 0.05]
    p = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.15, 0.05])
    logits = p.log().expand(4000, 6).clone()
    g = torch.Generator().manual_seed(0)
    cases = [
        (dict(top_k=2), {1, 3}),
        (dict(top_p=0.5), {1, 3}),  # 0.40 < 0.5, so the 2nd token (0.25) is needed; 0.65 >= 0.5 stops
        (dict(top_p=0.75), {1, 3, 4}),  # 0.40 + 0.25 = 0.65 < 0.75; + 0.15 = 0.80 reaches it
        (dict(top_p=0.3), {1}),  # the top token alone already reaches 0.3
        # top-k first, then top-p on the renormalised rest: {0.5, 0.3125, 0.1875}; 0.5 < 0.6 needs a 2nd
        (dict(top_k=3, top_p=0.6), {1, 3}),
        (dict(top_k=3, top_p=0.5), {1}),
    ]
    for kw, allowed in cases:
        cfg = SamplingConfig(temperature=1.0, **kw)
        ids, lp = sample_next(logits, cfg, g)
        assert set(ids.tolist()) == allowed, kw  # every allowed token appears, nothing else does
        torch.testing.assert_close(lp, p.log()[ids], atol=1e-6, rtol=0)  # log-probs before truncation
        kept = filter_logits(logits[:1], **kw)[0]
        assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == allowed
    # empirical frequencies follow the renormalised distribution (0.40/0.65 vs 0.25/0.65)
    ids, _ = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)
    assert abs((ids == 1).float().mean().item() - 0.40 / 0.65) < 0.03


def test_stop_tokens_finish_rows_independently_and_are_kept():
    model = tiny(seed=5)
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), pad_id=0)
    stop = free.tokens[0, 3].item()  # make row 0 stop at its 4th token
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0, stop_token_ids=(stop,)),
                   pad_id=0)
    first = (free.tokens[0] == stop).nonzero()[0].item()
    assert out.responses()[0] == free.tokens[0, :first + 1].tolist()  # stop token kept, nothing after
    assert out.finish_reasons[0] == "stop_token"
    assert out.mask[0].sum().item() == first + 1 and (out.tokens[0, first + 1:] == 0).all()
    assert (out.logprobs[0, first + 1:] == 0).all()
    for b in (1, 2):  # other rows unaffected unless they emit the stop token themselves
        row = free.tokens[b].tolist()
        expected = row[:row.index(stop) + 1] if stop in row else row
        assert out.responses()[b] == expected
        assert out.finish_reasons[b] == ("stop_token" if stop in row else "length")


def test_stop_strings_use_decoded_text():
    model = tiny(seed=6)
    free = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, temperature=0), pad_id=0)
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731  a toy detokenizer
    target = decode(free.tokens[0, 4:6].tolist())  # a string spanning two tokens
    out = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, temperature=0, stop_strings=(target,)),
                   pad_id=0, decode=decode)
    assert out.finish_reasons == ["stop_string"]
    text = decode(out.responses()[0])
    assert text.endswith(target) and text.count(target) == 1
    with pytest.raises(ValueError, match="decode"):
        generate(model, [PROMPTS[0]], SamplingConfig(stop_strings=("x",)), pad_id=0)


def test_batched_rows_equal_single_rows():
    """Left padding changes nothing about a row: each prompt decodes the same alone and in a batch."""
    model = tiny(seed=7)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    batched = generate(model, PROMPTS, cfg, pad_id=0).responses()
    for b, p in enumerate(PROMPTS):
        assert generate(model, [p], cfg, pad_id=0).responses()[0] == batched[b]


def test_dropping_finished_rows_changes_no_row():
    """Rows that stop early are dropped from the batch and the cache (once an eighth of the batch is
    done): every row must still decode exactly as it does alone, and log-probs must match too."""
    model = tiny(seed=11)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (24,), generator=g)]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=24, temperature=0), pad_id=0)
    # the two most frequent generated tokens as stop ids: rows finish at many different steps
    stop = tuple(torch.bincount(free.tokens.flatten(), minlength=97).topk(2).indices.tolist())
    cfg = SamplingConfig(max_new_tokens=24, temperature=0, stop_token_ids=stop)
    out = generate(model, prompts, cfg, pad_id=0)
    lengths = out.mask.sum(1)
    assert len(set(lengths.tolist())) >= 4 and (lengths < 24).sum() >= 8  # rows really were dropped
    for b, p in enumerate(prompts):
        alone = generate(model, [p], cfg, pad_id=0)
        assert out.responses()[b] == alone.responses()[0]
        assert out.finish_reasons[b] == alone.finish_reasons[0]
        n = int(lengths[b])
        torch.testing.assert_close(out.logprobs[b, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)
        assert (out.logprobs[b, n:] == 0).all() and (out.tokens[b, n:] == 0).all()


def test_sampling_with_dropped_rows_is_seeded_and_follows_the_distribution():
    """Sampled rows that stop early: the same seed gives the same tokens, and the first token's
    empirical frequencies follow softmax(logits / T) of the model."""
    model = tiny(seed=2)
    prompts = [[5, 17, 33]] * 3000
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.3, seed=9, stop_token_ids=(1, 2, 3, 4, 5, 6, 7, 8))
    a, b = generate(model, prompts, cfg, pad_id=0), generate(model, prompts, cfg, pad_id=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert (a.mask.sum(1) < 6).any()  # some rows stopped and were dropped
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[5, 17, 33]]))[0, -1].float() / 1.3, -1)
    freq = torch.bincount(a.tokens[:, 0], minlength=97).float() / len(prompts)
    assert (freq - p).abs().max() < 0.03
