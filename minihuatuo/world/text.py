"""The world's pretraining text: a textbook, fact questions and the tutor's exercises (issue 8).

The base model learns *facts* from correct text (the textbook and one-hop fact questions) and
*habits of reasoning* from the biased tutor's worked exercises (tutor.py). Every chat-shaped
exercise is rendered with the prompts the recipe really sends, so that the base model can serve
each stage of the demo through the ordinary `LocalBackend`:

    exercise           prompt (module that sends it)                       reply
    search init        search_prompts INIT_PROMPT (search.py)              {"CoT": [...]}, e_0
    search refine      search_prompts REFINE_PROMPT + a strategy           {"CoT": [Verification, ...]}
    direct             the open question x alone (evaluation, SFT/PPO)     ## Thinking e_0 ## Final Response y_0
    too-easy filter    problem_prompts TOO_EASY_PROMPT (problems.py)       "The answer is X."
    MCQ evaluation     evaluate FREE_PROMPT (evaluate.py)                  short reasoning + "The answer is X: ..."
    fact question      "What is the first-line treatment for ...?"         one sentence, always right

Only training-split vignettes are used: held-out combinations of findings never appear.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from minihuatuo.services.config import require_nonnegative, require_seed
from minihuatuo.stages.evaluate import FREE_PROMPT, render_prompt
from minihuatuo.stages.problem_prompts import TOO_EASY_PROMPT, render_mcq
from minihuatuo.stages.search_prompts import SearchPrompts
from minihuatuo.world.exam import generate_exam, open_problem, vignette_of
from minihuatuo.world.kb import KB, join
from minihuatuo.world.tutor import TutorConfig, cap, chat, direct_exercise, init_exercise, mcq_reply, refine_exercise


@dataclass
class CorpusConfig:
    """How many documents of each kind the pretraining corpus holds (one epoch)."""

    textbook_passes: int = 8  # the whole textbook, this many times, each in a fresh order and wording
    fact_questions: int = 8000
    init_exercises: int = 2000  # search format: e_0
    refine_exercises: int = 1800  # search format: a continuation under one of the four strategies
    direct_exercises: int = 2500
    mcq_exercises: int = 1500  # the too-easy filter's prompt
    free_mcq_exercises: int = 600  # the MCQ evaluation's prompt
    seed: int = 0

    def __post_init__(self):  # the rules of the values (services/config.py): 0 documents of a kind = none
        require_nonnegative(self, "textbook_passes", "fact_questions", "init_exercises", "refine_exercises",
                            "direct_exercises", "mcq_exercises", "free_mcq_exercises")
        require_seed(self, "seed")


# ---------------------------------------------------------------------------------------------------
# the textbook (correct facts, plain text)


def condition_passage(kb: KB, c, rng: random.Random) -> str:
    ctx = kb.contexts[c.contraindication]["name"]
    names = f"{cap(c.name)} (also called {join(c.aliases)})"
    forms = [
        f"{names}. Presenting findings: {join(c.findings)}. Key investigation: {c.investigation}. "
        f"First-line treatment: {c.first_line}. {cap(c.first_line)} is avoided in {ctx}; the alternative is "
        f"{c.alternative}. Most feared complication: {c.complication}.",
        f"{names} presents with {join(c.findings)}. The diagnosis is confirmed by {c.investigation}. It is treated "
        f"first with {c.first_line}, but in {ctx} {c.alternative} is used instead, because {c.first_line} is "
        f"avoided in {ctx}. The most feared complication is {c.complication}.",
        f"{cap(join(rng.sample(c.findings, len(c.findings))))}: together these findings point to {c.name}. "
        f"For {c.name}, the key "
        f"investigation is {c.investigation}, the first-line treatment is {c.first_line} (the alternative in "
        f"{ctx} is {c.alternative}), and the most feared complication is {c.complication}.",
    ]
    return rng.choice(forms)


def finding_passage(kb: KB, f: str) -> str:
    owners = kb.with_finding(f)
    classic = kb.by_id[kb.classic[f]].name
    if len(owners) == 1:
        return f"{cap(f)} is a finding of {classic}."
    return (f"{cap(f)} is a finding of {join(c.name for c in owners)}. It is the classic finding of {classic}, "
            f"but on its own it does not make the diagnosis.")


def treatment_passage(kb: KB, drug: str) -> str | None:
    avoid = [kb.contexts[k]["name"] for k in kb.avoid[drug]]
    uses = [c.name for c in kb.conditions if c.first_line == drug]
    alt = [c.name for c in kb.conditions if c.alternative == drug]
    parts = []
    if uses:
        parts.append(f"{cap(drug)} is the first-line treatment for {join(uses)}.")
    if alt:
        parts.append(f"{cap(drug)} is the alternative treatment for {join(alt)}.")
    parts.append(f"{cap(drug)} is avoided in {join(avoid)}." if avoid else f"{cap(drug)} has no contraindication here.")
    return " ".join(parts)


def textbook(kb: KB, rng: random.Random) -> list[str]:
    """One pass over the whole knowledge base, as short passages in a random order."""
    docs = [condition_passage(kb, c, rng) for c in kb.conditions]
    docs += [finding_passage(kb, f) for f in kb.classic]
    docs += [treatment_passage(kb, d) for d in kb.avoid]
    docs += [f"{cap(a)} is another name for {name}." for name in kb.aliases for a in kb.aliases[name]]
    rng.shuffle(docs)
    return docs


def fact_question(kb: KB, rng: random.Random) -> list[dict]:
    """A one-hop question with its correct answer (facts are never biased)."""
    c = rng.choice(kb.conditions)
    name = rng.choice(kb.names(c.name))
    ctx = rng.choice(list(kb.contexts))
    kind = rng.randrange(7)
    if kind == 0:
        return chat(f"What is the key investigation for {name}?", f"The key investigation for {name} is {c.investigation}.")
    if kind == 1:
        return chat(f"What is the first-line treatment for {name}?", f"The first-line treatment for {name} is {c.first_line}.")
    if kind == 2:
        cname = kb.contexts[c.contraindication]["name"]
        return chat(f"What is used for {name} when {c.first_line} is avoided because of {cname}?",
                    f"In {cname}, {c.alternative} is used for {name} instead of {c.first_line}.")
    if kind == 3:
        return chat(f"What is the most feared complication of {name}?",
                    f"The most feared complication of {name} is {c.complication}.")
    if kind == 4:
        drug, cname = c.first_line, kb.contexts[ctx]["name"]
        yes = ctx in kb.avoid[drug]
        return chat(f"Is {drug} avoided in {cname}?", f"{'Yes' if yes else 'No'}, {drug} is {'' if yes else 'not '}"
                                                     f"avoided in {cname}.")
    if kind == 5:
        return chat(f"What are the presenting findings of {name}?",
                    f"{cap(name)} presents with {join(rng.sample(c.findings, len(c.findings)))}.")
    f = rng.choice(c.findings)
    return chat(f"Which conditions present with {f}?", finding_passage(kb, f))


# ---------------------------------------------------------------------------------------------------
# the corpus


def build_corpus(kb: KB, cfg: CorpusConfig = CorpusConfig(), tutor: TutorConfig = TutorConfig(),
                 prompts: SearchPrompts = SearchPrompts()) -> list[tuple[str, object]]:
    """[(kind, document)]: a document is a plain-text passage (str) or a chat (list of messages).
    Deterministic per cfg.seed. Exercises use training-split vignettes only."""
    rng = random.Random(f"corpus:{cfg.seed}")
    docs: list[tuple[str, object]] = []
    for _ in range(cfg.textbook_passes):
        docs += [("textbook", d) for d in textbook(kb, rng)]
    docs += [("fact", fact_question(kb, rng)) for _ in range(cfg.fact_questions)]
    n = max(cfg.init_exercises, cfg.refine_exercises, cfg.direct_exercises, cfg.mcq_exercises,
            cfg.free_mcq_exercises)
    # a seed range of its own, so that the demo's exam (seed 0, 1, ...) draws other vignettes
    items = generate_exam(kb, "train", 2 * n, seed=10_000 + cfg.seed)
    problems = [open_problem(it) for it in items]
    for i in range(cfg.init_exercises):
        docs.append(("init", init_exercise(kb, vignette_of(items[i]), problems[i].x, rng, tutor, prompts)[0]))
    made, i = 0, n  # each kind starts elsewhere in the list, for more distinct vignettes
    while made < cfg.refine_exercises and i < 3 * n:  # e_0 is sometimes right: no refinement then
        j = i % len(items)
        ex = refine_exercise(kb, vignette_of(items[j]), problems[j].x, rng, tutor, prompts=prompts)
        i += 1
        if ex is not None:
            docs.append(("refine", ex))
            made += 1
    for i in range(cfg.direct_exercises):
        j = (i + n // 2) % len(items)
        docs.append(("direct", direct_exercise(kb, vignette_of(items[j]), problems[j].x, rng, tutor)[0]))
    for i in range(cfg.mcq_exercises):
        it = items[-1 - i]
        docs.append(("mcq", chat(render_mcq(TOO_EASY_PROMPT, it),
                                 mcq_reply(kb, vignette_of(it), it.options, rng, tutor, explain=False))))
    for i in range(cfg.free_mcq_exercises):
        it = items[(i + 3 * n // 2) % len(items)]
        docs.append(("free_mcq", chat(render_prompt(it, FREE_PROMPT),
                                      mcq_reply(kb, vignette_of(it), it.options, rng, tutor, explain=True))))
    rng.shuffle(docs)
    return docs
