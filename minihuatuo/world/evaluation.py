"""Held-out accuracy of a checkpoint on the clinical world (`minihuatuo world eval`).

Three ways of asking the same held-out questions, each graded the way the recipe grades:
  direct  the open question x alone; the rule verifier (world aliases) on the final response;
  cot     the search's first request (INIT prompt, search_prompts.py); the verifier on the Final
          Conclusion that `parse_cot` reads, as search.py does; an unreadable reply is wrong;
  mcq     the too-easy filter's MCQ prompt; the option letter `evaluate.extract_choice` finds.
Greedy decoding with our sampler through `LocalBackend`, as every stage of the demo uses it.
Accuracy is reported overall and by question type, hop count and contraindication.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

from minihuatuo.services.backends import ChatRequest, LocalBackend
from minihuatuo.services.replies import ReplyError, render
from minihuatuo.services.response_format import extract_final_response
from minihuatuo.services.verifier import RuleVerifier
from minihuatuo.services.verifier_text import load_aliases
from minihuatuo.stages.evaluate import extract_choice
from minihuatuo.stages.problem_prompts import TOO_EASY_PROMPT, render_mcq
from minihuatuo.stages.search_prompts import SearchPrompts, parse_cot
from minihuatuo.world.exam import generate_exam, open_problem
from minihuatuo.world.kb import DEFAULT_KB, load_kb, write_aliases

MODES = ("direct", "cot", "mcq")
MAX_TOKENS = {"direct": 384, "cot": 384, "mcq": 64}


def world_verifier(kb) -> RuleVerifier:
    """The rule verifier with the world's alias groups (the shipped medical list is not needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        return RuleVerifier(load_aliases([write_aliases(kb, Path(tmp) / "aliases.tsv")]))


def requests_for(mode: str, items, problems, prompts: SearchPrompts) -> list[ChatRequest]:
    if mode == "direct":
        texts = [p.x for p in problems]
    elif mode == "cot":
        texts = [render(prompts.init, question=p.x) for p in problems]
    else:
        texts = [render_mcq(TOO_EASY_PROMPT, it) for it in items]
    return [ChatRequest([{"role": "user", "content": t}], temperature=0.0, max_tokens=MAX_TOKENS[mode]) for t in texts]


def grade(mode: str, reply: str, item, problem, verifier) -> tuple[bool, bool]:
    """(correct, readable)."""
    if mode == "direct":  # think-then-answer: the verifier reads the final response (reward.py's ŷ)
        return verifier.verify(extract_final_response(reply, "tolerant"), problem.y_star), True
    if mode == "cot":
        try:
            conclusion = parse_cot(reply).conclusion
        except ReplyError:
            return False, False
        return verifier.verify(conclusion, problem.y_star), True
    ex = extract_choice(reply, item.options, similarity_fallback=False)
    return ex.first == ex.last == item.answer_idx, ex.first is not None


def evaluate_base(model_dir, n: int = 500, seed: int = 0, kb_path=DEFAULT_KB, batch_size: int = 32,
                  modes=MODES, backend=None, prompts: SearchPrompts = SearchPrompts()) -> dict:
    """Greedy held-out accuracy of the checkpoint in `model_dir` (or of `backend`) per mode."""
    kb = load_kb(kb_path)
    items = generate_exam(kb, "heldout", n, seed)
    problems = [open_problem(it) for it in items]
    backend = backend or LocalBackend.from_dir(model_dir, dtype="float32", batch_size=batch_size)
    verifier = world_verifier(kb)
    report = {"model": str(model_dir), "n": n, "seed": seed, "modes": {}}
    for mode in modes:
        replies = [r[0] for r in backend.complete(requests_for(mode, items, problems, prompts))]
        groups: dict[str, list[bool]] = defaultdict(list)
        readable = 0
        for it, p, reply in zip(items, problems, replies):
            ok, read = grade(mode, reply, it, p, verifier)
            readable += read
            meta = it.extra["world"]
            for key in ("all", f"qtype={meta['qtype']}", f"hops={meta['hops']}",
                        f"contraindicated={meta['contraindicated']}"):
                groups[key].append(ok)
        report["modes"][mode] = {
            "accuracy": sum(groups["all"]) / len(items), "readable": readable / len(items),
            "by": {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for k, v in sorted(groups.items())
                   if k != "all"},
            "examples": [{"question": p.x, "answer": p.y_star, "reply": r} for p, r in list(zip(problems, replies))[:3]],
        }
    return report


def format_report(report: dict) -> str:
    lines = [f"held-out accuracy of {report['model']} on {report['n']} questions (greedy):"]
    for mode, r in report["modes"].items():
        by = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in r["by"].items())
        lines.append(f"  {mode:6s} {r['accuracy']:6.1%}  (readable {r['readable']:.0%}; {by})")
    return "\n".join(lines)
