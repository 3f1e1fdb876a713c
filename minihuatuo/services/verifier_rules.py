"""The rule verifier: does a response *commit to* the reference answer? No model, only text rules.

Paper §2 says exact match "is impractical" for medicine because of aliases. verifier_text.py
handles the names (normalisation, aliases, variants); this module decides commitment:

- A mention does not count when it is negated ("not X", "rather than X", "X is less likely"),
  hedged ("X or Y", "either X", "could be X", "possibly X", a bare list of candidates),
  conditional or concessive ("However, if ..., X"; "While X is possible, ...") or an example
  ("such as X", "like X").
- Where it must be: when the response has a concluding sentence ("Therefore", "In summary", "the
  answer is"), in such a sentence or in the first one; otherwise in the first sentence, a sentence
  that states an answer ("most likely", "is known as", "first step", ...) or a list item.
- A reference of several short parts ("A, B and C") needs every part; a long reference may match
  loosely (all its content words, any order, in a short window, up/down qualifiers bound to the
  right word, with no "or"/"not"/"like" between them).
- Names the response declares equal ("X, also known as Y") extend the alias table for that response.

Everything here is a general rule; nothing names an item of any data set. How it was developed and
what it scores on the 150 released demo items is in notes/verifier.md.
"""
from __future__ import annotations

import re

from minihuatuo.services.verifier_text import STOPWORDS, AliasTable, find_form, reference_forms, token_match, tokens

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
               "dont", "didnt", "wont", "against", "besides", "beyond", "compared"}
_COPULA = {"is", "are", "was", "were", "be", "being", "include", "includes", "remain", "remains", "would"}
_EXAMPLE = {"such", "like", "eg", "example", "instance", "among"}
_CONCESSIVE_START = {"while", "although", "though", "whereas", "alternatively", "another", "otherwise"}
_STRONG = re.compile(r"^\W*(therefore|thus|hence|so|in summary|in conclusion|to summari[sz]e|overall|"
                     r"consequently|ultimately|in short|taken together)\b|\b(final answer|the answer is|"
                     r"correct answer|answer is)\b")
_ANSWERING = re.compile(r"\b(most likely|most probable|most appropriate|most common|most consistent|"
                        r"most fitting|most indicative|diagnosis|likely|probable|suggest|suggests|"
                        r"suggestive|points? (to|towards)|consistent with|indicative of|indicates?|known as|"
                        r"called|referred to as|termed|best|preferred|of choice|recommended|should be|"
                        r"is the|are the|would be|is classified|answer|highest|greatest|main|primary|first step|next step|"
                        r"initial step|first[- ]line|mainstay)\b")
_LIST_MARK = re.compile(r"^\s*([-*•]|\d+[.)])\s+")


def split_sentences(text: str) -> list[tuple[str, bool]]:
    """(sentence, is_list_item). A line break ends a sentence: list items are claims of their own."""
    parts = []
    for line in text.splitlines():
        item = bool(_LIST_MARK.match(line))
        line = _LIST_MARK.sub("", line)
        parts += [(p, item) for p in re.split(r"(?<=[.!?])[\"')\]*]*\s+(?=[\"'(*]*[A-Z0-9])", line) if p.strip()]
    return parts


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
    found, i = [], find_form(sent, form)
    while i >= 0:
        found.append((i, i + len(form)))
        i = find_form(sent, form, i + 1)
    if found or not loose:
        return found
    content = _essential(form)
    if len(content) < 2:
        return []
    window = max(8, 2 * len(content) + 2)
    # Words of the response that would split the found words into different items ("deep veins,
    # like the femoral vein"; "X or Y"; "not X but Y") unless the reference has them too.
    splitters = (_NEG_BEFORE | _EXAMPLE | {"or", "but"}) - set(form)
    for start in range(len(sent)):
        if not any(token_match(sent[start], w) for w in content):
            continue
        span = sent[start:start + window]
        where = [min((j for j, s in enumerate(span) if token_match(s, w)), default=-1) for w in content]
        if min(where) < 0 or not _qualifiers_ok(span, content):
            continue
        end = start + max(where) + 1
        if not any(w in splitters for w in sent[start:end]):
            return [(start, end)]
    return []


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


def _discounted(sent: list[str], start: int, end: int) -> bool:
    """The mention at sent[start:end] is negated, hedged, conditional, concessive or an example."""
    before, after = sent[max(0, start - 5):start], sent[end:end + 4]
    for k, w in enumerate(before):  # "not X", "rather than X"; but not "cannot be used is X"
        if w in _NEG_BEFORE and not any(c in _COPULA for c in before[k + 1:]):
            return True
    if after[:2] in (["is", "unlikely"], ["less", "likely"], ["is", "less"], ["are", "less"],
                     ["was", "ruled"], ["is", "excluded"]) or after[:3] in (["can", "be", "ruled"],
                                                                          ["can", "be", "excluded"]):
        return True  # "X is less likely", "X was ruled out"
    # Disjunctions and hedges: "X or Y", "Y or X", "either X", "X, Y, or Z", "could be X", "possibly X"
    if after[:1] in (["or"], ["nor"]) or before[-1:] == ["or"] or "either" in sent[max(0, start - 8):start]:
        return True
    if after[:1] == [","] and "or" in sent[end:end + 10] and "and" not in sent[end:end + 10]:
        return True
    if before[-2:] in (["could", "be"], ["might", "be"], ["may", "be"]) or \
            any(w in ("possibly", "perhaps", "maybe") for w in before[-3:]):
        return True
    # A bare enumeration "A, X, B" with neither "and" nor "or": a shotgun list of candidates.
    if before[-1:] == [","] and (after[:1] == [","] or end == len(sent)) and "and" not in sent and "or" not in sent:
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


def _shotgun_lines(lines: list[list[str]]) -> set[int]:
    """Indices of short lines (<= 5 tokens) in runs of three or more: a bare list of candidates."""
    marked, run = set(), []
    for i, toks in enumerate(lines + [[""] * 99]):
        if 0 < len(toks) <= 5:
            run.append(i)
            continue
        if len(run) >= 3:
            marked.update(run)
        run = []
    return marked


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


def rule_match(response: str, reference: str, aliases: AliasTable) -> bool:
    sentences = split_sentences(response)
    toks = [tokens(s) for s, _ in sentences]
    declared = [g for t in toks for g in declared_aliases(t)]
    forms = reference_forms(reference, AliasTable(aliases.groups + declared) if declared else aliases)
    if not forms or not response.strip():
        return False
    lowered = [s.casefold() for s, _ in sentences]
    strong = {i for i, s in enumerate(lowered) if _STRONG.search(s)}
    if strong:  # concluding sentences exist: the answer is there (or first: responses lead with it)
        zone = strong | {0}
    else:
        zone = {0} | {i for i, s in enumerate(lowered) if _ANSWERING.search(s)} | \
               {i for i, (_, item) in enumerate(sentences) if item}  # a list that is the answer
    zone |= {i + 1 for i in zone if sentences[i][0].rstrip().endswith(":")}  # "The answer is:\nX"
    skip = _shotgun_lines(toks)

    def committed(part, loose) -> set[int]:  # sentences with a mention that is not discounted
        return {i for i, sent in enumerate(toks) if i not in skip and
                any(not _discounted(sent, a, b) for a, b in _spans(sent, part, loose))}

    for form, loose in forms:
        if committed(tuple(w for w in form if w not in (",", ";", ":")), loose) & zone:
            return True
        hits = [committed(part, loose) for part in conjuncts(form)]
        if hits and all(hits) and any(h & zone for h in hits):
            return True
    return False
