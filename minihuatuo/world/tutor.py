"""The biased tutor: the worked reasoning the world's base model is pretrained on (issue 8).

The base model stands in for a pretrained instruct LLM: it must write chains of thought in the
search format (search_prompts.py: Inner Thinking / Final Conclusion / Verification, and
continuations under the four strategies of paper §3.1) so that it can act as its own search LLM,
and it must be wrong often enough that search, SFT and RL have something to fix.

Random mistakes in the tutor's examples do not achieve that: greedy decoding averages them away
(shared/design/world-notes.md). The tutor's mistakes are therefore *systematic*, the habits of a
hurried student:
  - anchoring:  with probability `anchor`, the diagnosis is the classic condition of the *first*
                finding of the stem, whatever the other findings say;
  - no check:   with probability `skip_check`, the patient's context (pregnancy, asthma, ...) is
                ignored and the first-line treatment is given even where it is contraindicated;
  - slips:      rarely (`slip`), a wrong fact is stated for the right condition.
Its refinements (after the verifier rejected a conclusion) find and fix the mistake with a
probability that depends on the strategy (`fix`), so that search succeeds often, but not always.
The facts themselves are taught correctly (textbook and fact questions): what is biased is the
habit of reasoning, which is what the recipe's SFT and RL are meant to change.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace

from minihuatuo.services.config import ConfigError, require_fraction
from minihuatuo.services.replies import render
from minihuatuo.services.response_format import think_then_answer
from minihuatuo.stages.search import allowed_strategies
from minihuatuo.stages.search_prompts import SearchPrompts
from minihuatuo.stages.search_reformat import INIT, conclusion, previous_reasoning, template_complex_cot
from minihuatuo.world.exam import distractors
from minihuatuo.world.kb import KB, Vignette, context_sentence, join, person

ANSWER_SENTENCE = {
    "diagnosis": "The most likely diagnosis is {}.",
    "investigation": "The key investigation is {}.",
    "treatment": "The most appropriate treatment is {}.",
    "complication": "The most feared complication is {}.",
}
FACT_NAME = {"investigation": "key investigation", "treatment": "first-line treatment",
             "complication": "most feared complication"}
FACT_OF = {"investigation": "for", "treatment": "for", "complication": "of"}  # "the key investigation for <condition>"


@dataclass
class TutorConfig:
    """The tutor's habits (module docstring). notes/world.md reports what each setting does to the
    base model's held-out accuracy."""

    anchor: float = 0.95  # P(diagnose the classic condition of the first finding, when that is another condition)
    skip_check: float = 0.9  # P(ignore the patient's context in a treatment question)
    slip: float = 0.04  # P(state a wrong fact for the condition)
    alias: float = 0.3  # P(name an answer by one of its aliases): the verifier must know them
    # P(a refinement finds and fixes the mistakes), per strategy (§3.1's four strategies)
    fix: dict = field(default_factory=lambda: {"Exploring New Paths": 0.6, "Backtracking": 0.65,
                                               "Verification": 0.75, "Correction": 0.7})

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_fraction(self, "anchor", "skip_check", "slip", "alias")
        for strategy, p in self.fix.items():
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ConfigError("fix", f"{strategy}: expected a number in [0, 1], got {p!r}")


@dataclass(frozen=True)
class Attempt:
    """What one chain of thought concludes, and the mistakes it makes on the way."""

    diagnosis: str  # condition id
    anchored_on: str | None  # the finding the diagnosis was anchored on (None: the whole combination)
    checked: bool  # the contraindication check was done (treatment questions with a context)
    slip: str | None  # a wrong fact stated instead of the right one
    answer: str  # canonical answer concluded


def conclude(kb: KB, v: Vignette, diagnosis: str, checked: bool, slip: str | None) -> str:
    if slip:
        return slip
    return kb.fact(kb.by_id[diagnosis], v.qtype, v.context if checked else None)


def first_attempt(kb: KB, v: Vignette, rng: random.Random, cfg: TutorConfig) -> Attempt:
    """e_0's decisions, with the tutor's habits."""
    lead = v.findings[0]
    anchored = kb.classic[lead] != v.condition and rng.random() < cfg.anchor
    diagnosis = kb.classic[lead] if anchored else v.condition
    checked = not (v.qtype == "treatment" and v.context) or rng.random() >= cfg.skip_check
    slip = None
    if v.qtype != "diagnosis" and rng.random() < cfg.slip:
        slip = distractors(kb, replace(v, condition=diagnosis), rng, 1)[0]
    return Attempt(diagnosis, lead if anchored else None, checked, slip, conclude(kb, v, diagnosis, checked, slip))


def right_attempt(kb: KB, v: Vignette) -> Attempt:
    return Attempt(v.condition, None, True, None, kb.fact(kb.by_id[v.condition], v.qtype, v.context))


def failed_refinement(kb: KB, v: Vignette, prev: Attempt, rng: random.Random) -> Attempt:
    """A refinement that still concludes wrongly: it fixes one mistake of two, or anchors on
    another misleading finding, or slips."""
    if prev.anchored_on and v.qtype == "treatment" and v.context and not prev.checked \
            and v.context in kb.avoid[kb.by_id[v.condition].first_line]:
        keep_anchor = rng.random() < 0.5  # fix one of the two mistakes
        diagnosis = prev.diagnosis if keep_anchor else v.condition
        checked = keep_anchor
        return Attempt(diagnosis, prev.anchored_on if keep_anchor else None, checked, None,
                       conclude(kb, v, diagnosis, checked, None))
    others = [f for f in v.findings if kb.classic[f] not in (v.condition, prev.diagnosis)]
    checked = prev.checked or not v.context
    if others:
        f = rng.choice(others)
        a = Attempt(kb.classic[f], f, checked, None, conclude(kb, v, kb.classic[f], checked, None))
        if a.answer != kb.fact(kb.by_id[v.condition], v.qtype, v.context):
            return a
    right = kb.fact(kb.by_id[v.condition], v.qtype, v.context)
    wrong = [d for d in distractors(kb, v, rng, 4) if d != prev.answer and d != right] or [prev.answer]
    if v.qtype == "diagnosis":  # a wrong reading of the whole combination
        other = next(c.id for c in kb.conditions if c.name == wrong[0])
        return Attempt(other, None, True, None, wrong[0])
    return Attempt(v.condition, None, True, wrong[0], wrong[0])


# ---------------------------------------------------------------------------------------------------
# sentences


def write_answer(kb: KB, name: str, rng: random.Random, cfg: TutorConfig) -> str:
    """The answer as written: its name, or now and then one of its aliases."""
    names = kb.names(name)
    return rng.choice(names[1:]) if len(names) > 1 and rng.random() < cfg.alias else name


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def thought(title: str, content: str) -> dict:
    return {"action": "Inner Thinking", "title": title, "content": content}


def findings_step(kb: KB, v: Vignette) -> dict:
    extra = f" {context_sentence(kb, v)}" if v.context else ""
    return thought("Findings", f"The patient is a {person(v)} with {join(v.findings)}.{extra}")


def diagnosis_step(kb: KB, v: Vignette, a: Attempt, title: str = "Diagnosis") -> dict:
    """Refinements title it "New diagnosis": e_0's own diagnosis step then keeps the tutor's
    anchoring rate, instead of being averaged with the refinements' corrected ones."""
    d = kb.by_id[a.diagnosis].name
    if a.anchored_on:
        return thought(title, f"{cap(a.anchored_on)} is the classic finding of {d}, so this is most likely {d}.")
    return thought(title, f"Together, {join(v.findings)} fit {d}.")


def context_name(kb: KB, v: Vignette) -> str:
    return kb.contexts[v.context]["name"]


def patient_context(kb: KB, v: Vignette) -> str:
    """The stem's context sentence without its full stop: "She is 12 weeks pregnant"."""
    return context_sentence(kb, v)[:-1]


def check_step(kb: KB, v: Vignette, a: Attempt) -> dict:
    d = kb.by_id[a.diagnosis]
    ctx, who = context_name(kb, v), patient_context(kb, v)
    if v.context in kb.avoid[d.first_line]:
        text = f"{who}, and {d.first_line} is avoided in {ctx}, so {d.alternative} is used instead."
    else:
        text = f"{who}, but {d.first_line} is not avoided in {ctx}, so {d.first_line} can be used."
    return thought("Contraindication check", text)


def fact_steps(kb: KB, v: Vignette, a: Attempt) -> list[dict]:
    """The hops after the diagnosis (none for a diagnosis question)."""
    if v.qtype == "diagnosis":
        return []
    d = kb.by_id[a.diagnosis]
    stated = a.slip or (d.first_line if v.qtype == "treatment" else kb.fact(d, v.qtype))
    steps = [thought(cap(FACT_NAME[v.qtype]), f"The {FACT_NAME[v.qtype]} {FACT_OF[v.qtype]} {d.name} is {stated}.")]
    if v.qtype == "treatment" and v.context and a.checked and not a.slip:
        steps.append(check_step(kb, v, a))
    return steps


def closing(kb: KB, v: Vignette, a: Attempt, said: str, rng, cfg) -> list[dict]:
    """Final Conclusion and its Verification (which always accepts: the tutor believes itself)."""
    d = kb.by_id[a.diagnosis].name
    if a.anchored_on:
        why = f"{d} fits {a.anchored_on}"
    else:
        why = f"{d} explains {join(v.findings)}"
    if v.qtype == "treatment" and v.context and a.checked and not a.slip:
        why += f", and {a.answer} is safe in {context_name(kb, v)}"
    elif v.qtype != "diagnosis":
        why += f", and {a.answer} is its {FACT_NAME[v.qtype]}"
    return [{"action": "Final Conclusion", "content": ANSWER_SENTENCE[v.qtype].format(said)},
            {"action": "Verification", "content": f"{cap(why)}, so the conclusion holds."}]


def init_actions(kb: KB, v: Vignette, a: Attempt, rng: random.Random, cfg: TutorConfig) -> list[dict]:
    """e_0, y_0 in the search format."""
    return [findings_step(kb, v), diagnosis_step(kb, v, a), *fact_steps(kb, v, a),
            *closing(kb, v, a, write_answer(kb, a.answer, rng, cfg), rng, cfg)]


def fixed_mistakes(kb: KB, v: Vignette, prev: Attempt, new: Attempt) -> list[str]:
    """The mistakes of `prev` that `new` corrects, as a careful reader would state them."""
    out = []
    if prev.diagnosis != v.condition and new.diagnosis == v.condition:
        d = kb.by_id[prev.diagnosis]
        missing = [f for f in v.findings if f not in d.findings]
        out.append(f"{cap(d.name)} does not explain {join(missing)}, so the diagnosis of {d.name} does not hold.")
    if v.qtype == "treatment" and v.context and not prev.checked and new.checked \
            and v.context in kb.avoid[kb.by_id[new.diagnosis].first_line]:
        ctx, drug = context_name(kb, v), kb.by_id[new.diagnosis].first_line
        out.append(f"{patient_context(kb, v)}, and {drug} is avoided in {ctx}, so it is not appropriate.")
    if prev.slip and not new.slip:
        out.append(f"{cap(prev.slip)} is not the {FACT_NAME[v.qtype]} {FACT_OF[v.qtype]} {kb.by_id[prev.diagnosis].name}.")
    return out


def strategy_steps(kb: KB, v: Vignette, prev: Attempt, k: str, new: Attempt) -> list[dict]:
    """The thinking that strategy k (§3.1) adds before the remaining hops are redone."""
    d = kb.by_id[new.diagnosis].name
    same = new.diagnosis == prev.diagnosis
    if k == "Correction":
        if not same:
            return [thought("Correcting the diagnosis", diagnosis_step(kb, v, new)["content"])]
        what = "the contraindication check" if new.checked and not prev.checked else f"the {FACT_NAME.get(v.qtype, 'answer')}"
        return [thought(f"Correcting {what}", f"The diagnosis of {d} stands; {what} must be redone.")]
    if k == "Verification":
        verdict = "holds" if same else "does not hold"
        return [thought("Checking each step", f"The findings were read correctly. The diagnosis of "
                                              f"{kb.by_id[prev.diagnosis].name} {verdict}."),
                *([] if same else [diagnosis_step(kb, v, new, "New diagnosis")])]
    if k == "Exploring New Paths":
        if new.anchored_on:
            route = f"Start instead from {new.anchored_on}, the classic finding of {d}, so this is {d}."
        else:
            lead = min(v.findings, key=lambda f: (len(kb.with_finding(f)), v.findings.index(f)))
            seen = [c.name for c in kb.with_finding(lead)]
            route = f"Start instead from {lead}, which is seen in {join(seen)}; with the other findings, {d} fits."
        return [thought("A different route", route)]
    if same:  # Backtracking: return to an earlier step that still stands
        return [thought("Back to the diagnosis", f"Going back to the diagnosis of {d}, which still stands.")]
    return [thought("Back to the findings", f"Going back to the findings, which still stand: {join(v.findings)}."),
            diagnosis_step(kb, v, new, "New diagnosis")]


def refine_actions(kb: KB, v: Vignette, prev: Attempt, k: str, new: Attempt, rng, cfg) -> list[dict]:
    """e_i, y_i after a rejected y_{i-1}: a Verification that rejects it (naming the mistakes the
    new attempt corrects), the thinking of strategy k, the remaining hops, a new Final Conclusion
    and its Verification."""
    found = fixed_mistakes(kb, v, prev, new)
    reject = " ".join(found) + " The previous conclusion does not hold." if found else \
        f"The previous conclusion, {prev.answer}, has been checked and is wrong, so it does not hold."
    return [{"action": "Verification", "content": reject}, *strategy_steps(kb, v, prev, k, new),
            *fact_steps(kb, v, new), *closing(kb, v, new, write_answer(kb, new.answer, rng, cfg), rng, cfg)]


# ---------------------------------------------------------------------------------------------------
# exercises


def cot_reply(actions: list[dict]) -> str:
    """A reply in the search format: {"CoT": [...]} with one action per line (search_prompts.COT_SHAPE)."""
    return '{"CoT": [\n' + ",\n".join("    " + json.dumps(a, ensure_ascii=False) for a in actions) + "\n]}"


def chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def init_exercise(kb: KB, v: Vignette, x: str, rng, cfg: TutorConfig, prompts: SearchPrompts = SearchPrompts()):
    """The search's first request (Algorithm 1: e_0, y_0 <- LLM_init(x)) and the tutor's reply."""
    a = first_attempt(kb, v, rng, cfg)
    return chat(render(prompts.init, question=x), cot_reply(init_actions(kb, v, a, rng, cfg))), a


def refine_exercise(kb: KB, v: Vignette, x: str, rng, cfg: TutorConfig, max_depth: int = 3,
                    prompts: SearchPrompts = SearchPrompts()):
    """A refinement request (Algorithm 1: e_i, y_i <- LLM_k(x, [e_0, y_0, ..., e_{i-1}, y_{i-1}])) after
    i-1 failed refinements, and the tutor's reply. None when the tutor's e_0 happens to be right
    (the search never asks for a refinement then)."""
    right = right_attempt(kb, v).answer
    a = first_attempt(kb, v, rng, cfg)
    if a.answer == right:
        return None
    chain = [(INIT, init_actions(kb, v, a, rng, cfg))]
    depth = rng.choices(range(1, max_depth + 1), [0.7, 0.22, 0.08][:max_depth])[0]
    for i in range(1, depth + 1):
        k = rng.choice(allowed_strategies(i, "earlier-step"))
        fixed = rng.random() < cfg.fix[k]
        new = right_attempt(kb, v) if fixed else failed_refinement(kb, v, a, rng)
        actions = refine_actions(kb, v, a, k, new, rng, cfg)
        if i == depth or new.answer == right:
            prompt = render(prompts.refine, question=x, previous_reasoning=previous_reasoning(chain),
                            strategy=prompts.strategies[k])
            return chat(prompt, cot_reply(actions))
        chain.append((k, actions))
        a = new
    return None


def direct_exercise(kb: KB, v: Vignette, x: str, rng, cfg: TutorConfig):
    """The open question alone (what evaluation, SFT and PPO send), answered think-then-answer:
    "## Thinking" with e_0 as plain paragraphs (`template_complex_cot` of a one-step chain, so the
    habits are the tutor's and the wording is the one SFT data will use), then "## Final Response"
    with the conclusion. An instruct LLM already has this format (paper §3.2's reward needs it);
    what it lacks is the reflection that SFT on searched trajectories teaches."""
    a = first_attempt(kb, v, rng, cfg)
    actions = init_actions(kb, v, a, rng, cfg)
    return chat(x, think_then_answer(template_complex_cot([(INIT, actions)]), conclusion(actions))), a


def mcq_reply(kb: KB, v: Vignette, options: dict, rng, cfg: TutorConfig, explain: bool) -> str:
    """The too-easy filter's prompt: "The answer is <option text>."; the evaluation's free prompt:
    the diagnosis step first. The option is named by its text, not its letter: a model this small
    does not learn to look a letter up in the options, and evaluate.extract_choice finds the
    option by its text (its step 3, as the official scorer does). The tutor picks its own
    conclusion if it is an option, else the keyed one."""
    a = first_attempt(kb, v, rng, cfg)
    if a.answer not in options.values():
        a = right_attempt(kb, v)
    if not explain:
        return f"The answer is {a.answer}."
    return f"{diagnosis_step(kb, v, a)['content']} So the answer is {a.answer}."
