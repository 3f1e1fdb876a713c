"""Strategy search (paper §3.1, Algorithm 1 stage one): control flow with scripted LLMs, reply parsing,
the template reformatter, resumption after a crash or a SIGKILL, and the command on a real tiny model.

The scripted LLMs are test doubles that return prepared replies; everything between them and the
output files (search.py's algorithm and driver, the verifiers, the HTTP client and server in the
kill test, the local backend in the end-to-end test) is the product code."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minihuatuo.services.backends import Completion
from minihuatuo.services.formats import VerifiableProblem, read_sft
from minihuatuo.services.records import read_records
from minihuatuo.services.replies import ReplyError
from minihuatuo.services.verifier import ExactMatchVerifier
from minihuatuo.stages.search import FAILURE_REASONS, SearchConfig, allowed_strategies, problem_ids, run_search
from minihuatuo.stages.search_cli import summarize, write_outputs
from minihuatuo.stages.search_prompts import (
    STRATEGIES,
    STRATEGY_INSTRUCTIONS,
    SearchPrompts,
    load_search_prompts,
    parse_cot,
    parse_natural_reasoning,
)
from minihuatuo.stages.search_reformat import long_cot, previous_reasoning, simple_cot, template_complex_cot

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_150 = SHARED / "reference" / "medical_o1_demo_150.json"


def cot(answer: str, refine: bool = False, verification: bool = True, thoughts=("Look at the signs.",)) -> str:
    """A well-formed search reply concluding `answer`."""
    actions = [{"action": "Verification", "content": "The previous conclusion does not hold."}] if refine else []
    actions += [{"action": "Inner Thinking", "title": f"Step {n}", "content": t} for n, t in enumerate(thoughts, 1)]
    actions.append({"action": "Final Conclusion", "content": f"The answer is {answer}."})
    if verification:
        actions.append({"action": "Verification", "content": f"{answer} fits the findings."})
    return json.dumps({"CoT": actions})


NATURAL = json.dumps({"NaturalReasoning": "Hmm, fever and rash.\nWait, Koplik spots: measles."})


def problem(n: int, answer: str = "measles") -> VerifiableProblem:
    return VerifiableProblem(f"Q{n}: a child has fever, cough and a rash. What is the diagnosis?", answer,
                             {"id": f"p{n}"})


class Scripted:
    """Replies from a per-problem script, in order; a request belongs to the problem whose "Q<n>:"
    tag it contains. Logs every backend.complete call as a list of (tag, prompt messages)."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[list[tuple[str, list[dict]]]] = []

    def complete(self, requests):
        call, out = [], []
        for r in requests:
            tag = re.search(r"Q\d+:", r.messages[0]["content"]).group(0)[:-1]
            call.append((tag, r.messages))
            out.append([self.scripts[tag].pop(0)])
        self.calls.append(call)
        return out

    def prompts(self, tag: str) -> list[str]:
        return [m[-1]["content"] for call in self.calls for t, m in call if t == tag]


class CountingVerifier(ExactMatchVerifier):
    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def verify_batch(self, pairs):
        self.batches.append(len(pairs))
        return super().verify_batch(pairs)


def search(tmp_path, problems, backend, verifier=None, **cfg):
    return run_search(problems, backend, verifier or ExactMatchVerifier(), tmp_path / "out", SearchConfig(**cfg),
                      progress=False)


# ---------------------------------------------------------------------------------------------------
# control flow of Algorithm 1


def test_rejected_then_accepted_gives_exactly_the_expected_sft_record(tmp_path):
    e1_reply = cot("measles", refine=True, thoughts=("Koplik spots.",))
    llm = Scripted({"Q1": [cot("influenza"), e1_reply, "Sure:\n```json\n" + NATURAL + "\n```",
                           "  Measles is the diagnosis.\n"]})
    [rec] = search(tmp_path, [problem(1)], llm, max_depth=3, max_attempts=3)
    e0, e1 = json.loads(cot("influenza"))["CoT"], json.loads(e1_reply)["CoT"]
    k1 = rec["search"]["strategies"][1]
    assert k1 in ("Exploring New Paths", "Verification", "Correction")  # never Backtracking at i = 1
    assert {k: rec[k] for k in ("id", "Question", "Complex_CoT", "Response", "Long_CoT")} == {
        "id": "p1", "Question": problem(1).x,
        "Complex_CoT": "Hmm, fever and rash.\nWait, Koplik spots: measles.",
        "Response": "Measles is the diagnosis.",
        "Long_CoT": e0[:-1] + e1}  # e_0's own Verification (it accepted influenza) is replaced by e_1's
    s = rec["search"]
    assert s["success"] and s["failure_reason"] is None and not s["hint_used"]
    assert s["attempts"] == 1 and s["accepted_at"] == {"attempt": 1, "depth": 1}
    assert s["strategies"] == ["Init CoT", k1]
    assert s["verifier_calls"] == [
        {"attempt": 1, "depth": 0, "conclusion": "The answer is influenza.", "verdict": False},
        {"attempt": 1, "depth": 1, "conclusion": "The answer is measles.", "verdict": True}]
    assert [t["strategy"] for t in s["trajectory"]] == ["Init CoT", k1, "Reformat", "Response"]
    assert s["trajectory"][2]["replies"] == ["Sure:\n```json\n" + NATURAL + "\n```"]  # raw reply kept
    # the refinement prompt: the strategy's sentence, and e_0 without its closing Verification
    refine = llm.prompts("Q1")[1]
    assert STRATEGY_INSTRUCTIONS[k1] in refine
    assert previous_reasoning([("Init CoT", e0)]) in refine and "influenza fits the findings" not in refine
    # the reformat prompt carries the whole trajectory, the response prompt carries ê
    assert "Koplik spots." in llm.prompts("Q1")[2] and "Wait, Koplik spots: measles." in llm.prompts("Q1")[3]
    # the SFT file reads back in the official format; no simple CoT (e_0 was wrong); a direct-response row
    write_outputs(tmp_path / "out", [rec], SearchConfig())
    [ex] = read_sft(tmp_path / "out" / "sft.jsonl")
    assert (ex.question, ex.complex_cot, ex.response) == (rec["Question"], rec["Complex_CoT"], rec["Response"])
    assert read_records(tmp_path / "out" / "sft_simple_cot.jsonl") == []
    assert [r.data for r in read_records(tmp_path / "out" / "sft_direct.jsonl")] == [
        {"id": "p1", "Question": problem(1).x, "Response": "Measles is the diagnosis."}]


def test_first_chain_accepted_is_also_a_simple_cot_example(tmp_path):
    llm = Scripted({"Q1": [cot("measles", thoughts=("Fever.", "Rash.")), NATURAL, "Measles."]})
    [rec] = search(tmp_path, [problem(1)], llm)
    assert rec["search"]["accepted_at"] == {"attempt": 1, "depth": 0} and rec["search"]["strategies"] == ["Init CoT"]
    write_outputs(tmp_path / "out", [rec], SearchConfig())
    [simple] = [r.data for r in read_records(tmp_path / "out" / "sft_simple_cot.jsonl")]
    assert simple["Complex_CoT"] == "Fever.\n\nRash.\n\nThe answer is measles." and simple["Response"] == "Measles."


def test_depth_and_attempt_limits_are_exact(tmp_path):
    """Always wrong: paper restart asks T x (1 + N) chains and verifies each; then discards."""
    for depth, attempts in ((2, 3), (0, 2), (3, 1)):
        llm = Scripted({"Q1": [cot("influenza", refine=True)] * 50})
        [rec] = search(tmp_path / f"{depth}-{attempts}", [problem(1)], llm, max_depth=depth, max_attempts=attempts)
        s = rec["search"]
        assert len(llm.calls) == attempts * (1 + depth) == len(s["verifier_calls"])
        assert [(t["attempt"], t["depth"]) for t in s["trajectory"]] == \
            [(j, i) for j in range(1, attempts + 1) for i in range(depth + 1)]
        assert not s["success"] and s["failure_reason"] == "not_verified" and s["attempts"] == attempts
        assert "Complex_CoT" not in rec and "Question" not in rec


def test_a_false_reflection_ends_the_attempt_when_retrying(tmp_path):
    """false_reflection = "retry": a verified trajectory the reflection check faults ends its attempt
    (outcome false_reflection, with the faults) and the next attempt starts with a new e_0; "keep"
    accepts the same trajectory; all attempts faulted discards the problem with that reason."""
    def faults(p, actions):  # a stand-in check: any thought that says "Koplik" is false here
        assert p.y_star == "measles"
        return [f"false: {a['content']}" for a in actions if "Koplik" in a["content"]]

    lie, truth = cot("measles", thoughts=("Koplik spots.",)), cot("measles", thoughts=("Rash after fever.",))
    refined_lie = cot("measles", refine=True, thoughts=("Koplik spots.",))
    llm = Scripted({"Q1": [lie, truth, NATURAL, "Measles."],  # depth 0 faulted, then attempt 2 accepted
                    "Q2": [cot("influenza"), refined_lie, cot("influenza"), refined_lie],  # depth 1 faulted twice
                    "Q3": [lie, NATURAL, "Measles."]})
    r1, r2, r3 = run_search([problem(1), problem(2), problem(3)], llm, ExactMatchVerifier(), tmp_path / "r",
                            SearchConfig(max_depth=2, max_attempts=2, false_reflection="retry"), progress=False,
                            reflection_faults=lambda p, a: [] if "Q3" in p.x else faults(p, a))
    assert r1["search"]["success"] and r1["search"]["accepted_at"] == {"attempt": 2, "depth": 0}
    assert r1["search"]["outcomes"] == [{"attempt": 1, "outcome": "false_reflection", "detail": ["false: Koplik spots."]}]
    assert "Koplik" not in json.dumps(r1["Long_CoT"])
    s2 = r2["search"]  # the verified refinement ends the attempt: no second refinement is asked
    assert not s2["success"] and s2["failure_reason"] == "false_reflection"
    assert s2["failure_detail"] == ["false: Koplik spots."] and s2["attempts"] == 2
    assert [(t["attempt"], t["depth"]) for t in s2["trajectory"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [o["outcome"] for o in s2["outcomes"]] == ["false_reflection", "false_reflection"]
    assert r3["search"]["success"] and r3["search"]["accepted_at"] == {"attempt": 1, "depth": 0}
    # "keep" (the default): the verifier alone decides, the check is never consulted
    keep = Scripted({"Q1": [lie, NATURAL, "Measles."]})
    [k] = run_search([problem(1)], keep, ExactMatchVerifier(), tmp_path / "k", SearchConfig(), progress=False,
                     reflection_faults=lambda p, a: pytest.fail("consulted"))
    assert k["search"]["accepted_at"] == {"attempt": 1, "depth": 0} and "Koplik" in json.dumps(k["Long_CoT"])
    with pytest.raises(ValueError, match="needs a reflection check"):
        run_search([problem(1)], keep, ExactMatchVerifier(), tmp_path / "n", SearchConfig(false_reflection="retry"),
                   progress=False)


def test_backtracking_needs_an_earlier_step_and_the_paper_text_rule_is_available(tmp_path):
    assert "Backtracking" not in allowed_strategies(1, "earlier-step")
    assert allowed_strategies(2, "earlier-step") == allowed_strategies(3, "earlier-step") == list(STRATEGIES)
    assert "Backtracking" in allowed_strategies(1, "paper-text")
    assert "Backtracking" not in allowed_strategies(3, "paper-text")
    problems = [problem(n) for n in range(40)]
    llm = Scripted({f"Q{n}": [cot("influenza", refine=True)] * 3 for n in range(40)})
    recs = search(tmp_path, problems, llm, max_depth=2, max_attempts=1)
    drawn = [(t["depth"], t["strategy"]) for r in recs for t in r["search"]["trajectory"] if t["depth"] > 0]
    assert len(drawn) == 80
    assert not any(d == 1 and k == "Backtracking" for d, k in drawn)
    assert {k for d, k in drawn if d == 2} == set(STRATEGIES)  # all four occur once an earlier step exists
    # the draws depend on (seed, id) only: the same problem alone draws the same strategies
    llm_alone = Scripted({"Q7": [cot("influenza", refine=True)] * 3})
    [alone] = search(tmp_path / "alone", [problem(7)], llm_alone, max_depth=2, max_attempts=1)
    assert alone["search"]["strategies"] == recs[7]["search"]["strategies"]


def test_restart_policies(tmp_path):
    """paper: a new e_0 each attempt; official: each attempt restarts from the first e_0."""
    def chains(n):  # the attempt's e_0 names itself, so the prompts show which e_0 was continued
        return [cot(f"guess{j}", thoughts=(f"E0-of-attempt-{j}",)) for j in range(1, 4)]

    wrong = cot("influenza", refine=True, thoughts=("refined",))
    paper = Scripted({"Q1": [c for j, c in enumerate(chains(3)) for c in [c, wrong, wrong]]})
    [p] = search(tmp_path / "paper", [problem(1)], paper, max_depth=2, max_attempts=3, restart="paper")
    prompts = paper.prompts("Q1")
    assert len(prompts) == 9 and sum("Work out the answer" in t for t in prompts) == 3
    for j in (1, 2, 3):  # attempt j's first refinement continues attempt j's own e_0
        first_refine = prompts[3 * (j - 1) + 1]
        assert f"E0-of-attempt-{j}" in first_refine and "refined" not in first_refine

    official = Scripted({"Q1": [chains(3)[0]] + [wrong] * 6})
    [o] = search(tmp_path / "official", [problem(1)], official, max_depth=2, max_attempts=3, restart="official")
    prompts = official.prompts("Q1")
    assert len(prompts) == 1 + 3 * 2 and sum("Work out the answer" in t for t in prompts) == 1
    for j in (1, 2, 3):  # every attempt's first refinement sees the first e_0 and nothing after it
        first_refine = prompts[1 + 2 * (j - 1)]
        assert "E0-of-attempt-1" in first_refine and "refined" not in first_refine
    s = o["search"]
    assert len(s["verifier_calls"]) == 1 + 3 * 2  # the reused e_0 is not verified again
    assert [t.get("reused_from_attempt") for t in s["trajectory"] if t["depth"] == 0] == [None, 1, 1]
    assert s["attempts"] == 3 and p["search"]["attempts"] == 3


def test_label_hint_round_runs_only_when_enabled_and_is_recorded(tmp_path):
    wrong = [cot("influenza")] + [cot("influenza", refine=True)] * 10
    off = Scripted({"Q1": list(wrong)})
    [r] = search(tmp_path / "off", [problem(1, "rubeola")], off, max_depth=1, max_attempts=2)
    assert len(off.calls) == 4 and "Label Hint" not in r["search"]["strategies"]
    assert not r["search"]["hint_used"] and not r["search"]["hint_round"]
    assert not any("rubeola" in t for t in off.prompts("Q1"))  # y* never reaches a prompt without the hint

    on = Scripted({"Q1": wrong[:4] + [cot("rubeola", refine=True), NATURAL, "Rubeola."]})
    [r] = search(tmp_path / "on", [problem(1, "rubeola")], on, max_depth=1, max_attempts=2, label_hint=True)
    s = r["search"]
    assert [("rubeola" in t) for t in on.prompts("Q1")[:5]] == [False] * 4 + [True]  # only the hint round is told
    assert s["success"] and s["hint_used"] and s["strategies"][-1] == "Label Hint"
    assert s["accepted_at"] == {"attempt": "hint", "depth": 2} and s["attempts"] == 3
    assert summarize([r])["hint_used"] == 1

    # the hinted conclusion is verified (ours) or accepted unchecked (official: --hint-verify false)
    for verify, success in ((True, False), (False, True)):
        llm = Scripted({"Q1": wrong[:4] + [cot("influenza", refine=True), NATURAL, "Flu."]})
        [r] = search(tmp_path / f"verify-{verify}", [problem(1, "rubeola")], llm, max_depth=1, max_attempts=2,
                     label_hint=True, hint_verify=verify)
        assert r["search"]["success"] is success and r["search"]["hint_used"] is success
        assert r["search"]["hint_round"]


def test_one_backend_call_per_step_across_all_problems_in_flight(tmp_path):
    script = [cot("influenza"), cot("measles", refine=True), NATURAL, "Measles."]
    llm, verifier = Scripted({f"Q{n}": list(script) for n in range(5)}), CountingVerifier()
    recs = search(tmp_path / "all", [problem(n) for n in range(5)], llm, verifier)
    assert all(r["search"]["success"] for r in recs)
    assert [len(c) for c in llm.calls] == [5, 5, 5, 5]  # init, refine, reformat, response: 4 steps, 4 calls
    assert verifier.batches == [5, 5]
    # a bounded window: at most max_in_flight problems share a call, and a freed slot is refilled at once
    llm = Scripted({f"Q{n}": list(script) for n in range(5)})
    search(tmp_path / "window", [problem(n) for n in range(5)], llm, max_in_flight=2)
    assert [len(c) for c in llm.calls] == [2] * 8 + [1] * 4  # three waves of four steps
    # a freed slot is taken at once by the next problem, which joins the others' next call
    quick = [cot("measles"), NATURAL, "Measles."]
    llm = Scripted({"Q0": list(quick), "Q1": list(script), "Q2": list(quick)})
    search(tmp_path / "refill", [problem(n) for n in range(3)], llm, max_in_flight=2)
    assert [[tag for tag, _ in c] for c in llm.calls] == [["Q0", "Q1"]] * 3 + [["Q1", "Q2"], ["Q2"], ["Q2"]]


def test_unreadable_replies_are_retried_a_bounded_number_of_times(tmp_path):
    llm = Scripted({"Q1": ["I think it is measles."] * 20})
    [r] = search(tmp_path, [problem(1)], llm, max_attempts=2, json_retries=2)
    s = r["search"]
    assert len(llm.calls) == 2 * 3 and s["failure_reason"] == "unparseable"
    assert "no JSON object in the reply" in s["failure_detail"]
    step = s["trajectory"][0]
    assert len(step["replies"]) == 3 and len(step["errors"]) == 3
    retry = llm.calls[1][0][1]  # the follow-up shows the model its reply and the error
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "I think it is measles." and "no JSON object" in retry[2]["content"]


def test_failed_rewrite_discards_with_its_reason(tmp_path):
    llm = Scripted({"Q1": [cot("measles")] + ['{"NaturalReasoning": "one line only"}'] * 3})
    # input fields are carried, but not an earlier run's outputs (the released demo items hold some)
    p = VerifiableProblem(problem(1).x, "measles", {"id": "p1", "options": {"A": "measles"}, "Complex_CoT": "old",
                                                    "Response": "old"})
    [r] = search(tmp_path, [p], llm, json_retries=2)
    assert r["search"]["failure_reason"] == "rewrite_failed" and "separate lines" in r["search"]["failure_detail"]
    assert r["search"]["attempts"] == 1 and "Response" not in r and "Complex_CoT" not in r
    assert r["options"] == {"A": "measles"} and r["Ground-True Answer"] == "measles"


# ---------------------------------------------------------------------------------------------------
# reading replies


def test_cot_replies_survive_fences_prose_trailing_commas_and_a_missing_verification():
    plain = cot("measles")
    expected = json.loads(plain)["CoT"]
    cases = {
        plain: [],
        "```json\n" + plain + "\n```": ["code fence"],
        "```\n" + plain + "\n```\nHope this helps!": ["code fence"],
        "Here is my reasoning:\n" + plain + "\nLet me know.": ["leading prose"],
        plain.replace("}]}", "},\n]}").replace('"},', '",},', 1): ["trailing commas"],
    }
    for text, repairs in cases.items():
        parsed = parse_cot(text)
        assert (parsed.actions, parsed.conclusion, parsed.repairs) == (expected, "The answer is measles.", repairs)
    short = parse_cot(cot("measles", verification=False))
    assert short.actions == expected[:-1] and short.repairs == ["missing final Verification"]
    # raw line breaks inside strings, free spelling of action names, a bare list, titles kept
    loose = '[{"action": "inner_thinking", "title": "A", "content": "line one\nline two"},' \
            ' {"action": "final conclusion", "content": "Measles."}]'
    assert parse_cot(loose).actions == [{"action": "Inner Thinking", "title": "A", "content": "line one\nline two"},
                                        {"action": "Final Conclusion", "content": "Measles."}]
    # a comma inside a string is not a trailing comma
    assert parse_cot(cot("measles, rubeola")).conclusion == "The answer is measles, rubeola."


@pytest.mark.parametrize("text, message", [
    ("", "the reply is empty"),
    ("The answer is measles.", "no JSON object"),
    (cot("measles")[:-20], "cut off at max_tokens"),
    ('{"steps": []}', 'expected a "CoT" field'),
    ('{"CoT": []}', "non-empty list"),
    ('{"CoT": [{"action": "Inner Thinking", "content": "x"}]}', 'no "Final Conclusion"'),
    ('{"CoT": [{"action": "Final Conclusion", "content": "x"}]}', 'no "Inner Thinking"'),
    ('{"CoT": [{"action": "Inner Thinking", "content": "x"}, {"action": "Final Conclusion", "content": "y"},'
     ' {"action": "Inner Thinking", "content": "z"}]}', "goes on thinking"),
    ('{"CoT": [{"action": "Musing", "content": "x"}]}', "CoT[0].action must be one of"),
    ('{"CoT": [{"action": "Inner Thinking", "content": ""}]}', "CoT[0].content must be a non-empty string"),
    ("{'CoT': []}", "invalid JSON"),
])
def test_unusable_cot_replies_fail_with_the_reason(text, message):
    with pytest.raises(ReplyError, match=re.escape(message)):
        parse_cot(text)


def test_natural_reasoning_reply():
    natural = parse_natural_reasoning("```json\n" + NATURAL + "\n```")
    assert natural == "Hmm, fever and rash.\nWait, Koplik spots: measles."
    for bad in ('{"NaturalReasoning": "one line"}', '{"Reasoning": "a\\nb"}', "just text"):
        with pytest.raises(ReplyError):
            parse_natural_reasoning(bad)


# ---------------------------------------------------------------------------------------------------
# renderings of a trajectory


def step(kind, content, title=None):
    return {"action": kind, **({"title": title} if title else {}), "content": content}


CHAIN = [("Init CoT", [step("Inner Thinking", "The fever started on day one.", "Onset"),
                       step("Inner Thinking", "ECG is normal.", "Heart"),
                       step("Final Conclusion", "The answer is influenza."),
                       step("Verification", "Influenza fits.")]),
         ("Correction", [step("Verification", "Influenza does not explain the rash."),
                         step("Inner Thinking", "Koplik spots point elsewhere.", "Spots"),
                         step("Inner Thinking", "The rash spread from the face.", "Spread"),
                         step("Final Conclusion", "The answer is measles."),
                         step("Verification", "Measles explains everything.")])]


def test_template_reformatter_keeps_every_step_with_natural_transitions():
    assert template_complex_cot(CHAIN) == (
        "The fever started on day one.\n\n"
        "Also, ECG is normal.\n\n"
        "So, the answer is influenza.\n\n"
        "Wait, influenza does not explain the rash.\n\n"
        "Let me correct that. Koplik spots point elsewhere.\n\n"
        "Also, the rash spread from the face.\n\n"
        "So, the answer is measles.\n\n"
        "Hmm, let me double-check. Measles explains everything.")
    assert "Onset" not in template_complex_cot(CHAIN)  # no headings
    assert long_cot(CHAIN) == CHAIN[0][1][:-1] + CHAIN[1][1]  # e_0's accepting Verification is dropped
    assert json.loads(previous_reasoning(CHAIN)) == long_cot(CHAIN)[:-1]
    assert simple_cot(CHAIN[0][1]) == "The fever started on day one.\n\nECG is normal.\n\nThe answer is influenza."


def test_template_mode_runs_offline_without_rewrite_calls(tmp_path):
    llm = Scripted({"Q1": [json.dumps({"CoT": CHAIN[0][1]}), json.dumps({"CoT": CHAIN[1][1]})]})
    [r] = run_search([problem(1, "measles")], llm, ExactMatchVerifier(), tmp_path,
                     SearchConfig(reformat="template", seed=3), progress=False)
    assert len(llm.calls) == 2 and r["Response"] == "The answer is measles."
    k = r["search"]["strategies"][1]
    assert r["Complex_CoT"] == template_complex_cot([CHAIN[0], (k, CHAIN[1][1])])


# ---------------------------------------------------------------------------------------------------
# prompts from a user's file


def test_prompts_are_replaceable_from_a_file(tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"init": "Solve: {question}", "strategies": {"Correction": "fix it"}}))
    p = load_search_prompts(f)
    assert p.init == "Solve: {question}" and p.strategies["Correction"] == "fix it"
    assert p.strategies["Backtracking"] == STRATEGY_INSTRUCTIONS["Backtracking"] and p.refine == SearchPrompts().refine
    llm = Scripted({"Q1": [cot("measles"), NATURAL, "M."]})
    run_search([problem(1)], llm, ExactMatchVerifier(), tmp_path / "out", prompts=p, progress=False)
    assert llm.prompts("Q1")[0] == "Solve: " + problem(1).x
    for bad, message in (({"init": "no placeholder"}, "field 'init': the template has no {question}"),
                         ({"strategies": {"Guessing": "x"}}, "unknown strategy Guessing"),
                         ({"intro": "x"}, "unknown prompt(s) intro")):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(message)):
            load_search_prompts(f)


# ---------------------------------------------------------------------------------------------------
# resumption


class Teacher:
    """A stateless, deterministic scripted LLM: problem Q<n> (answer "measles") is solved after
    n % 4 refinements (it counts the conclusions already in the prompt), so with depth 2 the
    problems with n % 4 == 3 are discarded. It can also sit behind `minihuatuo serve`'s ChatServer."""

    batch_size = 8

    def reply(self, messages) -> str:
        text = messages[0]["content"]
        n = int(re.search(r"Q(\d+):", text).group(1))
        if "<Thought Process>" in text:
            return json.dumps({"NaturalReasoning": f"Hmm, problem {n}.\nWait, it is measles."})
        if "<Internal Thinking>" in text:
            return f"Measles (problem {n})."
        seen = text.count("The answer is")  # conclusions y_0 .. y_{i-1} in the previous reasoning
        return cot("measles" if seen >= n % 4 else f"guess{seen}", refine=seen > 0)

    def complete(self, requests):
        return [[self.reply(r.messages)] for r in requests]

    # what ChatServer needs of a backend
    def prompt_ids(self, request):
        return [0] * len(request.messages[0]["content"].split())

    def complete_detailed(self, requests, seed=None):
        return [[Completion(t[0], "stop", 1, len(t[0].split()))] for t in self.complete(requests)]


class CrashAfter(Teacher):
    def __init__(self, calls: int):
        self.left = calls

    def complete(self, requests):
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return super().complete(requests)


def lines(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines()]


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path):
    problems = [problem(n) for n in range(12)]
    cfg = SearchConfig(max_depth=2, max_attempts=1)
    full = run_search(problems, Teacher(), ExactMatchVerifier(), tmp_path / "full", cfg, progress=False)
    write_outputs(tmp_path / "full", full, cfg)
    # seeded: the same seed, data and deterministic backend give the same output file
    run_search(problems, Teacher(), ExactMatchVerifier(), tmp_path / "twice", cfg, progress=False)
    assert (tmp_path / "twice" / "search.jsonl").read_bytes() == (tmp_path / "full" / "search.jsonl").read_bytes()

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(problems, CrashAfter(3), ExactMatchVerifier(), out, cfg, progress=False)
    first = lines(out / "search.jsonl")
    # after 3 calls: solved at e_0 (init, reformat, response) or rejected at depth 2 (init, 2 refinements)
    assert sorted(r["id"] for r in first) == ["p0", "p11", "p3", "p4", "p7", "p8"]
    with open(out / "search.jsonl", "a", encoding="utf-8") as f:  # a record cut short by the crash
        f.write(json.dumps(full[1])[:50])
    again = run_search(problems, Teacher(), ExactMatchVerifier(), out, cfg, progress=False)
    write_outputs(out, again, cfg)
    ids = [r["id"] for r in lines(out / "search.jsonl")]
    assert sorted(ids) == sorted(problem_ids(problems)) and len(ids) == len(set(ids)) == 12
    assert again == full
    for name in ("sft.jsonl", "sft_simple_cot.jsonl", "sft_direct.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    s = summarize(again)
    assert (s["succeeded"], s["discarded"]) == (9, {"not_verified": 3})
    assert s["accepted_at_attempt/depth"] == {"1/0": 3, "1/1": 3, "1/2": 3}
    # a resumed run must use the same settings (max_in_flight aside)
    run_search(problems, Teacher(), ExactMatchVerifier(), out, SearchConfig(max_depth=2, max_attempts=1,
                                                                           max_in_flight=3), progress=False)
    with pytest.raises(ValueError, match="max_depth"):
        run_search(problems, Teacher(), ExactMatchVerifier(), out, SearchConfig(max_depth=3), progress=False)


def test_sigkill_mid_run_then_rerun_gives_each_problem_exactly_once(tmp_path):
    from minihuatuo.services.serve import ChatServer

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(problem(n).to_record()) + "\n" for n in range(16)))
    srv = ChatServer(Teacher(), "127.0.0.1", 0, "teacher", delay_s=0.04)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        def cmd(out):
            return [sys.executable, "-m", "minihuatuo", "search", "--data", str(data), "--out", str(out),
                    "--search-url", srv.url + "/v1", "--search-model", "teacher",
                    "--search-api-key-env", "MINIHUATUO_TEST_NO_KEY", "--verifier", "exact",
                    "--max-depth", "2", "--max-attempts", "1", "--max-in-flight", "2", "--concurrency", "2"]

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log, deadline = tmp_path / "killed" / "search.jsonl", time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 3 <= log.read_text().count("\n") < 16
        r = subprocess.run(cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "16 problems: 12 trajectories found" in r.stdout  # the summary table
        from minihuatuo.cli import main  # the uninterrupted reference run, in this process
        assert main(cmd(tmp_path / "whole")[3:]) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    killed, whole = lines(tmp_path / "killed" / "search.jsonl"), lines(tmp_path / "whole" / "search.jsonl")
    assert sorted(r["id"] for r in killed) == sorted(r["id"] for r in whole) == sorted(f"p{n}" for n in range(16))
    assert (tmp_path / "killed" / "sft.jsonl").read_bytes() == (tmp_path / "whole" / "sft.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------
# the command


def test_bad_input_names_file_line_and_field(tmp_path, capsys):
    from minihuatuo.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(problem(1).to_record()) + "\n" +
                    json.dumps({"Open-ended Verifiable Question": "Q2: x?", "Ground-True Answer": " "}) + "\n")
    assert main(["search", "--data", str(data), "--out", str(tmp_path / "o"), "--search-url",
                 "http://127.0.0.1:9/v1", "--search-model", "m"]) == 2
    assert f"{data}: line 2: field 'Ground-True Answer': empty" in capsys.readouterr().err
    data.write_text(json.dumps(problem(1).to_record()))
    assert main(["search", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "--search-checkpoint DIR, or as --search-url and --search-model" in capsys.readouterr().err
    # the reflection check exists only in the demo's world: the command says so, and writes nothing
    assert main(["search", "--data", str(data), "--out", str(tmp_path / "r"), "--false-reflection", "retry"]) == 2
    assert "--false-reflection retry needs the reflection check of the demo's world" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_command_end_to_end_with_a_real_tiny_model(tiny_checkpoint, tmp_path):
    """A random tiny model writes gibberish: the command must record why each problem failed, not crash."""
    items = [{"Open-ended Verifiable Question": f"Which drug treats case {n}?", "Ground-True Answer": "amoxicillin"}
             for n in range(3)]
    real = json.loads(REAL_150.read_text(encoding="utf-8"))[:3] if REAL_150.exists() else []  # the released format
    data = tmp_path / "problems.json"
    data.write_text(json.dumps(items + real))
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "search", "--data", str(data), "--out", str(tmp_path / "o"),
                        "--search-checkpoint", str(tiny_checkpoint), "--verifier", "exact", "--max-tokens", "48",
                        "--max-depth", "1", "--max-attempts", "2", "--json-retries", "1", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # a tiny model gains nothing from threads
    assert r.returncode == 0, r.stderr
    recs, n = lines(tmp_path / "o" / "search.jsonl"), 3 + len(real)
    assert len(recs) == n and len({x["id"] for x in recs}) == n
    for rec in recs:
        s = rec["search"]
        assert not s["success"] and s["failure_reason"] in FAILURE_REASONS and s["failure_detail"]
        assert "Complex_CoT" not in rec and "Response" not in rec  # the released items' own are not carried
    for rec in recs[:3]:
        assert rec["search"]["trajectory"][0]["replies"] and rec["search"]["tokens"]["generated"] > 0  # it generated
    for rec, item in zip(recs[3:], real):
        assert rec["options"] == item["options"] and rec["Ground-True Answer"] == item["Ground-True Answer"]
    assert f"{n} problems: 0 trajectories found" in r.stdout and "discard reason" in r.stdout
    assert read_records(tmp_path / "o" / "sft.jsonl") == []
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["problems"] == n and summary["token_counter"].startswith("tokenizer")


def test_transitions_lower_case_only_ordinary_capitalised_words():
    from minihuatuo.stages.search_reformat import decapitalize

    assert decapitalize("The rash spread.") == "the rash spread."
    assert decapitalize("Together, fever and cough fit pneumonia.") == "together, fever and cough fit pneumonia."
    assert decapitalize("Community-acquired pneumonia does not hold.") == "community-acquired pneumonia does not hold."
    for kept in ("ECG shows ST elevation.", "X-ray first.", "I think so.", "COPD-related", "3 findings"):
        assert decapitalize(kept) == kept


# ---------------------------------------------------------------------------------------------------
# the LLM judge's verdict: ours (strict) and the official script's substring rule


@pytest.mark.parametrize("reply, strict, official", [
    ("True", True, True),
    ("  True.\n", True, True),
    (" true.", False, True),
    ("TRUE!", False, True),
    ("The answer is correct: True", False, True),
    ("not true", False, True),
    ("untrue", False, True),
    ("True or False?", False, True),
    ("**True**", False, True),
    ("False", False, False),
    ("FALSE.", False, False),
    ("Incorrect", False, False),
    ("", False, False),
])
def test_judge_verdict_rules_on_hand_written_replies(reply, strict, official):
    from minihuatuo.services.verifier import LLMJudgeVerifier, parse_verdict

    assert parse_verdict(reply) is strict  # the default is ours
    assert parse_verdict(reply, "strict") is strict
    assert parse_verdict(reply, "official") is official
    for rule, expected in (("strict", strict), ("official", official)):
        judge = LLMJudgeVerifier(ConstantJudge(reply), parse=rule)
        assert judge.verify_batch([("Measles.", "measles")]) == [expected]


def test_unknown_judge_rule_is_an_error():
    from minihuatuo.services.verifier import LLMJudgeVerifier, parse_verdict

    with pytest.raises(ValueError, match="'lenient': expected one of strict, official"):
        parse_verdict("True", "lenient")
    with pytest.raises(ValueError, match="judge_parse: expected one of strict, official, got 'lenient'"):
        LLMJudgeVerifier(ConstantJudge("True"), parse="lenient")
    with pytest.raises(ValueError, match="judge_parse: expected one of strict, official, got 'lenient'"):
        SearchConfig(judge_parse="lenient")


class ConstantJudge:
    """A judge backend giving the same reply to every request; records how many it got."""

    def __init__(self, reply: str):
        self.reply, self.requests = reply, 0

    def complete(self, requests):
        self.requests += len(requests)
        return [[self.reply] for _ in requests]


@pytest.mark.parametrize("flag, accepted", [([], False), (["--judge-parse", "strict"], False),
                                            (["--judge-parse", "official"], True)])
def test_judge_parse_flag_reaches_the_llm_judge_of_the_search_command(flag, accepted, tmp_path, monkeypatch, capsys):
    """A judge that answers "The response is not true." rejects e_0 under our rule and accepts it under
    the official one; the rule is a SearchConfig field, pinned by config.json on resume."""
    import minihuatuo.services.reward
    import minihuatuo.stages.search_cli

    from minihuatuo.cli import main
    from minihuatuo.services.verifier import LLMJudgeVerifier

    judge = ConstantJudge("The response is not true.")
    monkeypatch.setattr(minihuatuo.stages.search_cli, "search_backend", lambda args, cfg: Scripted({"Q1": [cot("measles")]}))
    monkeypatch.setattr(minihuatuo.services.reward, "build_verifier", lambda name, args: LLMJudgeVerifier(judge))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(problem(1).to_record()) + "\n")
    out = tmp_path / "o"
    argv = ["search", "--data", str(data), "--out", str(out), "--search-url", "http://127.0.0.1:9/v1",
            "--search-model", "m", "--verifier", "llm", "--max-depth", "0", "--max-attempts", "1",
            "--reformat", "template", *flag]
    assert main(argv) == 0, capsys.readouterr().err
    [rec] = lines(out / "search.jsonl")
    assert judge.requests == 1
    assert rec["search"]["verifier_calls"] == [
        {"attempt": 1, "depth": 0, "conclusion": "The answer is measles.", "verdict": accepted}]
    assert rec["search"]["success"] is accepted
    rule = "official" if accepted else "strict"
    assert json.loads((out / "config.json").read_text())["judge_parse"] == rule
    other = "strict" if accepted else "official"
    assert main(argv[:-2] + ["--judge-parse", other] if flag else argv + ["--judge-parse", other]) == 2
    assert f"judge_parse={rule!r}" in capsys.readouterr().err


def test_a_run_started_before_judge_parse_existed_resumes_with_the_strict_rule(tmp_path):
    problems = [problem(1)]
    run_search(problems, Teacher(), ExactMatchVerifier(), tmp_path / "o", SearchConfig(max_depth=1), progress=False)
    path = tmp_path / "o" / "config.json"
    old = json.loads(path.read_text())
    del old["judge_parse"]  # as written before the field was added
    path.write_text(json.dumps(old))
    run_search(problems, Teacher(), ExactMatchVerifier(), tmp_path / "o", SearchConfig(max_depth=1), progress=False)
    with pytest.raises(ValueError, match=r"\(judge_parse differ: judge_parse='strict'\)"):
        run_search(problems, Teacher(), ExactMatchVerifier(), tmp_path / "o",
                   SearchConfig(max_depth=1, judge_parse="official"), progress=False)


def test_search_checkpoint_chat_template(tiny_checkpoint, tmp_path, capsys):
    """A local search model whose template we do not recognise stops the command before any weights are
    read, naming the file; --chat-template picks a hand-written format; an endpoint takes no such flag."""
    from minihuatuo.cli import main

    (tiny_checkpoint / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                                                         "{% endfor %}", encoding="utf-8")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(problem(1).to_record()) + "\n")
    argv = ["search", "--data", str(data), "--out", str(tmp_path / "o"), "--search-checkpoint", str(tiny_checkpoint),
            "--verifier", "exact", "--max-tokens", "8", "--max-depth", "0", "--max-attempts", "1",
            "--json-retries", "0", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"minihuatuo search: error: {tiny_checkpoint / 'chat_template.jinja'}: chat template not recognised" in err
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--chat-template", "plain"]) == 0
    [rec] = lines(tmp_path / "o" / "search.jsonl")
    assert rec["search"]["trajectory"][0]["replies"]  # the model was asked and answered
    assert main(["search", "--data", str(data), "--out", str(tmp_path / "o2"), "--search-url", "http://127.0.0.1:9/v1",
                 "--search-model", "m", "--chat-template", "plain"]) == 2
    assert "--chat-template applies to a local --search-checkpoint" in capsys.readouterr().err
