"""Turning a search trajectory into text (paper §3.1 "Constructing SFT Training Data", Appendix E).

A trajectory is a chain of steps [(k_0, e_0), (k_1, e_1), ..., (k_i, e_i)]: k is the strategy that
produced the step ("Init CoT" for e_0, a paper strategy or "Label Hint" for the others) and e is its
list of actions ({"action": "Inner Thinking" | "Final Conclusion" | "Verification", "title"?,
"content"}). Each refinement begins with a Verification that rejects the previous conclusion, so
the previous step's own closing Verification (which had wrongly accepted it) is dropped when the
steps are joined, as the official script does (`Long_CoT[:-1] + new`).

Four renderings:
  - `long_cot`: the joined action list (the official output's "Long_CoT");
  - `previous_reasoning`: that list as JSON without its closing Verification, for the refine prompt;
  - `stream_of_search`: "### title" blocks, the input of the LLM reformatter (Figure 13);
  - `template_complex_cot`: a deterministic stand-in for the LLM reformatter, for offline runs: every
    step is kept, in order, without titles, and joined by natural transitions ("hmm", "wait", "also");
  - `simple_cot`: e_0 alone as plain paragraphs (the "simple CoT" ablation of paper Table 2).
"""
from __future__ import annotations

import json

INIT, HINT = "Init CoT", "Label Hint"

Chain = list  # [(strategy: str, actions: list[dict]), ...]


def long_cot(chain: Chain) -> list[dict]:
    """[e_0, y_0, ..., e_i, y_i] as one action list: each step but the last loses a closing
    Verification, because the next step opens with the Verification that replaces it."""
    out: list[dict] = []
    for n, (_, actions) in enumerate(chain):
        keep = actions[:-1] if n < len(chain) - 1 and actions and actions[-1]["action"] == "Verification" \
            else actions
        out += keep
    return out


def previous_reasoning(chain: Chain) -> str:
    """The refine prompt's {previous_reasoning}: the joined actions without the closing
    Verification (the reply starts with a new one), as indented JSON, like the official script."""
    actions = long_cot(chain)
    if actions and actions[-1]["action"] == "Verification":
        actions = actions[:-1]
    return json.dumps(actions, ensure_ascii=False, indent=2)


def stream_of_search(actions: list[dict]) -> str:
    """The reformat prompt's {thought_process}: one "### heading" block per action (the title of an
    Inner Thinking step, else "Conclusion" or "Verification")."""
    blocks = []
    for a in actions:
        head = a.get("title") or ("Conclusion" if a["action"] == "Final Conclusion" else a["action"])
        blocks.append(f"### {head}\n{a['content']}")
    return "\n\n".join(blocks)


def conclusion(actions: list[dict]) -> str:
    """y_i: the content of the last Final Conclusion of a step."""
    return next(a["content"] for a in reversed(actions) if a["action"] == "Final Conclusion")


def decapitalize(text: str) -> str:
    """Lower-case the first letter when a transition is put in front of a sentence ("The ..." ->
    "Also, the ..."), but leave acronyms ("ECG"), "I" and non-letters alone."""
    word = text.split(" ", 1)[0].rstrip(",;:.")
    rest = word[1:].replace("-", "")  # "Community-acquired" is a capitalised word too, "X-ray" is not
    if len(word.split("-")[0]) > 1 and word[0].isupper() and rest.islower() and rest.isalpha():
        return text[0].lower() + text[1:]
    return text


# What the first Inner Thinking of a refinement says first, by strategy (§3.1's four meanings).
OPENERS = {
    "Exploring New Paths": "Let me try a different approach.",
    "Backtracking": "Let me go back to an earlier step.",
    "Verification": "Let me check this carefully, step by step.",
    "Correction": "Let me correct that.",
    HINT: "Let me think this through again.",
}


def template_complex_cot(chain: Chain) -> str:
    """ê without an LLM. One paragraph per action, in trajectory order, titles dropped:
        the first Inner Thinking of e_0         as written
        the first Inner Thinking of a later e_j OPENERS[k_j] + " " + content
        any other Inner Thinking                "Also, " + content
        a Final Conclusion                      "So, " + content
        the Verification opening a refinement   "Wait, " + content   (it rejects the last conclusion)
        any other Verification                  "Hmm, let me double-check. " + content
    ("Also, " / "So, " / "Wait, " lower-case a capitalised first word, see `decapitalize`.)"""
    paragraphs = []
    for n, (strategy, actions) in enumerate(chain):
        keep = actions[:-1] if n < len(chain) - 1 and actions and actions[-1]["action"] == "Verification" \
            else actions
        first_thought = True
        for m, a in enumerate(keep):
            kind, text = a["action"], a["content"]
            if kind == "Inner Thinking":
                if first_thought and n == 0:
                    paragraphs.append(text)
                elif first_thought:
                    paragraphs.append(f"{OPENERS.get(strategy, OPENERS[HINT])} {text}")
                else:
                    paragraphs.append(f"Also, {decapitalize(text)}")
                first_thought = False
            elif kind == "Final Conclusion":
                paragraphs.append(f"So, {decapitalize(text)}")
            elif n > 0 and m == 0:
                paragraphs.append(f"Wait, {decapitalize(text)}")
            else:
                paragraphs.append(f"Hmm, let me double-check. {text}")
    return "\n\n".join(paragraphs)


def simple_cot(actions: list[dict]) -> str:
    """The simple CoT (e_0, y_0) of paper Table 2: the Inner Thinking contents and the Final
    Conclusion of the first chain as plain paragraphs, without titles and without the Verification
    (no reflection: that is what distinguishes it from the complex CoT)."""
    return "\n\n".join(a["content"] for a in actions if a["action"] != "Verification")
