"""The bundled clinical world: knowledge base, exam generator, splits, biased tutor, tokenizer and
`minihuatuo world pretrain` (issue 8)."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from itertools import combinations, permutations
from pathlib import Path

import pytest

from minihuatuo.services.formats import read_mcq, read_problems
from minihuatuo.services.verifier_text import load_aliases
from minihuatuo.stages.search_prompts import STRATEGIES, parse_cot
from minihuatuo.world.evaluation import grade, world_verifier
from minihuatuo.world.exam import (
    generate_exam,
    heldout_combination,
    names_overlap,
    open_problem,
    sample_vignettes,
    vignette_of,
)
from minihuatuo.world.kb import DEFAULT_KB, WORLD_ALIASES, KBError, Vignette, join, load_kb, write_aliases
from minihuatuo.world.tutor import Attempt, TutorConfig, first_attempt, init_actions, init_exercise, refine_exercise

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "world" / "base"


@pytest.fixture(scope="module")
def kb():
    return load_kb()


@pytest.fixture(scope="module")
def raw():
    return json.loads(DEFAULT_KB.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def verifier(kb):
    return world_verifier(kb)


# ----------------------------------------------------------------------------- knowledge base


def test_kb_has_60_conditions_with_every_field_and_aliases(kb, raw):
    assert len(kb.conditions) >= 60
    for c in raw["conditions"]:
        for key in ("name", "aliases", "findings", "investigation", "first_line", "contraindication", "alternative",
                    "complication"):
            assert c[key], (c["id"], key)
        assert c["aliases"], c["id"]
        for key in ("investigation", "first_line", "alternative", "complication"):
            assert raw["aliases"][c[key]], (c["id"], key)  # every answer has at least one alias
    # findings are shared, so a diagnosis needs the combination
    shared = [f for f in raw["findings"] if len(kb.with_finding(f)) > 1]
    assert len(shared) >= 20 and max(len(kb.with_finding(f)) for f in shared) >= 10


def test_kb_contraindications_are_consistent(kb, raw):
    for c in raw["conditions"]:
        assert c["contraindication"] in raw["treatments"][c["first_line"]]["avoid_in"]
        assert c["contraindication"] not in raw["treatments"][c["alternative"]]["avoid_in"]
        assert c["contraindication"] in raw["contexts"]


def test_shipped_alias_file_is_current_and_loads(kb, tmp_path):
    fresh = write_aliases(kb, tmp_path / "aliases.tsv")
    assert fresh.read_text(encoding="utf-8") == WORLD_ALIASES.read_text(encoding="utf-8"), \
        "data/world/aliases.tsv is stale: rerun write_aliases (minihuatuo world exam writes one too)"
    table = load_aliases([WORLD_ALIASES])
    assert len(table.groups) == len(kb.aliases)


def test_every_alias_is_accepted_and_no_other_answer_is(kb, verifier):
    names = list(kb.aliases)
    rng = random.Random(0)
    for name in names:
        for alias in kb.names(name):
            assert verifier.verify(f"The answer is {alias}.", name), (alias, name)
        other = rng.choice([n for n in names if not names_overlap(kb, n, name)])
        assert not verifier.verify(f"The answer is {other}.", name), (other, name)


def test_load_kb_names_file_line_and_field(raw, tmp_path):
    broken = json.loads(json.dumps(raw))
    del broken["conditions"][5]["first_line"]
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(broken, indent=1), encoding="utf-8")
    cid = raw["conditions"][5]["id"]
    line = next(i for i, s in enumerate(path.read_text().splitlines(), 1) if f'"id": "{cid}"' in s)
    with pytest.raises(KBError, match=rf"kb.json: line {line}: field 'conditions\[5\] \({cid}\).first_line'"):
        load_kb(path)
    ambiguous = json.loads(json.dumps(raw))  # a second condition with the same findings
    ambiguous["conditions"].append({**raw["conditions"][0], "id": "copy"})
    path.write_text(json.dumps(ambiguous, indent=1), encoding="utf-8")
    with pytest.raises(KBError, match="also fit"):
        load_kb(path)
    with pytest.raises(KBError, match=r"missing\.json: no such file"):
        load_kb(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- exam generator


def test_generator_is_deterministic_per_seed(kb):
    a = [it.to_record() for it in generate_exam(kb, "train", 60, seed=3)]
    b = [it.to_record() for it in generate_exam(kb, "train", 60, seed=3)]
    c = [it.to_record() for it in generate_exam(kb, "train", 60, seed=4)]
    assert a == b and a != c


def test_heldout_vignettes_are_new_combinations(kb):
    train = sample_vignettes(kb, "train", 3000, seed=0)
    held = sample_vignettes(kb, "heldout", 800, seed=0)
    key = lambda v: (v.condition, frozenset(v.findings))  # noqa: E731
    assert not {key(v) for v in train} & {key(v) for v in held}
    assert all(frozenset(v.findings) == heldout_combination(kb, kb.by_id[v.condition]) for v in held)
    assert len({v.condition for v in held}) == len(kb.conditions)  # every condition is examined


def test_heldout_combination_is_a_trap_where_the_condition_has_one(kb):
    """The reserved combination opens (least specific finding first) with another condition's
    classic finding whenever any three-finding combination of the condition can."""
    traps = 0
    for c in kb.conditions:
        def lead_misleads(s):
            widest = max(len(kb.with_finding(f)) for f in s)
            return all(kb.classic[f] != c.id for f in s if len(kb.with_finding(f)) == widest)
        possible = any(lead_misleads(s) for s in combinations(c.findings, 3))
        assert lead_misleads(heldout_combination(kb, c)) == possible, c.id
        traps += possible
    assert traps == 47  # notes/world.md §2
    held = sample_vignettes(kb, "heldout", 300, seed=1000)  # the demo's held-out set
    for v in held:  # generic_first = 1: every stem opens with its least specific finding
        assert len(kb.with_finding(v.findings[0])) == max(len(kb.with_finding(f)) for f in v.findings)
    misled = sum(kb.classic[v.findings[0]] != v.condition for v in held)
    assert misled >= 0.7 * len(held)  # 215 of 300 (72%); 53% when combinations were drawn at random


def test_mcqs_have_one_correct_option_and_labelled_hops(kb, raw, verifier):
    items = generate_exam(kb, "heldout", 300, seed=1) + generate_exam(kb, "train", 300, seed=1)
    hops = Counter()
    for it in items:
        m = it.extra["world"]
        c = next(d for d in raw["conditions"] if d["id"] == m["condition"])
        # the answer, worked out from the raw JSON rather than from KB.fact
        if m["qtype"] == "treatment":
            avoided = m["context"] in raw["treatments"][c["first_line"]]["avoid_in"]
            expected = c["alternative"] if avoided else c["first_line"]
            assert m["contraindicated"] == avoided
        else:
            expected = {"diagnosis": c["name"], "investigation": c["investigation"],
                        "complication": c["complication"]}[m["qtype"]]
        assert it.answer == expected
        assert len(it.options) in (4, 5) and len(set(it.options.values())) == len(it.options)
        assert list(it.options.values()).count(expected) == 1
        assert m["hops"] == (1 if m["qtype"] == "diagnosis" else 3 if m["qtype"] == "treatment" and m["context"]
                             else 2)
        hops[m["hops"]] += 1
        accepted = [k for k, o in it.options.items() if verifier.verify(f"So the answer is {o}.", it.answer)]
        assert accepted == [it.answer_idx], (it.question, it.options)
    assert set(hops) == {1, 2, 3}


def test_open_problems_are_the_offline_reformatters(kb):
    for it in generate_exam(kb, "heldout", 200, seed=2):
        p = open_problem(it)
        assert p.y_star == it.answer and p.x.endswith("?") and "following" not in p.x
        assert p.x.startswith(it.question.rsplit(". ", 1)[0])


def test_world_exam_command_writes_readable_files(tmp_path):
    out = tmp_path / "exam"
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "world", "exam", "--out", str(out), "--n-train", "30",
                        "--n-heldout", "20"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(read_mcq(out / "train.jsonl")) == 30 and len(read_mcq(out / "heldout.jsonl")) == 20
    assert [p.y_star for p in read_problems(out / "heldout_open.json")] == \
        [it.answer for it in read_mcq(out / "heldout.jsonl")]
    assert load_aliases([out / "aliases.tsv"]).groups


def test_world_pairs_command_writes_labelled_pairs(tmp_path, kb, verifier):
    """`world pairs`: N lines of exactly {"response", "reference", "label"}: right answers (label true)
    and near misses (label false) whose references are answers of the world; --adversarial adds each
    line's "category" (the hack set; tests/test_hacks.py). Same seed, same file."""
    out = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "-m", "minihuatuo", "world", "pairs", "--n", "45", "--seed", "4", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 45 and all(list(x) == ["response", "reference", "label"] for x in rows)
    assert Counter(x["label"] for x in rows) == {True: 25, False: 20}
    answers = {a for c in kb.conditions for a in (c.name, c.investigation, c.complication, c.first_line, c.alternative)}
    assert {x["reference"] for x in rows} <= answers
    assert [verifier.verify(x["response"], x["reference"]) for x in rows] == [x["label"] for x in rows]
    first = out.read_bytes()
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT).returncode == 0 and out.read_bytes() == first
    r = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "adv.jsonl"), "--adversarial"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    adv = [json.loads(line) for line in (tmp_path / "adv.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(list(x) == ["response", "reference", "label", "category"] for x in adv)
    r = subprocess.run(cmd[:5] + ["--n", "0", "--out", str(tmp_path / "none.jsonl")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "--n" in r.stderr


# ----------------------------------------------------------------------------- the biased tutor


def test_tutor_errors_are_systematic(kb):
    held = sample_vignettes(kb, "train", 400, seed=5)
    always = TutorConfig(anchor=1.0, skip_check=1.0, slip=0.0)
    never = TutorConfig(anchor=0.0, skip_check=0.0, slip=0.0)
    rng = random.Random(0)
    for v in held:
        lead = kb.by_id[kb.classic[v.findings[0]]]  # the classic condition of the first finding
        biased = first_attempt(kb, v, rng, always)
        assert biased.answer == kb.fact(lead, v.qtype, None)  # anchored, and the context ignored
        assert first_attempt(kb, v, rng, never).answer == kb.fact(kb.by_id[v.condition], v.qtype, v.context)


def test_exercises_parse_in_the_search_format(kb, verifier):
    cfg, rng = TutorConfig(), random.Random(1)
    strategies, depths = Counter(), Counter()
    for it in generate_exam(kb, "train", 250, seed=6):
        v, x = vignette_of(it), open_problem(it).x
        (user, reply), attempt = init_exercise(kb, v, x, rng, cfg)
        assert user["content"].startswith(f"<question>\n{x}\n</question>")
        parsed = parse_cot(reply["content"])
        assert not parsed.repairs and [a["action"] for a in parsed.actions][-2:] == ["Final Conclusion",
                                                                                      "Verification"]
        assert verifier.verify(parsed.conclusion, it.answer) == (attempt.answer == it.answer)
        ex = refine_exercise(kb, v, x, rng, cfg)
        if ex is None:
            continue
        user, reply = ex
        cot = parse_cot(reply["content"])
        assert cot.actions[0]["action"] == "Verification" and "does not hold" in cot.actions[0]["content"]
        previous = json.loads(user["content"].split("<previous reasoning>\n")[1].split("\n</previous reasoning>")[0])
        depth = sum(a["action"] == "Verification" for a in previous) + 1  # each refinement opens with one
        strategy = next(k for k in STRATEGIES if cfg_sentence(k) in user["content"])
        strategies[strategy] += 1
        depths[depth] += 1
        assert strategy != "Backtracking" or depth >= 2  # needs an earlier step to return to
    assert set(strategies) == set(STRATEGIES) and depths[1] > depths[2] > 0


def cfg_sentence(k: str) -> str:
    from minihuatuo.stages.search_prompts import STRATEGY_INSTRUCTIONS

    return STRATEGY_INSTRUCTIONS[k]


def test_grading_reads_the_final_conclusion(kb, verifier):
    from minihuatuo.services.formats import VerifiableProblem

    v = Vignette("cap", ("fever", "a productive cough", "focal crackles"), 50, "male", None, "diagnosis")
    it = generate_exam(kb, "heldout", 1, seed=0)[0]
    problem = VerifiableProblem(it.question, "community-acquired pneumonia")
    right = Attempt("cap", None, True, None, "community-acquired pneumonia")
    wrong = Attempt("pe", "fever", True, None, "pulmonary embolism")
    cfg = TutorConfig(alias=0.0)
    assert grade("cot", json.dumps({"CoT": init_actions(kb, v, right, random.Random(0), cfg)}), it, problem,
                 verifier) == (True, True)
    assert grade("cot", json.dumps({"CoT": init_actions(kb, v, wrong, random.Random(0), cfg)}), it, problem,
                 verifier) == (False, True)
    assert grade("cot", "no json here", it, problem, verifier) == (False, False)
    assert grade("direct", "The most likely diagnosis is CAP.", it, problem, verifier) == (True, True)
    assert grade("mcq", f"The answer is {it.answer_idx}.", it, problem, verifier) == (True, True)
    assert grade("mcq", f"The answer is {it.answer}.", it, problem, verifier) == (True, True)


def test_corpus_never_shows_a_heldout_combination(kb):
    from minihuatuo.world.text import CorpusConfig, build_corpus

    docs = build_corpus(kb, CorpusConfig(textbook_passes=0, fact_questions=0, init_exercises=150,
                                         refine_exercises=150, direct_exercises=150, mcq_exercises=50,
                                         free_mcq_exercises=50))
    text = "\n".join(m["content"] for _, d in docs for m in d)
    assert text.count("presents with ") > 300  # the stems are worded as searched for below
    for c in kb.conditions:
        for order in permutations(sorted(heldout_combination(kb, c))):
            assert f"presents with {join(order)}." not in text


# ----------------------------------------------------------------------------- tokenizer and pretraining


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "base"
    # 12 steps: enough for the loss to fall clearly (test_world_pretrain_writes_a_loadable_checkpoint). One thread:
    # the same numbers in ~0.4 s of training, where torch's default threads took ~1 s a step on 2 busy cores
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "world", "pretrain", "--size", "tiny", "--steps", "12",
                        "--threads", "1", "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out


def test_world_pretrain_writes_a_loadable_checkpoint(tiny_world):
    """The checkpoint loads and generates, and the training loss recorded in pretrain.json falls."""
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.engine.tokenizer import Tokenizer

    model = load_model(tiny_world)
    tok = Tokenizer.from_dir(tiny_world)
    assert tok.template.kind == "plain" and tok.token_to_id("<|end|>") in tok.eos_ids
    assert model.cfg.vocab_size >= tok.vocab_size and model.cfg.num_hidden_layers == 1
    summary = json.loads((tiny_world / "pretrain.json").read_text())
    assert summary["config"]["steps"] == 12 and summary["wall_time_s"]["total"] > 0
    log = summary["log"]
    assert [e["step"] for e in log] == [0, 10, 11]  # every 10 steps and the last
    first = log[0]["loss"]  # step 0: before any update
    assert first == pytest.approx(math.log(model.cfg.vocab_size), abs=0.05)  # a near-uniform random init: ln V
    # final_loss is the mean of the last 10 steps' losses (steps 2-11). Observed: 6.45 at step 0, 6.13 for the
    # last 10 steps, 6.01 for the last two; with --lr 0 all of them stay within 0.01 of step 0
    assert summary["final_loss"] < first - 0.15
    assert (log[-2]["loss"] + log[-1]["loss"]) / 2 < first - 0.25
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "generate", "--model", str(tiny_world), "--raw",
                        "--prompt", "Fever is", "--max-new-tokens", "5", "--temperature", "0"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_prompt_pieces_are_single_tokens_and_text_round_trips(kb, tiny_world):
    from minihuatuo.engine.tokenizer import Tokenizer
    from minihuatuo.world.pretrain import prompt_pieces, render_doc

    tok = Tokenizer.from_dir(tiny_world)
    for piece in prompt_pieces():
        assert len(tok.encode(piece, add_special_tokens=False)) == 1, piece
    it = generate_exam(kb, "train", 40, seed=7)
    ex = next(e for e in (refine_exercise(kb, vignette_of(i), open_problem(i).x, random.Random(0), TutorConfig())
                          for i in it) if e)
    text = render_doc(ex)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text) / 3  # the instructions and the JSON skeleton are single tokens


def test_world_eval_runs_on_a_checkpoint(tiny_world):
    """`evaluate_base` end to end on a real checkpoint: the questions asked, the report's shape and its
    groupings. The replies are not graded again with world_eval.grade (the code under test); the one
    check of the verdicts is independent of it: an empty or whitespace reply is neither correct nor
    readable, whatever the grader (the tiny model's greedy replies here are newlines only). Grading
    itself is checked on constructed replies by test_world_eval_grades_replies_as_they_were_built."""
    from minihuatuo.world.evaluation import evaluate_base

    report = evaluate_base(tiny_world, n=3, batch_size=3)
    items = generate_exam(load_kb(DEFAULT_KB), "heldout", 3, 0)  # what evaluate_base drew (n=3, seed 0)
    assert report["n"] == 3 and list(report["modes"]) == ["direct", "cot", "mcq"]
    for mode in ("direct", "cot", "mcq"):
        r = report["modes"][mode]
        # with n = 3 the examples are every reply
        assert [e["question"] for e in r["examples"]] == [open_problem(it).x for it in items]
        assert [e["answer"] for e in r["examples"]] == [it.answer for it in items]
        blank = sum(not e["reply"].strip() for e in r["examples"])
        assert r["accuracy"] <= (3 - blank) / 3
        if mode != "direct":  # a direct reply is always readable: the whole reply is its final response
            assert r["readable"] <= (3 - blank) / 3
        for prefix in ("qtype=", "hops=", "contraindicated="):  # each grouping partitions the 3 questions
            groups = {k: v for k, v in r["by"].items() if k.startswith(prefix)}
            assert sum(v["n"] for v in groups.values()) == 3
            assert round(sum(v["accuracy"] * v["n"] for v in groups.values())) == round(r["accuracy"] * 3)


def test_world_eval_grades_replies_as_they_were_built(raw):
    """`evaluate_base` with a scripted backend that answers each held-out question with a reply built
    here to be right, wrong or unreadable. Independent of the code under test: the expected verdicts
    are the plan the replies were built from, the accepted names are read from kb.json (an alias
    other than the canonical name where there is one), the wrong answer is another MCQ option that
    shares no name with the right one (checked here by plain substring tests), the letters are the
    item's own; world_eval.grade, the rule verifier and extract_choice are never called. A right
    reply mentions the wrong answer before its conclusion and a wrong one mentions the right answer,
    so only reading the final response / Final Conclusion / chosen letter gives the plan."""
    from minihuatuo.services.backends import ChatRequest
    from minihuatuo.world.evaluation import evaluate_base

    n = 6
    items = generate_exam(load_kb(DEFAULT_KB), "heldout", n, 0)  # what evaluate_base draws (seed 0)
    names = {c["name"]: [c["name"], *c["aliases"]] for c in raw["conditions"]} | \
        {k: [k, *v] for k, v in raw["aliases"].items()}

    def unrelated(a: str, b: str) -> bool:
        return all(x.casefold() not in y.casefold() and y.casefold() not in x.casefold()
                   for x in names.get(a, [a]) for y in names.get(b, [b]))

    right, wrong, wrong_letter = [], [], []
    for i, it in enumerate(items):
        accepted = names[it.answer]
        right.append(accepted[1 + i % (len(accepted) - 1)] if len(accepted) > 1 else accepted[0])
        other = next(k for k, o in it.options.items() if k != it.answer_idx and unrelated(o, it.answer))
        wrong.append(it.options[other])
        wrong_letter.append(other)

    def direct(i, plan):
        said, other = (right[i], wrong[i]) if plan == "right" else (wrong[i], right[i])
        return f"## Thinking\n\nCould it be {other}? The findings say otherwise.\n\n## Final Response\n\n" \
               f"The answer is {said}."

    def cot(i, plan):
        if plan == "unreadable":
            return "I would need to think about this one."
        said, other = (right[i], wrong[i]) if plan == "right" else (wrong[i], right[i])
        return json.dumps({"CoT": [
            {"action": "Inner Thinking", "title": "First idea", "content": f"Could it be {other}?"},
            {"action": "Final Conclusion", "content": f"The answer is {said}."},
            {"action": "Verification", "content": "The conclusion fits the findings."}]})

    def mcq(i, plan):
        return {"right": f"The answer is {items[i].answer_idx}.", "wrong": f"The answer is {wrong_letter[i]}.",
                "unreadable": "no idea"}[plan]

    R, W, U = "right", "wrong", "unreadable"
    plans = {"direct": (direct, [R, W, R, R, W, R]), "cot": (cot, [R, U, W, R, U, R]),
             "mcq": (mcq, [W, R, U, R, R, R])}

    class Scripted:
        def __init__(self, build, plan):
            self.build, self.plan, self.asked = build, plan, []

        def complete(self, requests: list[ChatRequest]) -> list[list[str]]:
            out = []
            for r in requests:
                assert r.temperature == 0.0 and r.n == 1 and [m["role"] for m in r.messages] == ["user"]
                # which question this is: the vignette stem shared by the MCQ and its open form
                (i,) = [i for i, it in enumerate(items) if it.question.rsplit(". ", 1)[0] in r.messages[0]["content"]]
                self.asked.append(i)
                out.append([self.build(i, self.plan[i])])
            return out

    for mode, (build, plan) in plans.items():
        backend = Scripted(build, plan)
        r = evaluate_base("scripted", n=n, modes=(mode,), backend=backend)["modes"][mode]
        assert sorted(backend.asked) == list(range(n))  # each question asked once
        assert r["accuracy"] == plan.count(R) / n, (mode, plan)
        assert r["readable"] == (n - plan.count(U)) / n, (mode, plan)
        expected = {}
        for it, p in zip(items, plan):
            m = it.extra["world"]
            for key in (f"qtype={m['qtype']}", f"hops={m['hops']}", f"contraindicated={m['contraindicated']}"):
                expected.setdefault(key, []).append(p == R)
        assert r["by"] == {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for k, v in expected.items()}
        assert [e["reply"] for e in r["examples"]] == [build(i, plan[i]) for i in range(3)]


@pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="no shipped base model")
def test_shipped_base_model_matches_the_current_prompts(kb):
    from minihuatuo.engine.tokenizer import Tokenizer
    from minihuatuo.world.pretrain import prompt_pieces

    tok = Tokenizer.from_dir(BASE)
    stale = [p[:40] for p in prompt_pieces() if len(tok.encode(p, add_special_tokens=False)) != 1]
    assert not stale, f"the prompts changed since data/world/base was trained (rerun world pretrain): {stale}"
    summary = json.loads((BASE / "pretrain.json").read_text())
    assert summary["parameters"] < 5_000_000
    # the recorded command regenerates it: every setting but the thread count is today's default
    from dataclasses import asdict

    from minihuatuo.world.pretrain import PretrainConfig

    recorded = {k: v for k, v in summary["config"].items() if k != "threads"}
    defaults = {k: v for k, v in asdict(PretrainConfig()).items() if k != "threads"}
    assert recorded == defaults, {k: (recorded.get(k), defaults.get(k))
                                  for k in recorded.keys() | defaults.keys() if recorded.get(k) != defaults.get(k)}


def test_direct_exercise_is_think_then_answer_with_the_tutors_conclusion(kb, verifier):
    from minihuatuo.services.response_format import extract_final_response
    from minihuatuo.world.tutor import direct_exercise

    items = generate_exam(kb, "train", 40, seed=3)
    seen = Counter()
    for it in items:
        doc, attempt = direct_exercise(kb, vignette_of(it), open_problem(it).x, random.Random(it.id), TutorConfig())
        reply = doc[1]["content"]
        final = extract_final_response(reply, "strict")  # the reward's format check passes on every exercise
        assert final is not None and reply.startswith("## Thinking\n\n")
        ok = verifier.verify(final, open_problem(it).y_star)
        assert ok == (attempt.answer == open_problem(it).y_star)  # ŷ is the tutor's own (biased) conclusion
        seen[ok] += 1
    assert seen[True] and seen[False]  # the habits make it wrong often, not always
