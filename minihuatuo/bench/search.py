"""python -m minihuatuo.bench search [--model DIR] [--n 32] [--width 32] [--max-depth 3] [--attempts 1]

Strategy search batched across problems vs one problem at a time (issue 4, acceptance 4): the same
problems, model, settings and seed through `run_search`, once with `max_in_flight = 1` and once
with `max_in_flight = width` (one batched sampler call per search step). Greedy decoding, so both
runs should make the same trajectories: the benchmark reports how many are identical (left padding
can flip a near-tie in float arithmetic, so this is reported, not assumed).

Default model: the bundled world's base model (data/world/base), which writes the search format
(so problems run through real refinements, not one unparseable reply each), on the world's
training problems. Prints one line per run and the speed-up measured in this run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from minihuatuo.services.backends import LocalBackend
    from minihuatuo.stages.search import SearchConfig, run_search
    from minihuatuo.world.evaluation import world_verifier
    from minihuatuo.world.exam import generate_exam, open_problem
    from minihuatuo.world.kb import WORLD_DIR, load_kb

    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench search", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(WORLD_DIR / "base"))
    p.add_argument("--n", type=int, default=32, help="problems")
    p.add_argument("--width", type=int, default=32, help="problems in flight in the batched run")
    p.add_argument("--max-depth", type=int, default=3)
    p.add_argument("--attempts", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kb = load_kb()
    problems = [open_problem(it) for it in generate_exam(kb, "train", args.n, seed=123)]
    verifier = world_verifier(kb)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for inflight in (1, args.width):
            backend = LocalBackend.from_dir(args.model, dtype="float32", batch_size=max(inflight, 1), seed=0)
            cfg = SearchConfig(max_in_flight=inflight, max_tokens=args.max_tokens, temperature=0.0,
                               max_depth=args.max_depth, max_attempts=args.attempts, reformat="template")
            out = Path(tmp) / f"w{inflight}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            records = run_search(problems, backend, verifier, out, cfg, progress=False)
            dt = time.perf_counter() - t
            tokens = sum(r["search"]["tokens"]["generated"] for r in records)
            rows[inflight] = {"seconds": dt, "records": records, "generated_tokens": tokens}
            print(f"max_in_flight {inflight:3d}: {dt:7.1f} s, {len(records)} problems, "
                  f"{sum(r['search']['success'] for r in records)} found, {tokens} tokens generated "
                  f"({tokens / dt:.0f} tokens/s)", flush=True)
    one, many = rows[1], rows[args.width]
    same = sum(json.dumps(a.get("Long_CoT")) == json.dumps(b.get("Long_CoT")) and
               a["search"]["success"] == b["search"]["success"] for a, b in zip(one["records"], many["records"]))
    speedup = one["seconds"] / many["seconds"]
    print(f"speed-up batched (width {args.width}) vs one at a time: {speedup:.2f}x; "
          f"identical trajectories {same}/{len(problems)}; torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "n": args.n, "width": args.width, "speedup": speedup, "identical": same,
            **{f"seconds_{k}": v["seconds"] for k, v in rows.items()},
            **{f"tokens_{k}": v["generated_tokens"] for k, v in rows.items()}}, indent=2) + "\n")
    return 0
