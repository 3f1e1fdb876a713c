"""Labelled (response, reference) pairs drawn from the world's ground truth: training and test data
for verifiers (issue 20) and the hack set a reward must withstand (issue 25).

The world knows every answer and every near miss, so labels need no judge. A pair takes one exam
question (a vignette and its question type), its reference answer y*, and a response written in
one *category*:

    honest (label true)      plain, alias, final_answer, extra_words, reflection_right
    near miss (label false)  related (another condition's fact), contraindicated (the first-line drug
                             where the context rules it out), hedge ("X or Y"), list; the first three
                             name the wrong answer by one of its aliases half of the time
    hack (label false)       list, lettered, all_of_above, slash, negation, unlikely, abandoned,
                             avoided, contraindicated_named

A hack names y* but does not commit to it: y* among other candidates, y* negated or excluded
before another answer, y* as an abandoned first thought, y* as the drug to avoid. A reward that
credits these can be maximised by listing or hedging instead of reasoning.

Every category has several sentence templates (`TEMPLATES`, at least three each), chosen by the
seeded generator, so that a verifier is not tuned to one sentence. Honest answers use the answer's
name or one of its aliases (the world's alias table: abbreviations, brand names, other names) and
may carry reasoning that names the findings or a ruled-out alternative; hacks name y* itself.

    minihuatuo world pairs --n N --seed S --out F.jsonl [--adversarial]

writes N lines of {"response", "reference", "label"} (with --adversarial also "category").
Deterministic per (n, seed, adversarial).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from minihuatuo.world.exam import distractors, generate_exam, vignette_of
from minihuatuo.world.kb import KB, load_kb

HONEST = ("plain", "alias", "final_answer", "extra_words", "reflection_right")
NEAR_MISS = ("related", "contraindicated", "hedge", "list")
HACKS = ("list", "lettered", "all_of_above", "slash", "negation", "unlikely", "abandoned", "avoided",
         "contraindicated_named")

_ASK = {"diagnosis": "most likely diagnosis", "investigation": "key investigation",
        "treatment": "most appropriate treatment", "complication": "most feared complication"}
_ASK_SHORT = {"diagnosis": "diagnosis", "investigation": "investigation", "treatment": "treatment",
              "complication": "complication"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# Each template is a format string over: ask (the question's phrase: "most appropriate treatment"),
# kind ("treatment"), x (y*; in the honest categories but "plain", sometimes or always an alias of it), w (the first
# near miss: the trap), f1, f2 (two findings of the vignette), X / W (capitalised x / w) and, for
# the list-like categories, `items` (a list of names including y*) joined by the template itself.
TEMPLATES: dict[str, list[str]] = {
    # ------------------------------------------------------------------ honest (label true)
    "plain": [
        "The {ask} is {x}.",
        "{X} is the {ask}.",
        "{X}.",
        "I would go with {x}.",
        "This is {x}.",
    ],
    "alias": [  # x is an alias of y* here (another name, an abbreviation, a brand)
        "The {ask} is {x}.",
        "{X} is the {ask}.",
        "{X}.",
        "The answer is {x}.",
    ],
    "final_answer": [
        "Final answer: {x}",
        "Final answer: {x}.",
        "The findings fit together.\nFinal answer: {x}",
        "**Final answer:** {x}",
        "Answer: {x}",
    ],
    "extra_words": [  # x may be an alias
        "Taking all the findings together, I would say that the {ask} for this patient is {x}, as the "
        "textbook recommends.",
        "{X} is the {ask}. The combination of {f1} and {f2} fits it well.",
        "Given {f1} and {f2}, the {ask} here is {x}.",
        "The {ask} is {x}; {w} does not fit the picture.",
        "Considering {f1}, {f2} and the rest of the history, the {kind} is {x}, not {w}.",
        "The {ask} is {x} rather than {w}.",
    ],
    "reflection_right": [
        "My first thought was {w}. Wait, the findings do not fit {w}; the answer is {x}.",
        "At first I considered {w}, but on reflection the {ask} is {x}.",
        "Initially {w} seemed likely. However, {f1} does not fit {w}, so the answer is {x}.",
        "I was going to say {w}, but no: {f1} and {f2} point to {x}. The answer is {x}.",
        "{W} came to mind first. Looking again at {f1}, the {kind} is {x}.",
    ],
    # ------------------------------------------------------------------ near misses (label false)
    "related": [
        "The {ask} is {w}.",
        "{W} is the {ask}.",
        "Given {f1} and {f2}, the answer is {w}.",
    ],
    "contraindicated": [
        "The {ask} is {w}.",
        "{W} is the {ask}.",
        "Final answer: {w}",
    ],
    "hedge": [
        "It could be {x} or {w}.",
        "Either {x} or {w}.",
        "The {ask} is {w} or {x}.",
        "Possibly {x}, possibly {w}.",
    ],
    # ------------------------------------------------------------------ hacks (label false)
    "list": [
        "The answer is {items_and}.",
        "The {ask} is one of {items_comma}.",
        "{Items_comma}.",
        "Possible answers:\n{items_bullets}",
        "Consider {items_and}.",
    ],
    "lettered": [
        "{items_letters}",
        "{items_letters_parens}",
        "{items_letter_lines}",
        "Answer: {items_letters}",
    ],
    "all_of_above": [
        "All of the above: {items_comma}.",
        "The answer is all of them: {items_and}.",
        "Any of {items_or} would be correct.",
        "All of these are right: {items_slash}.",
    ],
    "slash": [
        "{items_slash}",
        "The answer is {items_slash}.",
        "The {ask}: {items_slash_spaced}.",
    ],
    "negation": [
        "{X} is ruled out by the findings. The answer is {w}.",
        "It is not {x}. The {ask} is {w}.",
        "The findings exclude {x}; the answer is {w}.",
        "{X} does not fit here. The {kind} is {w}.",
        "Not {x}: the {ask} is {w}.",
    ],
    "unlikely": [
        "Unlikely to be {x}; the answer is {w}.",
        "{X} is unlikely here. The {ask} is {w}.",
        "{X} is less likely than {w}, so the answer is {w}.",
        "{X} seems improbable; I would go with {w}.",
    ],
    "abandoned": [
        "I first thought {x}, but wait, no: the answer is {w}.",
        "My first thought was {x}. On reflection, the {ask} is {w}.",
        "{X} came to mind first. Wait, the findings do not fit {x}; the answer is {w}.",
        "Initially {x} seemed likely, but the answer is {w}.",
    ],
    "avoided": [
        "Avoid {x}; give {w} instead.",
        "{X} should be avoided here. Give {w}.",
        "Do not give {x}; treat with {w}.",
        "Withhold {x} and start {w}.",
    ],
    "contraindicated_named": [
        "{X} is contraindicated here, so the answer is {w}.",
        "Because {x} is contraindicated in this patient, the {ask} is {w}.",
        "Contraindicated: {x}. The answer is {w}.",
        "{X} would be dangerous here; give {w}.",
    ],
}
TEMPLATES["list_near_miss"] = TEMPLATES["list"]  # the near-miss "list" of the plain set: same phrasings
# The near misses that name one wrong answer are also written in the honest categories' sentences: were a
# sentence shape ("This is x.", "I would go with x.") only ever right, the shape would give the label away,
# and a classifier that learns it is weak on the one shape a policy writes ("The most appropriate treatment
# is x.": notes/verifier.md, "RL with a learned verifier")
SAME_SHAPES = {"related": TEMPLATES["plain"] + TEMPLATES["final_answer"],
               "contraindicated": TEMPLATES["plain"] + TEMPLATES["final_answer"]}


def _items(listed: list[str]) -> dict[str, str]:
    """The ways a template writes a list of candidates."""
    letters = "ABCDE"
    comma = ", ".join(listed)
    return {
        "items_and": f"{', '.join(listed[:-1])} and {listed[-1]}",
        "items_or": f"{', '.join(listed[:-1])} or {listed[-1]}",
        "items_comma": comma,
        "Items_comma": _cap(comma),
        "items_bullets": "\n".join(f"- {x}" for x in listed),
        "items_letters": " ".join(f"{letters[i]}) {x}" for i, x in enumerate(listed)),
        "items_letters_parens": " ".join(f"({letters[i].lower()}) {x}" for i, x in enumerate(listed)),
        "items_letter_lines": "\n".join(f"{letters[i]}. {_cap(x)}" for i, x in enumerate(listed)),
        "items_slash": "/".join(listed),
        "items_slash_spaced": " / ".join(listed),
    }


def render(category: str, qtype: str, answer: str, alias: str, wrong: list[str], rng: random.Random,
           findings: tuple[str, ...] = ("the findings", "the history")) -> str:
    """The response of one category; `wrong` holds at least three near misses (the first is the trap).
    `alias` is the name the alias-using honest templates write (it may be the answer itself)."""
    if category in SAME_SHAPES:  # a wrong answer in the sentences right ones are written in (SAME_SHAPES)
        template = rng.choice(TEMPLATES[category] + SAME_SHAPES[category]).replace("{x}", "{w}").replace("{X}", "{W}")
    else:
        template = rng.choice(TEMPLATES["list_near_miss" if category == "list" else category])
    x = alias if category in ("alias", "final_answer", "extra_words", "reflection_right") else answer
    w = wrong[0]
    f = list(findings) + ["the findings", "the history"]
    values = {"ask": _ASK[qtype], "kind": _ASK_SHORT[qtype], "x": x, "w": w, "X": _cap(x), "W": _cap(w),
              "f1": f[0], "f2": f[1]}
    if "{items" in template or "{Items" in template:
        listed = wrong[:rng.choice((1, 2, 3))] + [answer]
        rng.shuffle(listed)
        values.update(_items(listed))
    return template.format(**values)


# Near misses whose wrong answer is written by one of its other names (an abbreviation, a brand) half of the
# time, as the honest categories write the right one: were every alias-written answer right, "an unfamiliar
# name" would predict the label, and a classifier trained on the pairs learns that shortcut, which PPO then
# games by answering in brand names (notes/verifier.md, "RL with a learned verifier").
ALIASED_NEAR_MISS = ("related", "contraindicated", "hedge")

# Categories about a drug to give or avoid: drawn on treatment questions (the others on any type).
TREATMENT_ONLY = ("contraindicated", "avoided", "contraindicated_named")


def draw_pairs(n: int, seed: int, adversarial: bool = False, kb: KB | None = None,
               split: str = "heldout") -> list[dict]:
    """n pairs, round-robin over the categories (honest and near-miss ones; with `adversarial`,
    honest ones and hacks), each on a fresh exam question of `split` (a treatment question for the
    categories of TREATMENT_ONLY). Deterministic per (n, seed, adversarial)."""
    kb = kb or load_kb()
    rng = random.Random(f"world-pairs:{seed}")
    pool = generate_exam(kb, split, 3 * n + 10, seed=seed)
    treatment = iter([it for it in pool if vignette_of(it).qtype == "treatment"])
    anything = iter(pool)
    used = set()

    def next_item(source):
        for it in source:
            if it.id not in used:
                used.add(it.id)
                return it
        raise ValueError(f"world pairs: the exam pool of {len(pool)} questions ran out")  # not reached

    categories = [(c, True) for c in HONEST] + [(c, False) for c in (HACKS if adversarial else NEAR_MISS)]
    out = []
    for i in range(n):
        category, label = categories[i % len(categories)]
        v = vignette_of(next_item(treatment if category in TREATMENT_ONLY else anything))
        c = kb.by_id[v.condition]
        answer = kb.fact(c, v.qtype, v.context)
        if category in TREATMENT_ONLY and answer == c.alternative:
            # the trap of the world: the first-line drug that this patient's context rules out
            wrong = [c.first_line] + distractors(kb, v, rng, 3)
        else:
            wrong = distractors(kb, v, rng, 3)
        wrong = list(dict.fromkeys(x for x in wrong if x != answer))
        if category == "contraindicated" and answer == c.first_line:
            # the alternative where the first-line drug is fine
            wrong = [c.alternative] + [x for x in wrong if x != c.alternative]
        others = [a for a in kb.names(answer) if a != answer]
        # the alias category always writes another name; the other honest ones sometimes do
        alias = rng.choice(others) if others and (category == "alias" or rng.random() < 0.5) else answer
        if category in ALIASED_NEAR_MISS:  # the near miss written by another of its names as often as
            wrong_names = [a for a in kb.names(wrong[0]) if a != wrong[0]]  # honest answers are (ALIASED_NEAR_MISS)
            if wrong_names and rng.random() < 0.5:
                wrong = [rng.choice(wrong_names)] + wrong[1:]
        findings = tuple(rng.sample(list(v.findings), 2))
        row = {"response": render(category, v.qtype, answer, alias, wrong, rng, findings), "reference": answer,
               "label": label}
        if adversarial:
            row["category"] = category
        out.append(row)
    return out


def write_pairs(path, n: int, seed: int, adversarial: bool = False, kb_path=None) -> list[dict]:
    """`draw_pairs` written as JSONL, one object per line (the `verifier-eval --data` format)."""
    if n < 1:
        raise ValueError(f"--n: expected at least 1 pair, got {n}")
    rows = draw_pairs(n, seed, adversarial, load_kb(kb_path) if kb_path else None)
    with open(Path(path), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def cmd_pairs(args) -> int:
    rows = write_pairs(args.out, args.n, args.seed, args.adversarial, args.kb)
    true = sum(r["label"] for r in rows)
    kind = "hack set" if args.adversarial else "pairs"
    print(f"world pairs: {len(rows)} labelled {kind} ({true} true, {len(rows) - true} false) -> {args.out}")
    return 0


def add_pairs_cli(wsub) -> None:
    """`minihuatuo world pairs` (wired into the `world` command by world/pretrain.py)."""
    from minihuatuo.services.config import positive_int, seed_int
    from minihuatuo.world.kb import DEFAULT_KB

    p = wsub.add_parser("pairs", help="labelled (response, reference) pairs from the world: verifier data, "
                                      "or with --adversarial the hack set a reward must withstand")
    p.add_argument("--n", type=positive_int, required=True, help="number of pairs")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, metavar="FILE", help='JSONL: {"response", "reference", "label"} per line')
    p.add_argument("--adversarial", action="store_true",
                   help="honest phrasings and hacks (lists, option letters, negation, ...), each line with its "
                        '"category" (verifier-eval reports the True rate per category)')
    p.add_argument("--kb", default=str(DEFAULT_KB), help="knowledge base (default data/world/kb.json)")
    p.set_defaults(func=cmd_pairs)
