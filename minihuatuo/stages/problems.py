"""Problem construction (paper §2.1; mission step 1): closed-set exam MCQs -> open-ended verifiable
problems x with one short ground-truth answer y*, in the official release format.

    minihuatuo problems build --mcq medqa_train.jsonl --mcq medmcqa_train.json --eval medqa_test.jsonl \\
        --filter-model gemma-2-9b/ --filter-model llama-3.1-8b/ --filter-model qwen2.5-7b/ \\
        --llm-endpoint https://api.openai.com/v1 gpt-4o --out runs/problems

`build_problems` runs the stages cheapest first; every item it drops is written with its reason:
  1. rules          too_short, negative_question, aggregate_option, multiple_correct  (§2.1 steps 1-2)
  2. decontaminate  contaminated: Med-PaLM 2 rule on the *source* MCQ, before rewriting (§4.1)
  3. too easy       too_easy: every filter model picks the keyed option (§2.1 step 1)
  4. LLM filter     llm_too_simple, llm_ambiguous, llm_not_reformulatable, llm_filter_unreadable (§2.1 step 2)
  5. reformat       reformat_failed (LLM, §2.1 step 3) or not_reformulatable_offline (offline rules)
                    (too_long_for_llm in 4 and 5: the prompt does not fit a local model's context)
  6. split          search (stage 1) / RL (stage 2) subsets, seeded (§4.1: 20K / 20K)
Outputs in --out: search.json, rl.json (official format + provenance fields), dropped.jsonl (id,
source, reason, detail), summary.json, responses.jsonl (every LLM reply, so a rerun asks nothing
twice). The offline rules (`reformat_offline`, `rule_filter`) live in problem_rules.py.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from minihuatuo.services.backends import ChatRequest
from minihuatuo.services.config import (
    require_choice,
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_seed,
)
from minihuatuo.services.formats import MCQItem, VerifiableProblem, write_problems
from minihuatuo.services.records import JsonlAppender
from minihuatuo.services.replies import ReplyError
from minihuatuo.stages.problem_prompts import (
    TOO_LONG,
    Asker,
    Prompts,
    ask_with_retries,
    parse_filter_verdict,
    parse_problem_json,
    render_mcq,
)
from minihuatuo.stages.problem_rules import NotReformulatable, reformat_offline, rule_filter

REFORMATTERS = ("auto", "llm", "offline", "hybrid")


@dataclass
class ProblemsConfig:
    # rules (§2.1: "discarded short questions"; the paper gives no length, this one is ours)
    min_question_chars: int = 50
    # too-easy filter (§2.1 step 1: drop what three small LLMs all answer correctly)
    easy_max_tokens: int = 256  # the prompt asks for one line; room for a short explanation
    easy_temperature: float = 0.0  # greedy: each model's best answer
    easy_similarity_fallback: bool = False  # only a letter the model named counts (no difflib guess)
    # share of the too-easy items kept all the same (a seeded draw per item). The paper: 0. Its search
    # LLM (GPT-4o) is far stronger than its filter models, so its search still meets problems whose
    # first answer is right; where one model is both (the demo's world), 0 leaves SFT data in which
    # every first conclusion is wrong, and verification cannot learn to confirm (notes/demo.md §10)
    too_easy_keep: float = 0.0
    # LLM filter and reformatting (§2.1 steps 2-3, GPT-4o in the paper); used only with an LLM
    llm_filter: bool = True
    reformat: str = "auto"  # auto: llm if one is given, else offline; hybrid: offline first, LLM for the rest
    llm_max_tokens: int = 1024
    llm_temperature: float = 0.0
    llm_retries: int = 2  # follow-up requests after an unreadable reply (the official script: 1)
    max_answer_chars: int = 200  # y* must be short (§2.1: "a concise standard answer")
    # split (§4.1: 40K problems, 20K for search + SFT, 20K for RL)
    search_fraction: float = 0.5
    seed: int = 0
    # decontamination (§4.1: Med-PaLM 2's 64 consecutive characters; see decontam.py)
    decontam_window: int = 64
    decontam_boilerplate_items: int = 0
    request_chunk: int = 512  # requests per backend.complete call (one progress step, one log flush)

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_choice(self, "reformat", REFORMATTERS)
        require_finite(self)
        require_fraction(self, "search_fraction", "too_easy_keep")
        require_nonnegative(self, "min_question_chars", "easy_temperature", "llm_temperature", "llm_retries",
                            "decontam_boilerplate_items")
        require_positive(self, "easy_max_tokens", "llm_max_tokens", "max_answer_chars", "decontam_window",
                         "request_chunk")
        require_seed(self, "seed")


Drop = tuple  # (MCQItem, reason: str, detail: str | dict)


# ---------------------------------------------------------------------------------------------------
# stages


def apply_rules(items: list[MCQItem], cfg: ProblemsConfig) -> tuple[list[MCQItem], list[Drop]]:
    kept, drops = [], []
    for it in items:
        hit = rule_filter(it, cfg.min_question_chars)
        if hit is None:
            kept.append(it)
        else:
            drops.append((it, *hit))
    return kept, drops


def too_easy_filter(items, filter_models: dict, cfg: ProblemsConfig, prompts: Prompts = Prompts(),
                    asker: Asker | None = None, stats: dict | None = None):
    """Drop an item when every filter model answers it correctly (§2.1 step 1). A model's answer is
    the letter `evaluate.extract_choice` finds; it counts only when the first and last letters
    found agree and are the keyed one ("A or B" is not an answer). A prompt too long for a local
    model's context counts as not answered. `filter_models`: name -> backend, or name -> a function
    returning one (loaded when its turn comes and released after, so three 8B models need not share
    the GPU). All items go to one model before the next, in `request_chunk`-sized calls."""
    from minihuatuo.stages.evaluate import extract_choice

    asker = asker or Asker(chunk=cfg.request_chunk)
    if not filter_models or not items:
        return list(items), []
    answers: dict[str, list] = {}
    for name, backend in filter_models.items():
        backend = backend if hasattr(backend, "complete") else backend()
        reqs = [ChatRequest([{"role": "user", "content": render_mcq(prompts.too_easy, it)}],
                            temperature=cfg.easy_temperature, max_tokens=cfg.easy_max_tokens) for it in items]
        outs = asker(backend, name, reqs, f"too-easy filter: {name}")
        del backend
        letters = []
        for it, out in zip(items, outs):
            ex = extract_choice(out[0], it.options, cfg.easy_similarity_fallback) if out is not None else None
            letters.append(None if ex is None else ex.first if ex.first == ex.last else "several")
        answers[name] = letters
        if stats is not None:
            stats[name] = {"correct": sum(a == it.answer_idx for a, it in zip(letters, items)),
                           "not_asked": sum(o is None for o in outs), "items": len(items)}
    kept, drops = [], []
    keep_anyway = random.Random(f"too-easy-keep {cfg.seed}")
    for i, it in enumerate(items):
        picked = {name: answers[name][i] for name in answers}
        draw = keep_anyway.random()  # one draw per item whatever its answers: an item's fate is its own
        if all(a == it.answer_idx for a in picked.values()):
            if draw >= cfg.too_easy_keep:
                drops.append((it, "too_easy", {"answers": picked}))
                continue
        kept.append(it)
    return kept, drops


def _llm_settings(cfg: ProblemsConfig) -> dict:
    return {"retries": cfg.llm_retries, "temperature": cfg.llm_temperature, "max_tokens": cfg.llm_max_tokens}


def llm_filter(items, llm, llm_name: str, cfg: ProblemsConfig, prompts: Prompts = Prompts(),
               asker: Asker | None = None):
    """§2.1 step 2: one LLM verdict per item; only "pass" is kept."""
    asker = asker or Asker(chunk=cfg.request_chunk)
    verdicts, errors = ask_with_retries(items, llm, llm_name, prompts.llm_filter, prompts.verdict_retry,
                                        parse_filter_verdict, asker, "LLM filter", **_llm_settings(cfg))
    kept, drops = [], []
    for it, v, err in zip(items, verdicts, errors):
        if v == "pass":
            kept.append(it)
        elif v is not None:
            drops.append((it, f"llm_{v}", f"verdict {v}"))
        else:
            drops.append((it, "too_long_for_llm" if err == TOO_LONG else "llm_filter_unreadable", err))
    return kept, drops


def _problem(it: MCQItem, x: str, y: str, how: str) -> VerifiableProblem:
    # provenance after the two official fields: the official scripts ignore fields they do not use
    return VerifiableProblem(x, y, {"source": it.source, "source_id": it.id, "source_answer": it.answer,
                                    "reformatted_by": how})


def reformat_items(items, mode: str, llm, llm_name: str, cfg: ProblemsConfig, prompts: Prompts = Prompts(),
                   asker: Asker | None = None) -> tuple[list[VerifiableProblem], list[Drop]]:
    """§2.1 step 3. mode: "offline" (rules only), "llm", or "hybrid" (offline where the rules can,
    the LLM for the rest). Problems come back in input order."""
    if mode in ("llm", "hybrid") and llm is None:
        raise ValueError(f"reformat {mode!r} needs an LLM (--llm-model or --llm-endpoint)")
    asker = asker or Asker(chunk=cfg.request_chunk)
    done: dict[int, VerifiableProblem] = {}
    drops: dict[int, Drop] = {}
    for i, it in enumerate(items if mode != "llm" else []):
        try:
            done[i] = _problem(it, *reformat_offline(it, cfg.max_answer_chars), "offline")
        except NotReformulatable as e:
            drops[i] = (it, "not_reformulatable_offline", str(e))
    if mode in ("llm", "hybrid"):
        todo = [i for i in range(len(items)) if i not in done]
        drops = {}

        def parse(reply):
            x, y = parse_problem_json(reply)
            if len(y) > cfg.max_answer_chars:
                raise ReplyError(f"the answer has {len(y)} characters; keep it under {cfg.max_answer_chars}")
            return x, y

        parsed, errors = ask_with_retries([items[i] for i in todo], llm, llm_name, prompts.reformat,
                                          prompts.json_retry, parse, asker, "reformat", **_llm_settings(cfg))
        for i, xy, err in zip(todo, parsed, errors):
            if xy is not None:
                done[i] = _problem(items[i], *xy, "llm")
            else:
                drops[i] = (items[i], "too_long_for_llm" if err == TOO_LONG else "reformat_failed", err)
    return [done[i] for i in sorted(done)], [drops[i] for i in sorted(drops)]


def split_problems(problems: list, search_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """(search, rl): round(n * search_fraction) problems drawn by a seeded shuffle go to the search
    subset, the rest to RL; each subset keeps the input order. Same seed and input, same split."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:round(len(problems) * search_fraction)])
    return ([p for i, p in enumerate(problems) if i in chosen], [p for i, p in enumerate(problems) if i not in chosen])


# ---------------------------------------------------------------------------------------------------
# the whole build


@dataclass
class BuildResult:
    n_input: int
    search: list[VerifiableProblem]
    rl: list[VerifiableProblem]
    dropped: list[dict]  # {"id", "source", "reason", "detail"}, in the order written
    stages: list[dict] = field(default_factory=list)  # {"stage", "in", "out"}
    too_easy: dict = field(default_factory=dict)  # per filter model: correct, not_asked, items

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"] for d in self.dropped))


def build_problems(items: list[MCQItem], cfg: ProblemsConfig = ProblemsConfig(), evals=(),
                   filter_models: dict | None = None, llm=None, llm_name: str = "llm",
                   prompts: Prompts | None = None, out_dir=None) -> BuildResult:
    """The stages of §2.1 in order (module docstring). With `out_dir`, dropped items are appended to
    dropped.jsonl as each stage ends (the file is started afresh: a rerun recomputes every drop,
    and the LLM replies it needs come from responses.jsonl), then search.json, rl.json and
    summary.json are written."""
    from minihuatuo.stages.decontam import DecontamConfig, decontaminate

    prompts, filter_models = prompts or Prompts(), filter_models or {}
    mode = ("llm" if llm is not None else "offline") if cfg.reformat == "auto" else cfg.reformat
    if mode in ("llm", "hybrid") and llm is None:  # say so before any expensive stage runs
        raise ValueError(f"reformat {mode!r} needs an LLM (--llm-model or --llm-endpoint)")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dropped.jsonl").unlink(missing_ok=True)
    asker = Asker(out / "responses.jsonl" if out else None, cfg.request_chunk)
    dropped_log = JsonlAppender(out / "dropped.jsonl") if out else None
    result = BuildResult(len(items), [], [], [])

    def stage(name: str, n_in: int, kept: list, drops: list[Drop]):
        for it, reason, detail in drops:
            rec = {"id": it.id, "source": it.source, "reason": reason, "detail": detail}
            result.dropped.append(rec)
            if dropped_log:
                dropped_log.write(rec)
        result.stages.append({"stage": name, "in": n_in, "out": len(kept)})
        return kept

    kept = stage("rules", len(items), *apply_rules(items, cfg))
    if evals:
        n = len(kept)
        kept, found = decontaminate(kept, evals, DecontamConfig(cfg.decontam_window, cfg.decontam_boilerplate_items),
                                    progress=True)
        details = [{k: v for k, v in c.to_dict(evals).items() if k != "reason"} for _, c in found]
        kept = stage("decontaminate", n, kept, [(it, "contaminated", d) for (it, _), d in zip(found, details)])
    if filter_models:
        kept = stage("too_easy", len(kept),
                     *too_easy_filter(kept, filter_models, cfg, prompts, asker, result.too_easy))
    if llm is not None and cfg.llm_filter:
        kept = stage("llm_filter", len(kept), *llm_filter(kept, llm, llm_name, cfg, prompts, asker))
    problems = stage(f"reformat ({mode})", len(kept),
                     *reformat_items(kept, mode, llm, llm_name, cfg, prompts, asker))
    result.search, result.rl = split_problems(problems, cfg.search_fraction, cfg.seed)
    if dropped_log:
        dropped_log.close()
    if asker.log:
        asker.log.close()
    if out is not None:
        write_problems(out / "search.json", result.search)
        write_problems(out / "rl.json", result.rl)
        summary = {"input": result.n_input, "kept": len(problems), "search": len(result.search),
                   "rl": len(result.rl), "dropped": len(result.dropped), "dropped_by_reason": result.counts,
                   "stages": result.stages, "too_easy": result.too_easy, "filter_models": list(filter_models),
                   "llm": llm_name if llm is not None else None, "reformat": mode, "config": dataclasses.asdict(cfg)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def format_summary(r: BuildResult) -> str:
    kept = len(r.search) + len(r.rl)
    lines = [f"{r.n_input} MCQs in, {kept} problems out ({len(r.search)} search, {len(r.rl)} rl), "
             f"{len(r.dropped)} dropped", "", f"{'stage':<24}{'in':>8}{'out':>8}"]
    lines += [f"{s['stage']:<24}{s['in']:>8}{s['out']:>8}" for s in r.stages]
    lines += ["", f"{'dropped: reason':<32}{'count':>8}"]
    lines += [f"{reason:<32}{n:>8}" for reason, n in sorted(r.counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    for name, s in r.too_easy.items():
        lines.append(f"too-easy filter {name}: {s['correct']}/{s['items']} correct, {s['not_asked']} too long to ask")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line


def cmd_build(args) -> int:
    from minihuatuo.services.config import build_config
    from minihuatuo.services.formats import read_mcq
    from minihuatuo.stages.problem_prompts import load_problem_prompts

    cfg = build_config(ProblemsConfig, {}, None, args.config, args)
    items, first_file = [], {}
    for path in args.mcq:
        for it in read_mcq(path, source=args.source, cop_base=args.cop_base):
            if it.id in first_file:
                raise ValueError(f"{path}: id {it.id!r} is also in {first_file[it.id]}; ids must be unique "
                                 "across the --mcq files")
            first_file[it.id] = path
            items.append(it)
    if not items:  # nothing to do is not an error: say so, write nothing in --out, exit 0
        print(f"minihuatuo problems build: {', '.join(map(str, args.mcq))} hold{'s' * (len(args.mcq) == 1)} no MCQs; "
              "nothing to do", file=sys.stderr)
        return 0
    items = items[:args.limit] if args.limit else items
    evals = [e for path in args.eval for e in read_mcq(path, cop_base=args.cop_base)]

    def local(path):
        import torch

        from minihuatuo.services.backends import LocalBackend
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return LocalBackend.from_dir(path, dtype=args.dtype, device=device, batch_size=args.batch_size, seed=cfg.seed)

    def remote(url, model):
        from minihuatuo.services.http_client import OpenAIBackend
        return OpenAIBackend(url, model, api_key_env=args.api_key_env, cache_dir=args.cache)

    filter_models = {}
    for name, make in [(str(d), lambda d=d: local(d)) for d in args.filter_model] + \
                      [(f"{m}@{u}", remote(u, m)) for u, m in args.filter_endpoint]:
        if name in filter_models:
            raise ValueError(f"filter model {name} given twice")
        filter_models[name] = make
    if args.llm_model and args.llm_endpoint:
        raise ValueError("give --llm-model or --llm-endpoint, not both")
    llm, llm_name = None, "llm"
    if args.llm_model:
        llm, llm_name = local(args.llm_model), str(args.llm_model)
    elif args.llm_endpoint:
        llm, llm_name = remote(*args.llm_endpoint), f"{args.llm_endpoint[1]}@{args.llm_endpoint[0]}"
    prompts = load_problem_prompts(args.prompts) if args.prompts else Prompts()
    result = build_problems(items, cfg, evals, filter_models, llm, llm_name, prompts, args.out)
    print(format_summary(result))
    print(f"wrote {args.out}/search.json, rl.json, dropped.jsonl, summary.json", file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    from minihuatuo.services.config import add_config_args, nonnegative_int, positive_int

    p = sub.add_parser("problems", help="verifiable problems from exam MCQs (paper §2.1)")
    psub = p.add_subparsers(dest="problems_command", required=True)
    b = psub.add_parser("build", help="filter, decontaminate, reformat and split MCQs into verifiable problems")
    b.add_argument("--mcq", action="append", required=True, metavar="FILE", help="MCQ file (repeatable); formats.py")
    b.add_argument("--out", required=True, metavar="DIR", help="search.json, rl.json, dropped.jsonl, summary.json")
    b.add_argument("--eval", action="append", default=[], metavar="FILE",
                   help="evaluation MCQ file to decontaminate against (repeatable)")
    b.add_argument("--source", default=None, help="source tag of items that carry none (default: the file name)")
    b.add_argument("--cop-base", type=int, choices=(0, 1), default=None, help="MedMCQA cop numbering (default: detect)")
    b.add_argument("--limit", type=nonnegative_int, default=0, help="only the first N items (0 = all)")
    b.add_argument("--filter-model", action="append", default=[], metavar="DIR",
                   help="too-easy filter: a local checkpoint (repeatable; the paper uses three small LLMs)")
    b.add_argument("--filter-endpoint", action="append", nargs=2, default=[], metavar=("BASE_URL", "MODEL"),
                   help="too-easy filter: an OpenAI-compatible endpoint and model name (repeatable)")
    b.add_argument("--llm-model", metavar="DIR", help="LLM filter + reformatter: a local checkpoint")
    b.add_argument("--llm-endpoint", nargs=2, metavar=("BASE_URL", "MODEL"),
                   help="LLM filter + reformatter: an OpenAI-compatible endpoint (GPT-4o in the paper)")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    b.add_argument("--cache", metavar="DIR", help="HTTP response cache directory for endpoints")
    b.add_argument("--prompts", metavar="FILE", help="JSON/TOML with your own too_easy / llm_filter / reformat prompts")
    b.add_argument("--dtype", default="float32", help="local models: float32, bfloat16, float16 or auto")
    b.add_argument("--device", default=None, help="local models: cpu, cuda, cuda:1, ... (default: cuda if available)")
    b.add_argument("--batch-size", type=positive_int, default=16, help="local models: rows per generate call")
    add_config_args(b, ProblemsConfig)
    b.set_defaults(func=cmd_build)
