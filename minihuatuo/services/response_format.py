"""The think-then-answer format of a policy's output, and the final response ŷ read out of it.

Paper §3.1: a stage-1 model writes "## Thinking\\n\\n{ê}\\n\\n## Final Response\\n\\n{ŷ}" (the SFT
target, `think_then_answer`). Everything that reads ŷ back goes through `extract_final_response`,
whose `rule` says how strictly:

    rule        used by                                   reads
    strict      the reward (reward.py, §3.2)              "## Thinking" then "## Final Response", each
                                                          exactly once, a non-empty answer; else None
                                                          (the paper's ŷ = null, reward 0)
    exact       the reward of the direct-response         after the last exact "## Final Response",
                ablation (RewardConfig.require_thinking)  else the whole output
    tolerant    benchmark scoring (evaluate.py), the      after the last "## Final Response" heading,
                demo's and the world's grading            spacing and case free, else the whole output
    official    the official scorer (scorer_official.py)  after the last exact "## Final Response\\n\\n"
                                                          (both newlines), else the whole output

Only "strict" strips the answer and may return None; the others return the text as it stands.
"""
from __future__ import annotations

import re

THINKING, FINAL = "## Thinking", "## Final Response"
OFFICIAL_FINAL = FINAL + "\n\n"  # the official scorer's split: no other spacing, case or heading level
_FINAL_HEADING = re.compile(r"##\s*Final\s+Response", re.I)
FINAL_RULES = ("strict", "exact", "tolerant", "official")


def think_then_answer(e_hat: str, y_hat: str) -> str:
    """The output format a stage-1 model is trained to write (paper §3.1)."""
    return f"{THINKING}\n\n{e_hat}\n\n{FINAL}\n\n{y_hat}"


def extract_final_response(output: str, rule: str = "strict") -> str | None:
    """ŷ of `output` under `rule` (module docstring).

    "strict": None unless "## Thinking" and "## Final Response" each occur exactly once, in that
    order, with a non-empty answer. A reply with two "## Final Response" headers could hide a
    second answer after the first; a reply without "## Thinking" skipped the reasoning that stage
    2 trains. Both get no reward."""
    if rule == "strict":
        if output.count(THINKING) != 1 or output.count(FINAL) != 1:
            return None
        if output.index(THINKING) > output.index(FINAL):
            return None
        return output.split(FINAL, 1)[1].strip() or None
    if rule == "exact":
        return output.rpartition(FINAL)[2]
    if rule == "tolerant":
        return _FINAL_HEADING.split(output)[-1]
    if rule == "official":
        return output.rpartition(OFFICIAL_FINAL)[2]
    raise ValueError(f"final response rule {rule!r}: expected one of {', '.join(FINAL_RULES)}")
