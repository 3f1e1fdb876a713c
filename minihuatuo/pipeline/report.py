"""What `minihuatuo demo` shows a learner: the results table, real example trajectories and answers,
and the plots (PNG when matplotlib is installed: `pip install matplotlib`; CSV always)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

STAGES = ("base", "sft", "ppo")
LABELS = {"base": "base (pretrained)", "sft": "SFT on complex CoT", "ppo": "SFT + PPO"}


def results_table(results: dict) -> str:
    """The final table: accuracy and the reasoning diagnostics of each stage (stages/diagnostics.py),
    then accuracy by question type."""
    lines = ["", f"held-out (seed {results.get('seed')}, held-out draw {results.get('heldout_seed')}, greedy; "
                 "open-ended: rule verifier on the final response; MCQ: benchmark scorer)",
             f"{'model':22s} {'open-ended':>12s} {'unfinished':>10s} {'reflect':>8s} {'first ans':>9s} "
             f"{'gain':>6s} {'verdicts ok':>11s} {'hacks':>6s} {'MCQ':>6s} {'tokens':>7s} {'time':>6s}"]
    for s in STAGES:
        r = results[s]
        va = "-" if r.get("verdict_accuracy") is None else f"{r['verdict_accuracy']:.0%}"
        lines.append(f"{LABELS[s]:22s} {r['accuracy']:>7.1%} of {r['n']:<3d} {r['unfinished']:>10.1%} "
                     f"{r['reflection']:>8.1%} {r['first_accuracy']:>9.1%} {r['reflection_gain']:>+6.1%} "
                     f"{va:>11s} {r.get('hack_rate', 0.0):>6.1%} {r['mcq_accuracy']:>6.1%} "
                     f"{r['avg_response_tokens']:>7.0f} {r.get('wall_s', 0):>5.0f}s")
    types = sorted({t for s in STAGES for t in results[s].get("by_type", {})})
    if types:
        lines.append("by question type (accuracy, n): " + "; ".join(
            f"{t} " + " / ".join(f"{results[s]['by_type'][t]['accuracy']:.0%}" if t in results[s]["by_type"] else "-"
                                 for s in STAGES) + f" (n {results[STAGES[0]]['by_type'].get(t, {}).get('n', 0)})"
            for t in types) + "  [base / SFT / PPO]")
    audit = results.get("rl_verifier", {}).get("audit")
    if audit:  # PPO rewarded by a learned classifier (demo --verifier classifier): how often it was gamed
        v, pct = results["rl_verifier"], lambda x: "-" if x is None else f"{x:.1%}"
        lines.append(f"PPO verifier: classifier (held-out balanced accuracy {pct(v['heldout_plain']['balanced_accuracy'])}"
                     f" plain, {pct(v['heldout_adversarial']['balanced_accuracy'])} adversarial); rewarded rollouts "
                     f"the ground truth rejects: {pct(audit['first_eighth']['hack_rate'])} in the first eighth of "
                     f"the updates, {pct(audit['last_eighth']['hack_rate'])} in the last, "
                     f"{pct(audit['all']['hack_rate'])} overall")
        own = v.get("on_replies", {})
        if own:  # the pairs RL rewards: the models' own replies (demo_verifier.grade_on_replies)
            lines.append("PPO verifier on the models' own held-out replies (accuracy, false-positive rate): " + "; ".join(
                f"{name} {pct(g['accuracy'])}, {pct(g['false_positive_rate'])}" for name, g in own.items()))
    if "timings_s" in results:  # not for a re-grading of an earlier run (demo --evaluate)
        lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items())
                     + f"; total {results['total_wall_s']:.0f}s")
    return "\n".join(lines)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def print_examples(out: Path, file=sys.stderr) -> None:
    """A search that needed a strategy, then one held-out answer each from SFT and PPO (one the SFT
    model got wrong and PPO right, when there is one)."""
    out = Path(out)
    records = read_jsonl(out / "search" / "search.jsonl")
    refined = [r for r in records if r["search"]["success"] and r["search"]["accepted_at"]["depth"] > 0]
    bar = "-" * 100
    if refined:
        r = refined[0]
        verdicts = ", ".join(f"{c['conclusion']!r} -> {'accepted' if c['verdict'] else 'rejected'}"
                             for c in r["search"]["verifier_calls"])
        print(f"\n{bar}\nA search that needed a strategy (steps: {' -> '.join(r['search']['strategies'])}; "
              f"verifier: {verdicts})\nQUESTION: {r['Question']}\nREFERENCE: "
              f"{r.get('Ground-True Answer', '')}\nCOMPLEX CoT (template reformatter):\n{r['Complex_CoT']}\n"
              f"RESPONSE: {r['Response']}", file=file)
    sft, ppo = read_jsonl(out / "eval" / "sft.jsonl"), read_jsonl(out / "eval" / "ppo.jsonl")
    pick = next((i for i, (a, b) in enumerate(zip(sft, ppo)) if not a["correct"] and b["correct"]), 0)
    for name, rows in (("SFT", sft), ("SFT+PPO", ppo)):
        r = rows[pick]
        print(f"\n{bar}\n{name} model, held-out question ({'correct' if r['correct'] else 'wrong'}; reference: "
              f"{r['answer']}):\n{r['question']}\n{r['reply']}", file=file)
    print(bar, file=file)


def write_plots(out: Path, results: dict) -> list[Path]:
    """accuracy.csv and ppo_reward.csv always; the same as PNG when matplotlib is importable."""
    out = Path(out)
    written = []
    with open(out / "accuracy.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "open_ended_accuracy", "mcq_accuracy", "n", "avg_response_tokens"])
        for s in STAGES:
            r = results[s]
            w.writerow([s, f"{r['accuracy']:.4f}", f"{r['mcq_accuracy']:.4f}", r["n"], f"{r['avg_response_tokens']:.1f}"])
    written.append(out / "accuracy.csv")
    curve = [(m["update"], m["score"], m.get("kl_k1", 0.0)) for m in read_jsonl(out / "ppo" / "metrics.jsonl")]
    with open(out / "ppo_reward.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["update", "mean_score", "kl"])
        w.writerows(curve)
    written.append(out / "ppo_reward.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o")
    ax.set(xlabel="PPO update", ylabel="mean reward (1 / 0.1 / 0)", title="PPO on verifier rewards")
    fig.tight_layout()
    fig.savefig(out / "ppo_reward.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(STAGES))
    ax.bar([x - 0.2 for x in xs], [results[s]["accuracy"] for s in STAGES], width=0.4, label="open-ended")
    ax.bar([x + 0.2 for x in xs], [results[s]["mcq_accuracy"] for s in STAGES], width=0.4, label="MCQ")
    ax.set_xticks(list(xs), [LABELS[s] for s in STAGES])
    ax.set(ylim=(0, 1), ylabel=f"held-out accuracy (n = {results['base']['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return written + [out / "ppo_reward.png", out / "accuracy.png"]
