"""`minihuatuo demo --ablation`: paper Tables 2 and 3 in miniature, on the bundled world.

For each seed, one `minihuatuo demo` run (problems, search, SFT on complex CoT, PPO) gives the
three SFT datasets of the same searched problems (search_cli.write_datasets):
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

from minihuatuo.pipeline.demo import DemoConfig, evaluate_model, fine_tune, reinforce, run_demo, say
from minihuatuo.world.evaluation import world_verifier
from minihuatuo.world.exam import generate_exam, open_problem
from minihuatuo.world.kb import DEFAULT_KB, load_kb

VARIANTS = {"direct": "sft_direct.jsonl", "simple": "sft_simple_cot.jsonl", "complex": "sft.jsonl"}


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def run_ablation(cfg: DemoConfig, out_dir, seeds: int = 3) -> dict:
    """out_dir/seed{s} is a complete `minihuatuo demo --seed s` run (made here unless it exists with
    the same configuration): its search, its complex-CoT SFT model and its PPO model are the
    "complex" variant. The other two variants are trained from its search files, under
    out_dir/seed{s}/ablation_{variant}/. Finished (seed, variant) pairs are kept in runs.jsonl and
    skipped on a rerun."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kb = load_kb(DEFAULT_KB)
    verifier = world_verifier(kb)
    heldout = generate_exam(kb, "heldout", cfg.n_heldout, cfg.heldout_seed)
    problems = [open_problem(it) for it in heldout]
    runs_file = out / "runs.jsonl"
    runs = [json.loads(line) for line in runs_file.read_text(encoding="utf-8").splitlines()] \
        if runs_file.exists() else []
    done = {(r["seed"], r["variant"]) for r in runs}

    def record(run: dict) -> None:
        runs.append(run)
        with open(runs_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(run) + "\n")

    base = None
    for seed in range(seeds):
        c = replace(cfg, seed=seed)  # every stage's seed follows (DemoConfig.__post_init__)
        d = out / f"seed{seed}"
        if not (d / "results.json").exists():
            run_demo(c, d)
        if json.loads((d / "config.json").read_text(encoding="utf-8")) != asdict(c):
            raise ValueError(f"{d}: a demo run with another configuration; remove it or choose another --out")
        res = json.loads((d / "results.json").read_text(encoding="utf-8"))
        base = res["base"]["accuracy"]
        if (seed, "complex") not in done:
            record(variant_run(seed, "complex", d / "search" / VARIANTS["complex"], res["sft"], res["ppo"]))
        for variant in ("direct", "simple"):
            if (seed, variant) in done:
                continue
            torch.manual_seed(seed)
            v = d / f"ablation_{variant}"
            data = d / "search" / VARIANTS[variant]
            say(f"ablation seed {seed}, {variant}: SFT on {count_lines(data)} examples, then PPO")
            # an unfinished variant (a crash) is redone from scratch: its stage directories are replaced
            sft_dir = fine_tune(c.sft, c.base, data, v / "sft", overwrite=True)
            sft = evaluate_model(sft_dir, heldout, problems, verifier, c, v / "eval_sft.jsonl", "sft", mcq=False)
            ppo_dir = reinforce(c.ppo, sft_dir, d / "problems" / "rl.json", v / "ppo", verifier,
                                require_thinking=variant != "direct", overwrite=True)
            ppo = evaluate_model(ppo_dir, heldout, problems, verifier, c, v / "eval_ppo.jsonl", "ppo", mcq=False)
            record(variant_run(seed, variant, data, sft, ppo))
    summary = {"base": base, "n": len(problems), "seeds": seeds, "config": asdict(cfg),
               "wall_s": round(time.perf_counter() - t0, 1), "variants": {}}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant and r["seed"] < seeds]
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


def count_lines(path: Path) -> int:
    return sum(1 for line in open(path, encoding="utf-8") if line.strip())


def variant_run(seed: int, variant: str, data: Path, sft: dict, ppo: dict) -> dict:
    return {"seed": seed, "variant": variant, "sft_examples": count_lines(data), "sft": sft["accuracy"],
            "ppo": ppo["accuracy"], "rl_gain": ppo["accuracy"] - sft["accuracy"],
            "sft_tokens": sft["avg_response_tokens"], "ppo_tokens": ppo["avg_response_tokens"]}


def format_ablation(s: dict) -> str:
    def ms(x, pct=True):
        return f"{x['mean']:.1%} ± {x['std']:.1%}" if pct else f"{x['mean']:.0f}"

    lines = [f"ablation over {s['seeds']} seeds, {s['n']} held-out problems (base model: {s['base']:.1%})",
             f"{'SFT data':10s} {'examples':>9s} {'SFT':>16s} {'SFT + PPO':>16s} {'RL gain':>16s} {'tokens':>7s}"]
    for v, x in s["variants"].items():
        lines.append(f"{v:10s} {ms(x['sft_examples'], False):>9s} {ms(x['sft']):>16s} {ms(x['ppo']):>16s} "
                     f"{ms(x['rl_gain']):>16s} {ms(x['ppo_tokens'], False):>7s}")
    return "\n".join(lines)
