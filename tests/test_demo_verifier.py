"""Issue 20: labels from the search's verifier calls, the demo's classifier verifier for PPO and the
audit of its reward hacking (pipeline/demo_verifier.py, reward.pairs_from_search)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from minihuatuo.pipeline.demo_verifier import (
    WORLD_TEMPLATE,
    AuditedVerifier,
    RLVerifierConfig,
    audit_row,
    summarize_audit,
    train_world_classifier,
)
from minihuatuo.services.records import FormatError
from minihuatuo.services.reward import LabeledPair, pairs_from_search

WORLD_BASE = Path(__file__).resolve().parents[1] / "data" / "world" / "base"


def search_record(answer: str, calls: list[tuple[str, bool]], **extra) -> dict:
    return {"id": answer, "Ground-True Answer": answer, "Question": "q?",
            "search": {"success": any(v for _, v in calls), **extra,
                       "verifier_calls": [{"attempt": 1, "depth": i, "conclusion": c, "verdict": v}
                                          for i, (c, v) in enumerate(calls)]}}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- labels from the search

def test_pairs_from_search_labels_every_verifier_call_with_its_verdict(tmp_path):
    f = write_jsonl(tmp_path / "search.jsonl", [
        search_record("Q fever", [("The most likely diagnosis is pneumonia.", False),
                                  ("The most likely diagnosis is Q fever.", True)]),
        # a failed search: its rejections are negatives too; a repeated conclusion is kept once
        search_record("meropenem", [("The most appropriate treatment is amoxicillin.", False),
                                    ("The most appropriate treatment is amoxicillin.", False),
                                    ("The most appropriate treatment is clindamycin.", False)]),
    ])
    assert pairs_from_search(f) == [
        LabeledPair("The most likely diagnosis is pneumonia.", "Q fever", False, "search"),
        LabeledPair("The most likely diagnosis is Q fever.", "Q fever", True, "search"),
        LabeledPair("The most appropriate treatment is amoxicillin.", "meropenem", False, "search"),
        LabeledPair("The most appropriate treatment is clindamycin.", "meropenem", False, "search"),
    ]


def test_pairs_from_search_errors_name_the_line_and_field(tmp_path):
    good = search_record("Q fever", [("Q fever.", True)])
    no_calls = {"Ground-True Answer": "x", "search": {"success": False}}
    f = write_jsonl(tmp_path / "a.jsonl", [good, no_calls])
    with pytest.raises(FormatError) as e:
        pairs_from_search(f)
    assert str(e.value) == f"{f}: line 2: field 'search.verifier_calls': missing or not a list"
    bad_call = search_record("x", [("y", True)])
    bad_call["search"]["verifier_calls"][0]["verdict"] = "True"
    f = write_jsonl(tmp_path / "b.jsonl", [good, good, bad_call])
    with pytest.raises(FormatError, match=r"line 3: field 'search.verifier_calls\[0\]'"):
        pairs_from_search(f)
    f = write_jsonl(tmp_path / "c.jsonl", [{"search": good["search"]}])
    with pytest.raises(FormatError, match="line 1: field 'Ground-True Answer': missing"):
        pairs_from_search(f)


# ----------------------------------------------------------------------------- the audit

def test_audit_row_counts_hacks_and_misses_by_hand():
    judged = [True, True, True, False, False, True]
    truth = [True, False, False, True, False, True]
    row = audit_row(7, judged, truth)
    assert row == {"call": 7, "n": 6, "rewarded": 4, "truth_right": 3, "hacked": 2, "missed": 1,
                   "hack_rate": 0.5, "miss_rate": 1 / 3, "agreement": 3 / 6}
    empty = audit_row(1, [], [])
    assert empty["hack_rate"] is None and empty["miss_rate"] is None and empty["agreement"] is None


class Fixed:
    """A verifier double whose verdicts are given in advance (control flow only)."""

    def __init__(self, verdicts):
        self.verdicts, self.seen = list(verdicts), []

    def verify_batch(self, pairs):
        self.seen.append(list(pairs))
        out, self.verdicts = self.verdicts[:len(pairs)], self.verdicts[len(pairs):]
        return out


def test_audited_verifier_returns_the_judges_verdicts_and_logs_each_batch(tmp_path):
    judge = Fixed([True, True, False, True, True, True])
    truth = Fixed([True, False, False, False, True, True])
    v = AuditedVerifier(judge, truth, tmp_path / "ppo" / "audit.jsonl")
    assert v.verify_batch([("a", "a"), ("b", "a"), ("c", "a")]) == [True, True, False]
    assert v.verify_batch([("d", "a"), ("e", "a"), ("f", "a")]) == [True, True, True]
    assert judge.seen == truth.seen  # the ground truth judges exactly the pairs the judge rewards
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "audit.jsonl").read_text().splitlines()]
    assert [(r["call"], r["rewarded"], r["hacked"]) for r in rows] == [(1, 2, 1), (2, 3, 1)]
    s = summarize_audit(tmp_path / "ppo" / "audit.jsonl")
    assert s["updates"] == 2 and s["hack_rate_by_update"] == [0.5, 1 / 3]
    assert s["all"]["hack_rate"] == pytest.approx(2 / 5) and s["all"]["agreement"] == pytest.approx(4 / 6)
    assert s["first_eighth"]["hack_rate"] == 0.5 and s["last_eighth"]["hack_rate"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- the demo's settings

def test_demo_flag_selects_the_classifier_and_its_seed_follows_the_demos():
    import argparse

    from minihuatuo.pipeline.demo import PRESETS, DemoConfig
    from minihuatuo.services.config import ConfigError, add_config_args, build_config

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    add_config_args(p, DemoConfig)
    cfg = build_config(DemoConfig, PRESETS, "default", None, p.parse_args(["--verifier", "classifier", "--seed", "3"]))
    assert cfg.rl_verifier.kind == "classifier" and cfg.rl_verifier.train.seed == 3
    cfg = build_config(DemoConfig, PRESETS, "quick", None,
                       p.parse_args(["--rl-verifier.kind", "classifier", "--rl-verifier.train.epochs", "2"]))
    assert cfg.rl_verifier.kind == "classifier" and cfg.rl_verifier.train.epochs == 2
    assert DemoConfig().rl_verifier.kind == "rule"  # the shipped demo keeps the rule verifier
    with pytest.raises(ConfigError, match="kind"):
        RLVerifierConfig(kind="llm")


def test_world_classifier_is_trained_on_training_questions_and_graded_on_held_out_ones(tmp_path):
    """A short run from the shipped base model: the pairs file, the checkpoint with the world's template and
    the trainer's threshold, and held-out grades on pairs none of which it was trained on."""
    from minihuatuo.services.reward import read_labeled
    from minihuatuo.world.pairs import draw_pairs

    cfg = RLVerifierConfig(kind="classifier", classifier_pairs=48, classifier_adversarial=16, heldout_pairs=30)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=2, eval_every=1, micro_batch_size=16))
    final, info = train_world_classifier(cfg, WORLD_BASE, tmp_path / "verifier", seed=5, heldout_seed=1000)
    pairs = read_labeled(tmp_path / "verifier" / "pairs.jsonl")
    assert len(pairs) == 64 == info["training_pairs"]
    assert [(p.response, p.reference) for p in pairs[:48]] == \
        [(r["response"], r["reference"]) for r in draw_pairs(48, 5, split="train")]
    config = json.loads((final / "config.json").read_text())
    assert config["minihuatuo_classifier_template"] == WORLD_TEMPLATE.read_text()
    assert info["threshold"] == config["minihuatuo_threshold"] and info["steps"] == 2
    for kind in ("plain", "adversarial"):
        assert info[f"heldout_{kind}"]["n"] == 30 and 0 <= info[f"heldout_{kind}"]["balanced_accuracy"] <= 1


def test_ppo_with_an_audited_verifier_writes_one_audit_line_per_update(tmp_path):
    """The audit's premise: PPO asks the verifier once per update (reward.rewards' one batch), so line k of
    verifier_audit.jsonl is update k."""
    from minihuatuo.pipeline.demo import reinforce
    from minihuatuo.services.formats import write_problems
    from minihuatuo.stages.rl.ppo import PRESETS as PPO_PRESETS
    from minihuatuo.world.evaluation import world_verifier
    from minihuatuo.world.exam import generate_exam, open_problem
    from minihuatuo.world.kb import load_kb

    kb = load_kb()
    write_problems(tmp_path / "rl.json", [open_problem(it) for it in generate_exam(kb, "train", 8, 0)])
    truth = world_verifier(kb)
    log = tmp_path / "ppo" / "verifier_audit.jsonl"
    cfg = replace(PPO_PRESETS["tiny-world"], batch_size=4, micro_batch_size=4, total_episodes=12, response_length=24,
                  save_every=0)
    reinforce(cfg, WORLD_BASE, tmp_path / "rl.json", tmp_path / "ppo", AuditedVerifier(truth, truth, log))
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["call"] for r in rows] == [1, 2, 3]
    assert all(r["hacked"] == 0 and r["missed"] == 0 for r in rows)  # judge = truth: nothing to find
    metrics = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "update" in m]) == 3


# one stage's row of results.json, as the report reads it
STAGE = {"accuracy": 0.5, "n": 2, "unfinished": 0.0, "reflection": 1.0, "first_accuracy": 0.5, "reflection_gain": 0.0,
         "mcq_accuracy": 0.0, "avg_response_tokens": 10, "by_type": {}}


def _classifier_summary(out, plain: float, adversarial: float):
    """out/verifier/summary.json as ppo_verifier writes it for a classifier."""
    (out / "verifier").mkdir()
    (out / "verifier" / "summary.json").write_text(json.dumps(
        {"kind": "classifier", "heldout_plain": {"balanced_accuracy": plain},
         "heldout_adversarial": {"balanced_accuracy": adversarial}}))


def test_results_table_prints_the_audit_line(tmp_path):
    from minihuatuo.pipeline.demo_verifier import verifier_results
    from minihuatuo.pipeline.report import results_table

    _classifier_summary(tmp_path, 0.934, 0.988)
    log = tmp_path / "ppo" / "verifier_audit.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(audit_row(i + 1, j, t)) + "\n" for i, (j, t) in enumerate(
        [([True, True, False, False], [True, False, False, False])] * 7 + [([True, True], [False, False])])))
    stage = STAGE
    results = {"base": stage, "sft": stage, "ppo": stage, "rl_verifier": verifier_results(tmp_path)}
    assert results["rl_verifier"]["audit"]["updates"] == 8
    line = [x for x in results_table(results).splitlines() if x.startswith("PPO verifier")]
    assert line == ["PPO verifier: classifier (held-out balanced accuracy 93.4% plain, 98.8% adversarial); "
                    "rewarded rollouts the ground truth rejects: 50.0% in the first eighth of the updates, "
                    "100.0% in the last, 56.2% overall"]
    results["rl_verifier"] = {"kind": "rule"}
    assert not [x for x in results_table(results).splitlines() if x.startswith("PPO verifier")]


class _ScriptedJudge:
    """A judge with fixed verdicts, for the counting of grade_on_replies (control flow only)."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = list(verdicts), []

    def verify_batch(self, pairs):
        self.asked.extend(pairs)
        return self.verdicts[:len(pairs)]


def _graded(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    reply = "## Thinking\n\nsome reasoning\n\n## Final Response\n\n{}"
    path.write_text("".join(json.dumps({"reply": reply.format(y) if y else "no format at all", "answer": a,
                                        "correct": c}) + "\n" for y, a, c in rows))


def test_grade_on_replies_counts_by_hand(tmp_path):
    """TP, FN, FP, TN, TN and one reply without a final response (no reward whatever the verdict: left out)."""
    from minihuatuo.pipeline.demo_verifier import grade_on_replies

    rows = [("It is flucloxacillin.", "flucloxacillin", True), ("It is Floxapen.", "flucloxacillin", True),
            ("It is Amoxil.", "flucloxacillin", False), ("It is asthma.", "COPD", False), (None, "COPD", False),
            ("Either A or B.", "A", False)]
    _graded(tmp_path / "eval" / "sft.jsonl", rows)
    judge = _ScriptedJudge([True, False, True, False, False])
    g = grade_on_replies(judge, tmp_path / "eval" / "sft.jsonl")
    assert judge.asked == [(y, a) for y, a, _ in rows if y is not None]
    assert g["n"] == 5 and g["accuracy"] == pytest.approx(3 / 5)
    assert g["true_positive_rate"] == pytest.approx(1 / 2) and g["false_positive_rate"] == pytest.approx(1 / 3)
    assert g["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_results_grade_the_classifier_on_the_models_own_replies(tmp_path, monkeypatch):
    from minihuatuo.pipeline.demo_verifier import verifier_results
    from minihuatuo.pipeline.report import results_table
    from minihuatuo.services import verifier as verifier_module

    _classifier_summary(tmp_path, 0.9, 0.95)
    log = tmp_path / "ppo" / "verifier_audit.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps(audit_row(1, [True, False], [True, False])) + "\n")
    _graded(tmp_path / "eval" / "sft.jsonl", [("A.", "A", True), ("B.", "A", False)])
    _graded(tmp_path / "eval" / "ppo.jsonl", [("A.", "A", True), ("B.", "A", False), ("C.", "A", False)])
    opened = []
    monkeypatch.setattr(verifier_module.ClassifierVerifier, "from_dir",
                        classmethod(lambda cls, path: (opened.append(path), _ScriptedJudge([True, True, True]))[1]))
    info = verifier_results(tmp_path)
    assert opened == [tmp_path / "verifier" / "final"]
    assert info["on_replies"]["sft"]["false_positive_rate"] == 1.0 and info["on_replies"]["ppo"]["n"] == 3
    stage = STAGE
    table = results_table({"base": stage, "sft": stage, "ppo": stage, "rl_verifier": info})
    assert "PPO verifier on the models' own held-out replies (accuracy, false-positive rate): sft 50.0%, 100.0%; " \
           "ppo 33.3%, 100.0%" in table
    (tmp_path / "verifier" / "summary.json").write_text(json.dumps({"kind": "rule"}))
    assert "on_replies" not in verifier_results(tmp_path)
