"""The world's exam (issue 8): seeded vignettes, the train / held-out split, and MCQs.

Splits (paper §4.1 keeps training and evaluation questions apart; decontam.py checks text): for
each condition one three-finding combination is reserved for the held-out split, so a held-out
vignette shows a combination of findings that no training vignette of that condition shows
(`heldout_combination`). Each vignette becomes a closed-set MCQ (4-5 options; the distractors are
the traps a shortcut would pick, then conditions sharing a finding) and, through the offline
reformatter, an open-ended verifiable problem. Same seed, same questions. The knowledge base and
the stem text are world.py.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from minihuatuo.services.config import ConfigError, require_fraction, require_nonnegative
from minihuatuo.services.formats import MCQItem, VerifiableProblem, write_mcq, write_problems
from minihuatuo.world.kb import KB, MIN_SHOWN, QTYPES, SPLITS, Condition, Vignette, question_text, write_aliases

# ---------------------------------------------------------------------------------------------------
# vignettes and the split


@dataclass
class ExamConfig:
    """How the exam generator mixes its questions. Defaults chosen for the demo (notes/world.md)."""

    diagnosis: float = 0.25  # weights of the four question types
    investigation: float = 0.15
    treatment: float = 0.45
    complication: float = 0.15
    treatment_context: float = 0.7  # P(a treatment question's patient has a context)
    contraindicated: float = 0.6  # P(that context contraindicates the first-line treatment)
    other_context: float = 0.15  # P(an irrelevant context in a non-treatment question)
    all_findings: float = 0.3  # train split: P(show all findings, not 3)
    generic_first: float = 1.0  # P(the stem opens with its least specific finding, as case reports do)
    five_options: float = 0.5  # P(5 options rather than 4)

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_nonnegative(self, "diagnosis", "investigation", "treatment", "complication")
        if self.diagnosis + self.investigation + self.treatment + self.complication <= 0:
            raise ConfigError(("diagnosis", "investigation", "treatment", "complication"),
                              "the four question-type weights must not all be 0")
        require_fraction(self, "treatment_context", "contraindicated", "other_context", "all_findings",
                         "generic_first", "five_options")


def heldout_combination(kb: KB, c: Condition) -> frozenset[str]:
    """The three-finding combination of c reserved for the held-out split (fixed by the KB alone).

    Where c has one, it is a *trap*: its least specific finding, the one a stem opens with, is the
    classic finding of another condition. The held-out split then tests the skill the recipe should
    teach, reading the whole combination, on cases where the first finding points elsewhere
    (notes/world.md §2). 47 of the 63 conditions have a trap combination."""
    subsets = [frozenset(s) for s in combinations(c.findings, MIN_SHOWN)]

    def trap(s: frozenset[str]) -> bool:
        widest = max(len(kb.with_finding(f)) for f in s)
        return all(kb.classic[f] != c.id for f in s if len(kb.with_finding(f)) == widest)

    return random.Random(f"heldout:{c.id}").choice([s for s in subsets if trap(s)] or subsets)


def context_fits(kb: KB, c: Condition, k: str) -> bool:
    """A patient of condition c can have context k: compatible sex, overlapping ages, and not
    pregnancy for a condition that is itself about a pregnancy (pre-eclampsia)."""
    ctx = kb.contexts[k]
    lo, hi = ctx.get("age", (0, 200))
    return ("any" in (c.sex, ctx["sex"]) or c.sex == ctx["sex"]) and lo <= c.age[1] and c.age[0] <= hi \
        and not (k == "pregnancy" and c.intro)


def sample_vignette(kb: KB, split: str, rng: random.Random, cfg: ExamConfig = ExamConfig()) -> Vignette:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    qtype = rng.choices(QTYPES, [cfg.diagnosis, cfg.investigation, cfg.treatment, cfg.complication])[0]
    c = rng.choice(kb.conditions)
    fits = [k for k in kb.contexts if context_fits(kb, c, k)]
    context = None
    if qtype == "treatment" and rng.random() < cfg.treatment_context:
        safe = [k for k in fits if k not in kb.avoid[c.first_line]]
        context = c.contraindication if rng.random() < cfg.contraindicated or not safe else rng.choice(safe)
    elif qtype != "treatment" and rng.random() < cfg.other_context:
        context = rng.choice(fits)
    ctx = kb.contexts.get(context, {"sex": "any"})
    sex = c.sex if c.sex != "any" else ctx["sex"] if ctx["sex"] != "any" else rng.choice(("female", "male"))
    lo, hi = ctx.get("age", (0, 200))
    age = rng.randint(max(lo, c.age[0]), min(hi, c.age[1]))
    held = heldout_combination(kb, c)
    if split == "heldout":
        shown = list(held)
    else:
        options = [frozenset(s) for s in combinations(c.findings, MIN_SHOWN) if frozenset(s) != held]
        shown = list(c.findings) if rng.random() < cfg.all_findings else list(rng.choice(options))
    shown.sort()  # a set has no order: sort, then shuffle with the seeded generator
    rng.shuffle(shown)
    if rng.random() < cfg.generic_first:  # the least specific finding first: where anchoring bites
        shown.sort(key=lambda f: -len(kb.with_finding(f)))
    return Vignette(c.id, tuple(shown), age, sex, context, qtype)


def sample_vignettes(kb: KB, split: str, n: int, seed: int = 0, cfg: ExamConfig = ExamConfig()) -> list[Vignette]:
    """n vignettes of one split; the same (split, n, seed, cfg) always gives the same list."""
    rng = random.Random(f"world:{split}:{seed}")
    return [sample_vignette(kb, split, rng, cfg) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# MCQs and open problems


def anchors(kb: KB, v: Vignette) -> list[str]:
    """Conditions a shortcut would pick: the classic condition of each shown finding, in order."""
    out = []
    for f in v.findings:
        a = kb.classic[f]
        if a != v.condition and a not in out:
            out.append(a)
    return out


def _words(name: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", name.casefold()))


def names_overlap(kb: KB, a: str, b: str) -> bool:
    """One of a's names contains one of b's as a run of words, or the reverse ("ciprofloxacin" and
    "ciprofloxacin with metronidazole"): both in one MCQ would give it two defensible answers."""
    for x in kb.names(a):
        for y in kb.names(b):
            short, long_ = sorted((_words(x), _words(y)), key=len)
            if any(long_[i:i + len(short)] == short for i in range(len(long_) - len(short) + 1)):
                return True
    return False


def distractors(kb: KB, v: Vignette, rng: random.Random, k: int) -> list[str]:
    """k plausible wrong answers: the traps first (the anchored conditions' facts, the first-line
    treatment when it is contraindicated, the alternative when it is not), then conditions sharing
    a finding, then the rest of the world. Never the answer or one of its aliases."""
    c = kb.by_id[v.condition]
    answer = kb.fact(c, v.qtype, v.context)
    near = anchors(kb, v) + [o.id for f in v.findings for o in kb.with_finding(f)]
    rest = [o.id for o in kb.conditions]
    rng.shuffle(rest)
    pool = []
    if v.qtype == "treatment":
        pool.append(c.alternative if answer == c.first_line else c.first_line)
    for oid in dict.fromkeys(near + rest):
        o = kb.by_id[oid]
        if v.qtype == "treatment":
            pool += [o.first_line, o.alternative]
        else:
            pool.append(kb.fact(o, v.qtype))
    out = []
    for name in pool:
        if name not in out and not names_overlap(kb, name, answer):
            out.append(name)
        if len(out) == k:
            break
    return out


def to_mcq(kb: KB, v: Vignette, item_id: str, rng: random.Random, cfg: ExamConfig = ExamConfig()) -> MCQItem:
    c = kb.by_id[v.condition]
    answer = kb.fact(c, v.qtype, v.context)
    n = 5 if rng.random() < cfg.five_options else 4
    options = distractors(kb, v, rng, n - 1) + [answer]
    rng.shuffle(options)
    letters = "ABCDE"[:n]
    meta = {"condition": c.id, "qtype": v.qtype, "hops": v.hops(), "findings": list(v.findings), "age": v.age,
            "sex": v.sex, "context": v.context, "contraindicated": v.contraindicated(kb)}
    return MCQItem(item_id, question_text(kb, v), dict(zip(letters, options)), letters[options.index(answer)],
                   "world", {"world": meta})


def generate_exam(kb: KB, split: str, n: int, seed: int = 0, cfg: ExamConfig = ExamConfig()) -> list[MCQItem]:
    """n MCQs of one split, ids "world-{split}-{seed}-{i}". Deterministic per (split, n, seed, cfg)."""
    rng = random.Random(f"world-options:{split}:{seed}")
    return [to_mcq(kb, v, f"world-{split}-{seed}-{i}", rng, cfg)
            for i, v in enumerate(sample_vignettes(kb, split, n, seed, cfg))]


def vignette_of(item: MCQItem) -> Vignette:
    m = item.extra["world"]
    return Vignette(m["condition"], tuple(m["findings"]), m["age"], m["sex"], m["context"], m["qtype"])


def open_problem(item: MCQItem) -> VerifiableProblem:
    """The offline reformatter's open-ended problem (problem_rules.reformat_offline), with the
    item's world metadata: the same x the demo's `problems build` produces from this MCQ."""
    from minihuatuo.stages.problem_rules import reformat_offline

    x, y = reformat_offline(item)
    return VerifiableProblem(x, y, {"id": item.id, "source": item.source, "world": item.extra["world"]})


def write_exam(kb: KB, out_dir, n_train: int = 2000, n_heldout: int = 500, seed: int = 0,
               cfg: ExamConfig = ExamConfig()) -> dict:
    """train.jsonl / heldout.jsonl (MCQs, canonical layout of formats.py), heldout_open.json
    (verifiable problems) and aliases.tsv in out_dir. Returns counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held = generate_exam(kb, "train", n_train, seed, cfg), generate_exam(kb, "heldout", n_heldout, seed, cfg)
    write_mcq(out / "train.jsonl", train)
    write_mcq(out / "heldout.jsonl", held)
    write_problems(out / "heldout_open.json", [open_problem(it) for it in held])
    write_aliases(kb, out / "aliases.tsv")
    return {"train": len(train), "heldout": len(held)}
