"""Prompts of the strategy search (paper §3.1, Appendices D and E) and the reading of their replies.

The paper's Figures 8-14 show the structure, which we keep; the wording here is ours:
  - init:      the question in a tagged block, the three kinds of actions ("Inner Thinking" with a
               short title, "Final Conclusion", "Verification"), and the JSON shape {"CoT": [...]}
               (Figure 8);
  - refine:    the question, the previous reasoning [e0, y0, ..., e_{i-1}, y_{i-1}], the response
               requirements, the statement that the Final Conclusion was checked and is false, and
               one sentence naming the strategy (Figures 9-12 differ only in that sentence: here it
               is the {strategy} placeholder, filled from `strategies`); the reply starts with a
               Verification that agrees the conclusion is false;
  - hint:      the official script's label-hinted round ("efficient search"): as refine, but the
               reference answer y* is disclosed and the model must reason its way to it;
  - reformat:  the trajectory -> {"NaturalReasoning": ê}, natural first-person thinking (Figure 13);
  - response:  ê and the question -> the formal response ŷ, plain text (Figure 14);
  - json_retry / text_retry: the follow-up sent after an unusable reply, showing the error.

Templates are filled in one pass (`replies.render`), so a question containing "{reference}" stays
as it is. `load_search_prompts(FILE)` replaces any of them from JSON or TOML; `strategies` is a table
keyed by the paper's strategy names.

Replies are read by `parse_cot` (the action list) and `parse_natural_reasoning`, which accept what
LLMs commonly wrap around JSON (`replies.extract_json`: a code fence, leading or trailing prose,
trailing commas, raw line breaks inside strings; and here a missing final Verification) and raise
`replies.ReplyError` with the reason for anything else; the search then retries a bounded number
of times.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from minihuatuo.services.replies import ReplyError, extract_json, load_prompts

# §3.1: the four search strategies K, by their paper names. Sampled uniformly (search.py).
STRATEGIES = ("Exploring New Paths", "Backtracking", "Verification", "Correction")
ACTIONS = ("Inner Thinking", "Final Conclusion", "Verification")

COT_SHAPE = """```json
{"CoT": [
    {"action": "Inner Thinking", "title": "...", "content": "..."},
    ...,
    {"action": "Final Conclusion", "content": "..."},
    {"action": "Verification", "content": "..."}
]}
```"""
# a refinement reply begins with the Verification of the rejected conclusion (paper Figures 9-12)
REFINE_SHAPE = COT_SHAPE.replace('[\n    {"action": "Inner',
                                 '[\n    {"action": "Verification", "content": "..."},\n    {"action": "Inner')

INIT_PROMPT = """<question>
{question}
</question>

Work out the answer to the question above by reasoning step by step. Write the reasoning as a \
sequence of actions of three kinds:

- "Inner Thinking": one step of reasoning. Use several of them so that the reasoning is thorough, \
and give each a short title saying what the step does.
- "Final Conclusion": the answer that the Inner Thinking steps lead to, stated plainly. No title.
- "Verification": a check of the Final Conclusion. If the check holds, stop there; if it does not, \
go back to Inner Thinking. No title.

Reply with JSON only, in exactly this shape:
""" + COT_SHAPE

RESPONSE_REQUIREMENTS = """<response requirements>
Continue the reasoning with actions of three kinds:
1. "Inner Thinking": short steps, each starting with a brief title that says what it does.
2. "Final Conclusion": the answer that the reasoning now supports, without a title.
3. "Verification": a check of that Final Conclusion; stop if it holds, otherwise keep thinking.
</response requirements>"""

REFINE_PROMPT = """<question>
{question}
</question>

<previous reasoning>
{previous_reasoning}
</previous reasoning>

""" + RESPONSE_REQUIREMENTS + """

The <previous reasoning> is your own earlier work on the <question>. Its Final Conclusion has been \
checked and it is wrong, so your next Verification must find that it does not hold. After that, \
{strategy}, and finish with a new Final Conclusion and its Verification.

Reply with JSON only. Do not repeat the earlier reasoning: begin with that Verification.
""" + REFINE_SHAPE

# One sentence per strategy (§3.1), completing "After that, ..." in REFINE_PROMPT.
STRATEGY_INSTRUCTIONS = {
    "Exploring New Paths": "set the earlier approach aside and solve the problem along a route that is "
                           "different from every one tried so far",
    "Backtracking": "go back to an earlier point of the previous reasoning that still stands and continue "
                    "from there in a different direction",
    "Verification": "check each step of the previous reasoning carefully, find the ones that do not hold, "
                    "and rebuild the reasoning on what survives the check",
    "Correction": "find the specific mistakes in the previous reasoning and correct each of them precisely",
}

HINT_PROMPT = """<question>
{question}
</question>

<previous reasoning>
{previous_reasoning}
</previous reasoning>

""" + RESPONSE_REQUIREMENTS + """

The <previous reasoning> is your own earlier work on the <question>. You may now know that the \
reference answer is "{reference}", but write as if you had not been told: your next Verification \
must examine the previous Final Conclusion on its merits, and where it does not hold, new Inner \
Thinking steps must reach an answer that agrees with the reference by sound reasoning, followed by \
a new Final Conclusion and its Verification.

Reply with JSON only. Do not repeat the earlier reasoning: begin with that Verification.
""" + REFINE_SHAPE

REFORMAT_PROMPT = """<Thought Process>
{thought_process}
</Thought Process>

<Question>
{question}
</Question>

The <Thought Process> is a structured record of how the <Question> was reasoned through. Rewrite it \
as the natural inner monologue of someone thinking the problem over:

1. One thought per line, with a line break between thoughts, in the order the thinking happened.
2. No headings, titles or lists. Link the thoughts with casual, natural transitions such as "hmm", \
"oh", "also" or "wait", including at the points where an earlier idea turned out to be wrong.
3. Keep every idea, check and correction, and flesh them out so that the reasoning is rich, clear \
and complete while staying conversational.

Reply with JSON only, in this shape:
```json
{"NaturalReasoning": "..."}
```"""

RESPONSE_PROMPT = """<Internal Thinking>
{complex_cot}
</Internal Thinking>

<Question>
{question}
</Question>

The <Internal Thinking> holds your private reasoning about the <Question>. Based on it, write the \
final response that the user will read: if there is a clear answer, give it first, then explain \
it well, staying close to what the <Question> asks, in a clear, helpful and well-organised style. \
Output only that final response and nothing else."""

JSON_RETRY = """I could not use that reply: {error}. Please send it again as the JSON object only, in \
the shape asked for above."""

TEXT_RETRY = """That reply could not be used: {error}. Please write the final response again."""


@dataclass
class SearchPrompts:
    init: str = INIT_PROMPT
    refine: str = REFINE_PROMPT
    strategies: dict[str, str] = field(default_factory=lambda: dict(STRATEGY_INSTRUCTIONS))
    hint: str = HINT_PROMPT
    reformat: str = REFORMAT_PROMPT
    response: str = RESPONSE_PROMPT
    json_retry: str = JSON_RETRY
    text_retry: str = TEXT_RETRY


# placeholders each template must contain (a template without them would ask about nothing)
REQUIRED = {"init": ("{question}",), "refine": ("{question}", "{previous_reasoning}", "{strategy}"),
            "hint": ("{question}", "{previous_reasoning}", "{reference}"),
            "reformat": ("{thought_process}", "{question}"), "response": ("{complex_cot}", "{question}"),
            "json_retry": (), "text_retry": (), "strategies": ()}


def load_search_prompts(path) -> SearchPrompts:
    """Prompts from a JSON or TOML file holding any fields of `SearchPrompts`; the rest keep ours.
    `strategies` is an object keyed by strategy names, replacing any of the four sentences."""
    data = load_prompts(path, REQUIRED, tables=("strategies",))
    strategies = dict(STRATEGY_INSTRUCTIONS)
    if "strategies" in data:
        table = data.pop("strategies")
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"{path}: field 'strategies': expected an object of strategy name -> sentence")
        bad = sorted(set(table) - set(STRATEGIES))
        if bad:
            raise ValueError(f"{path}: field 'strategies': unknown strategy {', '.join(bad)}; "
                             f"known: {', '.join(STRATEGIES)}")
        strategies.update(table)
    return dataclasses.replace(SearchPrompts(), strategies=strategies, **data)


# ---------------------------------------------------------------------------------------------------
# reading replies


@dataclass
class ParsedCoT:
    actions: list[dict]  # [{"action", "title"?, "content"}, ...] normalised
    conclusion: str  # y_i: the content of the last Final Conclusion
    repairs: list[str]  # what was tolerated, for the provenance record


_ACTION_NAMES = {re.sub(r"[\s_-]+", " ", a).casefold(): a for a in ACTIONS}


def parse_cot(text: str) -> ParsedCoT:
    """Read a search reply: {"CoT": [actions]} (or the bare list). Each action has "action" (one of
    ACTIONS, case and spacing free), a string "content" and, optionally, a string "title". The
    reply must hold an Inner Thinking step and a Final Conclusion after it; after the last Final
    Conclusion only Verification may follow. A missing final Verification is accepted (recorded
    as a repair); the official script rejects such replies."""
    value, repairs = extract_json(text)
    if isinstance(value, dict):
        key = next((k for k in value if isinstance(k, str) and k.casefold() == "cot"), None)
        if key is None:
            raise ReplyError(f"expected a \"CoT\" field, got {', '.join(map(repr, value)) or 'an empty object'}")
        value = value[key]
    if not isinstance(value, list) or not value:
        raise ReplyError("\"CoT\" must be a non-empty list of actions")
    actions = []
    for n, a in enumerate(value):
        if not isinstance(a, dict):
            raise ReplyError(f"CoT[{n}] must be an object, got {type(a).__name__}")
        name = _ACTION_NAMES.get(re.sub(r"[\s_-]+", " ", str(a.get("action", ""))).strip().casefold())
        if name is None:
            raise ReplyError(f"CoT[{n}].action must be one of {', '.join(ACTIONS)}, got {a.get('action')!r}")
        content = a.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ReplyError(f"CoT[{n}].content must be a non-empty string")
        act = {"action": name}
        if name == "Inner Thinking" and isinstance(a.get("title"), str) and a["title"].strip():
            act["title"] = a["title"].strip()
        act["content"] = content.strip()
        actions.append(act)
    kinds = [a["action"] for a in actions]
    if "Final Conclusion" not in kinds:
        raise ReplyError("no \"Final Conclusion\" action")
    last = len(kinds) - 1 - kinds[::-1].index("Final Conclusion")
    if any(k != "Verification" for k in kinds[last + 1:]):
        raise ReplyError("the reply goes on thinking after its last Final Conclusion; it must end with a "
                         "Final Conclusion and its Verification")
    if "Inner Thinking" not in kinds[:last]:
        raise ReplyError("no \"Inner Thinking\" step before the Final Conclusion")
    if last == len(kinds) - 1:
        repairs.append("missing final Verification")
    return ParsedCoT(actions, actions[last]["content"], repairs)


def parse_natural_reasoning(text: str) -> str:
    """ê from a reformat reply {"NaturalReasoning": "..."}: a non-empty string with at least one
    line break (the prompt asks for one thought per line; the official script checks the same)."""
    value, _ = extract_json(text)
    if not isinstance(value, dict) or not isinstance(value.get("NaturalReasoning"), str):
        raise ReplyError("expected a JSON object with a string field \"NaturalReasoning\"")
    cot = value["NaturalReasoning"].strip()
    if "\n" not in cot:
        raise ReplyError("\"NaturalReasoning\" must put its thoughts on separate lines")
    return cot


def parse_response(text: str) -> str:
    """ŷ: the reply itself, which must not be empty."""
    if not text.strip():
        raise ReplyError("the reply is empty")
    return text.strip()
