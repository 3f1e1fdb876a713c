"""`minihuatuo demo --ablation`: paper Tables 2 and 3 in miniature, on the bundled world.

For each seed, one run of problems + search (demo.py) gives the three SFT datasets of the same
searched problems (search_cli.write_datasets):
    direct   ŷ only (no thinking part)
    simple   e_0, y_0 of problems whose first chain was already right (no reflection)
    complex  ê of every successful search (the recipe)
Each is fine-tuned from the same base model with the same settings, then trained with PPO from
the same D_RL; base, every SFT model and every PPO model are graded on the same held-out problems
(open-ended, verifier on the final response). Reported per variant: accuracy after SFT and after
PPO, the RL gain, average reply tokens, as mean ± std over seeds (ablation.json, ablation.csv).
The paper's ordering (direct < simple < complex; RL gain grows with CoT length) is the hypothesis
under test: notes/demo.md reports what was found.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from .backends import LocalBackend
from .demo import (DemoConfig, evaluate_model, fine_tune, make_problems, reinforce, say,
                   search_trajectories)
from .world import DEFAULT_KB, generate_exam, load_kb, open_problem
from .world_eval import world_verifier

VARIANTS = {"direct": "sft_direct.jsonl", "simple": "sft_simple_cot.jsonl", "complex": "sft.jsonl"}


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def run_ablation(cfg: DemoConfig, out_dir, seeds: int = 3) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kb = load_kb(DEFAULT_KB)
    verifier = world_verifier(kb)
    heldout = generate_exam(kb, "heldout", cfg.n_heldout, cfg.heldout_seed)
    problems = [open_problem(it) for it in heldout]
    base_eval = evaluate_model(cfg.base, heldout, problems, verifier, cfg, out / "eval_base.jsonl", "base", mcq=False)
    runs: list[dict] = []
    for seed in range(seeds):
        c = replace(cfg, seed=seed)
        d = out / f"seed{seed}"
        torch.manual_seed(seed)
        base = LocalBackend.from_dir(c.base, dtype="float32", batch_size=c.batch_size, seed=seed)
        built = make_problems(c, d / "problems", generate_exam(kb, "train", c.n_train, seed), base)
        search_trajectories(c, d / "search", built.search, base, verifier)
        del base
        for variant, file in VARIANTS.items():
            n_examples = sum(1 for _ in open(d / "search" / file, encoding="utf-8"))
            say(f"ablation seed {seed}, {variant}: SFT on {n_examples} examples, then PPO")
            sft_dir = fine_tune(c, c.base, d / "search" / file, d / variant / "sft")
            sft = evaluate_model(sft_dir, heldout, problems, verifier, c, d / variant / "eval_sft.jsonl", "sft", mcq=False)
            ppo_dir = reinforce(c, sft_dir, d / "problems" / "rl.json", d / variant / "ppo", verifier,
                                require_thinking=variant != "direct")
            ppo = evaluate_model(ppo_dir, heldout, problems, verifier, c, d / variant / "eval_ppo.jsonl", "ppo", mcq=False)
            runs.append({"seed": seed, "variant": variant, "sft_examples": n_examples, "sft": sft["accuracy"],
                         "ppo": ppo["accuracy"], "rl_gain": ppo["accuracy"] - sft["accuracy"],
                         "sft_tokens": sft["avg_response_tokens"], "ppo_tokens": ppo["avg_response_tokens"]})
            with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(runs[-1]) + "\n")
    summary = {"base": base_eval["accuracy"], "n": len(problems), "seeds": seeds, "config": asdict(cfg),
               "wall_s": round(time.perf_counter() - t0, 1), "variants": {}}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        summary["variants"][variant] = {k: mean_std([r[k] for r in mine]) for k in
                                        ("sft_examples", "sft", "ppo", "rl_gain", "sft_tokens", "ppo_tokens")}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(out / "ablation.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", "sft_mean", "sft_std", "ppo_mean", "ppo_std", "rl_gain_mean", "rl_gain_std",
                    "sft_tokens_mean", "ppo_tokens_mean", "sft_examples_mean"])
        for v, s in summary["variants"].items():
            w.writerow([v, *(f"{s[k][m]:.4f}" for k in ("sft", "ppo", "rl_gain") for m in ("mean", "std")),
                        f"{s['sft_tokens']['mean']:.1f}", f"{s['ppo_tokens']['mean']:.1f}",
                        f"{s['sft_examples']['mean']:.1f}"])
    print(format_ablation(summary))
    return summary


def format_ablation(s: dict) -> str:
    def ms(x, pct=True):
        return f"{x['mean']:.1%} ± {x['std']:.1%}" if pct else f"{x['mean']:.0f}"

    lines = [f"ablation over {s['seeds']} seeds, {s['n']} held-out problems (base model: {s['base']:.1%})",
             f"{'SFT data':10s} {'examples':>9s} {'SFT':>16s} {'SFT + PPO':>16s} {'RL gain':>16s} {'tokens':>7s}"]
    for v, x in s["variants"].items():
        lines.append(f"{v:10s} {ms(x['sft_examples'], False):>9s} {ms(x['sft']):>16s} {ms(x['ppo']):>16s} "
                     f"{ms(x['rl_gain']):>16s} {ms(x['ppo_tokens'], False):>7s}")
    return "\n".join(lines)
