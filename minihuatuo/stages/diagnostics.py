"""Reasoning diagnostics of replies: does a model reflect, and does its reflection help? (issue 19)

Accuracy alone cannot tell a model that reasons better from one that stopped reasoning. These
reply-level measures, computed the same way for every stage, can (definitions in notes/demo.md
§ Diagnostics; every pattern is a `DiagnosticsConfig` field, so real models' styles can be read too):

    finished          the reply reached a final response: the think-then-answer format holds
                      (`## Thinking` … `## Final Response` + an answer); when the generator's stop
                      flag is known, the reply also ended with a stop token, not at the length limit
    conclusions       the sentences of the thinking part that commit to an answer ("So, the most
                      likely diagnosis is X.", "The answer is X", "Final answer: X")
    first answer      the first conclusion; with none in the thinking, the final response itself
    reflection        a verification step after the first conclusion: a sentence that re-examines
                      it ("Wait, …", "Hmm, let me double-check …", "Let me verify …")
    verdict           what a reflection concluded about the conclusion before it: "reject" ("… does
                      not hold") or "confirm" ("… holds"), read in the reflection sentence and the
                      two after it
    reflection gain   per reply with a reflection: +1 when its first answer is wrong and its final
                      answer right, −1 when the first is right and the final wrong; summed, / n

`thinking=False` reads a reply as the direct-response reward does (services/reward.py, `require_thinking`
off; the ablation's direct arm): the whole reply is the final response, there is no thinking part, so no
conclusion, reflection or verdict, and a reply is finished when it is not empty (and stopped).

A verdict is right when it rejects a wrong conclusion or confirms a right one, so the share of right
verdicts says whether verification discriminates (a model that rejects everything scores the share
of wrong conclusions, not 1). Grading uses the caller's `grade(text, reference)` (the demo passes
the rule verifier), applied alike to first answers, conclusions and final answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from minihuatuo.services.response_format import extract_final_response

Grade = Callable[[str, str], bool]


@dataclass
class DiagnosticsConfig:
    """The patterns that read a reply; each a Python regex, matched case-insensitively per sentence."""

    # a sentence that commits to an answer
    conclusion_pattern: str = (r"^(so|therefore|thus|hence|in conclusion|in summary)\b.*\b(is|are)\b|"
                               r"\b(the|my) (final |correct )?answer (is|would be)\b|^final (answer|conclusion)\b")
    # a sentence that starts re-examining a conclusion
    reflection_pattern: str = (r"^(but )?(wait|hmm)\b|\blet me (double[- ]?check|re-?check|verify|re-?examine|"
                               r"reconsider|re-?evaluate)\b|\bon second thought\b|^verification\b")
    reject_pattern: str = r"\bdoes not hold\b|\b(is|was) (wrong|incorrect|not correct)\b|\bcannot be right\b"
    confirm_pattern: str = r"\b(conclusion|answer|diagnosis) (still )?holds\b|\b(is|was) (correct|confirmed)\b"

    def __post_init__(self):
        for name in ("conclusion_pattern", "reflection_pattern", "reject_pattern", "confirm_pattern"):
            try:
                re.compile(getattr(self, name))
            except (re.error, TypeError) as e:  # re.error is no ValueError: name the field here
                raise ValueError(f"{name}: not a regular expression ({e}): {getattr(self, name)!r}") from None

    def compiled(self) -> dict[str, re.Pattern]:
        return {k: re.compile(getattr(self, k), re.I) for k in
                ("conclusion_pattern", "reflection_pattern", "reject_pattern", "confirm_pattern")}


def sentences(text: str) -> list[str]:
    """Sentences in order: a line break or a full stop / ! / ? before a capital ends one."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[\"'(]*[A-Z0-9#])", line) if s.strip()]
    return out


@dataclass
class Reading:
    """One reply, read: what it concluded, when it reflected, and what each reflection decided."""

    finished: bool
    final: str | None  # the final response (None: the format does not hold)
    conclusions: list[str]  # conclusion sentences of the thinking part, in order
    reflected: bool  # a reflection sentence after the first conclusion
    verdicts: list[tuple[str, str]] = field(default_factory=list)  # (judged conclusion, "reject" | "confirm")

    @property
    def first_answer(self) -> str | None:
        return self.conclusions[0] if self.conclusions else self.final


def read_reply(reply: str, cfg: DiagnosticsConfig = DiagnosticsConfig(), stopped: bool | None = None,
               cue: str | None = None, thinking: bool = True) -> Reading:
    """Read one reply (see the module docstring). `stopped`: the generator's stop flag, when known.
    `cue`: a word a conclusion must contain to answer THIS question ("treatment" when the question asks
    for one), so that "So, the most likely diagnosis is X." on the way to a treatment is a step, not an
    answer; None: every conclusion answers. `thinking`: False for a direct response (no thinking part)."""
    if not thinking:
        final = extract_final_response(reply, "exact").strip() or None
        return Reading(finished=final is not None and stopped is not False, final=final, conclusions=[],
                       reflected=False)
    pat = cfg.compiled()
    final = extract_final_response(reply)
    thinking = re.split(r"^#+\s*final response\b", reply, maxsplit=1, flags=re.I | re.M)[0]
    sents = sentences(thinking)
    conclusions, verdicts, reflected, last = [], [], False, None
    for i, s in enumerate(sents):
        if last is not None and pat["reflection_pattern"].search(s):
            reflected = True
            for t in sents[i:i + 3]:  # the verdict: in this sentence or the next two
                kind = "reject" if pat["reject_pattern"].search(t) else "confirm" if pat["confirm_pattern"].search(t) \
                    else None
                if kind:
                    verdicts.append((last, kind))
                    break
        elif pat["conclusion_pattern"].search(s) and not pat["reject_pattern"].search(s) and \
                (cue is None or cue.casefold() in s.casefold()):
            conclusions.append(s)
            last = s
    return Reading(finished=final is not None and stopped is not False, final=final, conclusions=conclusions,
                   reflected=reflected, verdicts=verdicts)


def summarize(replies: list[str], references: list[str], grade: Grade, cfg: DiagnosticsConfig = DiagnosticsConfig(),
              tokens: list[int] | None = None, stopped: list[bool] | None = None,
              types: list[str] | None = None, cues: list[str | None] | None = None,
              hack: Grade | None = None, thinking: bool = True) -> dict:
    """The diagnostics of one stage over its replies (fractions of all replies unless said otherwise).
    `tokens`: reply lengths; `stopped`: the generator's stop flags; `types`: a question type per reply,
    for `by_type`; `cues`: per reply, the word an answering conclusion contains (`read_reply`).
    `hack(final, reference)`: whether a final response games a mention-based reward (the rule
    verifier's `hack`: several candidates, or the reference negated or abandoned); gives `hack_rate`,
    the share of replies whose final response does. Accuracy is the final response graded against the reference (no final response =
    wrong). `thinking`: as in read_reply."""
    n = len(replies)
    if n == 0:
        raise ValueError("no replies to summarize")
    readings = [read_reply(r, cfg, None if stopped is None else stopped[i], None if cues is None else cues[i],
                           thinking) for i, r in enumerate(replies)]
    final_ok = [rd.final is not None and grade(rd.final, ref) for rd, ref in zip(readings, references)]
    first_ok = [rd.first_answer is not None and grade(rd.first_answer, ref) for rd, ref in zip(readings, references)]
    gain = sum((not f and c) - (f and not c) for rd, f, c in zip(readings, first_ok, final_ok) if rd.reflected)
    right = {"reject": 0, "confirm": 0}
    count = {"reject": 0, "confirm": 0}
    for rd, ref in zip(readings, references):
        for judged, kind in rd.verdicts:
            ok = grade(judged, ref)
            count[kind] += 1
            right[kind] += (kind == "reject") != ok  # a rejection is right when the conclusion is wrong
    verdicts = count["reject"] + count["confirm"]
    out = {
        "n": n,
        "accuracy": sum(final_ok) / n,
        "unfinished": sum(not rd.finished for rd in readings) / n,
        "reflection": sum(rd.reflected for rd in readings) / n,
        "first_accuracy": sum(first_ok) / n,
        "reflection_gain": gain / n,
        "verdicts": verdicts,  # counts, not fractions
        "rejections": count["reject"],
        "right_rejections": right["reject"],
        "confirmations": count["confirm"],
        "right_confirmations": right["confirm"],
        "verdict_accuracy": (right["reject"] + right["confirm"]) / verdicts if verdicts else None,
    }
    if hack is not None:
        out["hack_rate"] = sum(rd.final is not None and hack(rd.final, ref) for rd, ref in zip(readings, references)) / n
    if tokens is not None:
        out["mean_tokens"] = sum(tokens) / n
    if types is not None:
        groups: dict[str, list[bool]] = {}
        for t, ok in zip(types, final_ok):
            groups.setdefault(t, []).append(ok)
        out["by_type"] = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())}
    return out


def reply_stats(outputs: list[str], cfg: DiagnosticsConfig = DiagnosticsConfig(),
                finish_reasons: list[str] | None = None) -> dict:
    """Reply-level diagnostics that need no reference, for any model's outputs (`minihuatuo eval`):
    the share of replies in the think-then-answer format (`format_ok`: `## Thinking` then one
    `## Final Response` with text after it), of replies that started thinking but never reached a
    final response (`unfinished`; with `finish_reasons`, also any cut at the length limit), of
    replies with at least one reflection marker in their thinking part (`reflection_markers`: any
    sentence matching `reflection_pattern`, wherever it stands — looser than the demo's
    `reflection`, which needs a conclusion first), and the mean length in words."""
    n = len(outputs)
    if n == 0:
        return {"n": 0}
    pat = re.compile(cfg.reflection_pattern, re.I)
    ok = unfinished = marked = words = 0
    for i, out in enumerate(outputs):
        final = extract_final_response(out)
        ok += final is not None
        started = re.search(r"^#+\s*thinking\b", out, re.I | re.M) is not None
        cut = finish_reasons is not None and finish_reasons[i] == "length"
        unfinished += (started and final is None) or cut
        thinking = re.split(r"^#+\s*final response\b", out, maxsplit=1, flags=re.I | re.M)[0]
        marked += any(pat.search(s) for s in sentences(thinking))
        words += len(out.split())
    return {"n": n, "format_ok": ok / n, "unfinished": unfinished / n, "reflection_markers": marked / n,
            "mean_words": words / n}
