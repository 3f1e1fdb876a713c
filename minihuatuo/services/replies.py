"""Prompting an LLM and reading its reply: the machinery every prompted stage shares.

Problem construction (stages/problem_prompts.py), strategy search (stages/search_prompts.py) and the
LLM judge (verifier.py) each keep their own prompt wording and the reading of their own fields; what
they have in common is here:

- `render`: fill {name} placeholders in one pass;
- `load_prompt`: a user's template file, checked for the placeholders it must hold;
  `load_prompts`: a JSON or TOML file replacing any of a stage's named templates;
- `extract_json`: the JSON value in a reply (a code fence, leading prose), read strictly or with
  the repairs LLM JSON commonly needs (trailing commas);
- `ReplyError`: a reply that cannot be used, with the reason; every reader of a reply raises it;
- `follow_up`: the conversation after an unusable reply, for a bounded retry that shows the model
  its reply and the reason (so a retry is a new request: a greedy model or a response cache would
  otherwise give the same unusable reply again). Each stage's loop bounds the retries.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# ---------------------------------------------------------------------------------------------------
# prompts


def render(template: str, **values: str) -> str:
    """Fill {name} placeholders in one pass. Sequential str.replace would be wrong: text pasted in
    (a response, a question) that itself contains "{reference}" would get the reference pasted into
    it. Braces that name no value (a JSON example in the prompt) are left as they are."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], template)


def load_prompt(path, placeholders: tuple[str, ...]) -> str:
    """A user's template file; it must contain each placeholder (a template without them would
    ask about nothing)."""
    text = Path(path).read_text(encoding="utf-8")
    missing = [p for p in placeholders if p not in text]
    if missing:
        raise ValueError(f"{path}: the prompt must contain {' and '.join(placeholders)}; "
                         f"missing {', '.join(missing)}")
    return text


def load_prompts(path, required: dict[str, tuple[str, ...]], tables: tuple[str, ...] = ()) -> dict:
    """The templates a user's JSON or TOML file replaces: an object whose fields are names of
    `required`, each a string holding the placeholders required[name]. A field named in `tables`
    holds an object instead (a table of sentences), which the caller checks. ValueError names the
    file and the field."""
    from minihuatuo.services.config import read_config_file

    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with fields {', '.join(required)}")
    unknown = sorted(set(data) - set(required))
    if unknown:
        raise ValueError(f"{path}: unknown prompt(s) {', '.join(unknown)}; known: {', '.join(required)}")
    for name, text in data.items():
        if name in tables:
            continue
        if not isinstance(text, str):
            raise ValueError(f"{path}: field {name!r}: expected a string")
        missing = [p for p in required[name] if p not in text]
        if missing:
            raise ValueError(f"{path}: field {name!r}: the template has no {', '.join(missing)} placeholder")
    return data


# ---------------------------------------------------------------------------------------------------
# replies


class ReplyError(ValueError):
    """A reply that cannot be used; the message says why (it is shown to the model on a retry)."""


def follow_up(conversation: list[dict], reply: str, message: str) -> list[dict]:
    """The conversation continued after an unusable reply: the reply, then our message saying why
    it was refused (a stage's retry template filled with the ReplyError's text)."""
    return [*conversation, {"role": "assistant", "content": reply}, {"role": "user", "content": message}]


FENCE = re.compile(r"```[ \t]*[A-Za-z]*[ \t]*\n?(.*?)```", re.S)  # ```json ... ``` (any or no language tag)


def strip_trailing_commas(s: str) -> str:
    """Drop each comma that is followed (after white space) by } or ], outside strings."""
    out, i, in_str = [], 0, False
    while i < len(s):
        c = s[i]
        if in_str:
            if c == "\\":
                out.append(s[i:i + 2])
                i += 2
                continue
            in_str = c != '"'
        elif c == '"':
            in_str = True
        elif c == ",":
            j = i + 1
            while j < len(s) and s[j] in " \t\r\n":
                j += 1
            if j < len(s) and s[j] in "}]":
                i += 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def extract_json(text: str, repair: bool = True) -> tuple[object, list[str]]:
    """The JSON value of a reply and the repairs it needed ("code fence", "leading prose",
    "trailing commas"). Raw line breaks inside strings are always accepted (json strict=False:
    common in LLM JSON and harmless). Raises ReplyError with the reason.

    repair=True (the search): the first ``` fence is tried, then the text from the first "{" or
    "[" on; each also with trailing commas dropped; text after the value is ignored.
    repair=False (problem construction, "nothing else is repaired"): a fence if there is one, and
    it must hold the value alone; else the object from the first "{" on (trailing prose ignored);
    the JSON itself is taken as written."""
    s = text.strip()
    if not s:
        raise ReplyError("the reply is empty")
    candidates = []  # (text, how it was found: a repair, or None)
    fence = FENCE.search(s)
    if fence:
        candidates.append((fence.group(1).strip(), "code fence"))
    if repair or not fence:
        starts = [i for i in (s.find("{"), s.find("[") if repair else -1) if i >= 0]
        if starts:
            candidates.append((s[min(starts):], "leading prose" if min(starts) > 0 else None))
    if not candidates:
        raise ReplyError("no JSON object in the reply")
    error = None
    for candidate, how in candidates:
        readings = [(candidate, None)] + ([(strip_trailing_commas(candidate), "trailing commas")] if repair else [])
        for fixed, fix in readings:
            if fix and fixed == candidate:
                continue
            try:
                value, end = json.JSONDecoder(strict=False).raw_decode(fixed)
            except json.JSONDecodeError as e:
                error = error or (e, len(fixed))
                continue
            if not repair and how == "code fence" and fixed[end:].strip():
                raise ReplyError("extra text after the JSON object inside the code block")
            return value, [r for r in (how, fix) if r]
    e, n = error
    # an error at the very end of the text: the JSON never closed (typically max_tokens ran out)
    unfinished = e.pos >= n - 1 or e.msg.startswith("Unterminated string")
    cut = " (the JSON is unfinished: was the reply cut off at max_tokens?)" if unfinished else ""
    raise ReplyError(f"invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}")
