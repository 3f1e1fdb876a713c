"""Reasoning diagnostics (stages/diagnostics.py) on hand-made replies, every figure counted by hand."""
from __future__ import annotations

import pytest

from minihuatuo.stages.diagnostics import DiagnosticsConfig, read_reply, sentences, summarize


def grade(text: str, reference: str) -> bool:
    """A grader for the tests: the reference is named after the last "is" of the text."""
    return reference in text.lower().rsplit(" is ", 1)[-1]


WRONG_THEN_RIGHT = """## Thinking

The patient has fever and a bone ulcer.

So, the most appropriate treatment is amoxicillin.

Wait, pneumonia does not explain the bone ulcer, so the diagnosis of pneumonia does not hold.

So, the most appropriate treatment is clindamycin.

Hmm, let me double-check. Osteomyelitis explains the findings, so the conclusion holds.

## Final Response

The most appropriate treatment is clindamycin."""

RIGHT_THEN_WRONG = """## Thinking

So, the most likely diagnosis is pneumonia.

So, the most appropriate treatment is clindamycin.

Wait, that is wrong. The previous conclusion does not hold.

So, the most appropriate treatment is amoxicillin.

## Final Response

The most appropriate treatment is amoxicillin."""

NO_REFLECTION = """## Thinking

Fever and cough point to pneumonia.

So, the most appropriate treatment is clindamycin.

## Final Response

The most appropriate treatment is clindamycin."""

UNFINISHED = """## Thinking

So, the most appropriate treatment is amoxicillin.

Wait, pneumonia does not explain the ulcer, so the diagnosis of pneumonia does not hold.

So, the most appropriate treatment is amoxicillin.

Wait, pneumonia does not explain the ulcer, so the diagnosis"""

DIRECT = "## Thinking\n\nShe is allergic to penicillin.\n\n## Final Response\n\nThe treatment is clindamycin."


def test_sentences_split_on_lines_and_full_stops():
    assert sentences("A b. C d!\n\nE f? g h. 3 i.") == ["A b.", "C d!", "E f? g h.", "3 i."]


def test_read_reply_finds_conclusions_reflection_and_verdicts():
    r = read_reply(WRONG_THEN_RIGHT, cue="treatment")
    assert r.finished and r.final == "The most appropriate treatment is clindamycin."
    assert r.conclusions == ["So, the most appropriate treatment is amoxicillin.",
                             "So, the most appropriate treatment is clindamycin."]
    assert r.first_answer == "So, the most appropriate treatment is amoxicillin." and r.reflected
    # the "Wait" rejects amoxicillin; the double-check (verdict in the next sentence) confirms clindamycin
    assert r.verdicts == [("So, the most appropriate treatment is amoxicillin.", "reject"),
                          ("So, the most appropriate treatment is clindamycin.", "confirm")]
    # the cue: a diagnosis on the way to a treatment is a step, not the first answer
    r = read_reply(RIGHT_THEN_WRONG, cue="treatment")
    assert r.first_answer == "So, the most appropriate treatment is clindamycin."
    assert read_reply(RIGHT_THEN_WRONG).first_answer == "So, the most likely diagnosis is pneumonia."
    # a reply with no conclusion in its thinking commits first to its final response
    r = read_reply(DIRECT)
    assert r.conclusions == [] and r.first_answer == "The treatment is clindamycin." and not r.reflected
    # a "Wait" before any conclusion is not a reflection on one
    assert not read_reply("## Thinking\n\nWait, fever.\n\nSo, the answer is X.\n\n## Final Response\n\nX").reflected


def test_unfinished_means_no_final_response_or_no_stop_token():
    assert not read_reply(UNFINISHED).finished
    assert read_reply(NO_REFLECTION).finished
    assert not read_reply(NO_REFLECTION, stopped=False).finished  # cut at the length limit after the answer
    assert not read_reply("## Final Response\n\nclindamycin").finished  # no thinking: the format fails


def test_summarize_by_hand():
    replies = [WRONG_THEN_RIGHT, RIGHT_THEN_WRONG, NO_REFLECTION, UNFINISHED, DIRECT]
    refs = ["clindamycin"] * 5
    out = summarize(replies, refs, grade, tokens=[100, 80, 40, 200, 30], types=["t", "t", "t", "d", "d"],
                    cues=["treatment"] * 5)
    assert out["n"] == 5
    assert out["accuracy"] == pytest.approx(3 / 5)  # 1, 3, 5 end on clindamycin; 2 on amoxicillin; 4 unfinished
    assert out["unfinished"] == pytest.approx(1 / 5)
    assert out["reflection"] == pytest.approx(3 / 5)  # 1, 2, 4
    # first answers: 1 amoxicillin (wrong), 2 clindamycin (right), 3 right, 4 amoxicillin (wrong), 5 right
    assert out["first_accuracy"] == pytest.approx(3 / 5)
    # with a reflection: 1 wrong → right (+1), 2 right → wrong (−1), 4 wrong → no final (0)
    assert out["reflection_gain"] == pytest.approx(0.0)
    # verdicts: 1 rejects amoxicillin (right), confirms clindamycin (right); 2 rejects clindamycin (wrong);
    # 4 rejects amoxicillin (right); its second "Wait" is cut before "does not hold": no verdict
    assert (out["verdicts"], out["rejections"], out["right_rejections"]) == (4, 3, 2)
    assert (out["confirmations"], out["right_confirmations"]) == (1, 1)
    assert out["verdict_accuracy"] == pytest.approx(3 / 4)
    assert out["mean_tokens"] == pytest.approx(90.0)
    assert out["by_type"] == {"d": {"accuracy": 0.5, "n": 2}, "t": {"accuracy": pytest.approx(2 / 3), "n": 3}}
    gained = summarize([WRONG_THEN_RIGHT], ["clindamycin"], grade, cues=["treatment"])
    assert gained["reflection_gain"] == 1.0 and gained["first_accuracy"] == 0.0 and gained["accuracy"] == 1.0


def test_patterns_are_configurable_for_other_styles():
    """A model that reflects with "Let me reconsider" and concludes with "Answer:" is read through
    its own patterns; the defaults do not see its conclusions."""
    reply = ("## Thinking\n\nAnswer: amoxicillin.\n\nLet me reconsider: the ulcer is unexplained, this is "
             "incorrect.\n\nAnswer: clindamycin.\n\n## Final Response\n\nclindamycin")
    assert read_reply(reply).conclusions == []
    cfg = DiagnosticsConfig(conclusion_pattern=r"^answer:", reflection_pattern=r"^let me reconsider")
    r = read_reply(reply, cfg)
    assert r.conclusions == ["Answer: amoxicillin.", "Answer: clindamycin."] and r.reflected
    assert r.verdicts == [("Answer: amoxicillin.", "reject")]
    with pytest.raises(ValueError, match="no replies"):
        summarize([], [], grade)


def test_reply_stats_for_any_models_outputs():
    """eval's reference-free reply diagnostics, counted by hand on five outputs."""
    from minihuatuo.stages.diagnostics import reply_stats

    outs = [WRONG_THEN_RIGHT, NO_REFLECTION, UNFINISHED, "The answer is B.", "Wait, maybe C. The answer is C."]
    s = reply_stats(outs)
    assert s["n"] == 5 and s["format_ok"] == pytest.approx(2 / 5)  # 1 and 2 have both headings
    assert s["unfinished"] == pytest.approx(1 / 5)  # 3 started thinking and never answered; 4, 5 never started
    assert s["reflection_markers"] == pytest.approx(3 / 5)  # 1 and 3 ("Wait"), 5 ("Wait" leads its text)
    assert s["mean_words"] == pytest.approx(sum(len(o.split()) for o in outs) / 5)
    cut = reply_stats(outs, finish_reasons=["stop", "length", "length", "stop", "stop"])
    assert cut["unfinished"] == pytest.approx(2 / 5)  # 2 was cut at the length limit after its answer
    cfg = DiagnosticsConfig(reflection_pattern=r"\bmaybe\b")
    assert reply_stats(outs, cfg)["reflection_markers"] == pytest.approx(1 / 5)
    assert reply_stats([]) == {"n": 0}


def test_hack_rate_counts_final_responses_the_hack_check_flags():
    """summarize's hack_rate: the share of replies whose FINAL response the caller's check flags (an
    unfinished reply has none, so it is never counted)."""
    flagged = lambda text, ref: " or " in text  # noqa: E731 - a stand-in check: a hedge
    hedge = NO_REFLECTION.rsplit("\n", 1)[0] + "\nThe most appropriate treatment is clindamycin or amoxicillin."
    out = summarize([hedge, NO_REFLECTION, UNFINISHED], ["clindamycin"] * 3, grade, hack=flagged)
    assert out["hack_rate"] == pytest.approx(1 / 3)
    assert "hack_rate" not in summarize([NO_REFLECTION], ["clindamycin"], grade)


def test_direct_responses_are_read_as_their_reward_reads_them():
    """thinking=False (the ablation's direct arm, rewarded with require_thinking off): the whole reply is
    the final response; there is no thinking part to reflect in."""
    rd = read_reply("The most appropriate treatment is clindamycin.", thinking=False)
    assert rd.finished and rd.final == "The most appropriate treatment is clindamycin."
    assert (rd.conclusions, rd.reflected, rd.verdicts) == ([], False, [])
    assert not read_reply("  \n", thinking=False).finished  # nothing said
    assert not read_reply("The treatment is clindamycin.", stopped=False, thinking=False).finished  # cut off
    # the strict reading fails the same reply: no "## Thinking" part
    assert read_reply("The most appropriate treatment is clindamycin.").final is None
    out = summarize(["The treatment is clindamycin.", "The treatment is amoxicillin.", ""], ["clindamycin"] * 3, grade,
                    thinking=False)
    assert out["accuracy"] == pytest.approx(1 / 3) and out["unfinished"] == pytest.approx(1 / 3)
    assert out["first_accuracy"] == pytest.approx(1 / 3)  # the first answer is the final response
    assert out["reflection"] == 0.0 and out["reflection_gain"] == 0.0 and out["verdicts"] == 0
