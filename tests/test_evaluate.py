"""Benchmark scoring: each step of the extraction cascade on hand-written outputs, the report's
numbers by hand, and the `minihuatuo eval` contract run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minihuatuo.evaluate import (Extraction, explicit_answers, extract_choice, final_response, isolated_letters,
                                 option_mentions, render_prompt, score)
from minihuatuo.formats import MCQItem

OPTS = {"A": "Iron deficiency", "B": "Iron deficiency anemia", "C": "Vitamin B12 deficiency",
        "D": "Parvovirus B19 infection", "E": "Folate deficiency"}


def ex(text, opts=OPTS, **kw):
    e = extract_choice(text, opts, **kw)
    return e.first, e.last, e.step


# step 1: explicit "answer is X" / "answer: X"
@pytest.mark.parametrize("text, expected", [
    ("A is wrong because it is rare, B does not fit either, so the answer is C.", ("C", "C", "explicit")),
    ("The answer is (D).", ("D", "D", "explicit")),
    ("the answer is c.", ("C", "C", "explicit")),
    ("Final answer: **E**", ("E", "E", "explicit")),
    ("The answer is: option B", ("B", "B", "explicit")),
    ("At first the answer is A, but on reflection the answer is D.", ("A", "D", "explicit")),
])
def test_step1_explicit(text, expected):
    assert ex(text) == expected


def test_step1_refusals():
    assert explicit_answers("The answer is a bit unclear here.", "ABCDE") == []  # lowercase needs punctuation after
    assert explicit_answers("The answer is Iron deficiency.", "ABCDE") == []  # the I of Iron is no letter
    assert explicit_answers("The answer is F.", "ABCDE") == []  # not an option of this item
    assert explicit_answers("The answer isn't clear", "ABCDE") == []


# step 2: an isolated option letter
@pytest.mark.parametrize("text, expected", [
    ("I'd pick (D).", ("D", "D", "letter")),
    ("Option B, or maybe E.", ("B", "E", "letter")),
    ("A and B are both wrong; C is right.", ("A", "C", "letter")),
    ("答案是C。", ("C", "C", "letter")),
    ("I choose 'C', not 'D'.", ("C", "D", "letter")),
])
def test_step2_isolated_letter(text, expected):
    assert ex(text) == expected


def test_step2_ignores_words_that_are_letters():
    text = "A 45-year-old man with hepatitis B, type A blood, vitamin D deficiency and a B-cell clone; I think so."
    assert isolated_letters(text, "ABCDE") == []
    assert isolated_letters("I think it is B. I'm sure.", "ABCDEFGHIJ") == ["B"]  # 10 options: I is an option letter
    assert isolated_letters("The best is I.", "ABCDEFGHIJ") == ["I"]
    assert isolated_letters("O'Brien's sign, C's value, C-reactive protein", "ABCDE") == []
    assert isolated_letters("inhibin B, troponin I, B cells, a P wave, 32-35°C", "ABCDEFGHIJKLMNOP") == []


# step 3: option text without a letter
def test_step3_option_text():
    assert ex("This is most likely iron deficiency anemia, not folate deficiency.") == ("B", "E", "text")
    assert option_mentions("iron deficiency anemia", OPTS) == ["B"]  # the longer option owns the mention
    assert option_mentions("Iron deficiency first, later iron deficiency anemia", OPTS) == ["A", "B"]
    yes_no = {"A": "yes", "B": "no", "C": "maybe"}
    assert ex("There is not enough evidence, I know; so: maybe.", yes_no) == ("C", "C", "text")  # "not"/"know" != "no"


# step 4: most similar option, and no answer at all
def test_step4_similarity_and_none():
    assert ex("parvovirus infection, probably") == ("D", "D", "similar")
    assert ex("parvovirus infection, probably", similarity_fallback=False) == (None, None, "none")
    assert ex("") == (None, None, "none")
    assert ex("   \n") == (None, None, "none")


def test_final_response_part_decides():
    out = "## Thinking\n\nHmm, the answer is A? Wait.\n\n## Final Response\n\nThe answer is B."
    assert final_response(out) == "\n\nThe answer is B."
    assert ex(out) == ("B", "B", "explicit")
    assert ex("no headings, the answer is E.") == ("E", "E", "explicit")


def test_prompt_rendering():
    it = MCQItem("p1", "Does X help?", {"A": "yes", "B": "no", "C": "maybe"}, "A", "PubMedQA",
                 {"context": ["c1", "c2"]})
    text = render_prompt(it, "{context}Q: {question}\n{options}\n{not a field}")
    assert text == "Context: c1\nc2\n\nQ: Does X help?\nA. yes\nB. no\nC. maybe\n{not a field}"
    assert render_prompt(MCQItem("q", "Why?", {"A": "a"}, "A", "s"), "{context}{question}|{options}") == "Why?|A. a"


def items():
    o = {"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}
    return ([MCQItem(f"q{i}", f"Question {i}?", o, a, "MedQA") for i, a in enumerate("ABCD")]
            + [MCQItem("p0", "Is it?", {"A": "yes", "B": "no", "C": "maybe"}, "B", "PubMedQA")]
            + [MCQItem("p1", "Is it?", {"A": "yes", "B": "no", "C": "maybe"}, "A", "PubMedQA")])


OUTPUTS = {"q0": "The answer is A.",  # right
           "q1": "A looks tempting, but B fits best.",  # letters: first A (wrong), last B (right)
           "q2": "gamma",  # text: right
           # q3 missing: wrong, reported
           "p0": "The answer is (B).",  # right
           "p1": "",  # empty: wrong
           "zz": "an output whose id is in no item"}


def test_score_by_hand():
    r = score(items(), OUTPUTS)
    med, pub = r["sources"]["MedQA"], r["sources"]["PubMedQA"]
    assert (med["n"], med["correct_first"], med["correct_last"], med["missing"]) == (4, 2, 3, 1)
    assert (med["acc_first"], med["acc_last"], med["acc_official"]) == (0.5, 0.75, 0.75)
    assert med["steps"] == {"explicit": 1, "letter": 1, "text": 1, "similar": 0, "none": 0}
    assert (pub["n"], pub["correct_first"], pub["correct_last"], pub["acc_official"]) == (2, 1, 1, 0.5)
    assert pub["steps"]["none"] == 1
    assert r["average"] == {"acc_first": 0.5, "acc_last": 0.625, "acc_official": 0.625}  # mean over sources
    assert r["missing_ids"] == ["q3"] and r["unmatched_output_ids"] == ["zz"]
    by_id = {row["id"]: row for row in r["items"]}
    assert (by_id["q1"]["first"], by_id["q1"]["last"], by_id["q1"]["step"]) == ("A", "B", "letter")
    assert by_id["q3"] == {"id": "q3", "source": "MedQA", "answer_idx": "D", "first": None, "last": None,
                           "step": "missing", "correct_first": False, "correct_last": False}


def run(*args):
    return subprocess.run([sys.executable, "-m", "minihuatuo", *args], capture_output=True, text=True, timeout=120)


def write_eval_files(tmp_path):
    data = tmp_path / "bench.json"  # the official layout: {source: [items]}
    groups = {}
    for it in items():
        groups.setdefault(it.source, []).append({"id": it.id, "question": it.question, "options": it.options,
                                                 "answer_idx": it.answer_idx, "answer": it.answer})
    data.write_text(json.dumps(groups, indent=2))
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in OUTPUTS.items()))
    return data, outputs


def test_cli_contract_scores_existing_outputs(tmp_path):
    data, outputs = write_eval_files(tmp_path)
    report = tmp_path / "out" / "report.json"
    r = run("eval", "--data", str(data), "--outputs", str(outputs), "--report", str(report))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["source", "n", "first", "%", "last"]
    assert lines[2].split()[:6] == ["MedQA", "4", "50.0", "75.0", "75.0", "1"]
    assert lines[3].split()[:6] == ["PubMedQA", "2", "50.0", "50.0", "50.0", "0"]
    assert lines[4].split()[:5] == ["average", "6", "50.0", "62.5", "62.5"]
    assert "1 item(s) have no output" in r.stderr and "1 output id(s) match no item" in r.stderr
    rep = json.loads(report.read_text())
    assert rep["average"]["acc_official"] == 0.625 and rep["missing_ids"] == ["q3"]
    assert rep["sources"]["MedQA"]["n"] == 4 and len(rep["items"]) == 6
    assert {row["id"]: row["last"] for row in rep["items"]}["q1"] == "B"


def test_cli_errors(tmp_path):
    data, outputs = write_eval_files(tmp_path)
    outputs.write_text('{"id": "q0", "output": "A"}\n{"id": "q1", "output": 5}\n')
    r = run("eval", "--data", str(data), "--outputs", str(outputs))
    assert r.returncode == 2 and "outputs.jsonl: line 2: field 'output': missing or not a string" in r.stderr
    r = run("eval", "--data", str(data), "--outputs", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and "no such outputs file" in r.stderr


def test_cli_generates_with_a_local_model_then_resumes(tmp_path, tiny_checkpoint):
    data, _ = write_eval_files(tmp_path)
    outputs = tmp_path / "gen.jsonl"
    args = ["eval", "--data", str(data), "--outputs", str(outputs), "--model", str(tiny_checkpoint),
            "--max-tokens", "6", "--temperature", "0", "--report", str(tmp_path / "r.json")]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["q0", "q1", "q2", "q3", "p0", "p1"]
    assert all(isinstance(row["output"], str) for row in rows)
    assert "6 new outputs" in r.stderr
    r2 = run(*args)  # everything is done: nothing is generated again, the file is unchanged
    assert r2.returncode == 0 and "0 new outputs" in r2.stderr
    assert [json.loads(line) for line in outputs.read_text().splitlines()] == rows
    assert json.loads((tmp_path / "r.json").read_text())["missing_ids"] == []


def test_extraction_is_a_dataclass_with_three_fields():
    assert Extraction("A", "B", "letter") == Extraction(first="A", last="B", step="letter")
