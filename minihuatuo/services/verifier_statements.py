"""The rule verifier's statements (R1-R6): how a response splits into sentences and clauses, which
clauses can be a conclusion, which one is judged, and where its answer part starts.

Part of the rule verifier; verifier_rules.py has the overview of the rules R1-R10 and the verdict:

    split_sentences   (sentence, is_list) pairs; a run of short list lines, inline option letters
                      and a line ending in ":" with what follows it are one sentence
    statements        R1-R4, R6: the clauses that can be a conclusion, each with its answer part
    conclusion        R5: the statement judged, the conclusion the response commits to last
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from minihuatuo.services.verifier_candidates import candidates
from minihuatuo.services.verifier_mentions import mentions, word_set
from minihuatuo.services.verifier_text import STOPWORDS, AliasTable, tokens

# ----------------------------------------------------------------------------- statements (R1-R4, R6)

_NOUN = (r"(?:answers?|diagnos[ie]s|treatments?|management|therapy|therapies|investigations?|complications?|"
         r"causes?|choice|options?|drugs?|agents?|medications?|interventions?|procedures?|organisms?|culprit|"
         r"a?etiology|explanation|(?:next|first|initial|best|appropriate|immediate) steps?|"
         r"(?:best|key|diagnostic|confirmatory|initial|first|definitive|appropriate|gold standard) tests?)")
# R1 (test_r1_explicit_answer_statement_is_a_conclusion): explicit answer statements, always a
# conclusion. "the answer is X", "the most likely diagnosis is X", "the treatment of choice for this
# patient is X", "Final answer: X", "I would go with X" (the answer follows the cue) ...
_AFTER_CUE = re.compile(
    r"(?:(?:^|(?<=[\s*(]))(?:the|my|our|final|correct|best|right)\s+(?:[\w-]+\s+){0,3}?|^\W*)"
    rf"{_NOUN}(?:\s+(?:of choice|here|now|(?:for|in|to)\s+[^;:.]{{1,200}}?))?"
    r"(?:\s+(?:is|would be|will be|remains|should be|must be)|\s*[:=])(?=[\s*]|$)"
    r"|\bi(?:\s+would|'d|\s+will)?\s+(?:go with|choose|pick|opt for|diagnose|say|give|start|recommend|"
    r"treat (?:her |him |them |the patient |this patient )?with)\b", re.I)
# "the treatment is effective", "the diagnosis is challenging": a remark about the answer, not one
_REMARK = word_set("effective ineffective important necessary crucial essential critical vital needed required "
                   "successful unclear uncertain unknown challenging difficult complex limited based aimed directed "
                   "focused to that not")
# ... and "X is the most likely diagnosis", "X is the answer", "X remains the treatment of choice"
# (the answer precedes the cue)
_BEFORE_CUE = re.compile(rf"\b(?:is|are|was|would be|remains|seems|appears)\s+(?:the|my|our)\s+(?:[\w-]+\s+){{0,3}}?"
                         rf"{_NOUN}\b", re.I)
# R2 (test_r2_answering_statement_is_a_conclusion_when_it_names_a_candidate): other answering
# statements: a conclusion when they name a candidate
_ANSWERING = re.compile(r"\b(most likely|most probable|most appropriate|most common|most consistent|"
                        r"most fitting|most indicative|diagnosis|likely|probable|suggest|suggests|"
                        r"suggestive|points? (to|towards)|consistent with|indicative of|indicates?|known as|"
                        r"called|referred to as|termed|best|preferred|of choice|recommended|should be|"
                        r"is the|are the|would be|is classified|answer|highest|greatest|main|primary|first step|"
                        r"next step|initial step|first[- ]line|mainstay|actually|in fact)\b"
                        r"|^\W*(therefore|thus|hence|so|in summary|in conclusion|to summari[sz]e|overall|consequently|"
                        r"ultimately|in short|taken together)\b"
                        r"|^\W*(give|start|use|treat|prescribe|order|request|perform|arrange|administer|begin|"
                        r"commence|obtain|check|send|get|switch|choose|pick|consider|go with)\b", re.I)
# R3 (test_r3_summary_statement_is_a_conclusion_unless_it_refers_back): a summary is a conclusion
# whatever it names, unless it refers back ("this", "these")
_SUMMARY = re.compile(r"^\W*(therefore|thus|hence|in summary|in conclusion|to summari[sz]e|overall|consequently|"
                     r"ultimately|in short|taken together)\b", re.I)
_BACKREF = word_set("this these such it they that those its their")
# Words a bare answer may carry ("No, W.", "Actually W.", "W, definitely.")
_FILLER = word_set("no not yes rather actually instead definitely probably surely just so then it this that answer "
                   "wait hmm ok okay final")
# R4 (test_r4_an_abandoned_first_thought_is_never_the_conclusion): an abandoned first thought is
# never the conclusion
TENTATIVE = re.compile(r"\b(first thoughts?|thought at first|initially|at first|came to mind|comes? to mind|"
                       r"was going to|first impression|first instinct|first glance|"
                       r"i (?:first |initially )?(?:thought|considered|suspected|wondered))\b", re.I)
# ... nor is a hypothetical: "If the patient were allergic, X", "However, if that fails, X"
_HYPOTHETICAL = re.compile(r"^\W*(?:(?:however|but|and|otherwise|alternatively)\W+)?(?:if|unless|should the|in case)\b",
                           re.I)
# A clause ends at ";" and before ", but / so / therefore / ..." ("I first thought X, but the answer is Y").
CLAUSE_SPLIT = re.compile(r"\s*;\s*|,\s*(?=(?:but|so|therefore|thus|hence|however|yet|whereas)\b)", re.I)
# R6 (test_r6_the_answer_part_of_a_conclusion): an introductory phrase is context, not the answer:
# "Given fever and a cough, X is ..."
_INTRO = word_set("given considering based with in after because since as due taking looking on from regarding "
                  "according despite although though while whereas if when unless following")
_CONDITIONAL = word_set("although though while whereas if when unless")
_PRONOUN = word_set("this it that which these those they he she its here there what")
_LIST_MARK = re.compile(r"^\s*([-*•]|\d+[.)]|[A-Ea-e][.)]|\([A-Ea-e1-9]\))\s+")
# Inline option letters "A) x B) y C) z", "(a) x (b) y": a list of options (R8)
_OPTION = re.compile(r"(?:(?<=\s)|^)\(?([A-Ea-e])\)\s+|(?:(?<=\s)|^)([A-E])\.\s+(?=\S)")
# A parenthesis is an aside, listed beside what it follows: "X (W)" names two candidates, "X (its
# abbreviation)" one (R8, with the reference's own names)
_PAREN = re.compile(r"\s*[()\[\]]\s*")

# ----------------------------------------------------------------------------- sentences and clauses

def _list_line(line: str) -> bool:
    return bool(_LIST_MARK.match(line))


def _options_inline(line: str) -> str:
    """"A) x B) y C) z" -> "x / y / z": option letters in sequence (A, B, ...) list alternatives.
    A lone "E. coli" is no list: the letters must start at A and run on."""
    marks = list(_OPTION.finditer(line))
    letters = [(m.group(1) or m.group(2)).upper() for m in marks]
    if len(marks) < 2 or letters[:2] != ["A", "B"]:
        return line
    out, pos = [], 0
    for k, m in enumerate(marks):
        out.append(line[pos:m.start()])
        out.append(" " if k == 0 else " / ")
        pos = m.end()
    return "".join(out + [line[pos:]])


def split_sentences(text: str) -> list[tuple[str, bool]]:
    """(sentence, is_list). A line break ends a sentence. A run of short list lines (two or more
    bulleted, numbered or lettered lines of at most 8 words, or three or more bare lines of at most
    5 words) is one sentence whose items are joined by " / ", after the line that introduces it
    when that line ends with ":"; a line ending with ":" also takes the single line after it
    ("The answer is:\\nX")."""
    lines = [_PAREN.sub(" , ", _options_inline(x)) for x in text.splitlines() if x.strip()]
    n_words = [len(tokens(_LIST_MARK.sub("", x))) for x in lines]
    units: list[tuple[str, bool]] = []
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and _list_line(lines[j]) and n_words[j] <= 8:
            j += 1
        if j - i < 2:
            j = i
            while j < len(lines) and not _list_line(lines[j]) and 0 < n_words[j] <= 5 \
                    and not lines[j].rstrip().endswith((":", ".")):
                j += 1
            if j - i < 3:
                j = i
        if j > i:  # a list run
            joined = " / ".join(_LIST_MARK.sub("", x).strip().rstrip(".;,") for x in lines[i:j])
            if units and units[-1][0].rstrip().endswith(":"):
                units[-1] = (units[-1][0] + " " + joined, True)
            else:
                units.append((joined, True))
            i = j
            continue
        line = lines[i]
        if units and units[-1][0].rstrip().endswith(":") and not units[-1][1]:
            units[-1] = (units[-1][0] + " " + _LIST_MARK.sub("", line).strip(), _list_line(line))
        else:
            units.append((line, _list_line(line)))
        i += 1
    parts = []
    for unit, is_list in units:
        body = _LIST_MARK.sub("", unit)
        parts += [(p, is_list) for p in re.split(r"(?<=[.!?])[\"')\]*]*\s+(?=[\"'(*]*[A-Z0-9])", body) if p.strip()]
    return parts


def _intro_end(text: str, limit: int) -> int:
    """Where an introductory phrase ("Given fever and a cough, ", "In this patient, ", "While X is
    possible, ") ends within text[:limit]: after its first comma; a concession or a condition
    ("While ...", "If ...") after its last comma; 0 when the text opens with no such phrase. (A list
    inside the phrase, "Given fever, cough and crackles, X", is cut at its first comma; enumerated()
    then sees the closed list "cough and crackles, X" as no list of X's.)"""
    m = re.match(r"\W*([^\W\d_]+)", text)
    first = tokens(m.group(1)) if m else []
    if not first or first[0] not in _INTRO:
        return 0
    commas = [m.start() for m in re.finditer(",", text[:limit])]
    if commas and first[0] in _CONDITIONAL:
        return commas[-1] + 1  # "While some suggest X, around 60%, could ..., this is not definitive"
    return commas[0] + 1 if commas else 0


@dataclass
class Statement:
    """A candidate conclusion: the clause, and where its answer part starts in its sentence."""

    sentence: int
    slot: list[str]  # tokens of the answer part: from the answer's start to the end of the sentence
    clause: list[str]  # tokens of the clause's own answer part (for R2: does it name a candidate?)
    explicit: bool
    cue: bool = True  # an answering cue (not only the response's first clause)
    bare: bool = False  # no cue at all: a statement only when it is nothing but a name ("W.")
    follows: bool = False  # the answer follows its cue ("the answer is X"): what comes first is the answer


def statements(sentences: list[tuple[str, bool]]) -> list[Statement]:
    """R1-R4, R6: the statements that can be a conclusion, in order."""
    out = []
    for si, (sent, is_list) in enumerate(sentences):
        pos = 0
        bounds = []
        for m in CLAUSE_SPLIT.finditer(sent):
            bounds.append((pos, m.start()))
            pos = m.end()
        bounds.append((pos, len(sent)))
        for ci, (a, b) in enumerate(bounds):
            clause = sent[a:b]
            if not clause.strip() or TENTATIVE.search(clause) or _HYPOTHETICAL.match(clause):
                continue  # R4: "I first thought X", "initially X seemed likely", "If ..., X"
            cues = [(m.end(), "after") for m in _AFTER_CUE.finditer(clause)] + \
                   [(m.start(), "before") for m in _BEFORE_CUE.finditer(clause)]
            if cues:
                at, kind = max(cues)
                if kind == "after":
                    start = a + at
                    if tokens(sent[start:b])[:1] and tokens(sent[start:b])[0] in _REMARK:
                        cues = []  # "the treatment is effective": no answer stated
                else:  # "X is the answer": from the clause start, past an introductory phrase
                    start = a + _intro_end(clause, at)
                    if all(w in _PRONOUN or w in STOPWORDS for w in tokens(sent[start:a + at])):
                        cues = []  # "This is the treatment of choice": refers back, no new answer
                if cues:
                    out.append(Statement(si, tokens(sent[start:]), tokens(sent[start:b]), True,
                                         follows=kind == "after"))
                    continue
            cue = bool(is_list or _ANSWERING.search(clause))
            answering = cue or (si == 0 and ci == 0)
            if answering or len(tokens(clause)) <= 6:  # R2: a short clause may be a bare name ("W.")
                start = a + _intro_end(clause, len(clause))
                toks = tokens(sent[start:b])
                summary = bool(_SUMMARY.search(clause)) and not any(w in _BACKREF for w in toks)  # R3
                out.append(Statement(si, tokens(sent[start:]), toks, summary, cue, not answering))
    return out


# ----------------------------------------------------------------------------- the conclusion (R5)

def conclusion(sentences: list[tuple[str, bool]], forms, table: AliasTable) -> Statement | None:
    """R5 (test_r5_the_last_conclusion_is_judged_else_the_last_sentence): the conclusion the response
    commits to last: the last statement that is a conclusion by R1-R4; with none, the last statement
    with an answering cue (it names a candidate the tables do not know); with none, the last sentence
    that is not an abandoned thought or a hypothetical. None for a response with nothing to judge."""
    last = answering = None
    for st in statements(sentences):
        if st.bare:  # R2: a short clause without a cue counts when it is nothing but a name ("No, W.")
            spans = mentions(st.clause, forms) + candidates(st.clause, table)
            if any(all(w in STOPWORDS or w in _FILLER for w in st.clause[:a] + st.clause[b:]) for a, b in spans):
                last = st
            continue
        if st.explicit or mentions(st.clause, forms) or candidates(st.clause, table):
            last = st  # R1, R3 always; R2 when it names a candidate
        if st.cue:
            answering = st
    if last:
        return last  # R5: the last conclusion
    if answering:
        return answering  # R5: the last answering statement (it names a candidate the tables do not know)
    for si in range(len(sentences) - 1, -1, -1):  # R5: else the last sentence (R4: not an abandoned thought)
        sent = sentences[si][0]
        if not TENTATIVE.search(sent) and not _HYPOTHETICAL.match(sent):
            return Statement(si, tokens(sent), tokens(sent), False)
    return None

