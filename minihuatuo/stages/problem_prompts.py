"""Talking to LLMs for problem construction (paper §2.1, Appendix B): the prompts, the strict
reading of their replies, and the asking itself (`Asker`: chunked calls, progress, an append-only
reply log; `ask_with_retries`: follow-ups after an unreadable reply). The machinery shared with the
other prompted stages (placeholder filling, prompt files, JSON extraction, `ReplyError`, the
follow-up message) is services/replies.py; fitting a request to a local model's context is
`backends.fit_request`.

Three prompts, written for this project (the paper's Figures 5 and 6 show the structure: the MCQ in
a delimited block with its keyed answer, the criteria, the reply format; the wording here is ours):
  - too_easy:   a filter model answers the MCQ (paper §2.1 step 1, "three small LLMs");
  - llm_filter: one verdict among Pass / Too Simple / Ambiguous Answer / Not Reformulatable (Fig. 5);
  - reformat:   {"Open-ended Verifiable Question": x, "Ground-True Answer": y*} as JSON (Fig. 6).
Plus the two follow-up messages sent when a reply cannot be read (a retry continues the
conversation: the model sees its replies and why each was refused, so a retry is a different
request: a greedy model or a response cache would otherwise return the same unusable reply again).

Templates are filled in one pass (`render_mcq`: {question}, {options}, {answer}, {context}, {error}),
so a user's template may contain other braces (a JSON example). `load_problem_prompts(FILE)` replaces
any of them from a JSON or TOML file: {"too_easy": "...", "llm_filter": "...", "reformat": "...",
"verdict_retry": "...", "json_retry": "..."}.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass

from minihuatuo.services.backends import ChatRequest, fit_request
from minihuatuo.services.formats import X_KEY, Y_KEY, MCQItem
from minihuatuo.services.records import FormatError, JsonlAppender, read_records
from minihuatuo.services.replies import ReplyError, extract_json, follow_up, load_prompts, render

TOO_EASY_PROMPT = """Answer this multiple-choice exam question.

{context}{question}

{options}

Reply with one line of the form "The answer is X.", where X is the letter of the option you choose."""

LLM_FILTER_PROMPT = """Below is a multiple-choice exam question with its keyed answer. Good questions will be turned \
into open-ended problems that have one short answer which can be checked, and we need your judgement on \
whether this one is suitable.

[Question]
{context}{question}
{options}
Keyed answer: {answer}
[End of question]

Judge it by three tests:
- Reasoning: answering it should take several steps of clinical or scientific reasoning, not the recall of \
one fact. If it does not, the verdict is "Too Simple".
- One answer: exactly one option must be right, beyond debate. A question that asks for the wrong or false \
option, or that admits more than one right option, gets "Ambiguous Answer".
- Open form: with the options hidden, the question must still make sense and have a short answer that can \
be checked against the keyed one. If not, the verdict is "Not Reformulatable".

If it passes all three tests, the verdict is "Pass". You may explain briefly; then finish with one line of \
exactly this form:
Verdict: <Pass | Too Simple | Ambiguous Answer | Not Reformulatable>"""

REFORMAT_PROMPT = """Rewrite the multiple-choice exam question below as an open-ended question with a short \
reference answer.

[Question]
{context}{question}
{options}
Keyed answer: {answer}
[End of question]

Rules:
1. The open-ended question tests the same point as the original. Keep the details it needs, do not list or \
mention any options, and make sure it still has one definite answer.
2. The reference answer states the keyed answer briefly (a few words, like the keyed option), precisely \
enough that a reply can be checked against it.

Reply with a JSON object only, in this form:
```json
{"Open-ended Verifiable Question": "...", "Ground-True Answer": "..."}
```"""

VERDICT_RETRY = """I could not read a verdict from that reply ({error}). Please answer again and end with one \
line: "Verdict: Pass", "Verdict: Too Simple", "Verdict: Ambiguous Answer" or "Verdict: Not Reformulatable"."""

JSON_RETRY = """That reply could not be used ({error}). Please reply again with only the JSON object, whose \
two fields "Open-ended Verifiable Question" and "Ground-True Answer" are non-empty strings."""


@dataclass
class Prompts:
    too_easy: str = TOO_EASY_PROMPT
    llm_filter: str = LLM_FILTER_PROMPT
    reformat: str = REFORMAT_PROMPT
    verdict_retry: str = VERDICT_RETRY
    json_retry: str = JSON_RETRY


# placeholders each template must contain ({context} and {answer} are optional where not listed)
REQUIRED = {"too_easy": ("{question}", "{options}"), "llm_filter": ("{question}", "{options}", "{answer}"),
            "reformat": ("{question}", "{options}", "{answer}"), "verdict_retry": (), "json_retry": ()}


def load_problem_prompts(path) -> Prompts:
    """Prompts from a JSON or TOML file holding any of the fields of `Prompts`; the rest keep ours."""
    return dataclasses.replace(Prompts(), **load_prompts(path, REQUIRED))


def render_mcq(template: str, item: MCQItem, error: str = "") -> str:
    """Fill a template for one MCQ: `MCQItem.prompt_fields` (the question stripped here), {answer}
    = "C. <text of C>", the keyed option, and {error}, why the last reply was refused."""
    return render(template, **{**item.prompt_fields(), "question": item.question.strip(),
                               "answer": f"{item.answer_idx}. {item.answer}", "error": error})


# ---------------------------------------------------------------------------------------------------
# reading the replies


FILTER_VERDICTS = ("pass", "too_simple", "ambiguous", "not_reformulatable")
_LABELS = [("pass", r"pass(?:ed|es)?"), ("too_simple", r"too\s+simple"),
           ("ambiguous", r"ambiguous(?:\s+answer)?"), ("not_reformulatable", r"not\s+(?:easily\s+)?reformul\w*")]
_LABEL = "|".join(f"(?P<{name}>{rx})" for name, rx in _LABELS)
_VERDICT_LINE = re.compile(r"verdict\s*[:：]\s*[\s*_\"'`<\[(]*(?:" + _LABEL + r")\b", re.I)
_ANY_LABEL = re.compile(r"\b(?:" + _LABEL + r")\b", re.I)
_NEGATED = re.compile(r"\b(?:not|n't|never|fails?|failed|cannot)\W+(?:\w+\W+)?$", re.I)  # "does not pass"


def parse_filter_verdict(text: str) -> str:
    """The LLM filter's verdict (paper §2.1 step 2, Figure 5), one of FILTER_VERDICTS, read
    strictly: the last "Verdict: <label>" line if there is one, else the one label the reply names.
    A reply naming none or several labels, or only a negated "pass" ("it does not pass"), raises
    ReplyError: a lenient reading (the official script keeps an item when the substring "pass"
    occurs anywhere) would let "does not pass" or "bypass" through. (Not the LLM judge's True /
    False, which is `verifier.parse_verdict`.)"""
    # a line still holding the template's "<Pass | Too Simple | ...>" is an echo, not a verdict
    lines = [m for m in _VERDICT_LINE.finditer(text) if "|" not in text[m.end():].split("\n", 1)[0]]
    if lines:
        return lines[-1].lastgroup
    found = set()
    for m in _ANY_LABEL.finditer(text):
        if m.lastgroup == "pass" and _NEGATED.search(text[max(0, m.start() - 24):m.start()]):
            continue
        found.add(m.lastgroup)
    if len(found) == 1:
        return found.pop()
    if not text.strip():
        raise ReplyError("the reply is empty")
    if not found:
        raise ReplyError("no verdict label in the reply")
    raise ReplyError(f"several verdicts in the reply ({', '.join(sorted(found))}) and no 'Verdict:' line")


ANSWER_KEYS = (Y_KEY, "Standard Answer")  # the paper's Figure 6 names the answer "Standard Answer"


def parse_problem_json(text: str) -> tuple[str, str]:
    """(x, y*) from a reformatting reply, read strictly (`extract_json(repair=False)`): the JSON
    object alone, inside a ``` fence, or after some leading prose (then trailing prose is ignored
    too); raw line breaks inside strings are tolerated, nothing else is repaired. The object must
    have exactly the two fields, X_KEY and Y_KEY (or the paper's "Standard Answer"), both non-empty
    strings. Anything else raises ReplyError saying what is wrong."""
    obj, _ = extract_json(text, repair=False)
    if not isinstance(obj, dict):
        raise ReplyError(f"expected a JSON object, got {type(obj).__name__}")
    answer_keys = [k for k in ANSWER_KEYS if k in obj]
    if X_KEY not in obj or len(answer_keys) != 1:
        raise ReplyError(f"expected the fields {X_KEY!r} and {Y_KEY!r}, got {', '.join(map(repr, obj)) or 'none'}")
    extra = [k for k in obj if k not in (X_KEY, answer_keys[0])]
    if extra:
        raise ReplyError(f"unexpected field(s) {', '.join(map(repr, extra))}")
    x, y = obj[X_KEY], obj[answer_keys[0]]
    for name, v in ((X_KEY, x), (answer_keys[0], y)):
        if not isinstance(v, str) or not v.strip():
            raise ReplyError(f"field {name!r} must be a non-empty string")
    return x.strip(), y.strip()


# ---------------------------------------------------------------------------------------------------
# asking backends: chunks, progress, context fit, append-only reply log


def request_key(name: str, r: ChatRequest) -> str:
    body = {"backend": name, "messages": r.messages, "n": r.n, "temperature": float(r.temperature),
            "max_tokens": r.max_tokens, "stop": list(r.stop)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Asker:
    """`asker(backend, name, requests, desc)` -> completions per request (None: does not fit).
    Requests go in chunks of `chunk` per `backend.complete` call with a progress bar; each chunk's
    replies are appended to `log_path` (keyed by backend name and request) and read back on a rerun."""

    def __init__(self, log_path=None, chunk: int = 512):
        self.chunk, self.seen, self.log = chunk, {}, None
        if log_path is not None:
            self.log = JsonlAppender(log_path)  # opened first: it drops a line cut short by a crash
            for rec in read_records(log_path):
                key, completions = rec.data.get("key"), rec.data.get("completions")
                if not isinstance(key, str) or not isinstance(completions, list):
                    raise FormatError(log_path, rec.line, "key" if not isinstance(key, str) else "completions",
                                      "missing or of the wrong type in the reply log")
                self.seen[key] = completions

    def __call__(self, backend, name: str, requests: list[ChatRequest], desc: str) -> list[list[str] | None]:
        from tqdm import tqdm

        fitted = [fit_request(backend, r) for r in requests]
        keys = [request_key(name, r) if r is not None else None for r in fitted]
        out = [self.seen.get(k) if k is not None else None for k in keys]
        todo = [i for i, k in enumerate(keys) if k is not None and out[i] is None]
        with tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, unit="item",
                  file=sys.stderr, disable=not todo) as bar:
            for s in range(0, len(todo), self.chunk):
                part = todo[s:s + self.chunk]
                for i, completions in zip(part, backend.complete([fitted[i] for i in part])):
                    out[i] = self.seen[keys[i]] = completions
                    if self.log:
                        self.log.write({"key": keys[i], "backend": name, "completions": completions})
                bar.update(len(part))
        return out


TOO_LONG = "the prompt does not fit the model's context"


def ask_with_retries(items: list[MCQItem], llm, llm_name: str, template: str, retry_template: str, parse,
                     asker: Asker, desc: str, retries: int = 2, temperature: float = 0.0,
                     max_tokens: int = 1024) -> tuple[list, list[str | None]]:
    """Ask every item, read each reply with `parse` (which raises ReplyError); an unreadable reply
    gets up to `retries` follow-ups in the same conversation (the model sees its earlier replies and
    why each was refused, so every retry is a new request, not a cache hit). Returns (parsed value
    or None, last error or None) per item."""
    convos = [[{"role": "user", "content": render_mcq(template, it)}] for it in items]
    results, errors = [None] * len(items), [None] * len(items)
    todo = list(range(len(items)))
    for attempt in range(1 + retries):
        if not todo:
            break
        reqs = [ChatRequest(list(convos[i]), temperature=temperature, max_tokens=max_tokens) for i in todo]
        failed = []
        for i, out in zip(todo, asker(llm, llm_name, reqs, desc + (f" (retry {attempt})" if attempt else ""))):
            if out is None:  # a retry keeps the reason the last reply was refused
                errors[i] = TOO_LONG if attempt == 0 else f"{errors[i]} (the retry did not fit the model's context)"
                continue
            try:
                results[i], errors[i] = parse(out[0]), None
            except ReplyError as e:
                errors[i] = str(e)
                failed.append(i)
                convos[i] = follow_up(convos[i], out[0], render_mcq(retry_template, items[i], str(e)))
        todo = failed
    return results, errors
