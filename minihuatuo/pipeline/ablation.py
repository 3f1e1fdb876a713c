"""`minihuatuo demo --ablation`: paper Tables 2 and 3 in miniature, as a fair comparison.

Three SFT datasets of the same problems, the same number of examples each, each fine-tuned from the
same base model with the same settings and then trained with the same PPO budget on the same D_RL:
    direct   ŷ only (no thinking part)
    simple   a first chain (e_0, y_0) that the verifier accepts: no reflection
    complex  ê, ŷ of a successful search (the recipe)
For each seed: the demo's problems (§2.1) and search (§3.1), exactly as `minihuatuo demo --seed s`
makes them (the same functions, configuration and seed), give the complex CoTs and their ŷ. The
simple CoTs come from a second search of the same D_search by the same search LLM and verifier with
no refinement (N = 0) and `simple_attempts` fresh first chains (T): Algorithm 1 without its lines
5-10, so a simple CoT is what the model writes when it is right at once. The paper's simple CoT is
GPT-4o's first chain; the demo's search LLM is a 2M-parameter base model whose first chain is right
~30% of the time, so one attempt would give a few dozen examples against hundreds of complex CoTs
(notes/demo.md §5: the unfair arm of earlier runs). The three sets are then cut to the problems all
of them have, in the search's order: the same problems, the same count, the same SFT steps.

Every model is graded on the same held-out problems (open-ended, verifier on the final response,
the demo's diagnostics). Reported per variant, mean ± std over seeds: examples, accuracy after SFT
and after PPO, the RL gain, reply tokens, and the PPO model's reflection rate, first-answer accuracy
and reflection gain (ablation.json, ablation.csv). The paper's ordering (direct < simple < complex
after RL; the RL gain grows with the CoT) is the hypothesis under test: notes/demo.md §5 reports
what was found. Finished (seed, variant) pairs are kept in runs.jsonl and skipped on a rerun.
"""
from __future__ import annotations

import csv
import json
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from minihuatuo.pipeline.demo import (DemoConfig, evaluate_model, fine_tune, heldout_exam, make_problems,
                                      reinforce, search_trajectories, say)
from minihuatuo.pipeline.demo_verifier import ppo_verifier
from minihuatuo.services.backends import LocalBackend
from minihuatuo.services.formats import read_problems
from minihuatuo.stages.search_reformat import simple_cot
from minihuatuo.world.evaluation import world_verifier
from minihuatuo.world.exam import generate_exam
from minihuatuo.world.kb import DEFAULT_KB, load_kb

VARIANTS = ("direct", "simple", "complex")
SIMPLE_ATTEMPTS = 8  # fresh first chains per problem for the simple-CoT search (T; N = 0)
PER_RUN = ("sft_examples", "sft", "ppo", "rl_gain", "sft_tokens", "ppo_tokens", "ppo_reflection",
           "ppo_first_accuracy", "ppo_reflection_gain", "ppo_unfinished")


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Whole-file write through a temp file: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def stage_done(d: Path) -> bool:
    """A stage directory is finished when its summary.json exists; an unfinished one (a crash) is
    removed and the stage redone, so no half-written stage is mixed with a new one."""
    if (d / "summary.json").exists():
        return True
    if d.exists():
        shutil.rmtree(d)
    return False


def prepare_data(c: DemoConfig, d: Path, simple_attempts: int) -> dict:
    """The seed's problems, its recipe search and its simple-CoT search under d/, then the three SFT
    sets of the common problems in d/data/. Returns {variant: path} and the counts."""
    kb = load_kb(DEFAULT_KB)
    verifier = world_verifier(kb)
    train_items = generate_exam(kb, "train", c.n_train, c.seed, c.train_exam)
    base = LocalBackend.from_dir(c.base, dtype="float32", batch_size=c.batch_size, seed=c.seed)
    if not stage_done(d / "problems"):
        searched = make_problems(c.problems, d / "problems", train_items, base).search
    else:  # a rerun: the problems as written (the search's problem ids are read back with them)
        searched = read_problems(d / "problems" / "search.json")
    if not stage_done(d / "search"):  # the recipe's search, as the demo runs it
        worlds = {it.id: it.extra["world"] for it in train_items} if c.reflection_check else None
        search_trajectories(c.search, d / "search", searched, base, verifier, worlds)
    if not stage_done(d / "simple_search"):  # N = 0, T = simple_attempts: first chains only
        say(f"simple-CoT search: {len(searched)} problems, up to {simple_attempts} first chains each, no refinement")
        # no reflection check here (as before §17's retry): a simple CoT drops e_0's verification
        search_trajectories(replace(c.search, max_depth=0, max_attempts=simple_attempts, label_hint=False,
                                    false_reflection="keep"), d / "simple_search", searched, base, verifier)
    return write_variant_data(d)


def write_variant_data(d: Path) -> dict:
    """d/data/{direct,simple,complex}.jsonl: the problems both searches solved, in the recipe search's
    order. complex and direct from the recipe search (ê, ŷ and ŷ alone); simple from the first-chain
    search (e_0 without titles or verification, and its ŷ)."""
    complex_rows = read_jsonl(d / "search" / "sft.jsonl")
    simple_by_id = {r["id"]: r for r in read_jsonl(d / "simple_search" / "search.jsonl")
                    if r["search"]["success"] and r["search"]["accepted_at"]["depth"] == 0}
    common = [r for r in complex_rows if r["id"] in simple_by_id]
    data = {
        "complex": [{"id": r["id"], "Question": r["Question"], "Complex_CoT": r["Complex_CoT"],
                     "Response": r["Response"]} for r in common],
        "simple": [{"id": r["id"], "Question": r["Question"], "Complex_CoT": simple_cot(simple_by_id[r["id"]]["Long_CoT"]),
                    "Response": simple_by_id[r["id"]]["Response"]} for r in common],
        "direct": [{"id": r["id"], "Question": r["Question"], "Response": r["Response"]} for r in common],
    }
    (d / "data").mkdir(exist_ok=True)
    for v, rows in data.items():
        write_jsonl(d / "data" / f"{v}.jsonl", rows)
    counts = {"complex_found": len(complex_rows), "simple_found": len(simple_by_id), "common": len(common)}
    (d / "data" / "counts.json").write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return counts


def run_ablation(cfg: DemoConfig, out_dir, seeds: int = 3, simple_attempts: int = SIMPLE_ATTEMPTS) -> dict:
    """out_dir/seed{s}/ holds the seed's data (problems/, search/, simple_search/, data/) and one
    directory per variant (sft/, ppo/, eval_sft.jsonl, eval_ppo.jsonl). An unfinished variant (a crash)
    is redone from scratch on a rerun; finished ones are read from runs.jsonl."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": asdict(cfg), "simple_attempts": simple_attempts}
    if (out / "settings.json").exists():
        if json.loads((out / "settings.json").read_text(encoding="utf-8")) != json.loads(json.dumps(settings)):
            raise ValueError(f"{out}: an ablation with other settings; remove it or choose another --out")
    else:
        (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    verifier, heldout, problems = heldout_exam(cfg)
    runs_file = out / "runs.jsonl"
    runs = read_jsonl(runs_file) if runs_file.exists() else []
    done = {(r["seed"], r["variant"]) for r in runs}
    base = None
    for seed in range(seeds):
        c = replace(cfg, seed=seed)  # every stage's seed follows (DemoConfig.__post_init__)
        d = out / f"seed{seed}"
        counts = prepare_data(c, d, simple_attempts)
        say(f"ablation seed {seed}: {counts['common']} problems in every arm (recipe search {counts['complex_found']}, "
            f"first-chain search {counts['simple_found']})")
        if base is None:
            base = evaluate_model(c.base, heldout, problems, verifier, c, out / "eval_base.jsonl", "base", mcq=False)
        rl_verifier = ppo_verifier(c.rl_verifier, c.base, c.seed, c.heldout_seed, d, verifier)
        for variant in VARIANTS:
            if (seed, variant) in done:
                continue
            torch.manual_seed(seed)
            v, data = d / variant, d / "data" / f"{variant}.jsonl"
            say(f"ablation seed {seed}, {variant}: SFT on {counts['common']} examples, then PPO")
            sft_dir = fine_tune(c.sft, c.base, data, v / "sft", overwrite=True)
            thinking = variant != "direct"  # the direct arm's replies, rewards and grades have no thinking part
            sft = evaluate_model(sft_dir, heldout, problems, verifier, c, v / "eval_sft.jsonl", "sft", mcq=False,
                                 thinking=thinking)
            ppo_dir = reinforce(c.ppo, sft_dir, d / "problems" / "rl.json", v / "ppo", rl_verifier,
                                require_thinking=thinking, overwrite=True)
            ppo = evaluate_model(ppo_dir, heldout, problems, verifier, c, v / "eval_ppo.jsonl", "ppo", mcq=False,
                                 thinking=thinking)
            run = variant_run(seed, variant, counts["common"], sft, ppo)
            runs.append(run)
            with open(runs_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(run) + "\n")
    summary = summarize_runs([r for r in runs if r["seed"] < seeds], seeds)
    summary.update(base=base["accuracy"], n=len(problems), heldout_seed=cfg.heldout_seed,
                   simple_attempts=simple_attempts, wall_s=round(time.perf_counter() - t0, 1))
    return write_summary(out, summary)


def write_summary(out: Path, summary: dict) -> dict:
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(out / "ablation.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", *(f"{k}_{m}" for k in PER_RUN for m in ("mean", "std"))])
        for v, s in summary["variants"].items():
            w.writerow([v, *(f"{s[k][m]:.4f}" for k in PER_RUN for m in ("mean", "std"))])
    print(format_ablation(summary))
    return summary


def evaluate_ablation(run_dir, cfg: DemoConfig, out_dir) -> dict:
    """Every finished arm of the ablation in run_dir (its SFT and PPO checkpoints) and the base model
    graded on the held-out draw `cfg.heldout_seed`, as run_ablation grades them: the protocol's test draws
    (notes/demo.md §9) without training again. Writes out_dir/runs.jsonl, ablation.json, ablation.csv and
    the graded replies under out_dir/seed{s}/{variant}/. Resumable: each graded arm is appended to
    out_dir/runs.jsonl as it finishes, and a rerun into the same out_dir (same run, same draw) grades only
    the arms not there yet, such as those the ablation has finished since; any other out_dir that holds
    results is refused."""
    run, out = Path(run_dir), Path(out_dir)
    if not (run / "runs.jsonl").exists():
        raise ValueError(f"{run}: not an ablation run (no runs.jsonl)")
    which = {"evaluated_run": str(run), "heldout_seed": cfg.heldout_seed}
    marker = out / "evaluation.json"
    if marker.exists():
        if json.loads(marker.read_text(encoding="utf-8")) != which:
            raise ValueError(f"{out}: holds the evaluation of another run or draw; choose another --out")
    elif (out / "ablation.json").exists() or (out / "runs.jsonl").exists():
        raise ValueError(f"{out}: already holds results; choose another --out")
    trained = json.loads((run / "settings.json").read_text(encoding="utf-8"))
    verifier, heldout, problems = heldout_exam(cfg)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(which, indent=2) + "\n", encoding="utf-8")
    if (out / "base.json").exists():
        base = json.loads((out / "base.json").read_text(encoding="utf-8"))
    else:
        base = evaluate_model(trained["config"]["base"], heldout, problems, verifier, cfg, out / "eval_base.jsonl",
                              "base", mcq=False)
        (out / "base.json").write_text(json.dumps(base, indent=2) + "\n", encoding="utf-8")
    runs_file = out / "runs.jsonl"
    runs = read_jsonl(runs_file) if runs_file.exists() else []
    done = {(r["seed"], r["variant"]) for r in runs}
    for r in read_jsonl(run / "runs.jsonl"):
        if (r["seed"], r["variant"]) in done:
            continue
        d, v = run / f"seed{r['seed']}" / r["variant"], out / f"seed{r['seed']}" / r["variant"]
        say(f"evaluating seed {r['seed']}, {r['variant']} on held-out draw {cfg.heldout_seed} ...")
        thinking = r["variant"] != "direct"
        sft = evaluate_model(d / "sft" / "final", heldout, problems, verifier, cfg, v / "eval_sft.jsonl", "sft", mcq=False,
                             thinking=thinking)
        ppo = evaluate_model(d / "ppo" / "final" / "policy", heldout, problems, verifier, cfg, v / "eval_ppo.jsonl", "ppo",
                             mcq=False, thinking=thinking)
        graded = variant_run(r["seed"], r["variant"], r["sft_examples"], sft, ppo)
        runs.append(graded)
        with open(runs_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(graded) + "\n")
    seeds = 1 + max(r["seed"] for r in runs)
    summary = summarize_runs(runs, seeds)
    summary.update(base=base["accuracy"], n=len(problems), heldout_seed=cfg.heldout_seed,
                   simple_attempts=trained["simple_attempts"], evaluated_run=str(run))
    return write_summary(out, summary)


def variant_run(seed: int, variant: str, examples: int, sft: dict, ppo: dict) -> dict:
    return {"seed": seed, "variant": variant, "sft_examples": examples, "sft": sft["accuracy"],
            "ppo": ppo["accuracy"], "rl_gain": ppo["accuracy"] - sft["accuracy"],
            "sft_tokens": sft["avg_response_tokens"], "ppo_tokens": ppo["avg_response_tokens"],
            "ppo_reflection": ppo["reflection"], "ppo_first_accuracy": ppo["first_accuracy"],
            "ppo_reflection_gain": ppo["reflection_gain"], "ppo_unfinished": ppo["unfinished"],
            "ppo_by_type": ppo["by_type"]}


def summarize_runs(runs: list[dict], seeds: int) -> dict:
    """Per variant, mean ± std over seeds of each PER_RUN figure; and for each neighbouring pair of the
    paper's order (direct < simple < complex after PPO) the gap and whether it exceeds the larger std."""
    variants = {v: {k: mean_std([r[k] for r in runs if r["variant"] == v]) for k in PER_RUN}
                for v in VARIANTS if any(r["variant"] == v for r in runs)}
    order = {}
    for lo, hi in (("direct", "simple"), ("simple", "complex")):
        if lo in variants and hi in variants:
            gap = variants[hi]["ppo"]["mean"] - variants[lo]["ppo"]["mean"]
            std = max(variants[hi]["ppo"]["std"], variants[lo]["ppo"]["std"])
            order[f"{hi}_minus_{lo}"] = {"gap": gap, "larger_std": std, "beyond_one_std": gap > std}
    return {"seeds": seeds, "variants": variants, "order_after_ppo": order}


def format_ablation(s: dict) -> str:
    def ms(x, pct=True):
        return f"{x['mean']:.1%} ± {x['std']:.1%}" if pct else f"{x['mean']:.0f}"

    lines = [f"ablation over {s['seeds']} seeds, {s['n']} held-out problems (base model: {s['base']:.1%})",
             f"{'SFT data':10s} {'examples':>9s} {'SFT':>16s} {'SFT + PPO':>16s} {'RL gain':>16s} {'tokens':>7s} "
             f"{'reflection':>11s}"]
    for v, x in s["variants"].items():
        lines.append(f"{v:10s} {ms(x['sft_examples'], False):>9s} {ms(x['sft']):>16s} {ms(x['ppo']):>16s} "
                     f"{ms(x['rl_gain']):>16s} {ms(x['ppo_tokens'], False):>7s} {x['ppo_reflection']['mean']:>11.1%}")
    for k, o in s["order_after_ppo"].items():
        lines.append(f"{k}: {o['gap']:+.1%} after PPO (larger std {o['larger_std']:.1%}; "
                     f"{'beyond' if o['beyond_one_std'] else 'within'} one std)")
    return "\n".join(lines)
