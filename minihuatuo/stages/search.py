"""Stage one: strategy search for complex reasoning trajectories, and the SFT data built from them
(paper §3.1, Algorithm 1 stage one, Appendices D-E).

The command is `minihuatuo search` (search_cli.py).

For each verifiable problem (x, y*), `search_problem` is Algorithm 1's stage one read line by line:
an initial chain of thought e_0 with conclusion y_0; while the verifier rejects y_i, a strategy k_i
drawn from K = {Exploring New Paths, Backtracking, Verification, Correction} continues from the
rejected conclusion; depth N, attempts T; an accepted trajectory is rewritten into a natural
complex CoT ê and a formal response ŷ. It is a generator: it yields `Ask` (an LLM request) and
`Check` (a verifier call) and gets back the reply or the verdict, so that `run_search` can keep many
problems in flight and send every problem's current request in one `backend.complete` call per
step (one batched sampler call for a local model; bounded concurrent requests over HTTP).

Output: out_dir/search.jsonl, one record per problem, appended (flushed + fsynced) as each
finishes: the problem, then on success Question / Complex_CoT / Response (the official SFT format)
and Long_CoT, and "search", the provenance (every LLM step with its raw replies, the strategies in
order, verifier calls and verdicts, attempts, tokens, the label hint, the failure reason; see
notes/search.md). A rerun skips the ids it holds, so a killed run loses and duplicates nothing;
config.json pins the settings a resumed run must share. search_cli.py makes the datasets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minihuatuo.services.backends import ChatRequest, fit_request
from minihuatuo.services.config import (
    require_choice,
    require_finite,
    require_nonnegative,
    require_positive,
    require_seed,
)
from minihuatuo.services.formats import VerifiableProblem
from minihuatuo.services.records import FormatError, JsonlAppender, read_records
from minihuatuo.services.replies import ReplyError, follow_up, render
from minihuatuo.services.verifier import JUDGE_PARSES
from minihuatuo.stages.search_prompts import (
    STRATEGIES,
    SearchPrompts,
    parse_cot,
    parse_natural_reasoning,
    parse_response,
)
from minihuatuo.stages.search_reformat import (
    HINT,
    INIT,
    conclusion,
    long_cot,
    previous_reasoning,
    simple_cot,
    stream_of_search,
    template_complex_cot,
)

RESTARTS = ("paper", "official")
BACKTRACKING_RULES = ("earlier-step", "paper-text")
REFORMATTERS = ("llm", "template")
FALSE_REFLECTION = ("keep", "retry")


@dataclass
class SearchConfig:
    max_depth: int = 3  # N (§3.1): refinements per attempt. Official script default: 2
    max_attempts: int = 3  # T (§3.1): attempts per problem, then discard. Official script default: 1
    # "paper": Algorithm 1 re-samples e_0 at the start of every attempt; "official": every attempt
    # restarts from the first e_0 (the script deep-copies the state after the initial CoT). Hazard:
    # re-sampling needs temperature > 0 and no response cache, or every attempt gets the same e_0
    restart: str = "paper"
    # "earlier-step": Backtracking (return to some e_j, j < i-1) only when such a step exists, i >= 2
    # (the official script: excluded on the first refinement); "paper-text": "only if i <= 2", as §3.1
    # is printed (at i = 1 that can only mean returning into e_0's own steps)
    backtracking: str = "earlier-step"
    label_hint: bool = False  # official "efficient search": a last round told y*; off (not in the paper)
    hint_verify: bool = True  # the hinted conclusion must still pass the verifier (official: accepted unchecked)
    reformat: str = "llm"  # ê and ŷ by the LLM (Appendix E), or "template" (offline, deterministic)
    json_retries: int = 2  # follow-ups after an unusable reply (official: none; the item is lost)
    temperature: float = 1.0  # the official script sends none: the API default, 1.0
    max_tokens: int = 2048  # per reply (official: 8192 for GPT-4o); shrunk to fit a local model's context
    seed: int = 0  # strategy draws: random.Random(f"{seed}:{problem id}"), independent of batching
    max_in_flight: int = 64  # problems searched at once; their requests share each backend call
    # --verifier llm only: how the judge's reply becomes a verdict. "strict": exactly "True";
    # "official": the script's `'true' in reply.lower()`, under which "not true" passes
    judge_parse: str = "strict"
    # "keep": a trajectory is accepted when the verifier accepts its conclusion (Algorithm 1). "retry":
    # also when `run_search`'s reflection check finds no false claim in it, else the attempt ends and the
    # next one starts, like an attempt whose conclusions were all rejected (the demo's world knows each
    # case, world/reflection.py; notes/demo.md §17). Needs that check: a real-data run has none
    false_reflection: str = "keep"

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_choice(self, "restart", RESTARTS)
        require_choice(self, "backtracking", BACKTRACKING_RULES)
        require_choice(self, "reformat", REFORMATTERS)
        require_choice(self, "judge_parse", JUDGE_PARSES)
        require_choice(self, "false_reflection", FALSE_REFLECTION)
        require_finite(self)
        require_nonnegative(self, "max_depth", "json_retries", "temperature")
        require_positive(self, "max_attempts", "max_tokens", "max_in_flight")
        require_seed(self, "seed")


# ---------------------------------------------------------------------------------------------------
# what a problem's search asks of the driver


@dataclass
class Ask:
    """An LLM request. The driver sends back the reply text, or None when the prompt does not fit."""
    request: ChatRequest


@dataclass
class Check:
    """A verifier call, Verifier(y_i, y*). The driver sends back the verdict."""
    conclusion: str
    reference: str


class StepFailed(Exception):
    """A step that could not be completed: it ends the attempt (reason: a key of FAILURE_REASONS)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


FAILURE_REASONS = {
    "not_verified": "every conclusion was rejected (T attempts of depth N, and the hint round if enabled)",
    "unparseable": "a reply could not be read, after json_retries follow-ups",
    "prompt_too_long": "a prompt did not fit the local model's context",
    "rewrite_failed": "the trajectory was accepted, but ê or ŷ could not be produced",
    "false_reflection": "each verified trajectory's reflection said something false of its case (reflection check)",
}
MIN_ROOM = 16  # fewer free context tokens than this: the reply could not hold a step, do not ask


@dataclass
class Context:
    cfg: SearchConfig
    prompts: SearchPrompts
    count: Callable[[str], int]  # text -> number of tokens
    # (problem, Long_CoT actions) -> the false claims of its reflection; None: no such check
    reflection_faults: Callable[[VerifiableProblem, list], list] | None = None


def ask(ctx: Context, step: dict, content: str, parse, retry_template: str):
    """One LLM step with bounded retries: each follow-up shows the model its last reply and the
    error (so a greedy model or a response cache gets a different request). Returns parse(reply);
    raises StepFailed after json_retries follow-ups, or at once when the prompt does not fit."""
    first = {"role": "user", "content": content}
    messages = [first]
    for _ in range(ctx.cfg.json_retries + 1):
        reply = yield Ask(ChatRequest(messages, temperature=ctx.cfg.temperature, max_tokens=ctx.cfg.max_tokens))
        if reply is None:
            step["errors"].append(FAILURE_REASONS["prompt_too_long"])
            raise StepFailed("prompt_too_long", f"{step['strategy']} prompt ({len(messages)} message(s))")
        step["replies"].append(reply)
        step["tokens"] += ctx.count(reply)
        try:
            return parse(reply)
        except ReplyError as e:
            step["errors"].append(str(e))
            messages = follow_up([first], reply, render(retry_template, error=str(e)))  # the last reply only
    raise StepFailed("unparseable", f"{step['strategy']}: {step['errors'][-1]}")


def new_step(trace: dict, attempt, depth: int, strategy: str) -> dict:
    step = {"attempt": attempt, "depth": depth, "strategy": strategy, "replies": [], "errors": [], "repairs": [],
            "tokens": 0, "actions": None, "conclusion": None, "verdict": None}
    trace["trajectory"].append(step)
    return step


def ask_cot(ctx: Context, trace: dict, attempt, depth: int, strategy: str, content: str):
    """e_i, y_i <- LLM_k(...): one search step, its actions and conclusion recorded in the trace."""
    step = new_step(trace, attempt, depth, strategy)
    parsed = yield from ask(ctx, step, content, parse_cot, ctx.prompts.json_retry)
    step.update(actions=parsed.actions, conclusion=parsed.conclusion, repairs=parsed.repairs)
    return step


def check(trace: dict, step: dict, y_star: str):
    """Verifier(y_i, y*), recorded."""
    verdict = bool((yield Check(step["conclusion"], y_star)))
    step["verdict"] = verdict
    trace["verifier_calls"].append({"attempt": step["attempt"], "depth": step["depth"],
                                    "conclusion": step["conclusion"], "verdict": verdict})
    return verdict


def allowed_strategies(i: int, rule: str) -> list[str]:
    """K at refinement i (1-based). Backtracking revisits some e_j with j < i - 1 (§3.1), which
    exists only from i = 2 on ("earlier-step"); "paper-text" applies §3.1's "only if i <= 2"."""
    backtrack = i >= 2 if rule == "earlier-step" else i <= 2
    return [k for k in STRATEGIES if k != "Backtracking" or backtrack]


def refine_prompt(ctx: Context, k: str, x: str, chain) -> str:
    return render(ctx.prompts.refine, question=x, previous_reasoning=previous_reasoning(chain),
                  strategy=ctx.prompts.strategies[k])


def search_problem(p: VerifiableProblem, pid: str, ctx: Context):
    """Algorithm 1, stage one, for one (x, y*). Returns the problem's output record."""
    cfg, x, y_star = ctx.cfg, p.x, p.y_star
    rng = random.Random(f"{cfg.seed}:{pid}")  # the same draws whatever else is in flight
    trace = {"trajectory": [], "verifier_calls": [], "outcomes": []}
    first, chain = None, None  # first: (e_0 step, verdict) of the first attempt, the official restart point
    for j in range(1, cfg.max_attempts + 1):                        # for j <- 1 to T
        try:
            if first is None or cfg.restart == "paper":
                init = render(ctx.prompts.init, question=x)
                e0 = yield from ask_cot(ctx, trace, j, 0, INIT, init)  # e_0, y_0 <- LLM_init(x)
                ok = yield from check(trace, e0, y_star)            # §3.1: "The verifier checks if y_0 matches y*"
                first = first or (e0, ok)
            else:                                                   # official: restart from the first e_0
                e0, ok = first
                trace["trajectory"].append({**e0, "attempt": j, "replies": [], "errors": [], "tokens": 0,
                                            "reused_from_attempt": e0["attempt"]})
            chain = [(INIT, e0["actions"])]
            if ok:
                if true_reflection(ctx, trace, p, chain, j):
                    return (yield from finish(ctx, trace, p, pid, chain, j, hint=False))
                continue                                            # false_reflection: the next attempt
            for i in range(1, cfg.max_depth + 1):                   # for i <- 1 to N
                k = rng.choice(allowed_strategies(i, cfg.backtracking))  # k_i ~ K
                refine = refine_prompt(ctx, k, x, chain)            # x, [e_0, y_0, ..., e_{i-1}, y_{i-1}]
                e_i = yield from ask_cot(ctx, trace, j, i, k, refine)  # e_i, y_i <- LLM_k(...)
                chain.append((k, e_i["actions"]))
                if (yield from check(trace, e_i, y_star)):          # if Verifier(y_i, y*)
                    if not true_reflection(ctx, trace, p, chain, j):
                        break                                       # false_reflection: the next attempt
                    # ê <- LLM_Reformat(...); ŷ <- LLM_Response(ê); D_SFT <- D_SFT ∪ {(x, ê, ŷ)}; break
                    return (yield from finish(ctx, trace, p, pid, chain, j, hint=False))
            else:
                trace["outcomes"].append({"attempt": j, "outcome": "not_verified"})
        except StepFailed as f:                                     # this attempt ends; the next one starts
            trace["outcomes"].append({"attempt": j, "outcome": f.reason, "detail": f.detail})
    if cfg.label_hint and chain:  # official "efficient search": y* disclosed; continues the latest chain
        try:
            hint = render(ctx.prompts.hint, question=x, previous_reasoning=previous_reasoning(chain), reference=y_star)
            e_h = yield from ask_cot(ctx, trace, "hint", len(chain), HINT, hint)
            chain.append((HINT, e_h["actions"]))
            if (yield from check(trace, e_h, y_star)) or not cfg.hint_verify:
                if true_reflection(ctx, trace, p, chain, "hint"):
                    return (yield from finish(ctx, trace, p, pid, chain, "hint", hint=True))
            else:
                trace["outcomes"].append({"attempt": "hint", "outcome": "not_verified"})
        except StepFailed as f:
            trace["outcomes"].append({"attempt": "hint", "outcome": f.reason, "detail": f.detail})
    last = trace["outcomes"][-1]
    return make_record(p, pid, trace, None, None, False, failure=(last["outcome"], last.get("detail")))


def true_reflection(ctx: Context, trace: dict, p: VerifiableProblem, chain, attempt) -> bool:
    """With false_reflection = "retry", a verified trajectory must also pass the reflection check; a
    failure is recorded as the attempt's outcome, with the false claims as its detail."""
    if ctx.cfg.false_reflection == "keep":
        return True
    faults = ctx.reflection_faults(p, long_cot(chain))
    if faults:
        trace["outcomes"].append({"attempt": attempt, "outcome": "false_reflection", "detail": faults})
    return not faults


def finish(ctx: Context, trace: dict, p: VerifiableProblem, pid: str, chain, attempt, hint: bool):
    """§3.1 "Constructing SFT Training Data": ê <- LLM_Reformat([e_0, y_0, ..., e_i, y_i]), then
    ŷ <- LLM_Response(x, ê); or the deterministic template (reformat = "template")."""
    try:
        if ctx.cfg.reformat == "template":
            cot, response = template_complex_cot(chain), conclusion(chain[-1][1])
        else:
            step = new_step(trace, attempt, len(chain) - 1, "Reformat")
            text = render(ctx.prompts.reformat, thought_process=stream_of_search(long_cot(chain)), question=p.x)
            cot = yield from ask(ctx, step, text, parse_natural_reasoning, ctx.prompts.json_retry)
            step = new_step(trace, attempt, len(chain) - 1, "Response")
            text = render(ctx.prompts.response, complex_cot=cot, question=p.x)
            response = yield from ask(ctx, step, text, parse_response, ctx.prompts.text_retry)
    except StepFailed as f:
        return make_record(p, pid, trace, chain, attempt, hint, failure=("rewrite_failed", f"{f.reason}: {f.detail}"))
    rec = make_record(p, pid, trace, chain, attempt, hint, cot=cot, response=response)
    rec["search"]["tokens"].update(complex_cot=ctx.count(cot), response=ctx.count(response))
    if attempt == 1 and len(chain) == 1:  # e_0 of the first attempt accepted: a simple-CoT example too
        rec["search"]["tokens"]["simple_cot"] = ctx.count(simple_cot(chain[0][1]))
    return rec


OUTPUT_FIELDS = ("id", "Question", "Complex_CoT", "Response", "Long_CoT", "search")


def make_record(p: VerifiableProblem, pid: str, trace: dict, chain, attempt, hint: bool, cot=None, response=None,
                failure=None) -> dict:
    # the problem's own fields, less any output fields it carries (the released demo items hold an
    # earlier Complex_CoT / Response, which must not pass for this run's result)
    rec = {"id": pid, **{k: v for k, v in p.to_record().items() if k not in OUTPUT_FIELDS}}
    if failure is None:
        rec.update({"Question": p.x, "Complex_CoT": cot, "Response": response, "Long_CoT": long_cot(chain)})
    steps = trace["trajectory"]
    rewrite = sum(s["tokens"] for s in steps if s["strategy"] in ("Reformat", "Response"))
    rec["search"] = {
        "success": failure is None, "failure_reason": failure[0] if failure else None,
        "failure_detail": failure[1] if failure else None,
        "attempts": len({s["attempt"] for s in steps}),  # attempts made (the hint round counts as one)
        "accepted_at": None if failure else {"attempt": attempt, "depth": len(chain) - 1},
        "hint_round": any(s["strategy"] == HINT for s in steps),  # the label-hinted round was asked
        "hint_used": bool(hint) and failure is None,  # the accepted trajectory ends with the hinted step
        "strategies": [s["strategy"] for s in steps if s["strategy"] not in ("Reformat", "Response")],
        "verifier_calls": trace["verifier_calls"], "outcomes": trace["outcomes"], "trajectory": steps,
        "tokens": {"generated": sum(s["tokens"] for s in steps), "rewrite": rewrite},
    }
    return rec


# ---------------------------------------------------------------------------------------------------
# the driver: many problems in flight, one backend call per step, append-only output


def problem_ids(problems: list[VerifiableProblem]) -> list[str]:
    """Each problem's own "id" (or the official "process_id"), else a hash of (x, y*); a repeated id
    gets "#2", "#3", ... so that every problem has its own line in the output."""
    ids, seen = [], Counter()
    for p in problems:
        v = p.extra.get("id", p.extra.get("process_id"))
        pid = str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else \
            hashlib.sha1(f"{p.x}\0{p.y_star}".encode()).hexdigest()[:16]
        seen[pid] += 1
        ids.append(pid if seen[pid] == 1 else f"{pid}#{seen[pid]}")
    return ids


def read_done(path: Path) -> dict[str, dict]:
    done = {}
    for rec in read_records(path) if path.exists() else []:
        if not isinstance(rec.data.get("id"), str) or not isinstance(rec.data.get("search"), dict):
            raise FormatError(path, rec.line, "id" if not isinstance(rec.data.get("id"), str) else "search",
                              "missing: not a record written by minihuatuo search")
        done[rec.data["id"]] = rec.data
    return done


RESUME_IRRELEVANT = ("max_in_flight",)  # fields that may change between a run and its resumption


def check_config(out: Path, cfg: SearchConfig) -> None:
    path, mine = out / "config.json", dataclasses.asdict(cfg)
    if not path.exists():
        path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")
    # A field added to SearchConfig after the run started is absent from its config.json; the run
    # had that field's default behaviour (new fields default to the old behaviour, e.g. judge_parse).
    old = {**dataclasses.asdict(SearchConfig()), **json.loads(path.read_text(encoding="utf-8"))}
    diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k) and k not in RESUME_IRRELEVANT)
    if diff:
        raise ValueError(f"{out}: this run was started with another configuration ({', '.join(diff)} differ: "
                         f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); resume with the same settings, or "
                         "write to a new --out directory")


def run_search(problems: list[VerifiableProblem], backend, verifier, out_dir, cfg: SearchConfig = SearchConfig(),
               prompts: SearchPrompts | None = None, count_tokens=None, progress: bool = True,
               reflection_faults=None) -> list[dict]:
    """The outer loop of Algorithm 1's stage one, `for (x, y*) in D_search`, with up to
    cfg.max_in_flight problems at once. Each step: all pending verifier calls in one
    `verifier.verify_batch`, then all pending LLM requests in one `backend.complete`. Finished
    problems are appended to out_dir/search.jsonl; problems already there are skipped. Returns the
    records of all `problems`, in input order (search_cli.write_outputs makes the datasets of them).
    `reflection_faults` (problem, Long_CoT actions) -> false claims: the check that false_reflection =
    "retry" applies to each verified trajectory (the demo's world, world/reflection.py)."""
    from tqdm import tqdm

    if cfg.false_reflection == "retry" and reflection_faults is None:
        raise ValueError('false_reflection = "retry" needs a reflection check (reflection_faults); only the demo has one')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)
    ctx = Context(cfg, prompts or SearchPrompts(), count_tokens or estimate_tokens, reflection_faults)
    ids = problem_ids(problems)
    log = JsonlAppender(out / "search.jsonl", durable=True)  # opened first: it drops a line cut short by a crash
    done = read_done(out / "search.jsonl")
    todo = iter([(pid, p) for pid, p in zip(ids, problems) if pid not in done])
    active: dict[str, tuple] = {}  # pid -> (generator, its pending Ask or Check)
    wins = sum(done[i]["search"]["success"] for i in ids if i in done)
    bar = tqdm(total=len(problems), initial=sum(i in done for i in ids), desc="search",
               unit="problem", file=sys.stderr, disable=not progress)

    def advance(pid, gen, value):
        nonlocal wins
        try:
            active[pid] = (gen, gen.send(value))
        except StopIteration as stop:
            del active[pid]
            done[pid] = stop.value
            log.write(stop.value)
            wins += stop.value["search"]["success"]
            bar.update(1)
            bar.set_postfix(success=f"{wins / max(bar.n, 1):.0%}", refresh=False)

    def refill():  # a problem's first yield is always an Ask, so a started problem stays active
        for pid, p in itertools.islice(todo, cfg.max_in_flight - len(active)):
            advance(pid, search_problem(p, pid, ctx), None)

    try:
        while True:
            refill()
            checks = [pid for pid, (_, item) in active.items() if isinstance(item, Check)]
            if checks:  # verifier calls first: they are cheap, and each unblocks an LLM request
                verdicts = verifier.verify_batch([(active[i][1].conclusion, active[i][1].reference) for i in checks])
                if len(verdicts) != len(checks):
                    raise ValueError(f"the verifier returned {len(verdicts)} verdicts for {len(checks)} pairs")
                for pid, v in zip(checks, verdicts):
                    advance(pid, active[pid][0], v)
                continue
            if not active:
                break
            asks = list(active)  # every active problem waits on an LLM reply now
            fitted = [fit_request(backend, active[pid][1].request, MIN_ROOM) for pid in asks]
            sendable = [r for r in fitted if r is not None]
            replies = backend.complete(sendable) if sendable else []  # one batched call per step
            if len(replies) != len(sendable):
                raise ValueError(f"the backend returned {len(replies)} replies for {len(sendable)} requests")
            replies = iter(replies)
            for pid, r in zip(asks, fitted):
                advance(pid, active[pid][0], next(replies)[0] if r is not None else None)
    finally:
        bar.close()
        log.close()
    return [done[i] for i in ids]


def estimate_tokens(text: str) -> int:  # when no tokenizer is known (an endpoint without --tokenizer)
    return (len(text) + 3) // 4
