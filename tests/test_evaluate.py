"""Benchmark scoring: each step of the extraction cascade on hand-written outputs, the report's
numbers by hand, and the `minihuatuo eval` contract run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minihuatuo.services.formats import MCQItem, read_mcq
from minihuatuo.services.response_format import FINAL_RULES, extract_final_response
from minihuatuo.stages.evaluate import (
    Extraction,
    explicit_answers,
    extract_choice,
    isolated_letters,
    option_mentions,
    render_prompt,
    score,
)
from minihuatuo.stages.scorer_official import clean_output, official_choice

DEMO = Path(__file__).resolve().parents[2] / "shared" / "reference" / "medical_o1_demo_150.json"

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
    assert extract_final_response(out, "tolerant") == "\n\nThe answer is B."
    assert ex(out) == ("B", "B", "explicit")
    assert ex("no headings, the answer is E.") == ("E", "E", "explicit")


def test_final_response_rules_side_by_side():
    """One extractor, four readings (response_format.py): what the reward (strict; exact in the
    direct-response ablation), our scorer (tolerant) and the official scorer read of one output."""
    cases = {
        "## Thinking\n\nhmm\n\n## Final Response\n\nB.": ("B.", "\n\nB.", "\n\nB.", "B."),
        "## Thinking\n\nhmm\n##final response\nB.": (None, "## Thinking\n\nhmm\n##final response\nB.", "\nB.",
                                                     "## Thinking\n\nhmm\n##final response\nB."),
        "## Final Response\n\nA\n## Final Response\nB": (None, "\nB", "\nB", "A\n## Final Response\nB"),
        "no headings": (None, "no headings", "no headings", "no headings"),
    }
    for output, expected in cases.items():
        assert tuple(extract_final_response(output, rule) for rule in FINAL_RULES) == expected, output
    with pytest.raises(ValueError, match="expected one of strict, exact, tolerant, official"):
        extract_final_response("x", "lenient")


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
    assert r["scorer"] == "strict" and r["average"]["strict"] == {"acc_first": 0.5, "acc_last": 0.625, "acc_max": 0.625}
    # the flat keys are the chosen scorer's (strict here): the same names and values as before
    assert {k: r["average"][k] for k in ("acc_first", "acc_last", "acc_official")} == \
        {"acc_first": 0.5, "acc_last": 0.625, "acc_official": 0.625}  # mean over sources
    assert med["strict"]["acc_max"] == 0.75 and med["strict"]["n"] == 4
    assert r["missing_ids"] == ["q3"] and r["unmatched_output_ids"] == ["zz"]
    by_id = {row["id"]: row for row in r["items"]}
    assert (by_id["q1"]["first"], by_id["q1"]["last"], by_id["q1"]["step"]) == ("A", "B", "letter")
    missing = {"first": None, "last": None, "step": "missing", "correct_first": False, "correct_last": False}
    assert by_id["q3"] == {"id": "q3", "source": "MedQA", "answer_idx": "D", **missing,
                           "strict": missing, "official": missing}
    # the official scorer on the same outputs: q1 "A looks..." gives B only ("A " is never a letter);
    # p0 "(B)" is no step-1 match but a step-2 one; p1 "" is dropped, so PubMedQA is 1 of 1
    om, op = med["official"], pub["official"]
    assert (om["n"], om["correct_first"], om["correct_last"], om["acc_max"], om["dropped"]) == (4, 3, 3, 0.75, 0)
    assert om["steps"] == {"explicit": 1, "letter": 1, "text": 1, "similar": 0, "none": 0}
    assert (op["n"], op["correct_first"], op["correct_last"], op["acc_max"], op["dropped"]) == (1, 1, 1, 1.0, 1)
    assert r["average"]["official"] == {"acc_first": 0.875, "acc_last": 0.875, "acc_max": 0.875}
    assert r["dropped_ids"] == ["p1"] and by_id["p1"]["official"]["step"] == "dropped"
    assert (by_id["q1"]["official"]["first"], by_id["q1"]["official"]["last"]) == ("B", "B")
    o = score(items(), OUTPUTS, scorer="official")  # the chosen scorer's figures become the flat ones
    assert o["scorer"] == "official" and o["sources"]["PubMedQA"]["n"] == 1
    assert o["sources"]["PubMedQA"]["acc_official"] == 1.0 and o["average"]["acc_official"] == 0.875
    assert o["sources"]["PubMedQA"]["strict"]["acc_max"] == 0.5  # both scorers in either report
    assert {row["id"]: row["step"] for row in o["items"]}["p1"] == "dropped"
    with pytest.raises(ValueError, match="unknown scorer"):
        score(items(), OUTPUTS, scorer="lenient")


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


# ---------------------------------------------------------------------------------------------------
# the official scorer (`--scorer official`), quirks included; every expected value derived by hand
# from the algorithm in notes/eval.md

O4 = {"A": "Anemia", "B": "Hypertension", "C": "Sepsis", "D": "Gout"}
YES_NO = {"A": "yes", "B": "no", "C": "maybe"}


@pytest.mark.parametrize("text, expected", [
    ("The answer is K.", ("K", "K", "explicit")),  # step 1 takes any of A-N, not only the item's A-D
    ("the answer is Hypertension", ("H", "H", "explicit")),  # nothing required after the letter
    ("At first the answer is D; on reflection the answer is\nA.", ("D", "A", "explicit")),  # first and last
    ("the answer is b, not gout", ("D", "D", "text")),  # step 1 is case-sensitive: "b" falls to step 3
])
def test_official_step1(text, expected):
    assert official_choice(text, O4) == expected


@pytest.mark.parametrize("text, expected", [
    ("A patient with B.", ("B", "B", "letter")),  # "A" + space is never a letter (the article rule)...
    ("A is wrong, so C.", ("C", "C", "letter")),  # ... even when it is one
    ("(A) is wrong, so C", ("A", "C", "letter")),
    ("B or maybe C.", ("B", "C", "letter")),
    ("A,B", ("A", "A", "letter")),  # the "," after A is consumed, so B has nothing before it
    ("A, B", ("A", "B", "letter")),
    ("答案是C。", ("C", "C", "letter")),  # CJK before, CJK punctuation after
    ("答案为B项", ("B", "B", "letter")),
])
def test_official_step2(text, expected):
    assert official_choice(text, O4) == expected


def test_official_steps3_and_4():
    assert official_choice("It is not known.", YES_NO) == ("B", "B", "text")  # "no" inside "not"
    # first = the option whose FIRST occurrence is latest (fever, at 12), not the first mentioned (cough)
    assert official_choice("cough, then fever, then cough again", {"A": "fever", "B": "cough", "C": "rash"}) == \
        ("A", "B", "text")
    # both options start at 0: the tie goes to the earlier option, in either order
    assert official_choice("iron deficiency anemia", {"A": "iron deficiency anemia", "B": "iron deficiency"}) == \
        ("A", "A", "text")
    assert official_choice("iron deficiency anemia", {"A": "iron deficiency", "B": "iron deficiency anemia"}) == \
        ("A", "A", "text")
    # difflib: ties go to the later option, all-zero ratios included (ours: to the earlier one)
    assert official_choice("123", {"A": "xyz", "B": "qqq"}) == ("B", "B", "similar")
    assert official_choice("a", {"A": "ab", "B": "ba"}) == ("B", "B", "similar")  # 2*1/3 each
    assert ex("a", {"A": "ab", "B": "ba"}) == ("A", "A", "similar")


def test_official_final_response_split_and_clean_up():
    thinking = "## Thinking\n\nthe answer is B\n\n## Final Response"
    assert official_choice(thinking + "\n\nThe answer is C.", O4) == ("C", "C", "explicit")
    # one newline after the heading: no split, so the thinking's letter is the first match (ours splits)
    assert official_choice(thinking + "\nThe answer is C.", O4) == ("B", "C", "explicit")
    assert ex(thinking + "\nThe answer is C.", O4) == ("C", "C", "explicit")
    lower_heading = thinking.replace("Final Response", "final response")  # case-sensitive too
    assert official_choice(lower_heading + "\n\nThe answer is C.", O4) == ("B", "C", "explicit")
    assert [clean_output(x) for x in ("</s> x", " </s> y", "  z", "a</s>b</s>", " ", "</s>")] == \
        ["x", " y", " z", "ab", "", ""]


def test_official_drop_and_per_source_max():
    it = [MCQItem("a1", "?", YES_NO, "A", "S1"), MCQItem("a2", "?", YES_NO, "B", "S1"),
          MCQItem("a3", "?", YES_NO, "C", "S1"), MCQItem("b1", "?", YES_NO, "A", "S2")]
    outs = {"a1": "yes at first, then no, then yes again",  # first: no (index 19), last: yes (28)
            "a2": "</s>", "a3": " ",  # dropped (official), wrong (strict)
            "b1": "</s> </s>"}  # " " -> "": the only item of S2, dropped
    r = score(it, outs, scorer="official")
    s1, s2 = r["sources"]["S1"]["official"], r["sources"]["S2"]["official"]
    assert (s1["n"], s1["dropped"], s1["acc_first"], s1["acc_last"], s1["acc_max"]) == (1, 2, 0.0, 1.0, 1.0)
    assert (s2["n"], s2["dropped"], s2["acc_max"]) == (0, 1, None)
    assert r["average"]["official"] == {"acc_first": 0.0, "acc_last": 1.0, "acc_max": 1.0}  # S2 has no figure
    assert r["dropped_ids"] == ["a2", "a3", "b1"]
    st = r["sources"]["S1"]["strict"]
    assert (st["n"], st["correct_first"], st["correct_last"]) == (3, 1, 1)  # strict: "yes" first and last


def test_official_agrees_with_strict_on_plain_answers_of_the_150_items():
    if not DEMO.exists():
        pytest.skip("../shared/reference/medical_o1_demo_150.json is absent")
    items150 = read_mcq(DEMO)
    r = score(items150, {it.id: f"The answer is {it.answer_idx}." for it in items150}, scorer="official")
    assert r["sources"]["medical_o1_demo_150"]["official"]["acc_max"] == 1.0
    assert r["sources"]["medical_o1_demo_150"]["strict"]["acc_first"] == 1.0
    # "The answer is <option text>.": step 1 reads the text's first character when it is a capital A-N
    r = score(items150, {it.id: f"The answer is {it.answer}." for it in items150}, scorer="official")
    for it, row in zip(items150, r["items"]):
        if it.answer[0] in "ABCDEFGHIJKLMN":
            assert (row["first"], row["last"], row["step"]) == (it.answer[0], it.answer[0], "explicit")
        else:
            assert row["step"] != "explicit"


def test_cli_contract_official_scorer(tmp_path):
    o = {"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}
    groups = {"MedQA": [{"id": f"m{i}", "question": "?", "options": o, "answer_idx": a}
                        for i, a in enumerate("ABCDBA")],
              "PubMedQA": [{"id": f"p{i}", "question": "?", "options": YES_NO, "answer_idx": a}
                           for i, a in enumerate("ACB")]}
    data = tmp_path / "bench.json"
    data.write_text(json.dumps(groups))
    outs = {"m0": "The answer is A.",  # A, right
            "m1": "B or maybe C.",  # B first (right), C last (wrong)
            "m2": "The answer is Gamma.",  # official: G (wrong); strict: option text C (right)
            "m3": "", "m4": " ",  # official: dropped; strict: wrong
            # m5: no output: wrong in both
            "p0": "yes at first, then no, then yes again",  # official: no first (wrong), yes last; strict: yes, yes
            "p1": "Maybe.",  # maybe: right
            "p2": ""}  # official: dropped; strict: wrong
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in outs.items()))
    report = tmp_path / "report.json"
    r = run("eval", "--data", str(data), "--outputs", str(outputs), "--report", str(report), "--scorer", "official")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["source", "n", "first", "%", "last", "%", "official", "%", "missing", "dropped",
                                "explicit/letter/text/similar/none"]
    # MedQA: n 4 (6 minus 2 dropped), first 2 of 4, last 1 of 4 -> official 50%; PubMedQA: n 2, 1 and 2 of 2
    assert lines[2].split() == ["MedQA", "4", "50.0", "25.0", "50.0", "1", "2", "2/1/0/0/0"]
    assert lines[3].split() == ["PubMedQA", "2", "50.0", "100.0", "100.0", "0", "1", "0/0/2/0/0"]
    assert lines[4].split() == ["average", "6", "50.0", "62.5", "75.0", "1", "3"]
    assert "3 item(s) have an empty output and are dropped" in r.stderr
    rep = json.loads(report.read_text())
    assert rep["scorer"] == "official" and rep["dropped_ids"] == ["m3", "m4", "p2"] and rep["missing_ids"] == ["m5"]
    med, pub = rep["sources"]["MedQA"], rep["sources"]["PubMedQA"]
    assert (med["official"]["acc_max"], pub["official"]["acc_max"]) == (0.5, 1.0)
    assert (med["acc_official"], pub["acc_official"], rep["average"]["acc_official"]) == (0.5, 1.0, 0.75)
    # the strict scorer's figures are in the same report: MedQA first 3 of 6, last 2 of 6; PubMedQA 2 of 3
    assert (med["strict"]["n"], med["strict"]["correct_first"], med["strict"]["correct_last"]) == (6, 3, 2)
    assert (pub["strict"]["n"], pub["strict"]["correct_first"], pub["strict"]["correct_last"]) == (3, 2, 2)
    assert med["strict"]["acc_max"] == 0.5 and pub["strict"]["acc_max"] == pytest.approx(2 / 3)
    assert med["strict"]["steps"] == {"explicit": 1, "letter": 1, "text": 1, "similar": 0, "none": 2}
    # the default scorer's table: strict figures, its max column no longer called "official"
    r = run("eval", "--data", str(data), "--outputs", str(outputs))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:9] == ["source", "n", "first", "%", "last", "%", "max", "%", "missing"]
    assert lines[2].split() == ["MedQA", "6", "50.0", "33.3", "50.0", "1", "1/1/1/0/2"]
    assert lines[3].split() == ["PubMedQA", "3", "66.7", "66.7", "66.7", "0", "0/0/2/0/1"]


def test_cli_reply_diagnostics_per_source(tmp_path):
    """eval reports reference-free reply diagnostics per source (stages/diagnostics.reply_stats), so a
    reproduction that scores below its base model can be read: format, unfinished, reflection markers."""
    o = {"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}
    data = tmp_path / "bench.json"
    data.write_text(json.dumps({"MedQA": [{"id": f"m{i}", "question": "?", "options": o, "answer_idx": "A"}
                                          for i in range(4)]}))
    outs = {"m0": "## Thinking\n\nIt is alpha. Wait, let me verify: yes.\n\n## Final Response\n\nThe answer is A.",
            "m1": "## Thinking\n\nAlpha or beta. Hmm, beta",  # started thinking, never answered
            "m2": "The answer is A.",
            "m3": "## Thinking\n\nClearly alpha.\n\n## Final Response\n\nA"}
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in outs.items()))
    report = tmp_path / "report.json"
    r = run("eval", "--data", str(data), "--outputs", str(outputs), "--report", str(report))
    assert r.returncode == 0, r.stderr
    st = json.loads(report.read_text())["replies"]["MedQA"]
    assert (st["n"], st["format_ok"], st["unfinished"], st["reflection_markers"]) == (4, 0.5, 0.25, 0.5)
    assert "MedQA replies: 4, think-then-answer format 50.0%, unfinished 25.0%" in r.stderr
    r = run("eval", "--data", str(data), "--outputs", str(outputs), "--report", str(report),
            "--reflection-pattern", r"\bclearly\b")
    assert json.loads(report.read_text())["replies"]["MedQA"]["reflection_markers"] == 0.25


# ---------------------------------------------------------------------------------------------------
# outputs without our ids (the official eval.py's file) and generation through a server (issue 21)

def official_records(outputs: dict[str, str], order=None, drop=()) -> list[dict]:
    """Records as the official eval.py writes them: the data's items with an "output" field, no id."""
    by_id = {it.id: it for it in items()}
    return [{"question": by_id[i].question, "options": by_id[i].options, "answer_idx": by_id[i].answer_idx,
             "output": outputs.get(i, "")} for i in (order or list(by_id)) if i not in drop]


def test_outputs_without_ids_are_matched_by_position_then_by_question(tmp_path):
    from minihuatuo.stages.evaluate import match_outputs, read_output_records

    def match(records):
        path = tmp_path / "out.json"
        path.write_text(json.dumps(records))
        return match_outputs(items(), read_output_records(path), path)

    expected = score(items(), OUTPUTS)["items"]
    # position: one record per item, in the data's order (q3 has an empty output: wrong either way)
    outputs, how = match(official_records(OUTPUTS))
    assert how == "position" and outputs == {**{k: v for k, v in OUTPUTS.items() if k != "zz"}, "q3": ""}
    assert [r["last"] for r in score(items(), outputs)["items"]] == [r["last"] for r in expected]
    # ids that are not the data's, same count: still by position
    assert match([{**r, "id": f"x{k}"} for k, r in enumerate(official_records(OUTPUTS))])[1] == "position"
    # shuffled and one missing: by question; the two items asking "Is it?" are matched in order
    order = ["p0", "q2", "q0", "p1", "q1"]
    outputs, how = match(official_records(OUTPUTS, order=order))
    assert how == "question" and outputs == {i: OUTPUTS[i] for i in order}
    # the same count but in another order: the questions disagree with the positions, so by question
    outputs, how = match(official_records(OUTPUTS, order=["q1", "q0", "q2", "q3", "p0", "p1"]))
    assert how == "question" and outputs["q1"] == OUTPUTS["q1"] and outputs["q0"] == OUTPUTS["q0"]
    # "input" and "prompt" carry the question too
    assert match([{"input": "Question 2?", "output": "C"}, {"prompt": "Question 0?", "output": "A"}]) == \
        ({"q2": "C", "q0": "A"}, "question")
    # our own files: by id, unknown ids kept for the report
    assert match([{"id": "q0", "output": "A"}, {"id": "zz", "output": "B"}]) == ({"q0": "A", "zz": "B"}, "id")
    with pytest.raises(ValueError, match=r"cannot match its 2 outputs to the 6 items") as e:
        match([{"question": "Question 0?", "output": "A"}, {"question": "Unknown?", "output": "B"}])
    assert "\n" not in str(e.value)


def test_cli_scores_the_official_output_file_unchanged(tmp_path):
    data, _ = write_eval_files(tmp_path)
    official = tmp_path / "official_out.json"  # {source: [items + output]}, as the official eval.py saves
    groups = {}
    for rec, it in zip(official_records(OUTPUTS), items()):
        groups.setdefault(it.source, []).append(rec)
    official.write_text(json.dumps(groups))
    report = tmp_path / "r.json"
    r = run("eval", "--data", str(data), "--outputs", str(official), "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "matched to its items by position" in r.stderr
    rep = json.loads(report.read_text())
    assert rep["output_matching"] == "position" and rep["missing_ids"] == []
    by_hand = score(items(), {**OUTPUTS, "q3": ""})
    assert [row["last"] for row in rep["items"]] == [row["last"] for row in by_hand["items"]]
    official.write_text(json.dumps([{"question": "Nothing like it?", "output": "A"}]))
    r = run("eval", "--data", str(data), "--outputs", str(official))
    assert r.returncode == 2 and "cannot match its 1 outputs to the 6 items" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_generates_through_an_endpoint_then_resumes(tmp_path, tiny_checkpoint, monkeypatch):
    """`eval --endpoint` against a real `minihuatuo serve` (in this process, 127.0.0.1): every output
    equals the local model's greedy reply, the key is sent but never printed, and a rerun asks the
    server only for what is missing."""
    import os
    import threading

    from minihuatuo.services.backends import ChatRequest, LocalBackend
    from minihuatuo.services.serve import ChatServer
    from minihuatuo.stages.evaluate import FREE_PROMPT

    key = "sk-eval-endpoint-TEST-51d0c9"
    monkeypatch.setenv("MINIHUATUO_EVAL_KEY", key)
    local = LocalBackend.from_dir(tiny_checkpoint, batch_size=4)
    srv = ChatServer(local, "127.0.0.1", 0, "tiny", api_key_env="MINIHUATUO_EVAL_KEY")
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        data, _ = write_eval_files(tmp_path)
        outputs = tmp_path / "gen.jsonl"
        args = ["eval", "--data", str(data), "--outputs", str(outputs), "--endpoint", srv.url,
                "--served-model", "tiny", "--concurrency", "3", "--api-key-env", "MINIHUATUO_EVAL_KEY",
                "--max-tokens", "6", "--temperature", "0", "--report", str(tmp_path / "r.json")]
        r = run(*args)
        assert r.returncode == 0, r.stderr
        assert "6 new outputs" in r.stderr and key not in r.stderr + r.stdout
        rows = {row["id"]: row["output"] for row in map(json.loads, outputs.read_text().splitlines())}
        expected = local.complete([ChatRequest([{"role": "user", "content": render_prompt(it, FREE_PROMPT)}],
                                               max_tokens=6) for it in items()])
        assert rows == {it.id: e[0] for it, e in zip(items(), expected)}
        assert srv.stats.chat_requests == 6 and srv.stats.authorization_headers == 6
        assert srv.stats.max_in_flight <= 3
        assert run(*args).returncode == 0 and srv.stats.chat_requests == 6  # resume: nothing asked
        lines = outputs.read_text().splitlines()
        outputs.write_text("\n".join(lines[:4]) + "\n")  # an interrupted run: two outputs missing
        r = run(*args)
        assert r.returncode == 0 and "2 new outputs" in r.stderr and srv.stats.chat_requests == 8
        assert {row["id"]: row["output"] for row in map(json.loads, outputs.read_text().splitlines())} == rows
        assert json.loads((tmp_path / "r.json").read_text())["output_matching"] == "id"
        r = run(*args[:-4], "--api-key-env", "MINIHUATUO_NO_SUCH_KEY", "--outputs", str(tmp_path / "x.jsonl"))
        assert r.returncode == 1 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr
        assert os.environ["MINIHUATUO_EVAL_KEY"] == key
    finally:
        srv.shutdown()
        srv.server_close()
