"""Fused kernels vs their PyTorch references: time and peak extra memory, on CPU (and GPU if present).

    python -m minihuatuo.bench kernels [--cases all|rmsnorm,logprob,...] [--tokens 2048] [--vocab 128256]
                                       [--hidden 512] [--dtype float32|bfloat16] [--repeats 2] [--json]

Each case runs in its own subprocess, both sides in the same process: a warm-up on small inputs
(loads the kernels, touches every code path), then per side one measured call whose peak memory is
taken — on CPU the peak resident size (VmHWM, reset through /proc/self/clear_refs, with glibc told to
return every block over 128 KiB to the OS so that a freed buffer never hides a later one), on GPU
torch.cuda.max_memory_allocated — minus the resident size before the call; then the sides alternate
for the timed calls and the best time of each counts. "working" memory is the peak extra minus the
bytes of what the call must return either way (outputs, input gradients): the memory the method
itself needs. GB/s counts the bytes the fused kernel must move at least (each input read once,
each output written once).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from minihuatuo.engine import kernels as K
from minihuatuo.engine import reference_kernels as R

from .generate import machine

CASES = ["rmsnorm", "swiglu", "rope", "logprob-fwd", "logprob", "logprob-lsm-fwd", "logprob-lsm", "linear-ce",
         "linear-logprob-fwd", "linear-logprob"]
BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}  # HBM peak, for "of the card's bandwidth"


def build(case: str, a, device, dtype, scale: float = 1.0):
    """(describe, ref(), fused(), leaves needing grad, cotangents or None for forward-only, bytes the
    fused kernel must move at least, or None for matmul-bound cases)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    N = max(2, int(a.tokens * scale))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    es = torch.tensor([], dtype=dtype).element_size()
    if case == "rmsnorm":
        C = max(8, int(4096 * scale))
        x, w = rnd(N, C).requires_grad_(), (1 + rnd(C, std=0.1)).requires_grad_()
        return (f"x ({N}, {C})", lambda: R.rms_norm(x, w, 1e-5), lambda: K.rms_norm(x, w, 1e-5), [x, w],
                [rnd(N, C)], 5 * N * C * es)
    if case == "swiglu":
        Fw = max(8, int(14336 * scale))
        gate, up = rnd(N, Fw).requires_grad_(), rnd(N, Fw).requires_grad_()
        return (f"gate, up ({N}, {Fw})", lambda: R.swiglu(gate, up), lambda: K.swiglu(gate, up), [gate, up],
                [rnd(N, Fw)], 8 * N * Fw * es)
    if case == "rope":
        q, k = rnd(1, N, 32, 128).requires_grad_(), rnd(1, N, 8, 128).requires_grad_()
        ang = torch.arange(N, dtype=torch.float32)[:, None] * 10000 ** (-torch.arange(64) / 64)
        ang = torch.cat([ang, ang], -1)[None].to(device)  # (1, N, 128)
        cos, sin = ang.cos().to(dtype), (ang.sin() * torch.cat([-torch.ones(64), torch.ones(64)]).to(device)).to(dtype)
        return (f"q (1, {N}, 32, 128), k (1, {N}, 8, 128)", lambda: R.rope_qk(q, k, cos, sin),
                lambda: K.rope_qk(q, k, cos, sin), [q, k], [rnd(1, N, 32, 128), rnd(1, N, 8, 128)],
                4 * (q.numel() + k.numel()) * es)
    V = max(16, int(a.vocab * scale))
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    if case.startswith("logprob"):
        z = rnd(N, V, std=2.0).requires_grad_()
        bwd = not case.endswith("-fwd")
        if "lsm" in case:  # the leanest baseline: log_softmax + gather, no entropy (the fused side still has it)
            return (f"logits ({N}, {V}), T=0.7, vs log_softmax+gather",
                    lambda: torch.log_softmax(z.float() / 0.7, -1).gather(-1, targets[:, None]).squeeze(-1),
                    lambda: K.logprobs_from_logits(z, targets, 0.7)[0], [z], [rnd(N)] if bwd else None,
                    (2 if bwd else 1) * N * V * es)
        return (f"logits ({N}, {V}), T=0.7", lambda: R.token_logprobs_and_entropy(z, targets, 0.7),
                lambda: K.logprobs_from_logits(z, targets, 0.7), [z],
                [rnd(N), rnd(N)] if bwd else None, (3 if bwd else 1) * N * V * es)
    C = max(8, int(a.hidden * scale))
    h, W = rnd(N, C).requires_grad_(), rnd(V, C, std=C ** -0.5).requires_grad_()
    # the LM-head cases are matmul-bound: no GB/s for them
    if case == "linear-ce":
        return (f"hidden ({N}, {C}), W ({V}, {C}), sum NLL",
                lambda: F.cross_entropy((h @ W.t()).float(), targets, reduction="sum"),
                lambda: K.linear_cross_entropy(h, W, targets), [h, W], [torch.ones((), device=device)], None)
    bwd = case == "linear-logprob"
    return (f"hidden ({N}, {C}), W ({V}, {C}), T=0.7", lambda: R.linear_logprobs_and_entropy(h, W, targets, 0.7),
            lambda: K.linear_logprobs_and_entropy(h, W, targets, 0.7), [h, W], [rnd(N), rnd(N)] if bwd else None, None)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _reset_peak(device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    return _rss("VmRSS:")


def _peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss("VmHWM:")


def call(fn, leaves, cot, device):
    """One forward (+ backward when cotangents are given); returns (seconds, bytes of results)."""
    for x in leaves:
        x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    if cot is None:
        with torch.no_grad():
            out = fn()
    else:
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, cot)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    outs = out if isinstance(out, tuple) else (out,)
    kept = sum(o.numel() * o.element_size() for o in outs) + (
        sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None) if cot is not None else 0)
    return dt, kept


def run_case(case: str, a) -> dict:
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    for side in (1, 2):  # warm-up on small inputs: build / load the kernels, first-call costs
        _, ref, fused, leaves, cot, _ = build(case, a, device, dtype, scale=1 / 64)
        call(ref if side == 1 else fused, leaves, cot, device)
    describe, ref, fused, leaves, cot, min_bytes = build(case, a, device, dtype)
    res = {"case": case, "shape": describe, "pass": "fwd+bwd" if cot is not None else "fwd", "dtype": a.dtype,
           "device": device.type, "path": K.backend(device)}
    times = {"ref": [], "fused": []}
    for side, fn in (("ref", ref), ("fused", fused)):
        for x in leaves:  # the other side's gradients must not count in this side's baseline
            x.grad = None
        base = _reset_peak(device)
        dt, kept = call(fn, leaves, cot, device)
        peak = _peak(device) - base
        times[side].append(dt)
        res[f"{side}_peak_MiB"] = peak / 2**20
        res[f"{side}_working_MiB"] = max(0, peak - kept) / 2**20
        gc.collect()
    for _ in range(a.repeats - 1):
        for side, fn in (("ref", ref), ("fused", fused)):
            times[side].append(call(fn, leaves, cot, device)[0])
    res.update(ref_s=min(times["ref"]), fused_s=min(times["fused"]), speedup=min(times["ref"]) / min(times["fused"]),
               memory_ratio=res["fused_working_MiB"] / max(res["ref_working_MiB"], 1e-9),
               fused_GBps=min_bytes / min(times["fused"]) / 1e9 if min_bytes else None)
    return res


def _card_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--tokens", type=int, default=2048, help="rows (B·T tokens)")
    p.add_argument("--vocab", type=int, default=128256, help="V (Llama-3: 128256; Qwen2.5: 151936)")
    p.add_argument("--hidden", type=int, default=512, help="C of the LM-head cases")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_case(a.one, a)))
        return 0
    cases = CASES if a.cases == "all" else a.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # fixed threshold: big frees go back to the OS
    flags = ["--tokens", str(a.tokens), "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--dtype", a.dtype,
             "--device", a.device, "--repeats", str(a.repeats)]
    rows = []
    for case in cases:
        r = subprocess.run([sys.executable, "-m", "minihuatuo.bench", "kernels", "--one", case, *flags],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    report = {"machine": machine(), "device": a.device, "cases": rows}
    if a.device == "cuda":
        report["card"] = torch.cuda.get_device_name(0)
        report["card_bandwidth_GBps"] = _card_bandwidth(torch.device("cuda"))
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; device {a.device}"
          f"{' (' + report['card'] + ')' if a.device == 'cuda' else ''}; {a.dtype}; path: {rows[0]['path']}; "
          f"best of {a.repeats}")
    print(f"{'case':<19} {'pass':<8} {'ref s':>8} {'fused s':>8} {'speedup':>8} {'ref MiB':>9} {'fused MiB':>9} "
          f"{'mem ratio':>9} {'GB/s':>7}  shape")
    for r in rows:
        print(f"{r['case']:<19} {r['pass']:<8} {r['ref_s']:8.3f} {r['fused_s']:8.3f} {r['speedup']:7.2f}x "
              f"{r['ref_working_MiB']:9.1f} {r['fused_working_MiB']:9.1f} {r['memory_ratio']:9.3f} "
              f"{r['fused_GBps'] or float('nan'):7.1f}  {r['shape']}")
    print("MiB: working memory (peak extra minus outputs and input gradients); mem ratio = fused / ref")
    return 0
