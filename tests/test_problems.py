"""Problem construction (paper §2.1): rule filters, the offline reformatter, strict reading of LLM
replies, the LLM filter / reformatter control flow with retries, the too-easy filter, decontamination
of the source MCQs, the seeded split, and `minihuatuo problems build` end to end on the 150 released
demo items with a tiny local model as filter backend."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minihuatuo.services.config import ConfigError
from minihuatuo.services.formats import X_KEY, Y_KEY, MCQItem, read_problems
from minihuatuo.services.records import read_records
from minihuatuo.services.replies import ReplyError
from minihuatuo.stages.problem_prompts import (
    Asker,
    Prompts,
    load_problem_prompts,
    parse_filter_verdict,
    parse_problem_json,
    render_mcq,
)
from minihuatuo.stages.problem_rules import (
    NotReformulatable,
    aggregate_option,
    is_combination,
    multiple_correct,
    negative_question,
    reformat_offline,
    rule_filter,
    singular,
)
from minihuatuo.stages.problems import (
    ProblemsConfig,
    build_problems,
    llm_filter,
    reformat_items,
    split_problems,
    too_easy_filter,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEMO = SHARED / "reference" / "medical_o1_demo_150.json"
VIGNETTE = "A 34-year-old woman comes to the clinic with three days of fever, dysuria and right flank pain. "


def mcq(question, options=("Pyelonephritis", "Cystitis", "Urethritis", "Nephrolithiasis"), answer="A", id="q1"):
    return MCQItem(id, question, dict(zip("ABCDE", options)), answer, "test")


# ---------------------------------------------------------------------------------------------------
# rule filters


@pytest.mark.parametrize("call", [
    "Which of the following is NOT a feature of pyelonephritis?",
    "All of the following are true about pyelonephritis EXCEPT:",
    "All of the following are seen except",
    "Which of the following drugs is not used to treat this infection?",
    "Which of the following drug cannot be used to treat the infection:",
    "Which statement about her condition is incorrect?",
    "Which of the following is false regarding her condition?",
    "Which of the following is the least likely cause?",
    "Not a feature of acute pyelonephritis:",
    "Drug not used in pyelonephritis is:",
])
def test_negative_question_positives(call):
    assert negative_question(mcq(VIGNETTE + call)) is not None
    assert rule_filter(mcq(VIGNETTE + call))[0] == "negative_question"


@pytest.mark.parametrize("question", [
    # the negation is in the vignette, not in what is asked
    "Examination is unremarkable except for costovertebral angle tenderness. Which of the following is the most "
    "likely diagnosis?",
    "She does not smoke and is NOT pregnant. What is the most likely diagnosis?",
    "Which of the following is the most likely reason this patient is not responding to treatment?",
    "Which of the following best explains the false-positive urine pregnancy test?",
    "Which antibiotic, taken at least twice daily, is most appropriate for this patient?",
])
def test_negative_question_negatives(question):
    assert negative_question(mcq(VIGNETTE + question)) is None


@pytest.mark.parametrize("option", ["All of the above", "none of the above.", "Both A and B", "both a & c",
                                    "Neither a nor b", "All", "None", "a and b both", "All of these"])
def test_aggregate_option_positives(option):
    item = mcq(VIGNETTE + "What is the most likely diagnosis?", ("Pyelonephritis", "Cystitis", "Urethritis", option))
    assert aggregate_option(item) == f"option D: {option}"
    assert rule_filter(item)[0] == "aggregate_option"


@pytest.mark.parametrize("option", ["Both kidneys", "None detected on culture", "All-trans retinoic acid",
                                    "Allopurinol", "Nonsteroidal anti-inflammatory drug"])
def test_aggregate_option_negatives(option):
    item = mcq(VIGNETTE + "What is the most likely diagnosis?", ("Pyelonephritis", "Cystitis", "Urethritis", option))
    assert aggregate_option(item) is None


def test_multiple_correct():
    q = VIGNETTE + "What is the most likely diagnosis?"
    assert multiple_correct(mcq(VIGNETTE + "Select all that apply.")) == "Select all"
    assert multiple_correct(mcq(VIGNETTE + "Which two findings are expected?")) == "Which two"
    combos = mcq("True about the kidney: a) ... b) ... c) ... d) ... e) ...", ("ad", "bc", "ae", "cd"), "C")
    assert "combinations" in multiple_correct(combos)
    numbered = mcq(q, ("1,2 & 3", "2 & 3", "2,3 & 4", "1 and 4"), "B")
    assert multiple_correct(numbered) == "options A, B, C, D are combinations of statements"
    assert "keyed text" in multiple_correct(mcq(q, ("Cystitis", "Pyelonephritis", "cystitis.", "Urethritis"), "A"))
    assert multiple_correct(mcq(q)) is None
    # a lone combination that is not the key (and numbers, fractions, words) are not statement sets
    assert multiple_correct(mcq(q, ("Pyelonephritis", "ab", "12", "1/2"), "A")) is None
    assert [is_combination(s) for s in ("ae", "abd", "a, c", "1,2 & 3", "2 and 4", "12", "1.5", "1/2", "bad", "ea")] \
        == [True, True, True, True, True, False, False, False, False, False]


def test_too_short_boundary_and_rule_order():
    assert rule_filter(mcq("x" * 49), min_chars=50) == ("too_short", "49 characters < 50")
    fifty = "What is the most likely diagnosis in this woman???"
    assert len(fifty) == 50 and rule_filter(mcq(fifty), min_chars=50) is None
    assert rule_filter(mcq("  " + "x" * 49 + "\n"), min_chars=50)[0] == "too_short"  # surrounding space not counted
    # several rules fire: the first in the documented order is reported
    item = mcq("Which is NOT true?", ("All of the above", "b", "c", "d"))
    assert rule_filter(item, min_chars=50)[0] == "too_short"
    assert rule_filter(item, min_chars=5)[0] == "negative_question"


# ---------------------------------------------------------------------------------------------------
# offline reformatter


@pytest.mark.parametrize("call, expected", [
    ("Which of the following is the most likely diagnosis?", "What is the most likely diagnosis?"),
    ("Which of the following best explains these findings?", "What best explains these findings?"),
    ("Which of the following drugs is most appropriate?", "Which drug is most appropriate?"),
    ("Which of the following laboratory tests would most likely be abnormal?",
     "Which laboratory test would most likely be abnormal?"),
    ("Which one of the following arteries is most likely occluded?", "Which artery is most likely occluded?"),
    ("This patient is at increased risk of developing which of the following?",
     "This patient is at increased risk of developing what?"),
    ("A urine culture is most likely to show which of the following findings?",
     "A urine culture is most likely to show which findings?"),
    ("You recommend which of the following to the patient:", "You recommend what to the patient?"),
    ("Most likely diagnosis is:", "What is the most likely diagnosis?"),
    ("The probable diagnosis is -", "What is the probable diagnosis?"),
    ("Ultrasound shows a dilated pelvis, the next step is",
     "Ultrasound shows a dilated pelvis, what is the next step?"),
    ("Her condition is most commonly associated with:", "Her condition is most commonly associated with what?"),
    ("What is the drug of choice for this patient?", "What is the drug of choice for this patient?"),
    ("How many days should the antibiotic be given", "How many days should the antibiotic be given?"),
])
def test_offline_reformatter_rewrites_the_call(call, expected):
    x, y = reformat_offline(mcq(VIGNETTE + call, ("Pyelonephritis.", "b", "c", "d")))
    assert x == VIGNETTE + expected  # the vignette is kept word for word
    assert y == "Pyelonephritis"  # the keyed option, final period dropped


@pytest.mark.parametrize("call, options, why", [
    ("Which of the following statements is true?", None, "statement"),
    ("Which of the following is true about her condition?", None, "statement"),
    ("Which of the following histological features (if seen) would help?", None, "noun"),
    ("Which option best describes the lesion?", ("A", "b", "c", "d"), "label"),
    ("What is the diagnosis?", ("ae", "bd", "c", "d"), "label"),
    ("Which box best matches her values?", ("Box E", "Box F", "c", "d"), "label"),
    ("Which labelled structure in the image is the ureter?", None, "picture"),
    ("Does she have pyelonephritis?", ("yes", "no", "maybe"), "yes/no"),
    ("What is the diagnosis?", ("word " * 50, "b", "c", "d"), "characters"),
    ("Dwell-times for instilled markers are greatest in the:", None, "open question"),
    ("Her condition is best described by which of the options given above?", None, "options"),
])
def test_offline_reformatter_refuses(call, options, why):
    with pytest.raises(NotReformulatable, match=why):
        reformat_offline(mcq(VIGNETTE + call, options or ("Pyelonephritis", "b", "c", "d")))


def test_singular():
    assert [singular(w) for w in ("drugs", "arteries", "diagnoses", "indices", "viruses", "branches", "bacteria",
                                  "glass", "findings", "Organisms", "fetus")] == \
        ["drug", "artery", "diagnosis", "index", "virus", "branch", "bacterium", "glass", "finding", "Organism",
         "fetus"]


# ---------------------------------------------------------------------------------------------------
# reading LLM replies


GOOD = {X_KEY: "What is the most likely diagnosis?", Y_KEY: "Pyelonephritis"}


@pytest.mark.parametrize("reply", [
    json.dumps(GOOD),
    "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
    "Sure! Here it is:\n```\n" + json.dumps(GOOD) + "\n```\nHope this helps.",
    "Here is the rewrite: " + json.dumps(GOOD) + " -- let me know if you need more.",
    '{"Open-ended Verifiable Question": "What is the most likely\ndiagnosis?", "Ground-True Answer": "Pyelonephritis"}',
    '{"Open-ended Verifiable Question": "What is the most likely diagnosis?", "Standard Answer": " Pyelonephritis "}',
])
def test_parse_problem_json_accepts(reply):
    x, y = parse_problem_json(reply)
    assert x.replace("\n", " ") == GOOD[X_KEY] and y == "Pyelonephritis"


@pytest.mark.parametrize("reply, message", [
    ("", "empty"),
    ("I cannot rewrite this question.", "no JSON object"),
    ("{'Open-ended Verifiable Question': 'x', 'Ground-True Answer': 'y'}", "invalid JSON"),
    ('{"Open-ended Verifiable Question": "x", "Ground-True Answer": "y"', "invalid JSON"),
    ('```json\n["x", "y"]\n```', "expected a JSON object"),
    ('{"Question": "x", "Answer": "y"}', "expected the fields"),
    ('{"Open-ended Verifiable Question": "x", "Ground-True Answer": "y", "Standard Answer": "y"}',
     "expected the fields"),
    ('{"Open-ended Verifiable Question": "x", "Ground-True Answer": "y", "Options": "A-D"}', "unexpected field"),
    ('{"Open-ended Verifiable Question": "x", "Ground-True Answer": "  "}', "non-empty string"),
    ('{"Open-ended Verifiable Question": "x", "Ground-True Answer": 42}', "non-empty string"),
    ('```json\n{"Open-ended Verifiable Question": "x", "Ground-True Answer": "y"} and more\n```', "extra text"),
])
def test_parse_problem_json_rejects(reply, message):
    with pytest.raises(ReplyError, match=message):
        parse_problem_json(reply)


@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: Pass", "pass"),
    ("It needs several steps and has one answer.\nVerdict: **Pass**", "pass"),
    ("The keyed answer is debatable.\nVerdict: \"Ambiguous Answer\"", "ambiguous"),
    ("Too Simple", "too_simple"),
    ("not reformulatable.", "not_reformulatable"),
    ("Verdict: <Pass | Too Simple | Ambiguous Answer | Not Reformulatable>\nVerdict: Too Simple", "too_simple"),
    ("It mentions bypass surgery but is one recalled fact.\nVerdict: Too Simple", "too_simple"),
])
def test_parse_filter_verdict(reply, verdict):
    assert parse_filter_verdict(reply) == verdict


@pytest.mark.parametrize("reply, message", [
    ("", "empty"),
    ("I think this question does not pass.", "no verdict"),  # the official substring test keeps it
    ("Hmm, it is a bypass question.", "no verdict"),
    ("Too Simple? No. Ambiguous Answer? No. So: Pass.", "several verdicts"),
    ("Verdict: <Pass | Too Simple | Ambiguous Answer | Not Reformulatable>", "several verdicts"),
])
def test_parse_filter_verdict_rejects(reply, message):
    with pytest.raises(ReplyError, match=message):
        parse_filter_verdict(reply)


def test_prompts_render_and_load(tmp_path):
    item = mcq(VIGNETTE + "What is the most likely diagnosis?")
    text = render_mcq(Prompts().reformat, item)
    assert "A. Pyelonephritis\nB. Cystitis" in text and "Keyed answer: A. Pyelonephritis" in text
    assert '{"Open-ended Verifiable Question": "...", "Ground-True Answer": "..."}' in text  # braces kept
    assert "{" + "question}" not in text
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"llm_filter": "Q: {question} {options} key {answer}. Verdict?"}))
    p = load_problem_prompts(f)
    assert p.llm_filter.startswith("Q: ") and p.reformat == Prompts().reformat
    f.write_text(json.dumps({"reformat": "no placeholders"}))
    with pytest.raises(ValueError, match=r"p\.json: field 'reformat': the template has no \{question\}"):
        load_problem_prompts(f)
    f.write_text(json.dumps({"filter": "x"}))
    with pytest.raises(ValueError, match="unknown prompt"):
        load_problem_prompts(f)


# ---------------------------------------------------------------------------------------------------
# LLM stages with a scripted backend (a test double for control flow: it answers by item and attempt)


class Scripted:
    """Replies script[marker][k] to the k-th request about the item whose marker is in the prompt
    (the last reply repeats); records every call."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls, self.seen = script, [], {}

    def complete(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            marker = next(m for m in self.script if f"[{m}]" in r.messages[0]["content"])
            k = self.seen[marker] = self.seen.get(marker, -1) + 1
            out.append([self.script[marker][min(k, len(self.script[marker]) - 1)]])
        return out


def items_for(markers):
    return [mcq(f"{VIGNETTE}[{m}] Which of the following is the most likely diagnosis?", id=m) for m in markers]


def test_llm_filter_verdicts_retries_and_failure():
    llm = Scripted({"ok": ["Verdict: Pass"], "easy": ["Verdict: Too Simple"],
                    "late": ["hmm", "I mean, it is fine.\nVerdict: Ambiguous Answer"], "bad": ["no idea"],
                    "noreason": ["Verdict: Not Reformulatable"]})
    cfg = ProblemsConfig(llm_retries=2)
    kept, drops = llm_filter(items_for(["ok", "easy", "late", "bad", "noreason"]), llm, "scripted", cfg)
    assert [it.id for it in kept] == ["ok"]
    assert {it.id: reason for it, reason, _ in drops} == {
        "easy": "llm_too_simple", "late": "llm_ambiguous", "bad": "llm_filter_unreadable",
        "noreason": "llm_not_reformulatable"}
    assert [len(c) for c in llm.calls] == [5, 2, 1]  # one call per attempt; "bad" is asked 1 + 2 times
    retry = llm.calls[1][0].messages  # the follow-up shows the model its reply and the error
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "hmm" and "no verdict label" in retry[2]["content"]
    # the second retry carries the whole conversation: never the same request twice (no cache hit)
    assert [m["role"] for m in llm.calls[2][0].messages] == ["user", "assistant", "user", "assistant", "user"]
    assert dict((it.id, d) for it, _, d in drops)["bad"] == "no verdict label in the reply"

    llm0 = Scripted({"late": ["hmm", "Verdict: Pass"]})
    kept, drops = llm_filter(items_for(["late"]), llm0, "scripted", ProblemsConfig(llm_retries=0))
    assert kept == [] and drops[0][1] == "llm_filter_unreadable" and len(llm0.calls) == 1


def test_llm_reformat_retries_failure_and_hybrid():
    good = json.dumps({X_KEY: "Which organism is most likely?", Y_KEY: "E. coli"})
    llm = Scripted({"first": ["```json\n" + good + "\n```"], "second": ["Sorry.", "Here: " + good],
                    "never": ["{broken"], "long": [json.dumps({X_KEY: "q?", Y_KEY: "x" * 30}), good]})
    cfg = ProblemsConfig(llm_retries=1, max_answer_chars=20)
    problems, drops = reformat_items(items_for(["first", "second", "never", "long"]), "llm", llm, "scripted", cfg)
    assert [p.extra["source_id"] for p in problems] == ["first", "second", "long"]
    assert all(p.y_star == "E. coli" and p.extra["reformatted_by"] == "llm" for p in problems)
    assert [(it.id, reason) for it, reason, _ in drops] == [("never", "reformat_failed")]
    assert drops[0][2].startswith("invalid JSON")
    long_retry = [r for r in llm.calls[1] if "[long]" in r.messages[0]["content"]][0]
    assert "30 characters; keep it under 20" in long_retry.messages[2]["content"]
    # hybrid: what the offline rules can rewrite never reaches the LLM
    llm2 = Scripted({"hard": [good]})
    hard = mcq(VIGNETTE + "[hard] Dwell-times are greatest in the:", id="hard")
    problems, drops = reformat_items(items_for(["easy"]) + [hard], "hybrid", llm2, "scripted", cfg)
    assert [(p.extra["source_id"], p.extra["reformatted_by"]) for p in problems] == [("easy", "offline"),
                                                                                      ("hard", "llm")]
    assert drops == [] and [len(c) for c in llm2.calls] == [1]
    with pytest.raises(ValueError, match="needs an LLM"):
        reformat_items(items_for(["x"]), "llm", None, "none", cfg)


def test_too_easy_filter_all_correct_drops_one_wrong_keeps():
    items = [mcq(f"{VIGNETTE}[{i}] What is the most likely diagnosis?", answer="ABCD"[i % 4], id=f"q{i}")
             for i in range(6)]
    key = {f"{i}": ["The answer is %s." % "ABCD"[i % 4]] for i in range(6)}
    m1, m2 = Scripted(dict(key)), Scripted(dict(key))
    wrong = dict(key, **{"2": ["The answer is D."], "4": ["It is A or B."], "5": ["(no letter here)"]})
    m3 = Scripted(wrong)
    loaded = []
    stats = {}
    kept, drops = too_easy_filter(items, {"m1": m1, "m2": m2, "m3": lambda: loaded.append(1) or m3},
                                  ProblemsConfig(), stats=stats)
    assert [it.id for it in kept] == ["q2", "q4", "q5"]  # one model wrong (or no clear answer) keeps it
    assert [(it.id, r) for it, r, _ in drops] == [("q0", "too_easy"), ("q1", "too_easy"), ("q3", "too_easy")]
    assert drops[0][2] == {"answers": {"m1": "A", "m2": "A", "m3": "A"}}
    assert loaded == [1]  # a factory is loaded once, when its turn comes
    assert [len(m.calls) for m in (m1, m2, m3)] == [1, 1, 1] and len(m1.calls[0]) == 6  # one call per model
    assert stats["m3"] == {"correct": 3, "not_asked": 0, "items": 6}
    # chunked calls: 6 requests, 4 per call
    m4 = Scripted(dict(key))
    too_easy_filter(items, {"m4": m4}, ProblemsConfig(request_chunk=4))
    assert [len(c) for c in m4.calls] == [4, 2]


def test_too_easy_keep_keeps_a_seeded_share_of_the_too_easy_items():
    items = [mcq(f"{VIGNETTE}[{i}] What is the most likely diagnosis?", answer="A", id=f"q{i}") for i in range(400)]
    right = Scripted({f"{i}": ["The answer is A."] for i in range(400)})

    def kept_ids(keep, seed=0, subset=items):
        kept, drops = too_easy_filter(subset, {"m": right}, ProblemsConfig(too_easy_keep=keep, seed=seed))
        assert len(kept) + len(drops) == len(subset) and all(r == "too_easy" for _, r, _ in drops)
        return [it.id for it in kept]

    assert kept_ids(0.0) == [] and len(kept_ids(1.0)) == 400  # 0 = the paper's filter
    half = kept_ids(0.5)
    assert 160 < len(half) < 240  # a binomial(400, 0.5) draw: 4.5 standard deviations either side
    assert kept_ids(0.5) == half and kept_ids(0.5, seed=1) != half  # seeded
    assert set(kept_ids(0.25)) < set(half)  # one draw per item: a smaller share keeps a subset
    with pytest.raises(ConfigError, match="too_easy_keep"):
        ProblemsConfig(too_easy_keep=1.5)


def test_reply_log_makes_a_rerun_free(tmp_path):
    llm = Scripted({"a": ["Verdict: Pass"], "b": ["Verdict: Too Simple"]})
    items = items_for(["a", "b"])
    asker = Asker(tmp_path / "responses.jsonl")
    llm_filter(items, llm, "scripted", ProblemsConfig(), asker=asker)
    asker.log.close()
    with open(tmp_path / "responses.jsonl", "a") as f:
        f.write('{"key": "cut by a cra')  # a crash mid-line: removed on reopen
    again = Scripted({"a": ["Verdict: Too Simple"], "b": ["Verdict: Too Simple"]})
    kept, _ = llm_filter(items, again, "scripted", ProblemsConfig(), asker=Asker(tmp_path / "responses.jsonl"))
    assert again.calls == [] and [it.id for it in kept] == ["a"]  # answered from the log
    kept, _ = llm_filter(items, again, "another-model", ProblemsConfig(), asker=Asker(tmp_path / "responses.jsonl"))
    assert len(again.calls) == 1 and kept == []  # the key includes the backend name


def test_local_model_context_fit(tiny_checkpoint):
    """The product path on a real local model: a prompt that does not fit the context is not asked
    (and is dropped as too_long_for_llm), max_tokens shrinks to a power of two that fits."""
    import dataclasses

    from minihuatuo.services.backends import ChatRequest, LocalBackend, fit_request

    backend = LocalBackend.from_dir(tiny_checkpoint, batch_size=4)
    short = ChatRequest([{"role": "user", "content": "What is the most likely diagnosis?"}], max_tokens=4)
    room = backend.context_length - len(backend.tokenizer.apply_chat_template(short.messages))
    assert fit_request(backend, short) is short
    assert fit_request(backend, dataclasses.replace(short, max_tokens=room + 5)).max_tokens == \
        1 << (room.bit_length() - 1)
    long = dataclasses.replace(short, messages=[{"role": "user", "content": "fever " * 2000}])
    assert fit_request(backend, long) is None
    assert fit_request(backend, short, min_room=room) is short and fit_request(backend, short, room + 1) is None
    items = [mcq(VIGNETTE + "What is the most likely diagnosis?", id="fits"),
             mcq(VIGNETTE * 40 + "What is the most likely diagnosis?", id="long")]
    kept, drops = llm_filter(items, backend, "tiny", ProblemsConfig(llm_max_tokens=4, llm_retries=0))
    reasons = {it.id: reason for it, reason, _ in drops}
    assert reasons["long"] == "too_long_for_llm"
    assert len(kept) + len(drops) == 2 and reasons.get("fits", "kept") != "too_long_for_llm"


# ---------------------------------------------------------------------------------------------------
# decontamination, split, the whole build


def test_build_drops_planted_eval_overlap_and_counts_add_up(tmp_path):
    shared = "pain radiating to the groin and microscopic hematuria on urinalysis after a long run"  # 85 chars
    train = [mcq(f"A {30 + i}-year-old man has colicky flank {shared if i == 3 else 'pain'} today. "
                 "Which of the following is the most likely diagnosis?", id=f"t{i}") for i in range(8)]
    train.append(mcq(VIGNETTE + "Which is NOT a cause?", id="neg"))
    near = mcq(f"Case:{shared[:63]}|", id="e-near")  # 63 characters in common with t3: not enough
    ev = mcq(f"Old exam: {shared}. Most likely?", id="e1")
    r = build_problems(train, ProblemsConfig(search_fraction=0.5, seed=1), evals=[near, ev], out_dir=tmp_path)
    assert r.counts == {"negative_question": 1, "contaminated": 1}
    (c,) = [d for d in r.dropped if d["reason"] == "contaminated"]
    assert c["id"] == "t3" and c["detail"]["eval_id"] == "e1" and shared in c["detail"]["shared"]
    assert len(r.search) + len(r.rl) + len(r.dropped) == len(train) and (len(r.search), len(r.rl)) == (4, 3)
    written = [rec.data for rec in read_records(tmp_path / "dropped.jsonl")]
    assert written == r.dropped and set(written[0]) == {"id", "source", "reason", "detail"}
    assert [p.x for p in read_problems(tmp_path / "search.json")] == [p.x for p in r.search]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dropped_by_reason"] == r.counts and summary["kept"] == 7


def test_split_reproducible_by_seed():
    problems = list(range(41))
    s1, r1 = split_problems(problems, 0.5, seed=3)
    assert split_problems(problems, 0.5, seed=3) == (s1, r1)
    assert split_problems(problems, 0.5, seed=4) != (s1, r1)
    assert len(s1) == 20 and sorted(s1 + r1) == problems and not set(s1) & set(r1)
    assert s1 == sorted(s1) and r1 == sorted(r1)  # input order kept within each subset
    assert split_problems(problems, 0.0) == ([], problems) and split_problems(problems, 1.0) == (problems, [])
    assert len(split_problems(problems, 0.25, seed=0)[0]) == 10
    with pytest.raises(ValueError, match="search_fraction"):
        ProblemsConfig(search_fraction=1.5)


def test_cli_errors(tmp_path, capsys):
    from minihuatuo.cli import main

    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"id": "x", "question": VIGNETTE, "options": {"A": "a", "B": "b"}, "answer_idx": "A"}]))
    assert main(["problems", "build", "--mcq", str(f), "--out", str(tmp_path / "o"), "--reformat", "magic"]) == 2
    assert "reformat: expected one of auto, llm, offline, hybrid" in capsys.readouterr().err
    assert main(["problems", "build", "--mcq", str(f), "--mcq", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "id 'x' is also in" in capsys.readouterr().err
    assert main(["problems", "build", "--mcq", str(f), "--out", str(tmp_path / "o"), "--reformat", "llm"]) == 2
    assert "needs an LLM" in capsys.readouterr().err


@pytest.mark.skipif(not DEMO.exists(), reason="../shared/reference/medical_o1_demo_150.json is absent")
def test_cli_build_on_the_150_demo_items(tmp_path, tiny_checkpoint):
    demo = json.loads(DEMO.read_text())
    eval_file = tmp_path / "eval.json"  # three demo questions play an evaluation set
    eval_file.write_text(json.dumps([{"id": f"e{i}", "question": demo[i]["question"], "options": demo[i]["options"],
                                      "answer_idx": demo[i]["answer_idx"], "source": "eval"} for i in (0, 4, 5)]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "minihuatuo", "problems", "build", "--mcq", str(DEMO),
                           "--eval", str(eval_file), "--filter-model", str(tiny_checkpoint), "--out", str(out),
                           "--device", "cpu", "--easy-max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["dropped_by_reason"]
    for reason, n in counts.items():  # every reason is printed with its count
        assert re.search(rf"^{reason}\s+{n}$", proc.stdout, re.M), (reason, proc.stdout)
    assert counts["contaminated"] == 3 and counts["negative_question"] >= 15
    search, rl = read_problems(out / "search.json"), read_problems(out / "rl.json")
    dropped = [r.data for r in read_records(out / "dropped.jsonl")]
    assert len(search) + len(rl) + len(dropped) == 150 == summary["input"]
    assert abs(len(search) - len(rl)) <= 1 and sum(counts.values()) == len(dropped)
    raw = json.loads((out / "search.json").read_text())
    assert list(raw[0])[:2] == [X_KEY, Y_KEY] and all(p.x.endswith("?") and p.y_star for p in search + rl)
    assert summary["too_easy"][str(tiny_checkpoint)]["items"] == summary["stages"][1]["out"]


def test_cli_build_through_endpoints_with_prompt_file(tmp_path, tiny_checkpoint, monkeypatch):
    """--filter-endpoint / --llm-endpoint against `minihuatuo serve`'s server on 127.0.0.1 (a real
    HTTP round trip), our own short prompts from --prompts, the API key only in the environment."""
    import threading

    from minihuatuo.services.backends import LocalBackend
    from minihuatuo.services.serve import ChatServer

    secret = "sk-test-problems-0123456789"
    monkeypatch.setenv("PB_TEST_KEY", secret)
    srv = ChatServer(LocalBackend.from_dir(tiny_checkpoint, batch_size=4), "127.0.0.1", 0, "tiny",
                     api_key_env="PB_TEST_KEY")
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        mcqs = tmp_path / "mcq.jsonl"
        mcqs.write_text("".join(json.dumps({"id": f"m{i}", "question": f"{VIGNETTE}Case {i}. Which of the following "
                                            "is the most likely diagnosis?", "options": {"A": "Pyelonephritis",
                                            "B": "Cystitis"}, "answer_idx": "A"}) + "\n" for i in range(3)))
        prompts = tmp_path / "prompts.toml"
        prompts.write_text('too_easy = "{question} {options} Letter?"\n'
                           'llm_filter = "{question} {options} Key: {answer}. Verdict?"\n'
                           'reformat = "{question} {options} Key: {answer}. JSON?"\n')
        out = tmp_path / "out"
        args = [sys.executable, "-m", "minihuatuo", "problems", "build", "--mcq", str(mcqs), "--out", str(out),
                "--filter-endpoint", srv.url + "/v1", "tiny", "--llm-endpoint", srv.url + "/v1", "tiny",
                "--api-key-env", "PB_TEST_KEY", "--cache", str(tmp_path / "cache"), "--prompts", str(prompts),
                "--easy-max-tokens", "4", "--llm-max-tokens", "8", "--llm-retries", "1"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["input"] == 3 and summary["kept"] + summary["dropped"] == 3
        assert [s["stage"] for s in summary["stages"]] == ["rules", "too_easy", "llm_filter", "reformat (llm)"]
        logged = [r.data for r in read_records(out / "responses.jsonl")]
        assert {r["backend"] for r in logged} == {f"tiny@{srv.url}/v1"} and len(logged) >= 6
        requests_before = srv.stats.chat_requests
        assert srv.stats.authorization_headers == requests_before > 0  # the key was sent
        assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0
        assert srv.stats.chat_requests == requests_before  # the rerun is answered from responses.jsonl
        for f in [*out.iterdir(), *(tmp_path / "cache").rglob("*.json")]:
            assert secret not in f.read_text(), f
        assert secret not in proc.stdout + proc.stderr
    finally:
        srv.shutdown()
        srv.server_close()
