"""`python -m minihuatuo.bench generate --json`: its contract's shape (results[].batches[] with batch,
ours_tok_s, hf_tok_s, speedup_vs_hf, same_tokens), the compiled and eager rows, and the bf16 rows
measured against the fp32 ones, and the int8 rows (transformers on the dequantised weights), on a short
run of the tiny preset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_bench_generate_json_contract():
    r = subprocess.run([sys.executable, "-m", "minihuatuo.bench", "generate", "--presets", "tiny", "--batch", "1,3",
                        "--new-tokens", "6", "--repeats", "1", "--dtypes", "float32,bfloat16,int8", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["ours"].startswith("compiled decode step")
    assert [(x["preset"], x["dtype"]) for x in report["results"]] == [("tiny", "float32"), ("tiny", "bfloat16"),
                                                                   ("tiny", "int8")]
    for result in report["results"]:
        assert [row["batch"] for row in result["batches"]] == [1, 3]
        for row in result["batches"]:
            for key in ("ours_tok_s", "eager_tok_s", "hf_tok_s", "compile_s"):
                assert row[key] > 0, (key, row)
            assert row["speedup_vs_hf"] == pytest.approx(row["ours_tok_s"] / row["hf_tok_s"], abs=0.01)
            # fp32, and int8 against transformers in fp32 on the dequantised weights: both of our paths
            # wrote transformers' greedy tokens. bf16 (against transformers in bf16) is reported, not
            # promised: the two round bf16 intermediates at different points
            promised = result["dtype"] in ("float32", "int8")
            assert row["same_tokens"] is True if promised else isinstance(row["same_tokens"], bool)
        assert result["kernels"] is (result["dtype"] != "float32")
        assert "of_bound" in result["batches"][0] and "of_bound" not in result["batches"][1]
    fp32, bf16, int8 = report["results"]
    for low in (bf16, int8):
        for row, base in zip(low["batches"], fp32["batches"]):
            assert row["vs_float32"] == pytest.approx(row["ours_tok_s"] / base["ours_tok_s"], abs=0.01)
    assert fp32["params_M"] == int8["params_M"]  # counted before quantising (int8 weights are buffers)
    # the compiled step really ran: no fallback line on stderr
    assert "decoding eagerly" not in r.stderr


def test_decode_rate_retimes_and_then_refuses_a_noisy_measurement(monkeypatch):
    """rate = B·(N−1) / (t_N − t_1): a busy machine can time N tokens no slower than 1, which would
    give a negative or infinite rate; the benchmark retimes, then says why it cannot measure."""
    from minihuatuo.bench import generate as bg

    calls = []
    # a clock under which every run takes 0.5 s, whatever its number of tokens
    monkeypatch.setattr(bg, "best_time", lambda fn, repeats: (fn(), 0.5)[1])
    with pytest.raises(bg.NoisyTiming, match="too busy to measure"):
        bg.decode_rate(calls.append, 2, 8, 1)
    assert calls.count(8) == 3 and calls.count(1) == 4  # warm-up + 3 attempts
    # a clock of 10 ms a token plus 50 ms: (N - 1) tokens in (t_N - t_1) = 0.2 s, 2 rows -> 200 tok/s
    monkeypatch.setattr(bg, "best_time", lambda fn, repeats: 0.05 + 0.01 * fn())
    assert bg.decode_rate(lambda n: n, 2, 21, 1) == pytest.approx(200)


def test_an_unmeasurable_run_ends_in_one_line(monkeypatch, capsys):
    from minihuatuo.bench import generate as bg

    def busy(*args, **kwargs):
        raise bg.NoisyTiming("decoding 8 tokens timed no slower than 1 token: the machine is too busy to measure")

    monkeypatch.setattr(bg, "bench_preset", busy)
    assert bg.main(["--presets", "tiny", "--no-hf", "--dtypes", "float32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench generate: tiny float32: decoding 8 tokens timed no slower than 1 token: the machine is "
                   "too busy to measure"]
