"""`python -m minihuatuo.bench gpu` (issue 22, point 4): what can be checked without a GPU — the bound's
arithmetic by hand, the decode step on the CPU, and a clear refusal where there is no CUDA."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minihuatuo.bench.gpu import bytes_per_token
from minihuatuo.engine.model import build_model, preset


def test_bytes_per_token_by_hand():
    # tiny: V 512, C 64, I 172, 2 layers, 4 heads, 2 KV heads (head_dim 16), untied embeddings
    model = build_model(preset("tiny"), dtype=torch.bfloat16, seed=0)
    cfg = model.cfg
    assert not cfg.tie_word_embeddings and cfg.head_dim == 16
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 172 + 2 * 64  # q, k, v, o, gate/up/down, 2 norms
    weights = 2 * per_layer + 64 + 512 * 64 + 64  # layers, final norm, LM head, one embedding row
    kv = 2 * 2 * 2 * 16 * 10  # keys and values, 2 layers, 2 KV heads, head_dim 16, 10 cached positions
    assert bytes_per_token(model, 10) == 2 * (weights + kv)  # bf16: 2 bytes per element
    tied = build_model(preset("tiny", tie_word_embeddings=True), dtype=torch.float32, seed=0)
    # tied: the table is the LM head, read whole every step
    assert bytes_per_token(tied, 0) == 4 * sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())


def test_decode_step_runs_on_the_cpu_and_reports_its_bound():
    r = subprocess.run([sys.executable, "-m", "minihuatuo.bench", "gpu", "--device", "cpu", "--preset", "tiny",
                        "--new-tokens", "8", "--prompt-len", "4", "--repeats", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["decode"]
    assert d["tok_s"] > 0 and d["copy_GBps"] > 0
    assert d["bytes_per_token"] == bytes_per_token(build_model(preset("tiny"), dtype=torch.bfloat16), 4 + 8 // 2)
    # the fraction is tokens/s × bytes per token over the copy bandwidth (the printed figures are rounded)
    assert d["of_copy_bound"] == pytest.approx(d["tok_s"] * d["bytes_per_token"] / 1e9 / d["copy_GBps"], rel=0.03, abs=2e-3)
    assert "parity_tests" not in json.loads(r.stdout)  # the CUDA steps never run on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check instead")
def test_without_cuda_it_refuses_in_one_line():
    r = subprocess.run([sys.executable, "-m", "minihuatuo.bench", "gpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("bench gpu: no CUDA device here (torch.cuda.is_available() is False); "
                                "nothing was run")
