"""Text rules of problem construction (paper §2.1): the rule filters and the offline reformatter.

Rule filters (§2.1 steps 1-2: "discarded short questions", "excluded questions asking for
incorrect options or with multiple correct answers"). Each is a small pure function returning the
evidence it found (a string) or None; `rule_filter` applies them in this order and reports the
first that fires:
  too_short          the question has fewer than `min_chars` characters
  negative_question  the question asks for the odd one out: EXCEPT, NOT, "which ... is not",
                     incorrect / false / untrue / wrong, "least likely"
  aggregate_option   an option is "all / none of the above", "both A and B", "all", "none", ...
  multiple_correct   "select all that apply", "which two", statement-combination options ("ae",
                     "1, 2 & 3") that include the keyed one, or another option with the keyed text
Negations are looked for in the question's last sentence only (its "call"): a vignette's "is
unremarkable except for a rash" says nothing about what is asked.

The offline reformatter (`reformat_offline`) is for items whose stem already reads as an open
question once the options are hidden: it rewrites the call ("Which of the following is the most
likely diagnosis?" -> "What is the most likely diagnosis?", "... which of the following drugs is"
-> "... which drug is", "Most likely diagnosis is:" -> "What is the most likely diagnosis?"),
keeps the vignette word for word, and takes the keyed option's text as y*. Everything else raises
NotReformulatable (the build drops it as not_reformulatable_offline unless an LLM is configured).
"""
from __future__ import annotations

import re

from minihuatuo.services.formats import MCQItem

# ---------------------------------------------------------------------------------------------------
# rule filters

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“(])|\n+")


def call_sentence(question: str) -> tuple[int, str]:
    """(start offset, text) of the question's last sentence, where exams put what is asked."""
    q = question.rstrip()
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(q) if q[m.end():].strip()]
    return starts[-1], q[starts[-1]:]


_AUX = ("is|are|was|were|would|will|could|can|should|might|may|must|has|have|had|does|do|did")
_NEGATIVE = [
    re.compile(r"\bexcept\b", re.I),
    re.compile(r"\bNOT\b"),  # capitals: exam style for "which is NOT"
    re.compile(r"\b(?:incorrect(?:ly)?|untrue|wrong(?:ly)?|inaccurate)\b", re.I),
    re.compile(r"\bfalse\b(?![\s-]+(?:positive|negative))", re.I),  # not "false-positive result"
    re.compile(r"(?<!\bat )\bleast\s+\w+", re.I),  # "least likely"; not "at least"
    re.compile(r"\b(?:which|what)\b(?:\s+\S+){0,4}?\s+(?:(?:" + _AUX + r")\s+not\b|cannot\b|can't\b|isn't\b|"
               r"aren't\b|wouldn't\b|doesn't\b|won't\b)", re.I),  # "which of the following drugs is not"
    re.compile(r"^(?:\S+\s+){0,3}not\b", re.I),  # fragments: "Not a feature of ...", "Drug not used in ..."
]


def negative_question(item: MCQItem) -> str | None:
    _, call = call_sentence(item.question)
    for rx in _NEGATIVE:
        m = rx.search(call)
        if m:
            return m.group(0)
    return None


def _clean(option: str) -> str:
    return " ".join(option.strip().strip(".:;").split()).lower()


_AGGREGATE = re.compile(
    r"^(?:(?:all|none|both|neither)(?:\s+(?:of\s+)?(?:the\s+)?(?:above|these|them|options?|choices?|mentioned|"
    r"listed|following|answers?))?"
    r"|(?:both|neither)\s+\(?[a-z1-9]\)?\s*(?:and|&|nor|or)\s*\(?[a-z1-9]\)?"
    r"|\(?[a-z1-9]\)?\s*(?:and|&)\s*\(?[a-z1-9]\)?\s+both)$")


def aggregate_option(item: MCQItem) -> str | None:
    for k, v in item.options.items():
        if _AGGREGATE.match(_clean(v)):
            return f"option {k}: {v.strip()}"
    return None


_SELECT_MANY = re.compile(r"\b(?:select|choose|mark|pick|identify)\s+(?:all|two|three|both)\b|\ball that apply\b|"
                          r"\bwhich\s+(?:two|three)\b|\bmore than one\b", re.I)
_COMBO = re.compile(r"^\(?[a-e1-9]\)?(?:\s*(?:,|&|\band\b|\+)\s*\(?[a-e1-9]\)?)+$")


def is_combination(option: str) -> bool:
    """"ae", "abd", "a, c", "1,2 & 3": a set of statements, as in MedMCQA's "true about X:
    a) ... b) ..." items. Bare letters must be distinct and ascending ("bad" is a word)."""
    s = _clean(option)
    if re.fullmatch(r"[a-e]{2,5}", s):
        return list(s) == sorted(set(s))
    return bool(_COMBO.match(s))


def multiple_correct(item: MCQItem) -> str | None:
    m = _SELECT_MANY.search(item.question)
    if m:
        return m.group(0)
    combos = [k for k, v in item.options.items() if is_combination(v)]
    if item.answer_idx in combos and len(combos) >= 2:
        return f"options {', '.join(combos)} are combinations of statements"
    same = [k for k, v in item.options.items() if k != item.answer_idx and _clean(v) == _clean(item.answer)]
    if same:
        return f"option {', '.join(same)} has the keyed text {item.answer.strip()!r}"
    return None


def rule_filter(item: MCQItem, min_chars: int = 50) -> tuple[str, str] | None:
    """(reason, evidence) of the first rule that fires, or None."""
    if len(item.question.strip()) < min_chars:
        return "too_short", f"{len(item.question.strip())} characters < {min_chars}"
    for reason, rule in (("negative_question", negative_question), ("aggregate_option", aggregate_option),
                         ("multiple_correct", multiple_correct)):
        evidence = rule(item)
        if evidence is not None:
            return reason, evidence
    return None


# ---------------------------------------------------------------------------------------------------
# offline reformatter


class NotReformulatable(ValueError):
    """The offline rules cannot rewrite this item; the message says why."""


_WOTF = re.compile(r"\bwhich\s+(?:one\s+)?of\s+(?:the\s+following|these|the\s+options|the\s+choices)"
                   r"(?:\s+(?:options?|choices?|answers?))?\b", re.I)
_VERBS = set(_AUX.split("|")) | {"cannot", "best", "most", "least", "also", "likely", "usually", "commonly",
                                 "typically", "often", "correctly", "accurately", "explains", "describes",
                                 "represents", "indicates", "causes", "increases", "decreases", "involves",
                                 "inhibits", "characterizes", "predisposes", "contributes", "requires", "results",
                                 "occurs", "helps", "needs"}
_PREPOSITIONS = {"to", "for", "in", "on", "with", "as", "at", "from", "by", "of", "after", "before", "during",
                 "than", "into", "over", "under"}
_INTERROGATIVE = re.compile(r"\b(?:what|which|how|where|when|why|who|whom|whose)\b", re.I)
_STATEMENT_CALL = re.compile(r"^(?:what\s+(?:is|are|was|were)\s+(?:most\s+)?(?:true|correct|false|incorrect|right|"
                             r"accurate|wrong)\b|which\s+(?:statement|option|answer|choice)s?\b)", re.I)
# "drug of choice" and "treatment option" are fine; "the options", "these statements", "above" are not
_OPTION_TALK = re.compile(r"\bof the following\b|\b(?:the|these|those|given|following|listed)\s+(?:options|choices|"
                          r"statements|answers)\b|\babove\b", re.I)
_VISUAL = re.compile(r"\b(?:diagram|graph|figure|image|picture|photograph|illustration|labell?ed|x-ray shown)\b", re.I)
_FRAGMENT = re.compile(r"^(?P<np>.+?)\s+(?P<verb>is|are)$", re.I)
_FINITE = re.compile(r"\b(?:is|are|was|were|has|have|had|shows?|showed|reveals?|revealed|presents?|presented)\b",
                     re.I)


_IRREGULAR = {"indices": "index", "vertices": "vertex", "apices": "apex", "criteria": "criterion",
              "phenomena": "phenomenon", "bacteria": "bacterium", "fungi": "fungus", "nuclei": "nucleus",
              "teeth": "tooth", "feet": "foot", "women": "woman", "men": "man", "children": "child"}


def singular(word: str) -> str:
    """A rough English singular for the noun after "which of the following" ("drugs" -> "drug",
    "arteries" -> "artery", "diagnoses" -> "diagnosis"); words it does not recognise stay as they are."""
    w = word.lower()
    if w in _IRREGULAR:
        return word[0] + _IRREGULAR[w][1:]
    if w.endswith("ies") and len(w) > 4:
        return word[:-3] + "y"
    if w.endswith("oses"):
        return word[:-2] + "is"
    if w.endswith(("ches", "shes", "xes", "sses", "uses")):
        return word[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _open_call(call: str) -> str:
    c = call.strip().strip("\"'“”").strip()
    asked = c.endswith("?")
    c = re.sub(r"[\s:\-–—?.]+$", "", c)
    m = _WOTF.search(c)
    if m:  # "which of the following ..." -> "what ..." / "which <noun> ..."
        before, words = c[:m.start()], c[m.end():].split()
        if not words or words[0].lower() in _VERBS or words[0].lower() in _PREPOSITIONS:
            repl, rest = "what", words
        else:
            j = next((i for i, w in enumerate(words[:4]) if w.lower() in _VERBS), None)
            if j is None and len(words) <= 3:  # at the end: "... is most likely to show which findings"
                repl, rest = "which " + " ".join(words), []
            elif j is None:
                raise NotReformulatable(f"cannot tell the noun after 'which of the following' in {call.strip()!r}")
            else:
                repl, rest = "which " + " ".join(words[:j - 1] + [singular(words[j - 1])]), words[j:]
        c = before + (repl[0].upper() + repl[1:] if not before.strip() else repl) + "".join(" " + w for w in rest)
    elif asked or _INTERROGATIVE.match(c):  # already an open question
        if not _INTERROGATIVE.search(c):
            raise NotReformulatable(f"the question has no interrogative word: {call.strip()!r}")
    elif _FRAGMENT.match(c):  # "Most likely diagnosis is:" -> "What is the most likely diagnosis?"
        head, clause = re.match(r"^(.*[,;]\s*|)(.*)$", c).groups()
        f = _FRAGMENT.match(clause)
        np = f.group("np") if f else ""
        if not np or len(np.split()) > 14 or _FINITE.search(np):
            raise NotReformulatable(f"not a plain '<noun phrase> is' fragment: {call.strip()!r}")
        np = np if np[1:2].isupper() else np[0].lower() + np[1:]  # keep acronyms: "MMR of ..."
        if not re.match(r"(?:the|a|an|this|these|that|his|her|their|its)\b", np):
            np = "the " + np
        c = head + ("what" if head else "What") + f" {f.group('verb').lower()} {np}"
    elif c.split() and c.split()[-1].lower() in _PREPOSITIONS:  # "... is most commonly associated with:"
        c = c + " what"
    else:
        raise NotReformulatable(f"the question does not end in an open question: {call.strip()!r}")
    if _STATEMENT_CALL.match(c):
        raise NotReformulatable(f"asks which statement is true; the options are the content: {call.strip()!r}")
    if _OPTION_TALK.search(c):
        raise NotReformulatable(f"still refers to the options: {c!r}")
    return c + "?"


def reformat_offline(item: MCQItem, max_answer_chars: int = 200) -> tuple[str, str]:
    """(x, y*) by rules alone, or NotReformulatable. x is the stem with its call rewritten as an
    open question; y* is the keyed option's text (whitespace collapsed, final period dropped)."""
    if item.context or {_clean(v) for v in item.options.values()} <= {"yes", "no", "maybe"}:
        raise NotReformulatable("a yes/no question stays closed without its options")
    y = " ".join(item.answer.split()).rstrip(".").strip()
    if not y:
        raise NotReformulatable("the keyed option is empty")
    if len(y) > max_answer_chars:
        raise NotReformulatable(f"the keyed option has {len(y)} characters (> {max_answer_chars})")
    if len(y) == 1 or is_combination(y) or re.fullmatch(r"(?:box|option|choice|point|figure)\s+\w{1,2}", y, re.I):
        raise NotReformulatable(f"the keyed option {y!r} is a label, not an answer")
    if _VISUAL.search(item.question):
        raise NotReformulatable(f"refers to a picture: {_VISUAL.search(item.question).group(0)!r}")
    start, call = call_sentence(item.question)
    return item.question[:start] + _open_call(call), y
