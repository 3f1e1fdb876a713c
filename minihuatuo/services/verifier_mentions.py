"""The rule verifier's mentions: where a name of the reference occurs in a statement, and whether the
statement commits to it (R7).

Part of the rule verifier; verifier_rules.py has the overview of the rules R1-R10 and the verdict.
verifier_text.py gives the names of the reference (normalised tokens, alias forms, `find_form`); this
module finds them in a statement's tokens:

    spans, mentions    where a form of the reference occurs: word for word, or loosely (all its
                       content words in a short window, any order; notes/verifier.md, "The rule
                       verifier in one page", step 3)
    conjuncts          the parts of a reference of several short parts (R10)
    declared_aliases   names the response itself declares equal ("X, also known as Y")
    discounted         R7: a mention that is negated, excluded, avoided, hedged, conditional,
                       concessive or an example (discount: which of them; rejected: the first three)

and `word_set`, the normalised word lists that the rule modules write their vocabularies with.
"""
from __future__ import annotations

from minihuatuo.services.verifier_text import STOPWORDS, find_form, token_match, tokens


def word_set(words: str) -> set[str]:
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
_AVOID = word_set("avoid avoiding withhold withholding contraindicated contraindicate")
_AVOID_GAP = word_set("giving using prescribing starting use of any all")
# A negation before a mention is lifted by a finite copula between them ("the drug that cannot be
# used is X"), not by an infinitive ("unlikely to be X", "not to be X": still negated).
_COPULA = {"is", "are", "was", "were", "include", "remain", "would"}
_EXAMPLE = {"such", "like", "eg", "example", "instance", "among"}
_CONCESSIVE_START = {"while", "although", "though", "whereas", "alternatively", "another", "otherwise"}
# "X is ruled out", "X has been excluded", "X should be avoided", "X seems improbable" (R7)
_AUX_AFTER = word_set("is are was were be been being has have had should must can could would will may might seem "
                      "seems appear appears now also here therefore thus clearly definitely absolutely relatively "
                      "strictly very highly quite then so both all do does did far much")
_EXCLUDED = word_set("unlikely improbable implausible excluded ruled contraindicated avoided wrong incorrect "
                     "inappropriate dangerous harmful unsafe eliminated discarded")
_NEG_WORDS = word_set("not no never doesnt isnt arent wasnt dont didnt cannot wont shouldnt")
# "X does not fit", "X is not the answer", "X is not likely" (but "X is not typically given early": a
# property of X, the answer to a "which is NOT ..." question, is not a negation of the answer)
_NEGATED_HEAD = word_set("fit fits likely correct right consistent supported appropriate indicated recommended "
                         "answer diagnosis it option choice probable explain explains match matches")

# ----------------------------------------------------------------------------- where a name occurs

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


def spans(sent: list[str], form: tuple[str, ...], loose: bool = True) -> list[tuple[int, int]]:
    """Where `form` occurs in the sentence tokens: contiguously, or loosely (two or more essential
    words): all essential words, in any order, inside a short window, each up/down word next to the
    word it qualifies."""
    return _spans_how(sent, form, loose)[0]


def _spans_how(sent: list[str], form: tuple[str, ...], loose: bool = True) -> tuple[list[tuple[int, int]], bool]:
    """spans, and whether they are word-for-word (True) or loose (False)."""
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


def mentions(toks, forms) -> list[tuple[int, int]]:
    """The reference's mentions in toks; of overlapping ones, the longest ("acute urinary retention",
    not its alias "urinary retention" inside it). A loose match (any order, in a window) that overlaps
    a word-for-word one is dropped: it only borrows a word of the text around it ("community-acquired
    pneumonia, Mycoplasma pneumonia": "pneumonia, Mycoplasma" is no mention)."""
    exact, loose = set(), set()
    for form, lo in forms:
        found, word_for_word = _spans_how(toks, form, lo)
        (exact if word_for_word else loose).update(found)
    loose = {x for x in loose if not any(x[0] < y[1] and y[0] < x[1] for y in exact)}
    found = sorted(exact | loose, key=lambda s: (s[0], -s[1]))
    out = []
    for s in found:
        if out and s[0] < out[-1][1]:
            if s[1] > out[-1][1]:
                out[-1] = (out[-1][0], s[1])
            continue
        out.append(s)
    return out


# ----------------------------------------------------------------------------- committed to? (R7)

def discounted(sent: list[str], start: int, end: int) -> bool:
    """R7 (test_r7_the_reference_must_be_committed_to): the mention at sent[start:end] is negated,
    excluded, avoided, hedged, conditional, concessive or an example."""
    return discount(sent, start, end) is not None


# The discounts that reject a mention rather than leave it open (the hack signal's "negated")
REJECTING = ("negated", "avoided", "excluded")


def discount(sent: list[str], start: int, end: int) -> str | None:
    """Why the mention at sent[start:end] is discounted (R7): "negated", "avoided", "excluded",
    "hedged", "example", "conditional" or "concessive" (the first that applies, in this order);
    None when the statement commits to it."""
    before, after = sent[max(0, start - 5):start], sent[end:end + 6]
    for k, w in enumerate(before):  # "not X", "rather than X"; but not "cannot be used is X", "No, X", "not W but X"
        if w in _NEG_BEFORE and not any(c in _COPULA or c in (",", "but") for c in before[k + 1:]):
            return "negated"
    k = len(before) - 1
    while k >= 0 and before[k] in _AVOID_GAP:
        k -= 1
    if k >= 0 and before[k] in _AVOID:
        return "avoided"
    if _excluded_after(after):
        return "excluded"  # "X is less likely", "X was ruled out", "X is contraindicated", "X does not fit"
    # Disjunctions and hedges: "X or Y", "Y or X", "either X", "X, Y, or Z", "could be X", "possibly X"
    if after[:1] in (["or"], ["nor"]) or before[-1:] == ["or"] or "either" in sent[max(0, start - 8):start]:
        return "hedged"
    if after[:1] == [","] and "or" in sent[end:end + 10] and "and" not in sent[end:end + 10]:
        return "hedged"
    if before[-2:] in (["could", "be"], ["might", "be"], ["may", "be"]) or \
            any(w in ("possibly", "perhaps", "maybe") for w in before[-3:]):
        return "hedged"
    clause = sent[:start]  # the clause the mention is in: after the last ';' or ':'
    for sep in (";", ":"):
        if sep in clause:
            clause = clause[len(clause) - clause[::-1].index(sep):]
    recent = clause[-8:]
    marks = [k for k, w in enumerate(recent) if w in _EXAMPLE]
    if marks and not any(w in _COPULA or w in ("known", "called", "termed") for w in recent[marks[-1]:]):
        return "example"  # "such as X", "like X": an example ("the drug, such as Y, is X" is fine)
    head = [w for w in clause[:4] if w not in (",", ";", ":")]
    if head[:1] in (["if"], ["unless"]) or head[:2] in (["however", "if"], ["in", "some"]):
        return "conditional"  # a condition: "However, if ..., X might be needed"
    if head[:1] and head[0] in _CONCESSIVE_START and "," not in clause:
        return "concessive"  # the concession of "While X is possible, Y is ...": X, not Y
    return None


def rejected(sent: list[str], start: int, end: int) -> bool:
    """The mention at sent[start:end] is negated, excluded or avoided (discount: REJECTING), or
    stands under a heading that rejects it ("Contraindicated: X", "Ruled out: X", "Avoid: X"): what
    the hack signal counts as a negated answer (verifier_rules.hack_signals)."""
    if discount(sent, start, end) in REJECTING:
        return True
    if start == 0 or sent[start - 1] != ":":
        return False
    head = sent[:start - 1]  # the heading: what the clause says before the ":", one or two words
    for sep in (";", ":"):
        if sep in head:
            head = head[len(head) - head[::-1].index(sep):]
    return 0 < len(head) <= 2 and any(w in _AVOID or w in _EXCLUDED or w in _NEG_WORDS for w in head)


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
