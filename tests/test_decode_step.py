"""The compiled decode step (engine/decode_step.py): the same tokens as the eager step, greedy and
seeded sampling alike, across padded batches, dropped rows, other models and in-place weight updates
(without recompiling), and a one-line fallback when no C++ compiler is available."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from minihuatuo.engine import decode_step
from minihuatuo.engine.model import build_model, preset
from minihuatuo.engine.sample import SamplingConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed=0):
    model = build_model(preset("tiny", vocab_size=97), seed=seed).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init: greedy paths depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def prompts(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)]


def both(model, batch, **kw):
    eager = generate(model, batch, SamplingConfig(**kw), pad_id=0)
    compiled = generate(model, batch, SamplingConfig(compile=True, **kw), pad_id=0)
    return eager, compiled


def assert_same(eager, compiled):
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.equal(eager.mask, compiled.mask)
    assert eager.finish_reasons == compiled.finish_reasons
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-4, rtol=0)


def test_greedy_compiled_equals_eager_with_padding_and_dropped_rows():
    model = tiny(seed=11)
    batch = prompts(24)
    free = generate(model, batch, SamplingConfig(max_new_tokens=24, temperature=0), pad_id=0)
    stop = tuple(torch.bincount(free.tokens.flatten(), minlength=97).topk(2).indices.tolist())
    eager, compiled = both(model, batch, max_new_tokens=24, temperature=0, stop_token_ids=stop)
    lengths = eager.mask.sum(1)
    assert len(set(lengths.tolist())) >= 4 and (lengths < 24).sum() >= 8  # rows really were dropped
    assert_same(eager, compiled)
    assert decode_step.compile_stats()["failed"] is None
    # batch 1 (another batch size: the same compiled code, dynamic shapes)
    assert_same(*both(model, batch[:1], max_new_tokens=16, temperature=0))


def test_seeded_sampling_compiled_equals_eager():
    """The uniform draws are made outside the compiled code: the same seed gives the same tokens."""
    model = tiny(seed=2)
    batch = prompts(16, seed=5)
    eager, compiled = both(model, batch, max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=4,
                           stop_token_ids=(1, 2, 3))
    assert len(set(map(tuple, eager.responses()))) > 8  # really sampled
    assert_same(eager, compiled)


def test_one_compilation_serves_other_models_and_updated_weights():
    """Weights are inputs of the compiled code: another model of the same shape and an in-place update
    (what PPO does between rollouts) reuse the compilation and see the new weights."""
    a, b = tiny(seed=1), tiny(seed=2)
    batch = prompts(6, seed=8)
    cfg = dict(max_new_tokens=12, temperature=0)
    assert_same(*both(a, batch, **cfg))
    compiles = decode_step.compile_stats()["compiles"]
    eager_b, compiled_b = both(b, batch, **cfg)
    assert_same(eager_b, compiled_b)
    before = generate(a, batch, SamplingConfig(compile=True, **cfg), pad_id=0)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.5 * torch.randn_like(p))
    eager_a, compiled_a = both(a, batch, **cfg)
    assert_same(eager_a, compiled_a)
    assert not torch.equal(before.tokens, compiled_a.tokens)  # the update really changed the output
    assert decode_step.compile_stats()["compiles"] == compiles


def test_world_model_greedy_replies_are_identical(tmp_path):
    """The shipped world model on real exam prompts: the compiled step writes the same replies."""
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.engine.tokenizer import Tokenizer

    base = ROOT / "data" / "world" / "base"
    model = load_model(base).eval()
    tok = Tokenizer.from_dir(base)
    questions = ["A 54-year-old man has crushing chest pain radiating to the left arm. What is the most likely diagnosis?",
                 "A child has a barking cough and stridor. What is the first-line treatment?",
                 "What investigation confirms the diagnosis in a woman with fatigue and a low haemoglobin?"]
    batch = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    eager, compiled = both(model, batch, max_new_tokens=96, temperature=0, stop_token_ids=tuple(tok.eos_ids))
    assert eager.mask.sum(1).min() >= 30  # real replies, not an immediate stop
    assert_same(eager, compiled)


def test_falls_back_to_eager_with_one_line_when_no_compiler(tmp_path):
    script = """
import torch, torch._inductor.config as ic
ic.cpp.cxx = ("/nonexistent/c++",)
from tests.test_decode_step import tiny, prompts
from minihuatuo.engine.sample import SamplingConfig, generate
from minihuatuo.engine import decode_step
m = tiny(seed=4); batch = prompts(4)
e = generate(m, batch, SamplingConfig(max_new_tokens=8, temperature=0), pad_id=0)
c = generate(m, batch, SamplingConfig(max_new_tokens=8, temperature=0, compile=True), pad_id=0)
assert torch.equal(e.tokens, c.tokens)
assert decode_step.compile_stats()["failed"]
print("ok")
"""
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"
    lines = [line for line in r.stderr.splitlines() if "minihuatuo" in line]
    assert len(lines) == 1 and "decoding eagerly" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_cli_switch_compiles_every_stage_and_resets(capsys):
    """`minihuatuo --compile-decode CMD` turns the compiled step on for the whole command (greedy text
    unchanged); a command without it decodes eagerly."""
    from minihuatuo import cli

    base = str(ROOT / "data" / "world" / "base")
    args = ["generate", "--model", base, "--prompt", "A child has a barking cough and stridor. What is the diagnosis?",
            "--temperature", "0", "--max-new-tokens", "40"]
    calls = decode_step.compiled_step.calls
    assert cli.main(["--compile-decode"] + args) == 0
    compiled_text = capsys.readouterr().out
    assert decode_step.compile_by_default is True and decode_step.compiled_step.calls > calls
    calls = decode_step.compiled_step.calls
    assert cli.main(args) == 0
    assert capsys.readouterr().out == compiled_text and len(compiled_text.split()) > 5
    assert decode_step.compile_by_default is False and decode_step.compiled_step.calls == calls


def test_bf16_single_row_linear_matches_the_matrix_product():
    """model.Linear sends one bf16 row on a CPU to torch.mv: the same product as F.linear (both sum in
    fp32; they may differ by one bf16 rounding of the output), with and without a bias, any leading shape."""
    from minihuatuo.engine.model import Linear

    torch.manual_seed(0)
    for bias in (False, True):
        layer = Linear(64, 48, bias=bias).to(torch.bfloat16)
        with torch.no_grad():
            for shape in ((1, 1, 64), (1, 64), (64,), (3, 1, 64)):
                x = torch.randn(shape).to(torch.bfloat16)
                ref = torch.nn.functional.linear(x.float(), layer.weight.float(),
                                                 None if layer.bias is None else layer.bias.float())
                y = layer(x)
                assert y.shape == ref.shape and y.dtype == torch.bfloat16
                torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_the_row_kept_for_batch_two_draws_no_random_number(monkeypatch):
    """With the compiled step a batch is never cut to one row (a finished row rides along); the eager
    step does cut it. The rider draws no uniform, so seeded sampling still gives the eager tokens."""
    model = tiny(seed=5)
    batch = prompts(6, seed=9)
    sizes = {"eager": [], "compiled": []}
    eager_step, compiled_step = decode_step.step, decode_step.compiled_step
    monkeypatch.setattr(decode_step, "step", lambda *a: (sizes["eager"].append(a[1].shape[0]), eager_step(*a))[1])
    monkeypatch.setattr(decode_step, "compiled_step",
                        lambda *a: (sizes["compiled"].append(a[1].shape[0]), compiled_step(*a))[1])
    eager, compiled = both(model, batch, max_new_tokens=30, temperature=1.0, seed=1, stop_token_ids=tuple(range(1, 12)))
    assert 1 in sizes["eager"] and min(sizes["compiled"]) == 2  # the rider really rode
    assert_same(eager, compiled)
