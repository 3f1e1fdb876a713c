"""`minihuatuo search`: the command, the datasets made from the search records and the summary table.

    minihuatuo search --data search.json --out runs/search \\
        --search-url https://api.openai.com/v1 --search-model gpt-4o \\
        --verifier llm --judge-url https://api.openai.com/v1 --judge-model gpt-4o
    minihuatuo search --data search.json --out runs/search --search-checkpoint runs/base \\
        --verifier rule --reformat template          # offline, with a local model

The search LLM is a local checkpoint (--search-checkpoint: batched through LocalBackend) or any
OpenAI-compatible endpoint (--search-url/--search-model: bounded concurrent requests, key from the
environment variable named by --search-api-key-env, optional response cache). The verifier flags are
those of `minihuatuo verify` (reward.py). Every SearchConfig field is a flag (--max-depth,
--restart, --label-hint, ...); see search.py. A rerun with the same --out resumes.

Outputs in --out besides search.jsonl (search.py): sft.jsonl (the successful records: official SFT
format + provenance), sft_simple_cot.jsonl and sft_direct.jsonl (the ablation data of paper Table 2),
summary.json; the summary table goes to stdout.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from minihuatuo.engine.tokenizer import KINDS
from minihuatuo.services.formats import X_KEY, Y_KEY, problem_from_record
from minihuatuo.services.records import FormatError, read_records, write_records
from minihuatuo.services.verifier import LLMJudgeVerifier
from minihuatuo.stages.search import SearchConfig, run_search
from minihuatuo.stages.search_prompts import STRATEGIES, SearchPrompts, load_search_prompts
from minihuatuo.stages.search_reformat import HINT, simple_cot

# ---------------------------------------------------------------------------------------------------
# datasets


def write_datasets(out: Path, records: list[dict]) -> None:
    """The SFT file and the two ablation files of paper Table 2, in input order, rewritten whole
    (temp file + rename) from the records, so an interrupted run's files equal an uninterrupted one's."""
    ok = [r for r in records if r["search"]["success"]]
    write_records(out / "sft.jsonl", ok)
    simple = [{"id": r["id"], "Question": r["Question"], "Complex_CoT": simple_cot(r["Long_CoT"]),
               "Response": r["Response"]} for r in ok if r["search"]["accepted_at"] == {"attempt": 1, "depth": 0}]
    write_records(out / "sft_simple_cot.jsonl", simple)
    write_records(out / "sft_direct.jsonl", [{"id": r["id"], "Question": r["Question"], "Response": r["Response"]}
                                             for r in ok])


def write_outputs(out_dir, records: list[dict], cfg: SearchConfig, token_counter: str = "") -> dict:
    """The datasets and summary.json of a finished run; returns the summary."""
    out = Path(out_dir)
    write_datasets(out, records)
    summary = {**summarize(records), "token_counter": token_counter, "config": dataclasses.asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------------
# the summary table


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["search"]["success"]]
    cells = Counter(f"{r['search']['accepted_at']['attempt']}/{r['search']['accepted_at']['depth']}" for r in ok)
    uses, wins = Counter(), Counter()
    for r in records:
        for s in r["search"]["trajectory"]:
            if s["strategy"] in (*STRATEGIES, HINT) and not s.get("reused_from_attempt"):
                uses[s["strategy"]] += 1
                wins[s["strategy"]] += s["verdict"] is True

    def mean(key):
        xs = [r["search"]["tokens"][key] for r in ok if key in r["search"]["tokens"]]
        return (sum(xs) / len(xs) if xs else None), len(xs)

    return {"problems": len(records), "succeeded": len(ok), "success_rate": len(ok) / len(records) if records else 0.0,
            "accepted_at_attempt/depth": dict(sorted(cells.items())),
            "strategies": {k: {"used": uses[k], "accepted": wins[k]} for k in (*STRATEGIES, HINT) if uses[k]},
            "avg_tokens": {k: dict(zip(("mean", "n"), mean(k))) for k in ("complex_cot", "response", "simple_cot")},
            "avg_generated_tokens_per_problem": (sum(r["search"]["tokens"]["generated"] for r in records) /
                                                 len(records) if records else 0.0),
            "hint_used": sum(r["search"]["hint_used"] for r in ok),
            "discarded": dict(Counter(r["search"]["failure_reason"] for r in records if not r["search"]["success"]))}


def format_summary(s: dict, cfg: SearchConfig) -> str:
    def pct(a, b):
        return f"{100 * a / b:.1f}%" if b else "-"

    lines = [f"{s['problems']} problems: {s['succeeded']} trajectories found ({pct(s['succeeded'], s['problems'])}), "
             f"{s['problems'] - s['succeeded']} discarded", "", "accepted at (rows: attempt j, columns: depth i)"]
    rows = [str(j) for j in range(1, cfg.max_attempts + 1)] + (["hint"] if cfg.label_hint else [])
    depths = range(cfg.max_depth + (2 if cfg.label_hint else 1))
    lines.append(f"{'attempt':<9}" + "".join(f"{i:>7}" for i in depths))
    for j in rows:
        lines.append(f"{j:<9}" + "".join(f"{s['accepted_at_attempt/depth'].get(f'{j}/{i}', 0):>7}" for i in depths))
    lines += ["", f"{'strategy':<22}{'used':>8}{'accepted':>10}{'rate':>8}"]
    for k, v in s["strategies"].items():
        lines.append(f"{k:<22}{v['used']:>8}{v['accepted']:>10}{pct(v['accepted'], v['used']):>8}")
    lines.append("")
    for k, name in (("complex_cot", "complex CoT ê"), ("response", "response ŷ"), ("simple_cot", "simple CoT e_0")):
        m = s["avg_tokens"][k]
        lines.append(f"average tokens of {name:<15}" + (f"{m['mean']:>8.1f}  (n={m['n']})" if m["n"] else "       -"))
    lines.append(f"average generated tokens per problem {s['avg_generated_tokens_per_problem']:.1f}"
                 + (f"  (tokens: {s['token_counter']})" if s.get("token_counter") else ""))
    lines.append(f"hint-assisted trajectories: {s['hint_used']} of {s['succeeded']} "
                 f"({pct(s['hint_used'], s['succeeded'])})")
    if s["discarded"]:
        lines += ["", f"{'discard reason':<22}{'count':>8}"]
        lines += [f"{k:<22}{v:>8}" for k, v in sorted(s["discarded"].items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line


def read_search_problems(path):
    """Verifiable problems; an empty question or answer is an error naming the line."""
    problems = []
    for rec in read_records(path):
        p = problem_from_record(path, rec)
        for name, value in ((X_KEY, p.x), (Y_KEY, p.y_star)):
            if not value.strip():
                raise FormatError(path, rec.line, name, "empty")
        problems.append(p)
    return problems


def token_counter(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    count.label = f"tokenizer with {tokenizer.vocab_size} entries"
    return count


def search_backend(args, cfg: SearchConfig):
    if bool(args.search_checkpoint) == bool(args.search_url or args.search_model):
        raise ValueError("give the search LLM as --search-checkpoint DIR, or as --search-url and --search-model")
    if args.search_checkpoint:
        from minihuatuo.engine.tokenizer import Tokenizer
        from minihuatuo.services.backends import LocalBackend

        # The tokenizer first: an unknown chat format is reported before the weights are read.
        tokenizer = Tokenizer.from_dir(args.search_checkpoint, chat_format=args.chat_template)
        if not tokenizer.has_chat_template:
            raise ValueError(tokenizer.template_error)
        backend = LocalBackend.from_dir(args.search_checkpoint, dtype=args.dtype, device=args.device,
                                        batch_size=args.batch_size, seed=cfg.seed)
        backend.tokenizer = tokenizer  # LocalBackend.from_dir knows no chat_format; same files otherwise
        return backend
    if args.chat_template:
        raise ValueError("--chat-template applies to a local --search-checkpoint; an endpoint renders its own")
    if not (args.search_url and args.search_model):
        raise ValueError("--search-url and --search-model go together")
    from minihuatuo.services.http_client import OpenAIBackend
    return OpenAIBackend(args.search_url, args.search_model, api_key_env=args.search_api_key_env,
                         concurrency=args.concurrency, cache_dir=args.search_cache)


def cmd_search(args) -> int:
    from minihuatuo.services.config import build_config
    from minihuatuo.services.reward import build_verifier

    cfg = build_config(SearchConfig, {}, None, args.config, args)
    if cfg.false_reflection == "retry":  # the check needs a world that knows every case (world/reflection.py)
        raise ValueError('--false-reflection retry needs the reflection check of the demo\'s world '
                         '(minihuatuo demo --search.false-reflection retry); a search of real data has none')
    problems = read_search_problems(args.data)
    if not problems:  # nothing to do is not an error: say so, touch nothing in --out, exit 0
        print(f"minihuatuo search: {args.data} holds no problems; nothing to do", file=sys.stderr)
        return 0
    problems = problems[:args.limit] if args.limit else problems
    prompts = load_search_prompts(args.prompts) if args.prompts else SearchPrompts()
    backend = search_backend(args, cfg)
    verifier = build_verifier(args.verifier, args)
    if isinstance(verifier, LLMJudgeVerifier):  # the judge's reading is a SearchConfig field (pinned on resume)
        verifier = dataclasses.replace(verifier, parse=cfg.judge_parse)
    count = None
    if args.tokenizer:
        from minihuatuo.engine.tokenizer import Tokenizer
        count = token_counter(Tokenizer.from_dir(args.tokenizer))
    elif getattr(backend, "tokenizer", None) is not None:
        count = token_counter(backend.tokenizer)
    records = run_search(problems, backend, verifier, args.out, cfg, prompts, count)
    label = getattr(count, "label", "estimate: ~4 characters per token")
    print(format_summary(write_outputs(args.out, records, cfg, label), cfg))
    print(f"wrote {args.out}/search.jsonl, sft.jsonl, sft_simple_cot.jsonl, sft_direct.jsonl, summary.json",
          file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    from minihuatuo.services.config import add_config_args, nonnegative_int, positive_int
    from minihuatuo.services.reward import VERIFIERS, add_verifier_args

    p = sub.add_parser("search", help="strategy search for complex reasoning trajectories -> SFT data (paper §3.1)")
    p.add_argument("--data", required=True, metavar="FILE", help="verifiable problems (official format, JSON/JSONL)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; a rerun resumes")
    p.add_argument("--limit", type=nonnegative_int, default=0, help="only the first N problems (0 = all)")
    p.add_argument("--prompts", metavar="FILE", help="JSON/TOML replacing any search prompt (search_prompts.py)")
    g = p.add_argument_group("search LLM: --search-checkpoint, or --search-url with --search-model")
    g.add_argument("--search-checkpoint", metavar="DIR", help="a local causal-LM checkpoint (batched; on --device)")
    g.add_argument("--search-url", metavar="BASE_URL", help="OpenAI-compatible base URL ending in /v1")
    g.add_argument("--search-model", metavar="NAME", help="the model name at --search-url")
    g.add_argument("--search-api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    g.add_argument("--search-cache", metavar="DIR", help="HTTP response cache (sampled replies are cached too)")
    g.add_argument("--concurrency", type=positive_int, default=8, help="HTTP requests in flight at most")
    g.add_argument("--dtype", default="float32", help="local: float32, bfloat16, float16 or auto")
    g.add_argument("--batch-size", type=positive_int, default=16, help="local: rows per sampler call")
    g.add_argument("--chat-template", metavar="NAME", choices=KINDS,
                   help=f"local: use this hand-written chat format ({', '.join(KINDS)}) instead of recognising "
                        "the checkpoint's own template")
    p.add_argument("--tokenizer", metavar="DIR", help="count tokens with this tokenizer (default: the local "
                   "search model's; for an endpoint without it, ~4 characters per token)")
    p.add_argument("--verifier", choices=VERIFIERS, default="rule", help="Verifier(y, y*) of the search")
    add_verifier_args(p)
    add_config_args(p, SearchConfig)
    p.set_defaults(func=cmd_search)
