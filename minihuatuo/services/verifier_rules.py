"""The rule verifier: does a response *commit to* the reference answer? No model, only text rules.

Paper §2 says exact match "is impractical" for medicine because of aliases. verifier_text.py
handles the names (normalisation, aliases, variants); the rule modules decide commitment: they judge
the conclusion the response commits to last, and credit it when that conclusion names exactly one
candidate, the reference (issue 25: a reward that cannot be gamed by listing, hedging, negating or
abandoning the answer). The rules, each with examples, are in notes/verifier.md ("The rules"); each
is tagged where it is coded with its number and its test in tests/test_hacks.py (test_rN_...):

    which statement is judged                                               verifier_statements.py
    R1  an explicit answer statement ("the answer is X", "the most likely diagnosis is X", "X is the
        treatment of choice", "Final answer: X", "I would go with X") is a conclusion
    R2  another answering statement (the first one, one with an answering cue, an imperative "Give
        X", a bare name "No, W.") is a conclusion when it names a candidate: the reference, or a
        name of the alias tables that it commits to (verifier_candidates.candidates)
    R3  a summary ("Therefore, ...", "In summary, ...") is a conclusion unless it refers back
    R4  an abandoned first thought ("I first thought X") or a hypothetical ("If ..., X") never is
    R5  the last conclusion is judged; with none, the last answering statement; else the last sentence
    R6  its answer part: after the cue to the end of the sentence ("the answer is X"), or from the
        clause start past an introductory phrase ("Given ..., X is ..."); clauses split at ";" and
        ", but / so / therefore"; a line ending in ":" takes what follows
    what it must say                                                         here, rule_match
    R7  the reference is named there and committed to: not negated, excluded, avoided, hedged,
        conditional, concessive or an example                               verifier_mentions.py
    R8  ... and not one item of an enumeration ("and", "or", "/", bullets, option letters, "X (W)",
        "all of the above", three comma items, two known names)             verifier_candidates.py
    R9  ... and no other candidate stands beside it (a name of the tables in the same phrase, offered
        as possible too, named first after the cue, or a longer name containing it)
    R10 a reference of several short parts ("A, B and C") needs every part, one in the conclusion,
        and only its parts listed there                                     here, _parts_match

A candidate is any name of the alias tables (the world's: every answer of the world) and, outside
them, each item of an enumeration. Token-level matching (aliases, word families, loose matches of
long references, "X, also known as Y") is described in notes/verifier.md. Nothing here names an
item of any data set.
"""
from __future__ import annotations

from typing import NamedTuple

from minihuatuo.services.verifier_candidates import (
    ALL_OF,
    candidates,
    context_at,
    enumerated,
    phrase,
    plain_word,
    table_names,
)
from minihuatuo.services.verifier_mentions import (
    conjuncts,
    declared_aliases,
    discount,
    discounted,
    mentions,
    rejected,
    spans,
    word_set,
)
from minihuatuo.services.verifier_statements import CLAUSE_SPLIT, TENTATIVE, Statement, conclusion, split_sentences
from minihuatuo.services.verifier_text import AliasTable, reference_forms, tokens

SEPARATORS = (",", ";", ":", "/")
# Near another candidate, these make it an alternative on offer ("W is also possible", "maybe W")
_HEDGE_NEAR = word_set("also possible possibly alternatively maybe might could perhaps differential another either")
# "one of X, W", "any of X or W": the list after "of" is offered, not context (hack_signals)
_QUANTIFIERS = word_set("one any all either each none both some several")


class _Reading(NamedTuple):
    """What rule_match and hack_signals read from a response, for one reference."""

    sentences: list[tuple[str, bool]]
    declared: list  # alias groups the response declares itself ("X, also known as Y")
    table: AliasTable  # the alias tables plus the declared groups
    raw: list  # the reference's forms (verifier_text.reference_forms)
    forms: list  # ... without separators: what a mention of the reference matches
    parts: list  # R10: the parts of a reference of several short parts, as forms
    st: Statement | None  # R5: the conclusion judged; None when there is nothing to judge


def _read(response: str, reference: str, aliases: AliasTable) -> _Reading:
    sentences = split_sentences(response) if response.strip() else []
    declared = [g for s, _ in sentences for g in declared_aliases(tokens(s))]
    table = AliasTable(aliases.groups + declared) if declared else aliases
    raw = reference_forms(reference, table) if sentences else []
    forms = [(tuple(w for w in f if w not in SEPARATORS), loose) for f, loose in raw]
    parts = [(p, loose) for f, loose in raw for p in conjuncts(f)]  # R10: naming a part names the reference
    st = conclusion(sentences, forms + parts, table) if sentences else None
    return _Reading(sentences, declared, table, raw, forms, parts, st)


def _is_name(table: AliasTable, item) -> bool:
    """The words of `item` are a name of the alias tables, word for word."""
    return any(tuple(item) == name for name, _ in table.by_first.get(item[0], ())) if item else False


# ----------------------------------------------------------------------------- the verdict

def rule_match(response: str, reference: str, aliases: AliasTable) -> bool:
    """The rule verifier's verdict: the conclusion the response commits to last (R1-R6) names the
    reference, committed to (R7), as the one candidate (R8, R9); or every part of it (R10)."""
    rd = _read(response, reference, aliases)
    if not rd.raw or rd.st is None:
        return False
    sentences, declared, table, raw, forms, st = rd.sentences, rd.declared, rd.table, rd.raw, rd.forms, rd.st
    slot = st.slot
    if ALL_OF.search(" ".join(slot)):
        return False  # R8: "all of the above", "any of these"
    names = table_names(slot, table)
    refs = mentions(slot, forms)

    def overlaps(x, y):
        return x[0] < y[1] and y[0] < x[1]

    # names of the reference's own groups are the reference; names the response declares equal to
    # something ("G0 phase, also known as the resting phase") are no other candidate
    ref_groups = {id(g) for o0, o1, g in names if any(r[0] <= o0 and o1 <= r[1] for r in refs)}
    ref_groups |= {id(g) for g in declared}
    others = [(o0, o1) for o0, o1, g in names if id(g) not in ref_groups]
    first = [o for o in candidates(slot, table) if o in others] if st.follows else []

    def known(item):
        return _is_name(table, item)

    def own(item):  # a name of the reference itself ("acute kidney injury (AKI)")
        return bool(mentions(list(item), forms)) or any(
            id(g) in ref_groups for name, g in table.by_first.get(item[0], ()) if tuple(item) == name)

    for r in refs:
        if discounted(slot, *r):
            continue  # R7
        # R9 (test_r9_no_other_candidate_beside_the_reference): a longer name containing the mention is
        # another candidate ("ciprofloxacin with metronidazole")
        if any(o[0] <= r[0] and r[1] <= o[1] and o != r for o in others):
            continue
        lo, hi = phrase(slot, *r)
        if any(lo <= o[0] and o[1] <= hi and not overlaps(o, r) and o[1] != r[0] and o[0] != r[1]
               and not discounted(slot, *o) for o in others):
            continue  # R9: another candidate in the same phrase (one that abuts it modifies it: "IV X")
        if any(not overlaps(o, r) and not discounted(slot, *o) and _HEDGE_NEAR & set(slot[max(0, o[0] - 3):o[1] + 4])
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
            clauses = [tokens(c) for s, _ in sentences for c in CLAUSE_SPLIT.split(s) if not TENTATIVE.search(c)]

        def part(item, parts=parts, loose=loose):
            return any(spans(list(item), p, loose) for p in parts)

        def known(item):
            return _is_name(table, item)

        in_slot = [(a, b) for p in parts for a, b in spans(slot, p, loose) if not discounted(slot, a, b)]
        if not in_slot or any(enumerated(slot, a, b, known, part) for a, b in in_slot):
            continue
        if all(any(not discounted(t, a, b) for t in clauses for a, b in spans(t, p, loose)) for p in parts):
            return True
    return False


# ----------------------------------------------------------------------------- hack signals

def hack_signals(response: str, reference: str, aliases: AliasTable) -> dict[str, bool]:
    """The demo's hack signals (issue 25, point 3: "the share of graded final responses that name more
    than one candidate or negate the answer they contain"), read with rule_match's machinery. They
    describe the response, not its verdict, and hold whatever the reference:

    several_candidates  the judged conclusion (R5; with none, the whole response) offers more than
                        one candidate: "all of the above", a name of the tables or of the reference
                        that is one item of an enumeration (R8: "and", "or", "/", bullets, option
                        letters, "X (W)"), or two different candidates committed to or hedged
                        between ("X, though W is also possible", "possibly X, possibly W")
    negated             the reference is named somewhere with a negation, exclusion or avoidance
                        attached (R7: "not X", "X is ruled out / unlikely / contraindicated / does
                        not fit", "avoid X"; or under a heading: "Contraindicated: X")
    abandoned           the reference is a first thought the response gives up (R4: "I first thought
                        X", "Initially X seemed likely") and its conclusion does not name it

    An honest answer, right or wrong, that names one candidate raises none, also beside a rejected
    one ("X rather than W", "X; W does not fit"); one that names the reference only to reject it
    raises negated ("W rather than X", X the reference)."""
    rd = _read(response, reference, aliases)
    own_forms = rd.forms + rd.parts
    slots = [rd.st.slot] if rd.st is not None else [tokens(s) for s, _ in rd.sentences]
    offered, listed = [], False
    for slot in slots:
        keys, in_list = _offered(slot, rd, own_forms)
        offered += keys
        listed = listed or in_list
    several = listed or len(_merge(offered)) >= 2
    negated = any(rejected(t, a, b) for t in (tokens(s) for s, _ in rd.sentences) for a, b in mentions(t, own_forms))
    first_thoughts = [tokens(c) for s, _ in rd.sentences for c in CLAUSE_SPLIT.split(s) if TENTATIVE.search(c)]
    concluded = rd.st is not None and any(not rejected(rd.st.slot, a, b) for a, b in mentions(rd.st.slot, own_forms))
    abandoned = not concluded and any(mentions(t, own_forms) for t in first_thoughts)
    return {"several_candidates": several, "negated": negated, "abandoned": abandoned}


def is_hack(response: str, reference: str, aliases: AliasTable) -> bool:
    """Any hack signal (hack_signals): what the demo's hack rate counts."""
    return any(hack_signals(response, reference, aliases).values())


def _offered(slot: list[str], rd: _Reading, own_forms) -> tuple[list[set], bool]:
    """The candidates `slot` offers, each as a set of keys (ids of its alias groups; "ref" for the
    reference), and whether a list offers several (R8). Offered: the reference or a name of the
    tables, not rejected (negated, excluded, avoided) nor discounted as a condition, a concession or
    an example (hedged ones count: "X or W"), nor context after a preposition ("given her history of
    W"; but "one of X, W" offers them). Listed: an offered name, or the reference anywhere, is one
    item of an enumeration ("the answer is X (W)", "(a) W of V (b) X")."""
    if ALL_OF.search(" ".join(slot)):
        return [], True  # R8: "all of the above"
    refs = mentions(slot, own_forms)
    names = [(o0, o1, g) for o0, o1, g in table_names(slot, rd.table) if not plain_word(tuple(slot[o0:o1]))]
    ref_groups = {id(g) for o0, o1, g in names if any(a <= o0 and o1 <= b for a, b in refs)}
    found = [(a, b, {"ref"}) for a, b in refs] + [(o0, o1, {"ref" if id(g) in ref_groups else id(g)})
                                                  for o0, o1, g in names]
    # Overlapping spans are one name ("acute urinary retention" holds "urinary retention"); so are
    # parts of the reference joined by "," or "and" ("CT of the kidneys, ureters and bladder").
    merged = []
    for a, b, keys in sorted(found, key=lambda x: (x[0], -x[1])):
        if merged and (a < merged[-1][1] or "ref" in keys and "ref" in merged[-1][2]
                       and all(w in (",", "and", "plus") for w in slot[merged[-1][1]:a])):
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]), merged[-1][2] | keys)
        else:
            merged.append((a, b, set(keys)))

    def known(item):
        return _is_name(rd.table, item)

    def own(item):  # another name or a part of the reference ("X (Klaricid)" lists nothing)
        return bool(mentions(list(item), own_forms)) or any(
            id(g) in ref_groups for name, g in rd.table.by_first.get(item[0], ()) if tuple(item) == name)

    def context(a):
        """After a preposition (in_context), unless a quantifier offers the list ("one of X, W", "any of
        X or W") or the preposition is a word of a name ("CT angiography of the aorta, W")."""
        i = context_at(slot, a)
        return i >= 0 and not (slot[i] == "of" and i > 0 and slot[i - 1] in _QUANTIFIERS) \
            and not any(a0 <= i < b0 for a0, b0, _ in merged)

    open_ = [(a, b, keys) for a, b, keys in merged
             if discount(slot, a, b) in (None, "hedged") and not rejected(slot, a, b)]
    offered = [(a, b, keys) for a, b, keys in open_ if not context(a)]
    listed = any(enumerated(slot, a, b, known, own) for a, b, keys in open_ if "ref" in keys or not context(a))
    return [keys for _, _, keys in offered], listed


def _merge(keysets: list[set]) -> list[set]:
    """Key sets that share a key are one candidate (two names of one alias group)."""
    out: list[set] = []
    for keys in keysets:
        joined = [k for k in out if k & keys]
        out = [k for k in out if not k & keys] + [set().union(keys, *joined)]
    return out
