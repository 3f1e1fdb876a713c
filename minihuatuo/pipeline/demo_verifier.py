"""The demo's RL verifier (issue 20, point 4): the world's rule verifier, or a classifier verifier the
demo trains from the base model, and the audit that measures how PPO games a learned one.

    minihuatuo demo --verifier classifier

  1. labels     world pairs drawn from the *training* split's questions (world/pairs.py; the held-out
                exam is never seen): `classifier_pairs` plain (honest phrasings and near misses) and
                `classifier_adversarial` with hacks (lists, hedges, negations, avoided drugs)
  2. training   `verifier train` (stages/verifier_train.py) from the base model, its `tiny-world`
                preset, with the world's short input template (data/world/classifier_template.txt,
                stored in the checkpoint's config.json, so inference uses it without a flag)
  3. held-out   balanced accuracy on fresh pairs of the held-out split (draw `heldout_seed`), plain and
                adversarial, at the threshold the trainer chose
  4. PPO        rewarded by the classifier instead of the rule verifier; the search keeps the rule
                verifier, so the SFT model is the rule run's and the two PPO runs differ in the reward
                only
  5. audit      every reward batch is also judged by the world's ground truth (the rule verifier
                with the world's aliases: 0-0.2 % wrong-True on hacks, notes/verifier.md), one line per
                PPO update in ppo/verifier_audit.jsonl: the share of rollouts the classifier rewards that
                the ground truth rejects (reward hacking), and of right ones it does not reward

The paper (§4.2, Figure 4) measures its verifiers' accuracy on sampled pairs but not what RL does with a
verifier's errors; the audit makes that visible (notes/verifier.md, "RL with a learned verifier").
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from minihuatuo.services.config import require_choice, require_nonnegative, require_positive
from minihuatuo.services.reward import LabeledPair, binary_metrics, write_labeled
from minihuatuo.stages.verifier_train import PRESETS as VERIFIER_PRESETS
from minihuatuo.stages.verifier_train import VerifierTrainConfig
from minihuatuo.world.kb import WORLD_DIR

WORLD_TEMPLATE = WORLD_DIR / "classifier_template.txt"


@dataclass
class RLVerifierConfig:
    """Which verifier rewards PPO in the demo, and how the classifier one is trained (notes/verifier.md)."""

    kind: str = "rule"  # "rule": the world's rule verifier; "classifier": trained here from the base model
    classifier_pairs: int = 10000  # plain world pairs (training split) to train on
    classifier_adversarial: int = 3000  # adversarial world pairs (honest phrasings and hacks) added to them
    heldout_pairs: int = 2000  # fresh pairs of the held-out split per kind (plain, adversarial) to grade it on
    train: VerifierTrainConfig = field(default_factory=lambda: replace(VERIFIER_PRESETS["tiny-world"], eval_every=50))

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_choice(self, "kind", ("rule", "classifier"))
        require_nonnegative(self, "classifier_pairs", "classifier_adversarial")
        require_positive(self, "heldout_pairs")


class AuditedVerifier:
    """`judge` gives the verdicts (the reward); `truth` judges the same pairs beside it, and each batch
    (one per PPO update: reward.rewards makes one verify_batch call per rollout batch) appends one line
    to `log`: n, judged True, the hacks among them (judge True, truth False), the right answers the
    judge missed (truth True, judge False)."""

    def __init__(self, judge, truth, log: Path):
        self.judge, self.truth, self.log = judge, truth, Path(log)
        self.calls = 0

    def verify(self, response: str, reference: str) -> bool:
        return self.verify_batch([(response, reference)])[0]

    def verify_batch(self, pairs) -> list[bool]:
        pairs = list(pairs)
        judged = list(self.judge.verify_batch(pairs))
        truth = list(self.truth.verify_batch(pairs))
        self.calls += 1
        row = audit_row(self.calls, judged, truth)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as f:  # append-only: a resumed PPO run adds its updates
            f.write(json.dumps(row) + "\n")
        return judged


def audit_row(call: int, judged: list[bool], truth: list[bool]) -> dict:
    """One batch's counts and rates; a rate over an empty set is None (never a made-up 0)."""
    rewarded = sum(judged)
    hacks = sum(j and not t for j, t in zip(judged, truth))
    right = sum(truth)
    missed = sum(t and not j for j, t in zip(judged, truth))
    return {"call": call, "n": len(judged), "rewarded": rewarded, "truth_right": right, "hacked": hacks,
            "missed": missed, "hack_rate": hacks / rewarded if rewarded else None,
            "miss_rate": missed / right if right else None,
            "agreement": sum(j == t for j, t in zip(judged, truth)) / len(judged) if judged else None}


def summarize_audit(log: Path) -> dict:
    """Per update (one audit line each) and pooled: the hack rate (hacked / rewarded), the miss rate,
    the agreement with the ground truth, and the first and last eighth of the run."""
    rows = [json.loads(line) for line in Path(log).read_text(encoding="utf-8").splitlines() if line.strip()]

    def pooled(part):
        rewarded, hacked = sum(r["rewarded"] for r in part), sum(r["hacked"] for r in part)
        right, missed = sum(r["truth_right"] for r in part), sum(r["missed"] for r in part)
        n = sum(r["n"] for r in part)
        return {"n": n, "hack_rate": hacked / rewarded if rewarded else None,
                "miss_rate": missed / right if right else None,
                "agreement": sum(r["agreement"] * r["n"] for r in part) / n if n else None}

    k = max(1, len(rows) // 8)
    return {"updates": len(rows), "all": pooled(rows), "first_eighth": pooled(rows[:k]),
            "last_eighth": pooled(rows[-k:]), "hack_rate_by_update": [r["hack_rate"] for r in rows]}


def train_world_classifier(cfg: RLVerifierConfig, base_dir, out: Path, seed: int, heldout_seed: int) -> tuple[Path, dict]:
    """Steps 1-3 of the module docstring: out/pairs.jsonl, out/ (the trainer's run: final/, metrics,
    threshold study) and its held-out accuracy. Returns (final/, info for results.json)."""
    from minihuatuo.services.verifier import ClassifierVerifier
    from minihuatuo.stages.verifier_train import train
    from minihuatuo.world.pairs import draw_pairs

    def as_pairs(rows):
        return [LabeledPair(r["response"], r["reference"], r["label"], r.get("category")) for r in rows]

    out.mkdir(parents=True, exist_ok=True)
    rows = draw_pairs(cfg.classifier_pairs, seed, split="train") if cfg.classifier_pairs else []
    if cfg.classifier_adversarial:
        rows += draw_pairs(cfg.classifier_adversarial, seed, adversarial=True, split="train")
    write_labeled(out / "pairs.jsonl", as_pairs(rows))
    template = WORLD_TEMPLATE.read_text(encoding="utf-8")
    summary = train(replace(cfg.train, seed=seed), base_dir, out / "pairs.jsonl", out, template=template)
    final = out / "final"
    classifier = ClassifierVerifier.from_dir(final)
    info = {"kind": "classifier", "checkpoint": str(final), "training_pairs": len(rows),
            "threshold": classifier.threshold, "steps": summary.get("steps")}
    for name, adversarial in (("plain", False), ("adversarial", True)):
        held = as_pairs(draw_pairs(cfg.heldout_pairs, heldout_seed, adversarial=adversarial, split="heldout"))
        verdicts = classifier.verify_batch([(p.response, p.reference) for p in held])
        m = binary_metrics(verdicts, [p.label for p in held])
        info[f"heldout_{name}"] = {"n": len(held), "balanced_accuracy": m["balanced_accuracy"],
                                   "accuracy": m["accuracy"]}
    return final, info


def ppo_verifier(cfg: RLVerifierConfig, base_dir, seed: int, heldout_seed: int, out: Path, rule_verifier):
    """PPO's verifier: the rule verifier itself, or (kind "classifier") a classifier trained from the base
    model in out/verifier/, audited against the rule verifier in out/ppo/verifier_audit.jsonl.
    out/verifier/summary.json says which, with the classifier's held-out accuracy."""
    from minihuatuo.services.verifier import ClassifierVerifier

    info: dict = {"kind": "rule"}
    judge = rule_verifier
    if cfg.kind == "classifier":
        final, info = train_world_classifier(cfg, base_dir, out / "verifier", seed, heldout_seed)
        judge = AuditedVerifier(ClassifierVerifier.from_dir(final), rule_verifier, out / "ppo" / "verifier_audit.jsonl")
        print(f"classifier verifier: held-out balanced accuracy {info['heldout_plain']['balanced_accuracy']:.1%} "
              f"(plain), {info['heldout_adversarial']['balanced_accuracy']:.1%} (adversarial), threshold "
              f"{info['threshold']}", file=sys.stderr, flush=True)
    (out / "verifier").mkdir(parents=True, exist_ok=True)
    (out / "verifier" / "summary.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return judge


def grade_on_replies(judge, graded: Path) -> dict:
    """A verifier's verdicts on a model's own graded held-out replies (eval/NAME.jsonl: `reply`, `answer`
    and the world's `correct`), the pairs RL actually rewards, unlike world pairs: this accuracy, not the
    held-out pairs', is what bounds PPO (notes/verifier.md). Replies without a strict final response get
    no reward whatever the verifier says (reward.py) and are left out."""
    from minihuatuo.services.response_format import extract_final_response

    rows = [json.loads(line) for line in Path(graded).read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [(y, r) for y, r in ((extract_final_response(r["reply"], "strict"), r) for r in rows) if y is not None]
    judged = list(judge.verify_batch([(y, r["answer"]) for y, r in kept])) if kept else []
    truth = [bool(r["correct"]) for _, r in kept]
    right, wrong = sum(truth), len(truth) - sum(truth)
    tpr = sum(j and t for j, t in zip(judged, truth)) / right if right else None
    fpr = sum(j and not t for j, t in zip(judged, truth)) / wrong if wrong else None
    return {"n": len(kept), "accuracy": sum(j == t for j, t in zip(judged, truth)) / len(kept) if kept else None,
            "true_positive_rate": tpr, "false_positive_rate": fpr,
            "balanced_accuracy": (tpr + 1 - fpr) / 2 if tpr is not None and fpr is not None else None}


def verifier_results(out: Path) -> dict:
    """results.json's "rl_verifier": the summary; when PPO was rewarded by a classifier, the audit's, and
    the classifier's grade on the SFT and PPO models' own held-out replies (`on_replies`)."""
    info = json.loads((out / "verifier" / "summary.json").read_text(encoding="utf-8"))
    if (out / "ppo" / "verifier_audit.jsonl").exists():
        info["audit"] = summarize_audit(out / "ppo" / "verifier_audit.jsonl")
    graded = {name: out / "eval" / f"{name}.jsonl" for name in ("sft", "ppo")}
    if info.get("kind") == "classifier" and any(p.exists() for p in graded.values()):
        from minihuatuo.services.verifier import ClassifierVerifier

        judge = ClassifierVerifier.from_dir(out / "verifier" / "final")
        info["on_replies"] = {name: grade_on_replies(judge, p) for name, p in graded.items() if p.exists()}
    return info
