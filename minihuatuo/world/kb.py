"""The bundled offline clinical world (issue 8): its knowledge base, and the vignettes built on it.

No real model weights or data sets can be downloaded where the demo runs, so the repository ships
a small, self-consistent world written for this project (data/world/kb.json; simplified teaching
content, NOT medical advice). Each condition has presenting findings, a key investigation, a
first-line treatment, the context in which that treatment is avoided with its alternative, and a
feared complication. Findings are shared between conditions ("fever" belongs to 26 of them), so a
diagnosis needs the combination, never one finding; every three findings of a condition name it
uniquely. Every answer carries aliases, written out as data/world/aliases.tsv for the rule
verifier (paper §2: exact match fails on medical aliases).

The exam generator (exam.py) writes closed-set MCQs (4-5 options with plausible distractors) of 1 to 3
reasoning hops:

    diagnosis      findings -> condition                                         1 hop
    investigation  findings -> condition -> its key investigation                2 hops
    complication   findings -> condition -> its feared complication              2 hops
    treatment      findings -> condition -> first-line treatment                 2 hops
                   ... and the patient has a context: is it contraindicated?     3 hops
                       (yes: the alternative is the answer; no: the first-line one)

This module holds the knowledge base (loading and checking kb.json, the alias file), the vignette
(one patient and one question) and the text of its stem. Sampling vignettes, the train / held-out
split and the MCQs are exam.py; the biased tutor that writes the base model's worked
reasoning is tutor.py; the tokenizer and pretraining are pretrain.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from minihuatuo.engine.paths import bundled

WORLD_DIR = bundled("data/world")
DEFAULT_KB = WORLD_DIR / "kb.json"
WORLD_ALIASES = WORLD_DIR / "aliases.tsv"  # the world's alias groups (not verifier_text.DEFAULT_ALIASES)
QTYPES = ("diagnosis", "investigation", "treatment", "complication")
FACT_FIELD = {"investigation": "investigation", "complication": "complication"}  # qtype -> the Condition field
MIN_SHOWN = 3  # findings in a vignette: 3 or all of them; any 3 must name the condition uniquely
SPLITS = ("train", "heldout")
CALLS = {  # the MCQ call; problem_rules.reformat_offline turns each into an open question
    "diagnosis": "Which of the following is the most likely diagnosis?",
    "investigation": "Which of the following is the key investigation to confirm the diagnosis?",
    "treatment": "Which of the following is the most appropriate treatment?",
    "complication": "Which of the following is the most feared complication of this condition?",
}


# ---------------------------------------------------------------------------------------------------
# the knowledge base


@dataclass(frozen=True)
class Condition:
    id: str
    name: str
    aliases: tuple[str, ...]
    sex: str  # "any", "female" or "male"
    age: tuple[int, int]
    findings: tuple[str, ...]
    investigation: str
    first_line: str
    contraindication: str  # the context in which first_line is avoided
    alternative: str
    complication: str
    intro: str = ""  # e.g. "who is 34 weeks pregnant", after "A 30-year-old woman"


@dataclass
class KB:
    conditions: list[Condition]
    contexts: dict[str, dict]  # id -> {"name", "sentence", "sex"}
    classic: dict[str, str]  # finding -> the condition it is the classic finding of
    avoid: dict[str, tuple[str, ...]]  # treatment -> contexts in which it is avoided
    aliases: dict[str, tuple[str, ...]]  # answer name -> its other names
    about: str = ""
    by_id: dict[str, Condition] = field(default_factory=dict)

    def __post_init__(self):
        self.by_id = {c.id: c for c in self.conditions}
        for c in self.conditions:  # condition names are answers too
            self.aliases.setdefault(c.name, c.aliases)

    def with_finding(self, f: str) -> list[Condition]:
        return [c for c in self.conditions if f in c.findings]

    def names(self, answer: str) -> tuple[str, ...]:
        """The answer and all its aliases."""
        return (answer,) + tuple(self.aliases.get(answer, ()))

    def fact(self, c: Condition, qtype: str, context: str | None = None) -> str:
        """The answer to a question of type qtype about condition c for a patient with `context`."""
        if qtype == "diagnosis":
            return c.name
        if qtype == "treatment":
            return c.alternative if context in self.avoid.get(c.first_line, ()) else c.first_line
        return getattr(c, FACT_FIELD[qtype])


class KBError(ValueError):
    """A knowledge-base file that cannot be used; names file, line and field."""


def _line_of(text: str, needle: str) -> int | None:
    i = text.find(needle)
    return text.count("\n", 0, i) + 1 if i >= 0 else None


def load_kb(path=DEFAULT_KB) -> KB:
    """Read and validate a knowledge base (format: data/world/kb.json, described in notes/world.md)."""
    path = Path(path)
    if not path.is_file():
        hint = (" (the bundled world is the repository's data/ folder, or share/minihuatuo/data of an "
                "install: reinstall from a clone, `pip install -e .` as README says)") if path == DEFAULT_KB else ""
        raise KBError(f"{path}: no such file{hint}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KBError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None

    def fail(where: str, msg: str, needle: str | None = None):
        line = _line_of(text, needle) if needle else None
        raise KBError(f"{path}" + (f": line {line}" if line else "") + f": field {where!r}: {msg}")

    for key in ("contexts", "findings", "treatments", "aliases", "conditions"):
        if not isinstance(data.get(key), (dict, list)) or not data[key]:
            fail(key, "missing or empty")
    aliases = {}
    for name, names in data["aliases"].items():
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            fail(f"aliases.{name}", "expected a non-empty list of names", f'"{name}": [')
        aliases[name] = tuple(names)
    contexts = {}
    for cid, ctx in data["contexts"].items():
        if not isinstance(ctx, dict) or not all(isinstance(ctx.get(k), str) and ctx[k] for k in ("name", "sentence")):
            fail(f"contexts.{cid}", "expected {\"name\", \"sentence\", \"sex\"}", f'"{cid}": {{')
        if ctx.get("sex", "any") not in ("any", "female", "male"):
            fail(f"contexts.{cid}.sex", f"expected any, female or male, got {ctx.get('sex')!r}", f'"{cid}": {{')
        contexts[cid] = {"sex": "any", **ctx}
    avoid = {}
    for drug, t in data["treatments"].items():
        bad = [x for x in (t.get("avoid_in") if isinstance(t, dict) else None) or [] if x not in contexts]
        if not isinstance(t, dict) or not isinstance(t.get("avoid_in"), list) or bad:
            fail(f"treatments.{drug}.avoid_in", f"expected a list of context ids, unknown: {bad}", f'"{drug}": {{')
        avoid[drug] = tuple(t["avoid_in"])
    conditions = []
    for i, d in enumerate(data["conditions"]):
        cid = d.get("id") if isinstance(d, dict) else None
        needle = f'"id": "{cid}"'
        where = f"conditions[{i}]" + (f" ({cid})" if cid else "")
        for key in ("id", "name", "sex", "investigation", "first_line", "contraindication", "alternative",
                    "complication"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                fail(f"{where}.{key}", "missing or not a non-empty string", needle)
        for key in ("aliases", "findings"):
            if not isinstance(d.get(key), list) or not d[key] or not all(isinstance(x, str) and x for x in d[key]):
                fail(f"{where}.{key}", "expected a non-empty list of strings", needle)
        if len(d["findings"]) < MIN_SHOWN or len(set(d["findings"])) != len(d["findings"]):
            fail(f"{where}.findings", f"expected at least {MIN_SHOWN} distinct findings", needle)
        age = d.get("age")
        if not (isinstance(age, list) and len(age) == 2 and all(isinstance(a, int) for a in age) and 0 < age[0] <= age[1]):
            fail(f"{where}.age", "expected [youngest, oldest] in years", needle)
        if d["sex"] not in ("any", "female", "male"):
            fail(f"{where}.sex", f"expected any, female or male, got {d['sex']!r}", needle)
        for f in d["findings"]:
            if f not in data["findings"]:
                fail(f"{where}.findings", f"{f!r} is not in the findings table", needle)
        for key in ("investigation", "first_line", "alternative", "complication"):
            if d[key] not in aliases:
                fail(f"{where}.{key}", f"{d[key]!r} has no entry in the aliases table", needle)
        for key in ("first_line", "alternative"):
            if d[key] not in avoid:
                fail(f"{where}.{key}", f"{d[key]!r} has no entry in the treatments table", needle)
        if d["contraindication"] not in contexts:
            fail(f"{where}.contraindication", f"unknown context {d['contraindication']!r}", needle)
        if d["contraindication"] not in avoid[d["first_line"]]:
            fail(f"{where}.contraindication", f"{d['first_line']!r} is not avoided in it (treatments table)", needle)
        lo, hi = contexts[d["contraindication"]].get("age", (0, 200))
        if hi < age[0] or age[1] < lo:
            fail(f"{where}.contraindication", f"no patient age fits both {age} and the context's {[lo, hi]}", needle)
        if d["contraindication"] in avoid[d["alternative"]]:
            fail(f"{where}.alternative", f"{d['alternative']!r} is itself avoided in {d['contraindication']!r}", needle)
        conditions.append(Condition(cid, d["name"], tuple(d["aliases"]), d["sex"], tuple(age), tuple(d["findings"]),
                                    d["investigation"], d["first_line"], d["contraindication"], d["alternative"],
                                    d["complication"], d.get("intro", "")))
    ids = [c.id for c in conditions]
    if len(set(ids)) != len(ids):
        fail("conditions", f"duplicate ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    classic = {}
    for f, entry in data["findings"].items():
        owner = entry.get("classic_for") if isinstance(entry, dict) else None
        if owner not in ids or f not in next(c for c in conditions if c.id == owner).findings:
            fail(f"findings.{f}.classic_for", f"{owner!r} is not a condition listing this finding", f'"{f}": {{')
        classic[f] = owner
    kb = KB(conditions, contexts, classic, avoid, aliases, data.get("about", ""))
    for c in conditions:
        for sub in combinations(c.findings, MIN_SHOWN):  # the diagnosis must follow from any 3 findings
            other = [o.id for o in conditions if o.id != c.id and set(sub) <= set(o.findings)]
            if other:
                fail(f"conditions ({c.id}).findings", f"{list(sub)} also fit {other}", f'"id": "{c.id}"')
    owner: dict[str, str] = {}
    for name in aliases:  # one name must never mean two answers
        for n in kb.names(name):
            key = " ".join(re.findall(r"\w+", n.casefold()))
            if owner.setdefault(key, name) != name:
                fail(f"aliases.{name}", f"{n!r} also names {owner[key]!r}", f'"{name}": [')
    return kb


def write_aliases(kb: KB, path=WORLD_ALIASES) -> Path:
    """The world's alias groups in the rule verifier's TSV format (verifier_text.load_aliases)."""
    lines = ["# Aliases of the minihuatuo clinical world (data/world/kb.json), written by minihuatuo.world.",
             "# One group per line, names separated by TABs. Simplified teaching content, not medical advice."]
    lines += ["\t".join(kb.names(name)) for name in sorted(kb.aliases, key=str.casefold)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# vignettes


@dataclass(frozen=True)
class Vignette:
    condition: str
    findings: tuple[str, ...]  # in the order the stem lists them
    age: int
    sex: str  # "female" or "male"
    context: str | None  # a patient context (pregnancy, asthma, ...) or None
    qtype: str

    def hops(self) -> int:
        if self.qtype == "diagnosis":
            return 1
        return 3 if self.qtype == "treatment" and self.context else 2

    def contraindicated(self, kb: KB) -> bool:
        c = kb.by_id[self.condition]
        return self.qtype == "treatment" and self.context in kb.avoid[c.first_line]


# ---------------------------------------------------------------------------------------------------
# text


def pronoun(v: Vignette) -> str:
    return "she" if v.sex == "female" else "he"


def person(v: Vignette) -> str:
    noun = ("girl" if v.sex == "female" else "boy") if v.age < 16 else ("woman" if v.sex == "female" else "man")
    return f"{v.age}-year-old {noun}"


def join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def context_sentence(kb: KB, v: Vignette) -> str:
    s = kb.contexts[v.context]["sentence"].replace("{he}", pronoun(v))
    return s[0].upper() + s[1:] + "."


def stem(kb: KB, v: Vignette) -> str:
    """The vignette without its call: "A 54-year-old man presents with ... . He has asthma." """
    c = kb.by_id[v.condition]
    who = person(v)
    text = f"{'An' if who[0] in '8' or who.startswith(('11-', '18-')) else 'A'} {who}"
    text += f" {c.intro}" if c.intro else ""
    text += f" presents with {join(v.findings)}."
    return text + (" " + context_sentence(kb, v) if v.context else "")


def question_text(kb: KB, v: Vignette) -> str:
    return f"{stem(kb, v)} {CALLS[v.qtype]}"
