"""Is a searched trajectory's reflection true of its case? The world's exact check (issue 19).

The paper's search LLM (GPT-4o) writes verification that is mostly true; the world's search LLM is
the small base model, and ../shared/design/demo-mechanism.md measured what it writes when asked to
refine: about one rejection in five is self-inconsistent ("Wait, ascending cholangitis does not
explain ..., so the diagnosis of Mycoplasma pneumonia does not hold"), and some are the tutor's
oracle sentence ("The previous conclusion, X, has been checked and is wrong"), which no model can
check at inference time. SFT on them teaches "always reject". The world knows which findings each
condition explains, which drug each context rules out and what each condition's facts are, so each
claim a reflection makes can be checked exactly; `reflection_faults` lists the false ones, and the
demo drops trajectories that have any (demo.search_trajectories, notes/demo.md §10).

Claims read (the sentences the tutor teaches, world/tutor.py; anything else a rejection says is not
a reason, and a rejection without one reason is a fault too):
  "A does not explain F1 and F2, so the diagnosis of B does not hold."   A = B, a known condition that
        is not the case's; each F a finding of the stem that A does not have
  "A explains F1 and F2, ..., so the conclusion holds."                   each F a finding of the stem that A has
  "..., and D is avoided in C, so it is not appropriate."                C the patient's context, D avoided in it
  "S is not the <fact> for/of A."                                        S is not A's fact
  "The diagnosis of A does not hold." / "... holds."                      A wrong / right for the case
  "The previous conclusion, X, has been checked and is wrong, ..."        never (an oracle's verdict)
  a Verification that accepts a treatment ("... so the conclusion holds") for a patient with a named
  context must name that context (`unchecked_confirmation`)
"""
from __future__ import annotations

import re

from minihuatuo.world.kb import KB

NOT_EXPLAIN = re.compile(r"(?P<a>[^.]+?) does not explain (?P<f>[^.]+?), so the diagnosis of (?P<b>[^.]+?) does not hold")
EXPLAINS = re.compile(r"(?:^|\. )(?P<a>[^.,]+?) explains (?P<f>[^.]+?)(?:, and |, so )")
AVOIDED = re.compile(r"(?P<d>[\w' -]+?) is avoided in (?P<c>[^,.]+), so it is not appropriate")
NOT_FACT = re.compile(r"(?P<s>[^.]+?) is not the (?P<fact>key investigation|first-line treatment|most feared "
                      r"complication) (?:for|of) (?P<a>[^.]+?)\.")
DIAGNOSIS_VERDICT = re.compile(r"[Tt]he diagnosis of (?P<a>[^.;,]+?) (?P<v>does not hold|holds|stands)")
ORACLE = "has been checked and is wrong"
FACT_QTYPE = {"key investigation": "investigation", "first-line treatment": "treatment",
              "most feared complication": "complication"}


def read_findings(text: str, findings) -> tuple[list[str], str]:
    """ "a, b and c" read against the patient's findings (world/kb.join's inverse; a finding may hold
    "and" itself): (the findings named, what is left that names none of them)."""
    named = [f for f in sorted(findings, key=len, reverse=True) if f in text]
    for f in named:
        text = text.replace(f, "\0")
    rest = re.sub(r"\s+", " ", re.sub(r"\0|,|\band\b", " ", text)).strip()
    return named, rest


def _condition(kb: KB, name: str):
    key = name.strip().lower()
    for c in kb.conditions:
        if key == c.name.lower() or key in (a.lower() for a in c.aliases):
            return c
    return None


def _context(kb: KB, name: str) -> str | None:
    return next((cid for cid, c in kb.contexts.items() if c["name"].lower() == name.strip().lower()), None)


def claim_faults(kb: KB, world: dict, text: str) -> list[str]:
    """The false claims in one action's text, each as a short reason."""
    truth = kb.by_id[world["condition"]]
    faults = []
    if ORACLE in text:
        faults.append("oracle verdict: the rejection gives no reason a reader could check")
    for m in NOT_EXPLAIN.finditer(text):
        a, b = _condition(kb, m["a"]), _condition(kb, m["b"])
        if a is None or b is None or a.id != b.id:
            faults.append(f"self-inconsistent: '{m['a']}' does not explain, so '{m['b']}' does not hold")
            continue
        if a.id == truth.id:
            faults.append(f"rejects the right diagnosis, {a.name}")
        named, rest = read_findings(m["f"], world["findings"])
        if rest:
            faults.append(f"'{rest}' is not a finding of this patient")
        faults += [f"{a.name} does explain '{f}'" for f in named if f in a.findings]
    for m in EXPLAINS.finditer(text):
        a = _condition(kb, m["a"])
        if a is None:
            continue  # not a condition's name ("Together, ..." fits; anything else is not a claim read here)
        named, rest = read_findings(m["f"], world["findings"])
        if rest:
            faults.append(f"'{rest}' is not a finding of this patient")
        faults += [f"{a.name} does not explain '{f}'" for f in named if f not in a.findings]
    for m in AVOIDED.finditer(text):
        ctx = _context(kb, m["c"])
        drug = m["d"].split(" and ")[-1].split(", ")[-1].strip()
        if ctx is None or ctx != world.get("context"):
            faults.append(f"'{m['c']}' is not this patient's context")
        elif ctx not in kb.avoid.get(drug, ()):
            faults.append(f"{drug} is not avoided in {m['c']}")
    for m in NOT_FACT.finditer(text):
        a = _condition(kb, m["a"])
        if a is None:
            faults.append(f"unknown condition '{m['a']}'")
        elif m["s"].strip().lower() in (n.lower() for n in kb.names(kb.fact(a, FACT_QTYPE[m["fact"]]))):
            faults.append(f"{m['s']} is the {m['fact']} {a.name} has")
    for m in DIAGNOSIS_VERDICT.finditer(text):
        a = _condition(kb, m["a"])
        if a is None:
            faults.append(f"unknown condition '{m['a']}'")
        elif (m["v"] == "does not hold") == (a.id == truth.id):
            faults.append(f"says the diagnosis of {a.name} {m['v']}")
    return faults


def is_rejection(action: dict) -> bool:
    return action["action"] == "Verification" and "does not hold" in action["content"]


def grounded(text: str) -> bool:
    """A rejection names at least one checkable reason (a finding not explained, an avoided drug, a
    wrong fact)."""
    return any(p.search(text) for p in (NOT_EXPLAIN, AVOIDED, NOT_FACT))


def reflection_faults(kb: KB, world: dict, actions: list[dict]) -> list[str]:
    """Every false claim of a trajectory's thinking and verification (its Long_CoT actions), and
    every rejection that gives no checkable reason. [] = the reflection is true of the case."""
    faults = []
    for n, a in enumerate(actions):
        if a["action"] == "Final Conclusion":
            continue
        faults += [f"step {n + 1}: {f}" for f in claim_faults(kb, world, a["content"])]
        if is_rejection(a) and not grounded(a["content"]) and ORACLE not in a["content"]:
            faults.append(f"step {n + 1}: a rejection without a reason")
        if unchecked_confirmation(kb, world, a):
            faults.append(f"step {n + 1}: confirms a treatment without checking the patient's "
                          f"{kb.contexts[world['context']]['name']}")
    return faults


def unchecked_confirmation(kb: KB, world: dict, action: dict) -> bool:
    """A Verification that accepts a treatment for a patient with a named context (pregnancy,
    asthma, ...) without a word about that context. True or not of this drug, it is no check: the
    same sentence confirms the drug the context rules out, and SFT on it teaches that a treatment
    needs no check (the contraindicated questions stay wrong after SFT)."""
    return (world["qtype"] == "treatment" and bool(world.get("context")) and action["action"] == "Verification"
            and "holds" in action["content"] and "does not hold" not in action["content"]
            and kb.contexts[world["context"]]["name"].lower() not in action["content"].lower())


def drop_false_reflections(kb: KB, records: list[dict], worlds: dict) -> list[dict]:
    """Mark each found trajectory whose reflection says something false of its case (or rejects
    without a reason) as discarded, failure_reason "false_reflection" and its faults as the detail,
    so that the SFT files (search_cli.write_datasets) leave it out and the search summary counts it.
    `worlds`: source_id -> the world's record of the item (condition, findings, context, ...).
    Returns the marked records (the others unchanged)."""
    marked = []
    for r in records:
        world = worlds.get(r.get("source_id"))
        if not r["search"]["success"] or world is None:
            continue
        faults = reflection_faults(kb, world, r["Long_CoT"])
        if faults:
            r["search"].update(success=False, failure_reason="false_reflection", failure_detail=faults)
            marked.append(r)
    return marked
