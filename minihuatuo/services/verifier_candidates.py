"""The rule verifier's candidates and enumerations (R8, R9): which names a statement offers as its
answer, and when a mention is one item of a list.

Part of the rule verifier; verifier_rules.py has the overview of the rules R1-R10 and the verdict. A
candidate is any name of the alias tables (the world's: every answer of the world) and, outside them,
each item of an enumeration:

    table_names   the names of the alias tables in a statement, word for word (plain_word: "was"
                  is a word, though WAS is a name)
    candidates    those the statement commits to (R2: not discounted, not context after a preposition:
                  in_context, context_at)
    enumerated    R8: a mention is one item of an enumeration ("and", "or", "/", three comma items, ...)
    phrase        R9: the phrase around a mention, in which no other candidate may stand
    ALL_OF        R8: "all of the above", "any of these"
"""
from __future__ import annotations

import re

from minihuatuo.services.verifier_mentions import discounted, word_set
from minihuatuo.services.verifier_text import STOPWORDS, AliasTable

# ----------------------------------------------------------------------------- names and enumerations (R8, R9)

_SEPS = {",", "/", "and", "or", "nor", "plus", "versus", "vs"}
_JOINS = _SEPS - {","}
# Words that show a neighbour is a clause, not another item of a list ("X, which fits ...", "X and
# the treatment is Y", "X, given the fever").
_CLAUSE_WORDS = word_set(
    "is are was were be been being has have had do does did should must may might can could would will shall "
    "which who whom whose that because since as given due this these those it its he she they we i you his her "
    "their there then so therefore thus hence not no if when while although though also such like especially "
    "including particularly where whereas but however seem appear suggest indicate fit explain caused lead "
    "leading result resulting associated characterized known called involve involving require requiring need "
    "needed make making remain rather than instead")
# "all of the above", "any of these": every option at once
ALL_OF = re.compile(r"\b(all|any|none|each|either) of (the above|them|these|those|the options)\b|\ball the above\b",
                    re.I)


def table_names(toks: list[str], table: AliasTable) -> list[tuple[int, int, tuple]]:
    """(start, end, group) of the names of the alias tables in toks (word for word): the candidates
    the tables know."""
    out = []
    for i, w in enumerate(toks):
        for name, group in table.by_first.get(w, ()):
            # a one-word name that is also a function word ("WAS", Wiskott-Aldrich syndrome, folds to
            # "was") is a name only in the reference's own forms, never a competing candidate
            if len(name) == 1 and name[0] in _FUNCTION_WORDS:
                continue
            if tuple(toks[i:i + len(name)]) == name:
                out.append((i, i + len(name), group))
    return out


_FUNCTION_WORDS = STOPWORDS | word_set("is was has does did should must may might can could would will shall "
                                        "all any not no")


# After an item, a singular or modal verb starts a new clause ("X and the treatment is Y": no list);
# "A and X are the causes" is a list.
_VERBS = word_set("is was has does did should must may might can could would will shall")
# Words after which a right-hand item is complete ("X and Y, which ..."); any other clause word after
# it ("X and ensure no ...") leaves it unproven, unless it is a name of the alias tables.
_ITEM_END = word_set("which who whose given as because since due are were that being")


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


def plain_word(name: tuple[str, ...]) -> bool:
    """A name of the tables that is one clause word ("was": WAS, the abbreviation of Wiskott-Aldrich
    syndrome in the shipped table) is read as the word, not as a candidate (hack_signals)."""
    return len(name) == 1 and name[0] in _CLAUSE_WORDS


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


def phrase(toks: list[str], a: int, b: int) -> tuple[int, int]:
    """The phrase around toks[a:b]: up to the nearest clause word, ";" or ":" on either side (R9)."""
    lo, hi = a, b
    while lo > 0 and toks[lo - 1] not in _CLAUSE_WORDS and toks[lo - 1] not in (";", ":"):
        lo -= 1
    while hi < len(toks) and toks[hi] not in _CLAUSE_WORDS and toks[hi] not in (";", ":"):
        hi += 1
    return lo, hi


# ----------------------------------------------------------------------------- what a statement names (R2)

# ... but "consistent with X", "points to X", "treat with X", "known as X" state the answer
_CUE_HEADS = word_set("consistent suggestive indicative point points pointing treat treated go known referred "
                      "diagnosed diagnosis start started")
_PREPOSITIONS = word_set("of with in from by for to including like such as after during despite without than via "
                         "among between on at about")


def candidates(toks: list[str], table: AliasTable) -> list[tuple[int, int]]:
    """R2: the names of the alias tables that a statement commits to: not discounted, and not context
    in a phrase or list that follows a preposition ("her symptoms of amenorrhea, headaches and ...")."""
    return [(o0, o1) for o0, o1, _ in table_names(toks, table)
            if not in_context(toks, o0) and not discounted(toks, o0, o1)]


def in_context(toks: list[str], a: int) -> bool:
    """The name that starts at toks[a] is context: in a phrase or list that follows a preposition
    ("symptoms of W", "a history of V, W and ..."), unless the preposition follows a cue head
    ("consistent with W", "treat with W")."""
    return context_at(toks, a) >= 0


def context_at(toks: list[str], a: int) -> int:
    """Where the preposition stands that makes the name at toks[a] context (in_context); -1 if none."""
    i = a
    while i > 0 and (toks[i - 1] in _SEPS or toks[i - 1] not in _CLAUSE_WORDS and toks[i - 1] not in _PREPOSITIONS
                     and toks[i - 1] not in (";", ":")):
        i -= 1
    return i - 1 if i > 0 and toks[i - 1] in _PREPOSITIONS and not (i > 1 and toks[i - 2] in _CUE_HEADS) else -1
