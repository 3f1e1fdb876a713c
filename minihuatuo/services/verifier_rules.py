"""The rule verifier: does a response *commit to* the reference answer? No model, only text rules.

Paper §2 says exact match "is impractical" for medicine because of aliases. verifier_text.py
handles the names (normalisation, aliases, variants); this module decides commitment: it judges
the conclusion the response commits to last, and credits it when that conclusion names exactly one
candidate, the reference (issue 25: a reward that cannot be gamed by listing, hedging, negating or
abandoning the answer). The rules, each with examples, are in notes/verifier.md ("The rules"); each
is tagged below with its number and its test in tests/test_hacks.py (test_rN_...):

    which statement is judged
    R1  an explicit answer statement ("the answer is X", "the most likely diagnosis is X", "X is the
        treatment of choice", "Final answer: X", "I would go with X") is a conclusion
    R2  another answering statement (the first one, one with an answering cue, an imperative "Give
        X", a bare name "No, W.") is a conclusion when it names a candidate: the reference, or a
        name of the alias tables that it commits to
    R3  a summary ("Therefore, ...", "In summary, ...") is a conclusion unless it refers back
    R4  an abandoned first thought ("I first thought X") or a hypothetical ("If ..., X") never is
    R5  the last conclusion is judged; with none, the last answering statement; else the last sentence
    R6  its answer part: after the cue to the end of the sentence ("the answer is X"), or from the
        clause start past an introductory phrase ("Given ..., X is ..."); clauses split at ";" and
        ", but / so / therefore"; a line ending in ":" takes what follows
    what it must say
    R7  the reference is named there and committed to: not negated, excluded, avoided, hedged,
        conditional, concessive or an example
    R8  ... and not one item of an enumeration ("and", "or", "/", bullets, option letters, "X (W)",
        "all of the above", three comma items, two known names)
    R9  ... and no other candidate stands beside it (a name of the tables in the same phrase, offered
        as possible too, named first after the cue, or a longer name containing it)
    R10 a reference of several short parts ("A, B and C") needs every part, one in the conclusion,
        and only its parts listed there

A candidate is any name of the alias tables (the world's: every answer of the world) and, outside
them, each item of an enumeration. Token-level matching (aliases, word families, loose matches of
long references, "X, also known as Y") is described in notes/verifier.md. Nothing here names an
item of any data set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from minihuatuo.services.verifier_text import STOPWORDS, AliasTable, find_form, reference_forms, token_match, tokens


def _norm(words: str) -> set[str]:
    """A word list in the normalised spelling of `tokens` ("does" -> "doe", "fits" -> "fit")."""
    return {t for w in words.split() for t in tokens(w)}


# A trailing phrase of place or means after these words is optional in a loose match (`_essential`).
_TRAILING = {"on", "at", "in", "during", "via", "using"}
# Words that carry no answer of their own; dropped when two other content words remain.
_GENERIC = {"serum", "plasma", "level", "value", "test", "finding", "sign", "feature", "presence",
            "disease", "disorder", "condition", "infection", "therapy", "treatment", "administration",
            "use", "patient", "process", "mechanism", "change", "effect", "due", "carry", "out", "perform",
            "do", "give", "start", "administer", "obtain", "undergo", "get", "antibody", "ab"}
_UP = {"increase", "increased", "elevated", "elevation", "high", "higher", "raised", "rise", "rising",
       "excess", "excessive", "enhanced", "hyper"}
_DOWN = {"decrease", "decreased", "low", "lower", "reduced", "reduction", "diminished", "depressed",
         "fall", "falling", "deficient", "deficiency", "loss", "hypo", "impaired", "inadequate"}
_NEG_BEFORE = {"not", "no", "nor", "neither", "without", "unlike", "except", "excluding", "exclude", "excluded",
               "instead", "than", "unlikely", "versus", "vs", "cannot", "doesnt", "isnt", "arent", "wasnt",
               "dont", "didnt", "wont", "against", "besides", "beyond", "compared", "never"}
# "avoid X", "withhold X", "avoid giving X" (but "withhold it for 5 days": the object is "it")
_AVOID = _norm("avoid avoiding withhold withholding contraindicated contraindicate")
_AVOID_GAP = _norm("giving using prescribing starting use of any all")
# A negation before a mention is lifted by a finite copula between them ("the drug that cannot be
# used is X"), not by an infinitive ("unlikely to be X", "not to be X": still negated).
_COPULA = {"is", "are", "was", "were", "include", "remain", "would"}
_EXAMPLE = {"such", "like", "eg", "example", "instance", "among"}
_CONCESSIVE_START = {"while", "although", "though", "whereas", "alternatively", "another", "otherwise"}
# "X is ruled out", "X has been excluded", "X should be avoided", "X seems improbable" (R7)
_AUX_AFTER = _norm("is are was were be been being has have had should must can could would will may might seem "
                   "seems appear appears now also here therefore thus clearly definitely absolutely relatively "
                   "strictly very highly quite then so both all do does did far much")
_EXCLUDED = _norm("unlikely improbable implausible excluded ruled contraindicated avoided wrong incorrect "
                  "inappropriate dangerous harmful unsafe eliminated discarded")
_NEG_WORDS = _norm("not no never doesnt isnt arent wasnt dont didnt cannot wont shouldnt")
# "X does not fit", "X is not the answer", "X is not likely" (but "X is not typically given early": a
# property of X, the answer to a "which is NOT ..." question, is not a negation of the answer)
_NEGATED_HEAD = _norm("fit fits likely correct right consistent supported appropriate indicated recommended "
                      "answer diagnosis it option choice probable explain explains match matches")

# ----------------------------------------------------------------------------- statements (R1-R6)

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
_REMARK = _norm("effective ineffective important necessary crucial essential critical vital needed required "
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
_BACKREF = _norm("this these such it they that those its their")
# Words a bare answer may carry ("No, W.", "Actually W.", "W, definitely.")
_FILLER = _norm("no not yes rather actually instead definitely probably surely just so then it this that answer "
                "wait hmm ok okay final")
# Near another candidate, these make it an alternative on offer ("W is also possible", "maybe W")
_HEDGE_NEAR = _norm("also possible possibly alternatively maybe might could perhaps differential another either")
# R4 (test_r4_an_abandoned_first_thought_is_never_the_conclusion): an abandoned first thought is
# never the conclusion
_TENTATIVE = re.compile(r"\b(first thoughts?|thought at first|initially|at first|came to mind|comes? to mind|"
                        r"was going to|first impression|first instinct|first glance|"
                        r"i (?:first |initially )?(?:thought|considered|suspected|wondered))\b", re.I)
# ... nor is a hypothetical: "If the patient were allergic, X", "However, if that fails, X"
_HYPOTHETICAL = re.compile(r"^\W*(?:(?:however|but|and|otherwise|alternatively)\W+)?(?:if|unless|should the|in case)\b",
                           re.I)
# A clause ends at ";" and before ", but / so / therefore / ..." ("I first thought X, but the answer is Y").
_CLAUSE_SPLIT = re.compile(r"\s*;\s*|,\s*(?=(?:but|so|therefore|thus|hence|however|yet|whereas)\b)", re.I)
# R6 (test_r6_the_answer_part_of_a_conclusion): an introductory phrase is context, not the answer:
# "Given fever and a cough, X is ..."
_INTRO = _norm("given considering based with in after because since as due taking looking on from regarding "
               "according despite although though while whereas if when unless following")
_CONDITIONAL = _norm("although though while whereas if when unless")
_PRONOUN = _norm("this it that which these those they he she its here there what")
_LIST_MARK = re.compile(r"^\s*([-*•]|\d+[.)]|[A-Ea-e][.)]|\([A-Ea-e1-9]\))\s+")
# Inline option letters "A) x B) y C) z", "(a) x (b) y": a list of options (R8)
_OPTION = re.compile(r"(?:(?<=\s)|^)\(?([A-Ea-e])\)\s+|(?:(?<=\s)|^)([A-E])\.\s+(?=\S)")
# A parenthesis is an aside, listed beside what it follows: "X (W)" names two candidates, "X (its
# abbreviation)" one (R8, with the reference's own names)
_PAREN = re.compile(r"\s*[()\[\]]\s*")
_ALL_OF = re.compile(r"\b(all|any|none|each|either) of (the above|them|these|those|the options)\b|\ball the above\b",
                     re.I)

# ----------------------------------------------------------------------------- enumerations (R8)

_SEPS = {",", "/", "and", "or", "nor", "plus", "versus", "vs"}
_JOINS = _SEPS - {","}
# Words that show a neighbour is a clause, not another item of a list ("X, which fits ...", "X and
# the treatment is Y", "X, given the fever").
_CLAUSE_WORDS = _norm(
    "is are was were be been being has have had do does did should must may might can could would will shall "
    "which who whom whose that because since as given due this these those it its he she they we i you his her "
    "their there then so therefore thus hence not no if when while although though also such like especially "
    "including particularly where whereas but however seem appear suggest indicate fit explain caused lead "
    "leading result resulting associated characterized known called involve involving require requiring need "
    "needed make making remain rather than instead")


def _content(form) -> list[str]:
    words = [w for w in form if w not in STOPWORDS]
    core = [w for w in words if w not in _GENERIC]
    return core if len(core) >= 2 else words


def _essential(form) -> list[str]:
    """The content words a loose match must find: all of them, except a trailing phrase of place
    or means ("T-wave flattening on ECG", "permeation ... at the periphery") once two content
    words come before it."""
    for k, w in enumerate(form):
        if w in _TRAILING and len([c for c in _content(form[:k]) if c not in _GENERIC]) >= 2:
            return _content(form[:k])
    return _content(form)


def conjuncts(form: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The parts of a reference that lists several short things ("apnea, hypoglycemia and
    hypoxia", "decreased estradiol and increased LH"); [] when it is one thing ("difference in
    surfactant during inspiration and expiration": a part of four content words is a phrase)."""
    parts, cur = [], []
    for w in form:
        if w in ("and", "plus", ",", ";"):
            parts.append(tuple(cur))
            cur = []
        else:
            cur.append(w)
    parts = [p for p in parts + [tuple(cur)] if _content(p)]
    return parts if len(parts) >= 2 and all(len(_content(p)) <= 3 for p in parts) else []


def _polarity(w: str) -> str | None:
    return "up" if w in _UP else "down" if w in _DOWN else None


def _spans(sent: list[str], form: tuple[str, ...], loose: bool = True) -> list[tuple[int, int]]:
    """Where `form` occurs in the sentence tokens: contiguously, or loosely (two or more essential
    words): all essential words, in any order, inside a short window, each up/down word next to the
    word it qualifies."""
    return _spans_how(sent, form, loose)[0]


def _spans_how(sent: list[str], form: tuple[str, ...], loose: bool = True) -> tuple[list[tuple[int, int]], bool]:
    """_spans, and whether they are word-for-word (True) or loose (False)."""
    if not form:
        return [], True
    firsts = {t[:1] for t in sent}

    def possible(words):  # token_match needs the same first letter, except for numbers and ranges
        return all(w[:1] in firsts or w[:1].isdigit() for w in words)

    exact = possible(form)
    if not exact and not (loose and possible(_essential(form))):
        return [], True
    found, i = [], find_form(sent, form) if exact else -1
    while i >= 0:
        found.append((i, i + len(form)))
        i = find_form(sent, form, i + 1)
    if found or not loose:
        return found, True
    content = _essential(form)
    if len(content) < 2:
        return [], True
    window = max(8, 2 * len(content) + 2)
    # Words of the response that would split the found words into different items ("deep veins,
    # like the femoral vein"; "X or Y"; "not X but Y") unless the reference has them too.
    splitters = (_NEG_BEFORE | _EXAMPLE | {"or", "but", ";", ":", "/"}) - set(form)
    for start in range(len(sent)):
        if not any(token_match(sent[start], w) for w in content):
            continue
        span = sent[start:start + window]
        where = [min((j for j, s in enumerate(span) if token_match(s, w)), default=-1) for w in content]
        if min(where) < 0 or not _qualifiers_ok(span, content):
            continue
        end = start + max(where) + 1
        if not any(w in splitters for w in sent[start:end]):
            return [(start, end)], False
    return [], True


def _qualifiers_ok(span: list[str], content: list[str]) -> bool:
    """Each up/down word of the form must sit within 2 tokens of the content word that follows it
    in the form, so "decreased estradiol and increased LH" does not match "increased estradiol and
    decreased LH"."""
    for k, w in enumerate(content[:-1]):
        pol = _polarity(w)
        if pol is None:
            continue
        spots = [j for j, s in enumerate(span) if token_match(s, content[k + 1])]
        if not any(_polarity(span[j2]) == pol for j in spots for j2 in range(max(0, j - 2), min(len(span), j + 3))):
            return False
    return True




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
        for m in _CLAUSE_SPLIT.finditer(sent):
            bounds.append((pos, m.start()))
            pos = m.end()
        bounds.append((pos, len(sent)))
        for ci, (a, b) in enumerate(bounds):
            clause = sent[a:b]
            if not clause.strip() or _TENTATIVE.search(clause) or _HYPOTHETICAL.match(clause):
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


def _discounted(sent: list[str], start: int, end: int) -> bool:
    """R7 (test_r7_the_reference_must_be_committed_to): the mention at sent[start:end] is negated,
    excluded, avoided, hedged, conditional, concessive or an example."""
    before, after = sent[max(0, start - 5):start], sent[end:end + 6]
    for k, w in enumerate(before):  # "not X", "rather than X"; but not "cannot be used is X", "No, X", "not W but X"
        if w in _NEG_BEFORE and not any(c in _COPULA or c in (",", "but") for c in before[k + 1:]):
            return True
    k = len(before) - 1
    while k >= 0 and before[k] in _AVOID_GAP:
        k -= 1
    if k >= 0 and before[k] in _AVOID:
        return True
    if _excluded_after(after):
        return True  # "X is less likely", "X was ruled out", "X is contraindicated", "X does not fit"
    # Disjunctions and hedges: "X or Y", "Y or X", "either X", "X, Y, or Z", "could be X", "possibly X"
    if after[:1] in (["or"], ["nor"]) or before[-1:] == ["or"] or "either" in sent[max(0, start - 8):start]:
        return True
    if after[:1] == [","] and "or" in sent[end:end + 10] and "and" not in sent[end:end + 10]:
        return True
    if before[-2:] in (["could", "be"], ["might", "be"], ["may", "be"]) or \
            any(w in ("possibly", "perhaps", "maybe") for w in before[-3:]):
        return True
    clause = sent[:start]  # the clause the mention is in: after the last ';' or ':'
    for sep in (";", ":"):
        if sep in clause:
            clause = clause[len(clause) - clause[::-1].index(sep):]
    recent = clause[-8:]
    marks = [k for k, w in enumerate(recent) if w in _EXAMPLE]
    if marks and not any(w in _COPULA or w in ("known", "called", "termed") for w in recent[marks[-1]:]):
        return True  # "such as X", "like X": an example ("the drug, such as Y, is X" is fine)
    head = [w for w in clause[:4] if w not in (",", ";", ":")]
    if head[:1] in (["if"], ["unless"]) or head[:2] in (["however", "if"], ["in", "some"]):
        return True  # a condition: "However, if ..., X might be needed"
    if head[:1] and head[0] in _CONCESSIVE_START and "," not in clause:
        return True  # the concession of "While X is possible, Y is ...": X, not Y
    return False


def _excluded_after(after: list[str]) -> bool:
    k = 0
    while k < len(after) and after[k] in _AUX_AFTER:
        k += 1
    if k >= len(after):
        return False
    if after[k] in _EXCLUDED or after[k:k + 2] in (["less", "likely"], ["less", "probable"]):
        return True
    return after[k] in _NEG_WORDS and any(w in _NEGATED_HEAD for w in after[k + 1:k + 3])


def declared_aliases(toks: list[str]) -> list[tuple[tuple[str, ...], ...]]:
    """Names the response itself declares equal: "MYCL1 oncogene, also known as L-myc"."""
    groups = []
    for k in range(len(toks)):
        n = 3 if toks[k:k + 3] == ["also", "known", "as"] else 2 if toks[k:k + 2] == ["also", "called"] else 0
        if not n:
            continue
        left, right = [], []
        for w in reversed(toks[max(0, k - 5):k]):  # the noun phrase before the marker
            if w in (";", ":") or w in STOPWORDS and w != ",":
                break
            if w != ",":
                left.insert(0, w)
        for w in toks[k + n:k + n + 5]:  # and the one after it
            if w in STOPWORDS:
                break
            right.append(w)
        if left and right:
            groups.append((tuple(left[-4:]), tuple(right)))
    return groups


# ----------------------------------------------------------------------------- candidates (R8, R9)

def _names(toks: list[str], table: AliasTable) -> list[tuple[int, int, tuple]]:
    """(start, end, group) of the names of the alias tables in toks (word for word): the candidates
    the tables know."""
    out = []
    for i, w in enumerate(toks):
        for name, group in table.by_first.get(w, ()):
            if tuple(toks[i:i + len(name)]) == name:
                out.append((i, i + len(name), group))
    return out


# After an item, a singular or modal verb starts a new clause ("X and the treatment is Y": no list);
# "A and X are the causes" is a list.
_VERBS = _norm("is was has does did should must may might can could would will shall")
# Words after which a right-hand item is complete ("X and Y, which ..."); any other clause word after
# it ("X and ensure no ...") leaves it unproven, unless it is a name of the alias tables.
_ITEM_END = _norm("which who whose given as because since due are were that being")


def _neighbours(toks: list[str], a: int, b: int, step: int, known=None) -> list[tuple[set, tuple[str, ...]]]:
    """The items listed next to toks[a:b], walking left (step -1) or right (+1): (separators
    crossed, item) pairs. An item is a phrase of at most 6 words; it ends at a separator, at ";" or
    ":", or at a clause word ("is", "which", "given", ...). Walking right, an item followed by a
    singular or modal verb is the subject of a new clause and ends the walk, and an item followed by
    another clause word must be a known name (known(item)) or end at one of _ITEM_END."""
    chain, i = [], a - 1 if step < 0 else b
    while 0 <= i < len(toks):
        seps = set()
        while 0 <= i < len(toks) and toks[i] in _SEPS:
            seps.add(toks[i])
            i += step
        if not seps:
            break
        item = []
        while 0 <= i < len(toks) and toks[i] not in _SEPS and toks[i] not in (";", ":") \
                and toks[i] not in _CLAUSE_WORDS and len(item) <= 6:
            item.append(toks[i])
            i += step
        if step < 0:
            item.reverse()
        if not item or len(item) > 6:
            break
        if step > 0 and 0 <= i < len(toks) and toks[i] in _CLAUSE_WORDS:
            if toks[i] in _VERBS or not (toks[i] in _ITEM_END or (known and known(item))):
                break
        chain.append((seps, tuple(item)))
        if 0 <= i < len(toks) and toks[i] not in _SEPS:
            break  # the item ended at a clause word: so does the list
    return chain


def enumerated(toks: list[str], a: int, b: int, known, part=None) -> bool:
    """R8 (test_r8_the_reference_is_not_one_item_of_a_list): toks[a:b] is one item of an enumeration:
    joined to a neighbour by "and", "or", "/", "nor", "plus", "versus"; or one of three or more
    comma-separated items ("A, B, X"); or one of two when both are names of the alias tables ("A, X").
    A comma alone is otherwise no list ("Given the fever, X is ...", "X, a gram-positive coccus"), nor
    is a comma after a closed list ("fever and cough, X"). known(item) -> the item is a name of the
    alias tables; part(item) -> it belongs to the reference itself (its other names; R10's parts)."""
    left, right = _neighbours(toks, a, b, -1), _neighbours(toks, a, b, +1, known)
    if part is not None:  # the reference's own names and parts are no other item ("FNAC (fine needle ...)")
        left, right = [(s, i) for s, i in left if not part(i)], [(s, i) for s, i in right if not part(i)]
    if left and left[0][0] == {","} and len(left) > 1 and left[1][0] & _JOINS:
        left = []  # "fever and cough, X": the list before the comma was closed
    chain = left + right
    if not chain:
        return False
    return len(chain) >= 2 or bool(chain[0][0] & _JOINS) or (known(toks[a:b]) and known(chain[0][1]))


def _phrase(toks: list[str], a: int, b: int) -> tuple[int, int]:
    """The phrase around toks[a:b]: up to the nearest clause word, ";" or ":" on either side (R9)."""
    lo, hi = a, b
    while lo > 0 and toks[lo - 1] not in _CLAUSE_WORDS and toks[lo - 1] not in (";", ":"):
        lo -= 1
    while hi < len(toks) and toks[hi] not in _CLAUSE_WORDS and toks[hi] not in (";", ":"):
        hi += 1
    return lo, hi


# ----------------------------------------------------------------------------- the verdict

SEPARATORS = (",", ";", ":", "/")


def _mentions(toks, forms) -> list[tuple[int, int]]:
    """The reference's mentions in toks; of overlapping ones, the longest ("acute urinary retention",
    not its alias "urinary retention" inside it). A loose match (any order, in a window) that overlaps
    a word-for-word one is dropped: it only borrows a word of the text around it ("community-acquired
    pneumonia, Mycoplasma pneumonia": "pneumonia, Mycoplasma" is no mention)."""
    exact, loose = set(), set()
    for form, lo in forms:
        found, word_for_word = _spans_how(toks, form, lo)
        (exact if word_for_word else loose).update(found)
    loose = {x for x in loose if not any(x[0] < y[1] and y[0] < x[1] for y in exact)}
    spans = sorted(exact | loose, key=lambda s: (s[0], -s[1]))
    out = []
    for s in spans:
        if out and s[0] < out[-1][1]:
            if s[1] > out[-1][1]:
                out[-1] = (out[-1][0], s[1])
            continue
        out.append(s)
    return out


def conclusion(sentences: list[tuple[str, bool]], forms, table: AliasTable) -> Statement | None:
    """R5 (test_r5_the_last_conclusion_is_judged_else_the_last_sentence): the conclusion the response
    commits to last: the last statement that is a conclusion by R1-R4; with none, the last statement
    with an answering cue (it names a candidate the tables do not know); with none, the last sentence
    that is not an abandoned thought or a hypothetical. None for a response with nothing to judge."""
    last = answering = None
    for st in statements(sentences):
        if st.bare:  # R2: a short clause without a cue counts when it is nothing but a name ("No, W.")
            spans = _mentions(st.clause, forms) + _candidates(st.clause, table)
            if any(all(w in STOPWORDS or w in _FILLER for w in st.clause[:a] + st.clause[b:]) for a, b in spans):
                last = st
            continue
        if st.explicit or _mentions(st.clause, forms) or _candidates(st.clause, table):
            last = st  # R1, R3 always; R2 when it names a candidate
        if st.cue:
            answering = st
    if last:
        return last  # R5: the last conclusion
    if answering:
        return answering  # R5: the last answering statement (it names a candidate the tables do not know)
    for si in range(len(sentences) - 1, -1, -1):  # R5: else the last sentence (R4: not an abandoned thought)
        sent = sentences[si][0]
        if not _TENTATIVE.search(sent) and not _HYPOTHETICAL.match(sent):
            return Statement(si, tokens(sent), tokens(sent), False)
    return None


# ... but "consistent with X", "points to X", "treat with X", "known as X" state the answer
_CUE_HEADS = _norm("consistent suggestive indicative point points pointing treat treated go known referred "
                   "diagnosed diagnosis start started")
_PREPOSITIONS = _norm("of with in from by for to including like such as after during despite without than via "
                      "among between on at about")


def _candidates(toks: list[str], table: AliasTable) -> list[tuple[int, int]]:
    """R2: the names of the alias tables that a statement commits to: not discounted, and not context
    in a phrase or list that follows a preposition ("her symptoms of amenorrhea, headaches and ...")."""
    out = []
    for o0, o1, _ in _names(toks, table):
        i = o0
        while i > 0 and (toks[i - 1] in _SEPS or toks[i - 1] not in _CLAUSE_WORDS and toks[i - 1] not in _PREPOSITIONS
                         and toks[i - 1] not in (";", ":")):
            i -= 1
        if (i > 0 and toks[i - 1] in _PREPOSITIONS and not (i > 1 and toks[i - 2] in _CUE_HEADS)) \
                or _discounted(toks, o0, o1):
            continue
        out.append((o0, o1))
    return out


def rule_match(response: str, reference: str, aliases: AliasTable) -> bool:
    if not response.strip():
        return False
    sentences = split_sentences(response)
    if not sentences:
        return False
    declared = [g for s, _ in sentences for g in declared_aliases(tokens(s))]
    table = AliasTable(aliases.groups + declared) if declared else aliases
    raw = reference_forms(reference, table)
    if not raw:
        return False
    forms = [(tuple(w for w in f if w not in SEPARATORS), loose) for f, loose in raw]
    parts = [(p, loose) for f, loose in raw for p in conjuncts(f)]  # R10: naming a part names the reference
    st = conclusion(sentences, forms + parts, table)
    if st is None:
        return False
    slot = st.slot
    if _ALL_OF.search(" ".join(slot)):
        return False  # R8: "all of the above", "any of these"
    names = _names(slot, table)
    refs = _mentions(slot, forms)

    def overlaps(x, y):
        return x[0] < y[1] and y[0] < x[1]

    # names of the reference's own groups are the reference; names the response declares equal to
    # something ("G0 phase, also known as the resting phase") are no other candidate
    ref_groups = {id(g) for o0, o1, g in names if any(r[0] <= o0 and o1 <= r[1] for r in refs)}
    ref_groups |= {id(g) for g in declared}
    others = [(o0, o1) for o0, o1, g in names if id(g) not in ref_groups]
    first = [o for o in _candidates(slot, table) if o in others] if st.follows else []

    def known(item):
        return any(tuple(item) == name for name, _ in table.by_first.get(item[0], ())) if item else False

    def own(item):  # a name of the reference itself ("acute kidney injury (AKI)")
        return bool(_mentions(list(item), forms)) or any(
            id(g) in ref_groups for name, g in table.by_first.get(item[0], ()) if tuple(item) == name)

    for r in refs:
        if _discounted(slot, *r):
            continue  # R7
        # R9 (test_r9_no_other_candidate_beside_the_reference): a longer name containing the mention is
        # another candidate ("ciprofloxacin with metronidazole")
        if any(o[0] <= r[0] and r[1] <= o[1] and o != r for o in others):
            continue
        lo, hi = _phrase(slot, *r)
        if any(lo <= o[0] and o[1] <= hi and not overlaps(o, r) and o[1] != r[0] and o[0] != r[1]
               and not _discounted(slot, *o) for o in others):
            continue  # R9: another candidate in the same phrase (one that abuts it modifies it: "IV X")
        if any(not overlaps(o, r) and not _discounted(slot, *o) and _HEDGE_NEAR & set(slot[max(0, o[0] - 3):o[1] + 4])
               for o in others):
            continue  # R9: another candidate offered as possible too ("X, though W is also possible")
        if any(o[1] <= r[0] for o in first):
            continue  # R9: another candidate is named first; X comes after as context ("W, given X")
        if enumerated(slot, *r, known, own):
            continue  # R8
        return True
    return _parts_match(raw, slot, sentences, table)


def _parts_match(raw, slot, sentences, table) -> bool:
    """R10 (test_r10_a_reference_of_several_parts_needs_every_part): a reference of several short
    parts ("A, B and C"): every part committed somewhere in the response (not in an abandoned first
    thought), at least one in the conclusion, whose enumeration there may hold only parts."""
    clauses = None
    for form, loose in raw:
        parts = conjuncts(form)
        if not parts:
            continue
        if clauses is None:
            clauses = [tokens(c) for s, _ in sentences for c in _CLAUSE_SPLIT.split(s) if not _TENTATIVE.search(c)]

        def part(item, parts=parts, loose=loose):
            return any(_spans(list(item), p, loose) for p in parts)

        def known(item):
            return any(tuple(item) == name for name, _ in table.by_first.get(item[0], ())) if item else False

        in_slot = [(a, b) for p in parts for a, b in _spans(slot, p, loose) if not _discounted(slot, a, b)]
        if not in_slot or any(enumerated(slot, a, b, known, part) for a, b in in_slot):
            continue
        if all(any(not _discounted(t, a, b) for t in clauses for a, b in _spans(t, p, loose)) for p in parts):
            return True
    return False
