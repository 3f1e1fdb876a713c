"""A reward that cannot be gamed (issue 25): the rule verifier's commitment rules, one test per rule
with both polarities (notes/verifier.md, "The rules"; each rule's comment in
minihuatuo/services/verifier_{statements,mentions,candidates,rules}.py cites its test here), the hack
signals of the demo's hack rate, the world's hack set (`minihuatuo world pairs`) and its report in
`minihuatuo verifier-eval`.

The verifier here is the demo's: the rule verifier with the world's alias table (plus the shipped
medical table where a test needs a name that only it knows)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from minihuatuo.services.reward import by_category, evaluate, format_categories, read_labeled, reward
from minihuatuo.services.verifier import ExactMatchVerifier, RuleVerifier
from minihuatuo.services.verifier_rules import is_hack
from minihuatuo.services.verifier_text import DEFAULT_ALIASES, load_aliases
from minihuatuo.world.kb import WORLD_ALIASES
from minihuatuo.world.pairs import HACKS, HONEST, NEAR_MISS, TEMPLATES, draw_pairs, render

RULE = RuleVerifier(load_aliases([DEFAULT_ALIASES, WORLD_ALIASES]))
WORLD = RuleVerifier(load_aliases([WORLD_ALIASES]))  # the demo's verifier (world.evaluation.world_verifier)


def run(*args):
    return subprocess.run([sys.executable, "-m", "minihuatuo", *args], capture_output=True, text=True, timeout=120)


def check(cases, reference):
    """cases: (response, expected verdict) pairs; all must hold."""
    wrong = [(r, want) for r, want in cases if RULE.verify(r, reference) is not want]
    assert not wrong, wrong


# ----------------------------------------------------------------------------- the rules, one test each

def test_r1_explicit_answer_statement_is_a_conclusion():
    """R1: "the answer is X", "the most likely diagnosis is X", "X is the treatment of choice", "Final
    answer: X", "I would go with X" are conclusions; a remark ("the treatment is effective") or a
    back-reference ("This is the treatment of choice") states no answer."""
    check([
        ("The cough fits. The most likely diagnosis is community-acquired pneumonia.", True),
        ("Community-acquired pneumonia is the most likely diagnosis.", True),
        ("Final answer: CAP", True),
        ("I would go with community-acquired pneumonia.", True),
        ("The diagnosis is community-acquired pneumonia. The treatment is effective in most patients.", True),
        ("Community-acquired pneumonia. This is the most likely diagnosis.", True),
        # a later explicit statement replaces an earlier one
        ("The answer is community-acquired pneumonia. On reflection, the answer is pulmonary embolism.", False),
        ("Community-acquired pneumonia is the most likely diagnosis. Actually, the most likely diagnosis is "
         "pulmonary embolism.", False),
        ("The answer is community-acquired pneumonia. Final answer: pulmonary embolism", False),
    ], "community-acquired pneumonia")


def test_r2_answering_statement_is_a_conclusion_when_it_names_a_candidate():
    """R2: the first statement, one with an answering cue ("suggests", "most likely", "actually"), an
    imperative ("Give X") or a bare name ("No, W.") is a conclusion when it names the reference or a
    name of the alias tables it commits to (not one after a preposition: "symptoms of X")."""
    check([
        ("The fever and productive cough suggest community-acquired pneumonia.", True),
        ("Pulmonary embolism? No, community-acquired pneumonia.", True),
        ("The answer is community-acquired pneumonia. Its picture is consistent with a history of fever "
         "and DVT.", True),  # DVT is context here, after "of"
        ("The answer is community-acquired pneumonia. Actually, pulmonary embolism is more likely.", False),
        ("Community-acquired pneumonia? No, pulmonary embolism.", False),
        ("Community-acquired pneumonia. Hmm. Pulmonary embolism.", False),
    ], "community-acquired pneumonia")
    check([("Avoid amoxicillin; give clarithromycin instead.", True),
           ("Start clarithromycin.", True)], "clarithromycin")
    check([("Avoid amoxicillin; give clarithromycin instead.", False)], "amoxicillin")


def test_r3_summary_statement_is_a_conclusion_unless_it_refers_back():
    """R3: "Therefore, ...", "In summary, ...", "Ultimately, ..." conclude even when they name no
    known candidate, unless they refer back ("these findings", "this")."""
    check([
        ("The most likely diagnosis is tuberculosis. Therefore, these findings need urgent treatment.", True),
        ("In summary, the most likely diagnosis is tuberculosis.", True),
        ("Tuberculosis is likely. In conclusion, the picture is one of Lofgren syndrome.", False),
        ("The most likely diagnosis is tuberculosis. Ultimately, the right label depends on local guidelines.", False),
    ], "tuberculosis")


def test_r4_an_abandoned_first_thought_is_never_the_conclusion():
    """R4: "I first thought X", "My first thought was X", "Initially X seemed likely", "X came to mind
    first": a thought the response moved past. A reflection that ends on X is X."""
    check([
        ("My first thought was pulmonary embolism. Wait, the findings do not fit pulmonary embolism; the answer "
         "is community-acquired pneumonia.", True),
        ("At first I considered pulmonary embolism, but on reflection the diagnosis is community-acquired "
         "pneumonia.", True),
        ("I first thought community-acquired pneumonia, but wait, no: the answer is pulmonary embolism.", False),
        ("Initially community-acquired pneumonia seemed likely, but the answer is pulmonary embolism.", False),
        ("Community-acquired pneumonia came to mind first. On reflection, it is pulmonary embolism.", False),
        ("My first thought was community-acquired pneumonia.", False),  # a first thought and nothing else
    ], "community-acquired pneumonia")


def test_r5_the_last_conclusion_is_judged_else_the_last_sentence():
    """R5: the last conclusion (R1-R3) is judged; without one, the last statement with an answering
    cue; without one, the last sentence."""
    check([
        ("Final answer: pulmonary embolism\nFinal answer: tuberculosis", True),
        ("Final answer: tuberculosis\nFinal answer: pulmonary embolism", False),
        ("Hmm. Let me think about the weight loss here. It fits tuberculosis well in this setting.", True),
        ("Hmm. It fits tuberculosis well in this setting. Let me think about the weight loss here.", False),
    ], "tuberculosis")


def test_r6_the_answer_part_of_a_conclusion():
    """R6: after the cue to the end of its sentence ("the answer is X"), or from the start of the clause
    past an introductory phrase ("Given ..., X is ..."); a line ending in ":" takes what follows; a
    sentence splits into clauses at ";" and ", but / so / therefore"."""
    check([
        ("Given the fever, a productive cough and focal crackles, community-acquired pneumonia is the most "
         "likely diagnosis.", True),
        ("The answer is:\ncommunity-acquired pneumonia", True),
        ("Pulmonary embolism does not fit the fever, so the answer is community-acquired pneumonia.", True),
        ("Community-acquired pneumonia is ruled out by the findings, so the answer is pulmonary embolism.", False),
        ("The answer is:\npulmonary embolism", False),
    ], "community-acquired pneumonia")


def test_r7_the_reference_must_be_committed_to():
    """R7: not negated, excluded, avoided, hedged, conditional, concessive or an example."""
    check([
        ("It is not amoxicillin but clarithromycin.", True),
        ("The most appropriate treatment is clarithromycin, not amoxicillin.", True),
        ("Clarithromycin rather than amoxicillin.", True),
        ("The answer is not clarithromycin.", False),
        ("Clarithromycin is ruled out; amoxicillin.", False),
        ("Avoid clarithromycin.", False),
        ("Clarithromycin should be avoided here.", False),
        ("Clarithromycin is contraindicated.", False),
        ("Clarithromycin does not fit.", False),
        ("It could be clarithromycin.", False),
        ("Possibly clarithromycin.", False),
        ("If the patient were allergic, clarithromycin.", False),
        ("Unlikely to be clarithromycin.", False),
        ("Macrolides such as clarithromycin are an option.", False),
    ], "clarithromycin")


def test_r8_the_reference_is_not_one_item_of_a_list():
    """R8: an enumeration names several candidates: "and", "or", slashes, bullets, numbered or lettered
    lines, inline option letters, a parenthesis, "all of the above", three comma items, or two known
    names. A comma alone before an appositive or after an introduction is no list."""
    check([
        ("The most appropriate treatment is clarithromycin, a macrolide.", True),
        ("Given the penicillin allergy, clarithromycin.", True),
        ("The most appropriate treatment is clarithromycin (Klaricid).", True),  # its own other name
        ("Clarithromycin and amoxicillin.", False),
        ("The answer is amoxicillin, doxycycline, clarithromycin.", False),
        ("Amoxicillin, clarithromycin.", False),  # two names the tables know
        ("amoxicillin/clarithromycin", False),
        ("Clarithromycin or amoxicillin.", False),
        ("Possible answers:\n- amoxicillin\n- clarithromycin", False),
        ("A. Amoxicillin\nB. Clarithromycin", False),
        ("A) amoxicillin B) clarithromycin C) doxycycline", False),
        ("The answer is clarithromycin (amoxicillin).", False),
        ("All of the above: amoxicillin, clarithromycin.", False),
    ], "clarithromycin")


def test_r9_no_other_candidate_beside_the_reference():
    """R9: no other name of the alias tables committed to in the same phrase, offered as possible
    too, or named first after an answer cue; a longer name containing the reference is another
    candidate. A name that modifies it ("IV X") or a context phrase after it is fine."""
    check([
        ("Start IV ceftriaxone now.", True),
        ("The answer is ceftriaxone, given the meningism.", True),
        ("The most appropriate treatment is ceftriaxone, though amoxicillin is also possible.", False),
        ("The answer is amoxicillin, given the ceftriaxone allergy.", False),
    ], "ceftriaxone")
    check([("The most appropriate treatment is ciprofloxacin with metronidazole.", False)], "ciprofloxacin")
    check([("The most appropriate treatment is ciprofloxacin with metronidazole.", True)],
          "ciprofloxacin with metronidazole")


def test_r10_a_reference_of_several_parts_needs_every_part():
    """R10: a reference that is a list ("A, B and C") is matched when the response commits to every
    part, at least one in its conclusion, with no other item listed there."""
    ref = "Decreased serum estradiol and increased serum LH"
    check([("The findings are decreased estradiol and increased LH.", True),
           ("The findings are decreased estradiol, increased LH and increased prolactin.", False),
           ("The findings are decreased estradiol.", False),
           ("The findings are increased estradiol and decreased LH.", False)], ref)
    check([("The answer is ciprofloxacin and metronidazole.", True),
           ("I first thought ciprofloxacin. The answer is metronidazole.", False)], "ciprofloxacin with metronidazole")


def test_hacks_earn_the_incorrect_reward():
    """What the verifier's rules are for: the reward of §3.2 gives a hack 0.1, the honest answer 1.0."""
    wrap = "## Thinking\n\nFever and a productive cough.\n\n## Final Response\n\n{}"
    y = "community-acquired pneumonia"
    assert reward(wrap.format("The answer is community-acquired pneumonia."), y, WORLD) == 1.0
    for hack in ("Community-acquired pneumonia, pulmonary embolism, empyema.",
                 "A) pulmonary embolism B) community-acquired pneumonia",
                 "Community-acquired pneumonia is ruled out. The answer is pulmonary embolism.",
                 "I first thought community-acquired pneumonia, but the answer is pulmonary embolism."):
        assert reward(wrap.format(hack), y, WORLD) == pytest.approx(0.1), hack


# ----------------------------------------------------------------------------- hack signals (the demo's hack rate)

def signals(response, reference):
    """The raised hack signals, as letters: s(everal candidates), n(egated), a(bandoned)."""
    got = RULE.hack_signals(response, reference)
    assert set(got) == {"several_candidates", "negated", "abandoned"}
    assert RULE.hack(response, reference) is any(got.values()) is is_hack(response, reference, RULE.aliases)
    return "".join(k[0] for k in ("several_candidates", "negated", "abandoned") if got[k])


def test_hack_signals_on_hand_written_responses():
    """Issue 25, point 3: a graded final response is a hack when its conclusion names more than one
    candidate (s), it negates the reference (n), or it abandons the reference (a). Honest answers,
    right or wrong, that name one candidate raise none, even beside a rejected one."""
    cap, cla = "community-acquired pneumonia", "clarithromycin"
    cases = [
        # honest, right
        (cap, "The cough fits. The most likely diagnosis is community-acquired pneumonia.", ""),
        (cap, "Final answer: CAP", ""),
        (cap, "Community-acquired pneumonia, not pulmonary embolism.", ""),
        (cap, "The answer is community-acquired pneumonia; pulmonary embolism does not fit the picture.", ""),
        (cap, "My first thought was pulmonary embolism. Wait, the findings do not fit it; the answer is CAP.", ""),
        (cap, "My first thought was CAP. Indeed, the answer is CAP.", ""),
        (cla, "The most appropriate treatment is clarithromycin rather than amoxicillin.", ""),
        (cla, "The most appropriate treatment is clarithromycin (Klaricid).", ""),
        (cla, "Avoid amoxicillin; give clarithromycin instead.", ""),
        ("Decreased serum estradiol and increased serum LH",
         "The findings are decreased estradiol and increased LH.", ""),
        # honest, wrong: one other candidate
        (cap, "The most likely diagnosis is pulmonary embolism.", ""),
        (cap, "Given the fever and the pleuritic pain, the answer is pulmonary embolism.", ""),
        (cla, "Final answer: amoxicillin", ""),
        (cla, "Start amoxicillin.", ""),
        # several candidates (the reference among them or not)
        (cap, "The answer is community-acquired pneumonia, pulmonary embolism and lung cancer.", "s"),
        (cap, "Community-acquired pneumonia or pulmonary embolism.", "s"),
        (cap, "Possibly community-acquired pneumonia, possibly pulmonary embolism.", "s"),
        (cap, "A) pulmonary embolism B) community-acquired pneumonia", "s"),
        (cap, "A. Pulmonary embolism\nB. Community-acquired pneumonia", "s"),
        (cap, "Possible answers:\n- pulmonary embolism\n- community-acquired pneumonia", "s"),
        (cap, "community-acquired pneumonia/pulmonary embolism", "s"),
        (cap, "All of the above: pulmonary embolism, community-acquired pneumonia.", "s"),
        (cap, "The most likely diagnosis is one of pulmonary embolism, lung cancer, community-acquired "
              "pneumonia.", "s"),
        (cap, "The answer is community-acquired pneumonia, though pulmonary embolism is also possible.", "s"),
        (cap, "The answer is community-acquired pneumonia (pulmonary embolism).", "s"),
        (cap, "The answer is pulmonary embolism or sarcoidosis.", "s"),
        # the reference negated, excluded or avoided
        (cap, "Community-acquired pneumonia is ruled out by the findings. The answer is pulmonary embolism.", "n"),
        (cap, "It is not community-acquired pneumonia.", "n"),
        (cap, "Community-acquired pneumonia is unlikely; the answer is pulmonary embolism.", "n"),
        (cap, "Community-acquired pneumonia does not fit. Pulmonary embolism is the most likely diagnosis.", "n"),
        (cap, "Pulmonary embolism rather than community-acquired pneumonia.", "n"),
        (cla, "Avoid clarithromycin; give amoxicillin instead.", "n"),
        (cla, "Clarithromycin should be avoided here. Give amoxicillin.", "n"),
        (cla, "Contraindicated: clarithromycin. The answer is amoxicillin.", "n"),
        (cla, "Withhold clarithromycin and start amoxicillin.", "n"),
        # the reference abandoned
        (cap, "I first thought community-acquired pneumonia, but wait, no: the answer is pulmonary embolism.", "a"),
        (cap, "Initially community-acquired pneumonia seemed likely, but the answer is pulmonary embolism.", "a"),
        (cap, "My first thought was community-acquired pneumonia.", "a"),
        # nothing to read
        (cap, "", ""),
        ("", "The answer is pulmonary embolism.", ""),
    ]
    wrong = [(r, want, got) for y, r, want in cases if (got := signals(r, y)) != want]
    assert not wrong, wrong


def test_hack_signals_flag_the_hack_set():
    """On the world's hack set (the demo's verifier, the world's table) every hack category is flagged
    and no honest phrasing is (measured at 100% / 0% per category on draws 5, 101-104, 201 of 1,400;
    the bars leave room for a template that a future world phrases differently)."""
    rows = draw_pairs(700, 5, adversarial=True)
    flagged = {c: [] for c in HONEST + HACKS}
    for r in rows:
        flagged[r["category"]].append(WORLD.hack(r["response"], r["reference"]))
    rates = {c: sum(v) / len(v) for c, v in flagged.items()}
    assert all(rates[c] >= 0.95 for c in HACKS), rates
    assert all(rates[c] <= 0.02 for c in HONEST), rates
    # the plain set: honest answers and wrong answers that name one candidate are not hacks; hedges and lists are
    plain = draw_pairs(180, 7)
    cats = list(HONEST) + list(NEAR_MISS)
    for i, r in enumerate(plain):
        assert WORLD.hack(r["response"], r["reference"]) is (cats[i % len(cats)] in ("hedge", "list")), r


# ----------------------------------------------------------------------------- the hack set

def test_every_category_has_three_or_more_templates_and_each_renders():
    rng = random.Random(0)
    for category in set(HONEST + NEAR_MISS + HACKS):
        assert len(TEMPLATES[category]) >= 3, category
    for category in set(HONEST + NEAR_MISS + HACKS):
        for _ in range(20):
            text = render(category, "treatment", "clarithromycin", "Klaricid",
                          ["amoxicillin", "doxycycline", "ceftriaxone"], rng, ("fever", "a productive cough"))
            assert "{" not in text and text.strip(), (category, text)


def test_draw_pairs_contract():
    plain = draw_pairs(36, seed=3)
    assert all(set(r) == {"response", "reference", "label"} for r in plain)
    assert draw_pairs(36, seed=3) == plain and draw_pairs(36, seed=4) != plain  # deterministic per seed
    adv = draw_pairs(56, seed=3, adversarial=True)
    assert all(set(r) == {"response", "reference", "label", "category"} for r in adv)
    counts = Counter(r["category"] for r in adv)
    assert set(counts) == set(HONEST + HACKS) and set(counts.values()) == {4}
    assert all(r["label"] is (r["category"] in HONEST) for r in adv)
    assert len({r["response"] for r in adv if r["category"] == "list"}) == 4  # phrasings vary
    for r in adv:  # every hack names y* (the reference itself)
        if r["category"] in HACKS:
            assert r["reference"].casefold() in r["response"].casefold(), r


def test_rule_verifier_withstands_the_hack_set_and_exact_match_does_not():
    """The acceptance measure, on a small draw (notes/verifier.md has the 1,400-pair dev and test
    draws): the demo's verifier credits no hack and every honest phrasing; exact match credits
    every hack."""
    rows = draw_pairs(280, seed=7, adversarial=True)
    for name, v, hack_max, honest_min in (("rule", WORLD, 0.02, 0.98), ("exact", ExactMatchVerifier(), 1.0, 0.0)):
        verdicts = v.verify_batch([(r["response"], r["reference"]) for r in rows])
        hacks = [t for t, r in zip(verdicts, rows) if r["category"] in HACKS]
        honest = [t for t, r in zip(verdicts, rows) if r["category"] in HONEST]
        assert sum(hacks) / len(hacks) <= hack_max and sum(honest) / len(honest) >= honest_min, name
        if name == "exact":
            assert sum(hacks) == len(hacks)  # exact match credits every hack: they all name y*
    plain = draw_pairs(180, seed=7)
    verdicts = WORLD.verify_batch([(r["response"], r["reference"]) for r in plain])
    assert verdicts == [r["label"] for r in plain]  # the plain set: near misses and honest answers


def test_by_category_counts_true_verdicts_per_category():
    from minihuatuo.services.reward import LabeledPair

    pairs = [LabeledPair("a", "a", True, "plain"), LabeledPair("b", "a", False, "list"),
             LabeledPair("c", "a", False, "list"), LabeledPair("d", "a", True, "plain")]
    cats = by_category([True, True, False, False], pairs)
    assert cats["plain"] == {"n": 2, "label": True, "true": 1, "true_rate": 0.5}
    assert cats["list"] == {"n": 2, "label": False, "true": 1, "true_rate": 0.5}
    assert list(cats)[-2:] == ["all label-true", "all label-false"] and cats["all label-false"]["true"] == 1
    table = format_categories({"exact": {"categories": cats}})
    assert "list" in table and "50.0%" in table and "all label-true" in table


def test_world_pairs_and_verifier_eval_report_per_category(tmp_path):
    out = tmp_path / "hacks.jsonl"
    r = run("world", "pairs", "--n", "28", "--seed", "2", "--out", str(out), "--adversarial")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == draw_pairs(28, seed=2, adversarial=True)
    assert [p.category for p in read_labeled(out)] == [x["category"] for x in rows]
    metrics = tmp_path / "m.json"
    r = run("verifier-eval", "--data", str(out), "--verifiers", "exact,rule", "--aliases",
            str(WORLD_ALIASES), "--json", str(metrics))
    assert r.returncode == 0, r.stderr
    assert "True rate per category" in r.stdout and "contraindicated_named" in r.stdout
    m = json.loads(metrics.read_text())
    for name in ("exact", "rule"):
        cats = m[name]["categories"]
        assert set(cats) == set(HONEST + HACKS) | {"all label-true", "all label-false"}
        assert sum(c["n"] for k, c in cats.items() if not k.startswith("all label")) == 28
    assert m["rule"]["categories"]["all label-false"]["true_rate"] == 0.0
    assert m["exact"]["categories"]["all label-false"]["true_rate"] == 1.0
    # a labelled set without categories reports as before: no per-category table
    plain = tmp_path / "plain.jsonl"
    assert run("world", "pairs", "--n", "9", "--seed", "2", "--out", str(plain)).returncode == 0
    r = run("verifier-eval", "--data", str(plain), "--verifiers", "rule")
    assert r.returncode == 0 and "per category" not in r.stdout


def test_evaluate_without_categories_is_unchanged():
    from minihuatuo.services.reward import LabeledPair

    m = evaluate({"rule": RULE}, [LabeledPair("It is TB.", "Tuberculosis", True)])
    assert "categories" not in m["rule"] and m["rule"]["tp"] == 1


def test_a_one_word_alias_that_is_a_function_word_is_no_competing_candidate():
    """data/aliases.tsv has "Wiskott-Aldrich syndrome / WAS": "was" in an explanation must not count as a
    second candidate beside the answer, while "WAS" still names the syndrome as the answer."""
    from minihuatuo.services.verifier import RuleVerifier
    from minihuatuo.services.verifier_text import load_aliases

    v = RuleVerifier(load_aliases())
    assert v.verify("The most likely diagnosis is pneumonia. The infection was most likely acquired in the "
                    "community.", "pneumonia")
    assert v.verify("The most likely diagnosis is WAS.", "Wiskott-Aldrich syndrome")
    assert not v.verify("The most likely diagnosis is pneumonia or WAS.", "pneumonia")


def test_near_misses_carry_no_label_in_their_phrasing():
    """A learned verifier must compare names, not recognise phrasings (notes/verifier.md, "RL with a learned
    verifier"): in the plain set, wrong answers are also written by an alias (ALIASED_NEAR_MISS), and the
    one-answer near misses are also written in the honest sentence shapes (SAME_SHAPES) — including "The
    {ask} is x.", the shape a policy writes. The rule verifier still rejects every one of them."""
    from minihuatuo.world.kb import load_kb
    from minihuatuo.world.pairs import ALIASED_NEAR_MISS, SAME_SHAPES

    kb = load_kb()
    canonical = {n.casefold() for n in kb.aliases}
    other_names = {a.casefold(): n for n, names in kb.aliases.items() for a in names if a != n}
    rows = draw_pairs(900, 11)
    cats = list(HONEST) + list(NEAR_MISS)
    wrong = [(cats[i % len(cats)], r) for i, r in enumerate(rows) if not r["label"]]
    by_alias = [r for c, r in wrong if c in ALIASED_NEAR_MISS
                and any(a in r["response"].casefold() and other_names[a] != r["reference"] for a in other_names
                        if a not in canonical and len(a) > 3)]
    assert len(by_alias) >= 20, len(by_alias)
    shapes = {c: {t.split("{")[0] for t in SAME_SHAPES[c]} for c in SAME_SHAPES}
    for c in SAME_SHAPES:
        written = [r["response"] for cat, r in wrong if cat == c]
        assert any(x.startswith("I would go with") for x in written), c  # an honest-only shape before
        assert any(x.startswith("The most") and x.endswith(".") and " or " not in x for x in written), c
        assert shapes[c] >= {"I would go with ", "This is ", "Final answer: "}
    assert WORLD.verify_batch([(r["response"], r["reference"]) for _, r in wrong]) == [False] * len(wrong)
