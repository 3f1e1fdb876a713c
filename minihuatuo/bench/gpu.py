"""The GPU check (issue 22, point 4): one command that, on a CUDA machine, runs in a few minutes

    python -m minihuatuo.bench gpu [--json] [--new-tokens 64] [--skip-tests] [--skip-kernels]

  1. parity   the fused CUDA kernels' tests (tests/test_kernels.py: the "cuda" parameter runs every kernel
              against its PyTorch reference), when the repository's tests/ is there
  2. kernels  `bench kernels` on the GPU: each fused kernel vs its reference, time and memory
  3. decode   a Llama-3-8B-shaped model (preset llama-3.1-8b) with random bf16 weights, batch-1 greedy
              decoding with our sampler and static KV cache; tokens/s against the memory-bandwidth bound

The bound of batch-1 decoding: every step reads every weight once (the embedding table excepted: one
row) and the KV cache written so far, so tokens/s ≤ bandwidth / bytes per token (`bytes_per_token`).
Two bandwidths: the card's peak (its data sheet, where the card is known) and the achievable one,
measured here by a device-to-device copy of a 2 GiB buffer (reads + writes). The issue's goal is ≥ 70%
of the bandwidth bound.

Without CUDA it prints one line and exits 2, having run nothing. `--device cpu --preset tiny` runs step 3
on the CPU (the tests do; the bound then uses the measured copy bandwidth of RAM).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from minihuatuo.engine.model import ModelConfig, build_model, preset
from minihuatuo.engine.sample import SamplingConfig, generate

from .generate import machine
from .kernels import BANDWIDTH_GBS

REPO = Path(__file__).resolve().parents[2]


def bytes_per_token(model, context: int) -> int:
    """Bytes one batch-1 decode step must read: every parameter but the input embedding (one row of
    it), and the keys and values of `context` cached positions in every layer."""
    cfg: ModelConfig = model.cfg
    elem = next(model.parameters()).element_size()
    params = {id(p): p for p in model.parameters()}.values()
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() for p in params) - (embed.numel() - cfg.hidden_size if not cfg.tie_word_embeddings else 0)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context
    return (weights + kv) * elem


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written), best of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_benchmark(name: str, device: torch.device, new_tokens: int, prompt_len: int, repeats: int) -> dict:
    dtype = torch.bfloat16
    model = build_model(preset(name), dtype=dtype, device=device, seed=0).eval()
    prompt = torch.randint(1, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        generate(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0), pad_id=0)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up: allocator, kernels, thread pools
    t_n = min(run(new_tokens) for _ in range(repeats))
    t_1 = min(run(1) for _ in range(repeats))
    tok_s = (new_tokens - 1) / (t_n - t_1)
    per_token = bytes_per_token(model, prompt_len + new_tokens // 2)  # the mean cached length
    copy_gbs = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20))
    peak = next((bw for key, bw in BANDWIDTH_GBS.items() if key in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    row = {"preset": name, "dtype": "bfloat16", "params_B": round(model.num_parameters() / 1e9, 3),
           "prompt_len": prompt_len, "new_tokens": new_tokens, "tok_s": round(tok_s, 1),
           "bytes_per_token": per_token, "achieved_GBps": round(tok_s * per_token / 1e9, 1),
           "copy_GBps": round(copy_gbs, 1), "of_copy_bound": round(tok_s * per_token / 1e9 / copy_gbs, 3)}
    if peak:
        row.update(peak_GBps=peak, of_peak_bound=round(tok_s * per_token / 1e9 / peak, 3))
    return row  # the model's memory goes with this frame and the closure `run`


def run_step(cmd: list[str], timeout: int) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        out = {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-3000:]}
    except subprocess.TimeoutExpired:
        out = {"returncode": None, "tail": f"timed out after {timeout} s"}
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama-3.1-8b", help="the decode benchmark's model shape (random weights)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-tests", action="store_true", help="skip step 1 (the kernels' parity tests)")
    p.add_argument("--skip-kernels", action="store_true", help="skip step 2 (bench kernels)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 2
    report: dict = {"machine": machine(), "device": str(device)}
    if device.type == "cuda":
        report["card"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    if not a.skip_tests and device.type == "cuda":
        if (REPO / "tests" / "test_kernels.py").exists():
            report["parity_tests"] = run_step([sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py", "-k",
                                               "cuda"], timeout=240)
        else:
            report["parity_tests"] = {"returncode": None, "tail": "tests/ is not here (an installed package)"}
    if not a.skip_kernels and device.type == "cuda":
        report["kernels"] = run_step([sys.executable, "-m", "minihuatuo.bench", "kernels", "--device", "cuda",
                                      "--dtype", "bfloat16", "--json"], timeout=240)
    report["decode"] = decode_benchmark(a.preset, device, a.new_tokens, a.prompt_len, a.repeats)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for step in ("parity_tests", "kernels"):
            if step in report:
                s = report[step]
                print(f"{step}: exit {s['returncode']} in {s['wall_s']} s\n{s['tail'][-1200:]}\n")
        d = report["decode"]
        print(f"decode {d['preset']} ({d['params_B']}B, bf16, batch 1): {d['tok_s']} tok/s, "
              f"{d['bytes_per_token'] / 1e9:.3f} GB per token -> {d['achieved_GBps']} GB/s = {d['of_copy_bound']:.0%} of the "
              f"measured copy bandwidth ({d['copy_GBps']} GB/s)"
              + (f", {d['of_peak_bound']:.0%} of the card's peak ({d['peak_GBps']} GB/s)" if "peak_GBps" in d else ""))
    failed = any(report.get(s, {}).get("returncode") not in (0, None) for s in ("parity_tests", "kernels"))
    return 1 if failed else 0
