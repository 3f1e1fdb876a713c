"""The official HuatuoGPT-o1 benchmark scorer, reproduced exactly, quirks included
(`minihuatuo eval --scorer official`).

The official pipeline cleans each completion (`evaluation/eval.py`), drops the items whose cleaned
output is empty, and extracts an option with a four-step cascade (`evaluation/scorer.py`); the first
step that finds something decides. The code here is ours, written from the description of that
algorithm in notes/eval.md, which also lists every quirk and what it does to a score:

  clean:    every "</s>" removed, then one leading space; an empty result drops the item.
  split:    only the text after the last exact "## Final Response\\n\\n" (case and both newlines):
            `response_format.extract_final_response(output, "official")`.
  step 1:   "answer is" + optional whitespace + a capital A-N, whatever the item's options and
            whatever follows ("the answer is Hypertension" gives H); case-sensitive.
  step 2:   one of the item's letters (the first len(options) of A-N, capitals only) with a
            non-word or CJK character (or "is ", or the start) before it and a non-word or CJK
            character (or the end) after it, except "A" followed by a space; the matches do not
            overlap, so the character after one letter cannot precede the next ("A,B" gives A only).
  step 3:   option texts found as plain substrings of the lowercased text ("no" inside "not");
            last = the option whose last occurrence is latest; first = the option whose FIRST
            occurrence is latest; ties go to the earlier option.
  step 4:   difflib ratio of each lowercased option text to the lowercased text; the highest wins,
            ties (all zero included) go to the LATER option.
Per source, accuracy = max(first-letter accuracy, last-letter accuracy).
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache

from minihuatuo.services.response_format import extract_final_response

OFFICIAL_LETTERS = "ABCDEFGHIJKLMN"  # the official scorer's letters; an item with n options uses the first n
_CJK = "\u4e00-\u9fff"
_ANSWER_IS = re.compile(r"answer is\s*([A-N])")  # step 1: the letter need not be an option's


def clean_output(output: str) -> str:
    """eval.py's clean-up of a completion: "</s>" removed everywhere, then one leading space."""
    output = output.replace("</s>", "")
    return output[1:] if output.startswith(" ") else output


@lru_cache(maxsize=None)
def _letter_pattern(n_options: int) -> re.Pattern:
    # before: "is ", a non-word or CJK character, or the start; never "A" then a space; after: a
    # non-word or CJK character (consumed, so it cannot serve as the next letter's "before"), or the end
    return re.compile(rf"(?:is |[\W{_CJK}]|^)(?!A )([{OFFICIAL_LETTERS[:n_options]}])(?:[\W{_CJK}]|$)")


def _latest(found: list[tuple[str, int]]) -> str:
    """The option with the greatest position; on a tie the earlier option in option order."""
    best = found[0]
    for cand in found[1:]:
        if cand[1] > best[1]:
            best = cand
    return best[0]


def official_choice(output: str, options: dict[str, str]) -> tuple[str, str, str]:
    """(first, last, step) for a cleaned, non-empty output; step is "explicit" (step 1), "letter"
    (step 2: the official code reports both as type 1), "text" (type 2) or "similar" (type 3).
    There is always an answer."""
    text = extract_final_response(output, "official")  # after the last exact "## Final Response\n\n"
    for step, found in (("explicit", [m.group(1) for m in _ANSWER_IS.finditer(text)]),
                        ("letter", [m.group(1) for m in _letter_pattern(len(options)).finditer(text)])):
        if found:
            return found[0], found[-1], step
    low = text.lower()
    present = [(k, v.lower()) for k, v in options.items() if v.lower() in low]
    if present:
        first = _latest([(k, low.index(v)) for k, v in present])  # the quirk: latest FIRST occurrence
        last = _latest([(k, low.rindex(v)) for k, v in present])
        return first, last, "text"
    best, best_ratio = None, 0.0
    for k, v in options.items():
        r = difflib.SequenceMatcher(None, v.lower(), low).ratio()
        if r >= best_ratio:  # ">=": a tie goes to the later option
            best, best_ratio = k, r
    return best, best, "similar"
