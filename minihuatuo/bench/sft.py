"""SFT training step speed: our step (forward, masked token NLL, backward, AdamW) vs a transformers
model's forward(labels=...) + backward + the same torch AdamW, on the same weights and batch.

    python -m minihuatuo.bench sft [--preset llama-125m] [--batch 2] [--seq 256] [--steps 3] [--json]

Each side runs in its own subprocess so that its peak memory (peak RSS growth over the resident size
after loading the model and building the batch) is its own. Tokens/s counts every token of the batch;
the first step's loss is compared to check both sides compute the same thing. Every token is a target
here, so our "LM head only at target positions" saving does not apply: this measures the step itself.
transformers is imported only inside the baseline subprocess (see bench/generate.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from .generate import machine


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_side(side: str, ckpt: str, batch: int, seq: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if side == "ours":
        from minihuatuo.engine.checkpoint import load_model
        from minihuatuo.stages.sft import token_nll_sum
        from minihuatuo.stages.sft_data import Batch

        model = load_model(ckpt).train()
        V = model.cfg.vocab_size
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
        V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    base = _rss_kib("VmRSS:")
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        if side == "ours":
            labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)  # shifted; last position has none
            b = Batch(ids, labels, None, torch.arange(seq).expand(batch, seq))
            nll, n = token_nll_sum(model, b)
            loss = nll / n
        else:
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts internally
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {"tokens_per_s": batch * seq / min(times), "first_loss": losses[0],
            "peak_extra_MiB": (_rss_kib("VmHWM:") - base) / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench sft", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-125m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one side, in a subprocess
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args.ckpt, args.batch, args.seq, args.steps)))
        return 0
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(preset(args.preset), seed=0), d)
        res = {}
        for side in ("ours", "hf"):
            cmd = [sys.executable, "-m", "minihuatuo.bench", "sft", "--side", side, "--ckpt", d, "--batch",
                   str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    report = {"machine": machine(), "preset": args.preset, "batch": args.batch, "seq": args.seq, **res,
              "speedup": res["ours"]["tokens_per_s"] / res["hf"]["tokens_per_s"],
              "same_first_loss": abs(res["ours"]["first_loss"] - res["hf"]["first_loss"]) < 1e-4}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {args.preset}, fp32, batch {args.batch} x "
          f"{args.seq} tokens, forward + backward + AdamW, best of {args.steps} steps")
    for side, name in (("ours", "minihuatuo"), ("hf", "transformers")):
        r = res[side]
        print(f"  {name:>12}: {r['tokens_per_s']:8.1f} tok/s | peak extra memory {r['peak_extra_MiB']:7.1f} MiB"
              f" | first loss {r['first_loss']:.5f}")
    print(f"  ratio x{report['speedup']:.2f} | same first loss: {'yes' if report['same_first_loss'] else 'NO'}")
    return 0
