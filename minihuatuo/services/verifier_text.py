"""Answer text for the rule verifier: one normalisation for both sides, and the reference's names.

- `tokens`: Unicode NFKC, case folding, Greek letters spelled out, punctuation and articles
  dropped, plurals and British spellings folded, number words, Roman numerals after
  "type/grade/stage/...", ordinals, digit grouping ("1,000", "4,20,000"), decimals ("0.50" = "0.5"),
  ratios ("1:06" = "1:6"), ranges ("5 to 7" -> one token "5~7"), units ("mg/dL", "minutes" = "min")
  and weeks to days ("1 week" = "7 days").
- `token_match`: equality, plus numbers inside ranges, word families and one-vowel misspellings.
- `AliasTable` / `load_aliases`: synonym groups from data/aliases.tsv and user files.
- `reference_forms`: the reference and its variants: a parenthesised other name ("Partial
  thromboplastin time (PTT)" -> either), alias substitutions ("bone marrow suppression" =
  "myelosuppression"), joined compounds ("gall bladder" = "gallbladder"), the genus initial or a
  shortened genus of a binomial ("P. aeruginosa", "Staph aureus").

Every fold is applied to both the response and the reference, so a fold that is linguistically
crude ("diabetes" -> "diabete") is harmless; what a fold must never do is merge two different
medical words, and each rule below says how it avoids that.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from minihuatuo.engine.paths import bundled

DEFAULT_ALIASES = bundled("data/aliases.tsv")
# Function words: never content, never glued into a compound.
STOPWORDS = {"of", "in", "on", "at", "to", "for", "with", "by", "from", "and", "or", "is", "are", "be", "was",
             "were", "that", "which", "this", "these", "those", "as", "it", "its", "into", "during", "per",
             "their", "his", "her", "both", "each", "any", ",", ";", ":", "/"}

# ----------------------------------------------------------------------------- normalisation

_GREEK = {"α": " alpha ", "β": " beta ", "γ": " gamma ", "δ": " delta ", "ε": " epsilon ", "κ": " kappa ",
          "λ": " lambda ", "μ": " micro ", "τ": " tau ", "ω": " omega ", "Δ": " delta "}
_SYMBOLS = {"°": " degree ", "%": " percent ", "&": " and ", "+": " and ", "×": " x ", "’": "'", "‘": "'",
            "–": "-", "—": "-", "−": "-", "‐": "-", ">": " more than ", "<": " less than "}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                      "eighty": "80", "ninety": "90", "hundred": "100", "single": "1", "once": "1",
                      "twice": "2", "double": "2", "half": "0.5"})
_ORDINALS = {"1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth"}
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "vii": "7", "viii": "8",
          "ix": "9", "x": "10", "xi": "11", "xii": "12"}
# Roman numerals only count as numbers after these words ("type III", "cranial nerve VI"); elsewhere
# "i", "v" and "x" are a pronoun, a letter or a multiplication sign.
_ROMAN_AFTER = {"type", "grade", "stage", "class", "phase", "factor", "nerve", "cn", "degree", "level",
                "zone", "lobe", "collagen", "complex", "group", "mobitz"}
# Unit spellings, looked up after `_fold_word` (so plurals and -tre/-ter are already folded).
_UNITS = {"minute": "min", "hour": "h", "hr": "h", "wk": "week", "yr": "year", "gram": "g", "gm": "g",
          "milligram": "mg", "microgram": "mcg", "ug": "mcg", "kilogram": "kg", "milliliter": "ml", "liter": "l",
          "deg": "degree", "millimeter": "mm", "centimeter": "cm", "nanometer": "nm"}
ARTICLES = {"a", "an", "the"}
_NUM = r"\d+(?:\.\d+)?"
_TOKEN = re.compile(rf"{_NUM}~{_NUM}|{_NUM}(?::{_NUM})+|{_NUM}(?:/{_NUM})?|[^\W\d_]+|[,;:/]")
# A slash between two words is a list separator ("amoxicillin/doxycycline": two candidates) and stays
# a "/" token; between a unit and another word ("mg/dL", "ml/kg") it is dropped, as before.
_UNIT_WORDS = {"mg", "g", "dl", "ml", "l", "min", "h", "kg", "mmol", "mcg", "mol", "mm", "cm", "nm", "m", "day",
               "week", "month", "year", "meq", "iu", "u", "ng", "pg", "nmol", "pmol", "umol", "mmhg", "hg", "s",
               "sec", "dose", "hpf", "lpf", "m2", "unit", "mu", "d"}
_SLASH = re.compile(r"([^\W\d_]+)\s*/\s*(?=([^\W\d_]+))")


def _number(s: str) -> str:
    """Canonical decimal: "0.50" -> "0.5", "1.0" -> "1", "06" -> "6"."""
    x = float(s)
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


@lru_cache(maxsize=1 << 16)
def _fold_word(w: str) -> str:
    """British/American spelling and plural folding, the same on both sides. Each fold only
    removes spelling noise; none may merge two different medical words."""
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is", "os", "as")):
        w = w[:-1]  # veins, tests, results; diabetes -> diabete on both sides alike
    if len(w) > 4:
        w = w[0] + w[1:].replace("ae", "e").replace("oe", "e")  # anaemia, caesarean (not aeruginosa)
        w = "e" + w[2:] if w.startswith("oe") else w  # oesophagus, oedema, oestrogen
    if len(w) >= 6 and w.endswith("our"):
        w = w[:-3] + "or"  # tumour, labour, colour (not "four", "hour")
    if len(w) >= 5 and w.endswith("tre"):
        w = w[:-3] + "ter"  # litre, centre, theatre, fibre
    w = re.sub(r"is(e|ed|ing|ation)$", r"iz\1", w) if len(w) > 5 else w  # -ise / -ize
    return w.replace("sulph", "sulf")


def tokens(text: str) -> list[str]:
    """Normalised tokens; ',', ';', ':' and a '/' between words are kept as separator tokens for the
    hedge and list rules. Cached: the verifier tokenises the same sentences and names many times."""
    return list(_tokens(text))


@lru_cache(maxsize=4096)  # bounded: a reply's sentences are re-read within one verdict, names across verdicts
def _tokens(text: str) -> tuple[str, ...]:
    t = unicodedata.normalize("NFKC", text)
    # A capital letter after a word ("Box A", "hepatitis A", "vitamin E") is a label, not the article.
    t = re.sub(r"(?<=[^\W\d_] )([A-E])\b(?![-'’])", r"label\1", t)
    for k, v in _GREEK.items():  # before casefold, which would turn Δ into δ
        t = t.replace(k, v)
    t = t.casefold()
    for k, v in {**_SYMBOLS, **{g.casefold(): s for g, s in _GREEK.items()}}.items():
        t = t.replace(k, v)
    t = re.sub(r"'s\b|'", "", t)  # Barrett's -> barrett, doesn't -> doesnt
    t = re.sub(r"(?<=\d),(?=\d{2},\d{3}\b|\d{3}\b)", "", t)  # 1,000 and the Indian 4,20,000
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: _ORDINALS.get(m.group(0), m.group(1)), t)
    t = re.sub(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])", " ", t)  # CD21 -> cd 21, 10mg -> 10 mg
    t = re.sub(rf"(?<![\d.:/])({_NUM})\s*(?:-|to)\s*({_NUM})(?![\d:/])", r"\1~\2", t)  # ranges: 5 to 7, 0.5-1.0
    t = t.replace("per cent", "percent").replace("mm hg", "mmhg")
    t = _SLASH.sub(_slash, t)
    out: list[str] = []
    for w in _TOKEN.findall(t):
        if w[0].isdigit():
            w = re.sub(_NUM, lambda m: _number(m.group(0)), w)
        elif out and w in _ROMAN and out[-1] in _ROMAN_AFTER:
            w = _ROMAN[w]
        else:
            w = _fold_word(w)
            w = _UNITS.get(w) or _NUMBER_WORDS.get(w) or w
        if w == "week" and out and is_number(out[-1]):
            out[-1], w = _number(str(float(out[-1]) * 7)), "day"  # 1 week = 7 days
        if w not in ARTICLES:
            out.append(w)
    return tuple(out)


def _slash(m: re.Match) -> str:
    """"a/b" -> "a / b" (a list), but "mg/dl" -> "mg dl" (a unit)."""
    unit = any((_UNITS.get(_fold_word(w)) or _fold_word(w)) in _UNIT_WORDS for w in m.groups())
    return m.group(1) + (" " if unit else " / ")


def is_number(w: str) -> bool:
    return bool(re.fullmatch(_NUM, w))


def _in_range(x: str, rng: str, max_ratio: float = 1.5) -> bool:
    """x lies in the range token "a~b", and the range is narrow (b <= 1.5 a): "5 to 7 days" commits
    to about a week; "20 to 40 minutes" commits to neither end."""
    lo, hi = sorted(float(v) for v in rng.split("~"))
    return lo <= float(x) <= hi and (lo > 0 and hi <= max_ratio * lo)


def token_match(resp: str, ref: str) -> bool:
    """A response token matches a reference token: equal; a number inside a narrow range (either
    side); two long words of one family (a common prefix of 8+ letters and 80% of the shorter
    word, then different endings of at most 5 letters: perforator/perforating, but not
    glomerulonephritis/glomerulosclerosis, nor a word and a compound it starts); or a long word
    one vowel edit away (misspelt references such as "aeroginosa", "anthracus", "trabeclae").
    Consonant edits never count (osteoblast/osteoclast stay different)."""
    if resp == ref or (ref.endswith("*") and resp.startswith(ref[:-1]) and len(resp) > len(ref)):
        return True  # "staph*" (a shortened genus, see reference_forms) matches "staphylococcus"
    if resp[:1] != ref[:1] and "~" not in resp and "~" not in ref:
        return False  # the fast path: every rule below needs the same first letter
    if "~" in resp or "~" in ref:
        if "~" in ref and is_number(resp):
            return _in_range(resp, ref, max_ratio=float("inf"))  # the reference's own range: any width
        return "~" in resp and is_number(ref) and _in_range(ref, resp)
    a, b = resp, ref
    k = len(os.path.commonprefix([a, b])) if min(len(a), len(b)) >= 8 else 0
    if k >= max(8, 0.8 * min(len(a), len(b))) and 0 < len(a) - k <= 5 and 0 < len(b) - k <= 5:
        return True  # one word family: perforator/perforating, organophosphate/organophosphorus
    if min(len(a), len(b)) < 9 or abs(len(a) - len(b)) > 1 or a[:2] != b[:2]:
        return False
    vowels = set("aeiouy")
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] and a[i] in vowels and b[i] in vowels
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[i] in vowels and longer[i + 1:] == shorter[i:]


# ----------------------------------------------------------------------------- aliases and forms

@dataclass
class AliasTable:
    """Groups of interchangeable names, each a tuple of normalised token tuples."""

    groups: list[tuple[tuple[str, ...], ...]]

    def __post_init__(self):
        self.by_first: dict[str, list[tuple[tuple[str, ...], tuple]]] = {}  # first word -> (name, group)
        for group in self.groups:
            for name in group:
                self.by_first.setdefault(name[0], []).append((name, group))

    def substitutions(self, form: tuple[str, ...]) -> list[tuple[str, ...]]:
        """`form` with one of its names replaced by each other name of the name's group."""
        out = []
        for i, w in enumerate(form):
            for name, group in self.by_first.get(w, ()):
                if form[i:i + len(name)] == name:
                    out += [form[:i] + other + form[i + len(name):] for other in group if other != name]
        return out


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in tokens(text) if w not in (",", ";", ":"))


def load_aliases(paths=None) -> AliasTable:
    """Read alias files: one group per line, names separated by tabs; '#' starts a comment.
    Default: the shipped data/aliases.tsv. Pass [DEFAULT_ALIASES, user_file] to extend it."""
    groups = []
    for path in ([DEFAULT_ALIASES] if paths is None else paths):
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            names = [n.strip() for n in line.split("\t") if n.strip()]
            forms = tuple(dict.fromkeys(_words(n) for n in names))
            if len(names) < 2 or any(not f for f in forms):
                raise ValueError(f"{path}:{lineno}: an alias group needs at least two tab-separated "
                                 f"names, each with a word or number in it; got {line!r}")
            groups.append(forms)
    return AliasTable(groups)


def find_form(seq, sub, start=0) -> int:
    """Index of the first occurrence of token tuple `sub` in `seq` at or after `start` (token_match), or -1."""
    for i in range(start, len(seq) - len(sub) + 1):
        if all(token_match(seq[i + j], sub[j]) for j in range(len(sub))):
            return i
    return -1


def reference_forms(reference: str, aliases: AliasTable) -> list[tuple[tuple[str, ...], bool]]:
    """The reference's normalised variants, each with whether it may match loosely (see
    verifier_mentions.spans); genus initials must match word for word. A reference that is only an
    article-like letter ("A") has no form and never matches: an option letter needs the options."""
    ref = reference.strip().rstrip(".").strip()
    variants = [ref]
    m = re.match(r"^(.*?)\s*\(([^()]+)\)\s*(.*)$", ref)
    if m:
        main, inner, rest = m.group(1), m.group(2), m.group(3)
        if inner[:1].islower():  # "(transdermal)": a qualifier the answer must carry
            variants = [f"{main} {inner} {rest}"]
        else:  # "(PTT)", "(IL-11)": another name; either one names the answer
            variants = [f"{main} {rest}", f"{inner} {rest}", f"{main} {inner} {rest}"]
    forms = [tuple(tokens(v)) for v in variants]  # separators kept for `conjuncts`
    for form in list(forms):
        forms += aliases.substitutions(form)
    joined, initials = [], []
    for form in forms:
        for i in range(len(form) - 1):  # "gall bladder" -> "gallbladder"
            if all(w.isalpha() and len(w) >= 3 and w not in STOPWORDS for w in form[i:i + 2]):
                joined.append(form[:i] + (form[i] + form[i + 1],) + form[i + 2:])
        if len(form) == 2 and form[0].isalpha() and form[1].isalpha() and len(form[0]) >= 4:
            initials.append((form[0][0], form[1]))  # genus initial: "Pseudomonas aeruginosa" -> "p aeruginosa"
            initials.append((form[0] + "*", form[1]))  # shortened genus: "Staph aureus" -> "staph* aureus"
    out = {f: False for f in initials}  # a one-letter word must match in place, never loosely
    out.update({f: True for f in forms + joined if f})
    return list(out.items())
