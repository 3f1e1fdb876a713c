"""Benchmark evaluation (paper §4.1): the model answers an exam MCQ freely, and the chosen option is
extracted from its text.

    minihuatuo eval --data FILE --outputs OUTPUTS.jsonl --report OUT.json     score existing outputs
    minihuatuo eval --data FILE --model DIR --outputs OUTPUTS.jsonl ...       generate, then score
    minihuatuo eval --data FILE --endpoint URL --served-model NAME --outputs OUTPUTS.jsonl ...
                                                       generate through an OpenAI-compatible server, then score

An outputs file is matched to the data by id, else by position, else by question text
(`match_outputs`), so the official eval.py's output file is scored as it is.

The extraction cascade follows the official scorer (HuatuoGPT-o1 `evaluation/scorer.py`); the code
and its refinements are ours, each listed in notes/eval.md. For an output (only the part after
"## Final Response" when the model wrote one: `extract_final_response(output, "tolerant")`,
response_format.py), the first step that finds something decides:
  1. explicit: "the answer is C", "Answer: (C)", "answer is **c**";
  2. letter:   an option letter standing alone ("C.", "(C)", "option C") — not the article
               "A patient", the pronoun "I think", nor names ("vitamin B12", "B cells", "B-cell");
  3. text:     an option's text found in the output (whole words, case-insensitive);
  4. similar:  the option whose text is most similar to the output (difflib), the official fallback
               that always picks something (cfg.similarity_fallback=False turns it off).
Like the official scorer, the first and the last match are both kept: "A is wrong, B too, so the
answer is C" gives C / C at step 1, while "C or maybe D" gives C first, D last. Accuracy is reported
for the first match, the last match, and, as the official scorer does, per source the better of the two.
An item with no output, or an empty one, is wrong. The average is over sources, like Table 1.

That cascade is the "strict" scorer (the default). `--scorer official` shows instead the official
scorer reproduced exactly, quirks included (scorer_official.py); the report always holds both.
"""
from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from minihuatuo.services.config import (
    nonnegative_float,
    nonnegative_int,
    option_type,
    positive_int,
    require_finite,
    require_nonnegative,
    require_positive,
    seed_int,
)
from minihuatuo.services.formats import MCQItem, read_mcq
from minihuatuo.services.records import JsonlAppender
from minihuatuo.services.replies import load_prompt, render
from minihuatuo.services.response_format import extract_final_response
from minihuatuo.stages.diagnostics import DiagnosticsConfig, reply_stats
from minihuatuo.stages.eval_outputs import (  # noqa: F401  (re-exported: the outputs file's readers)
    QUESTION_FIELDS,
    OutputRecord,
    endpoint_base_url,
    match_outputs,
    read_output_records,
    read_outputs,
)
from minihuatuo.stages.scorer_official import clean_output, official_choice

# Our wording (the official prompts are not copied). {context} is empty or "Context: ...\n\n".
FREE_PROMPT = ("Here is a multiple-choice question. Work through it, then tell me which option you pick.\n\n"
               "{context}{question}\n\n{options}")
STRICT_PROMPT = ("Here is a multiple-choice question. Work through it, and end your reply with one line of "
                 "the form \"The answer is X.\", X being the letter of the option you pick.\n\n"
                 "{context}{question}\n\n{options}")
PROMPTS = {"free": FREE_PROMPT, "strict": STRICT_PROMPT}


@dataclass
class EvalConfig:
    prompt: str = FREE_PROMPT  # template with {question}, {options} and optionally {context}
    max_tokens: int = 2000  # official eval.py default (max_new_tokens 2000); capped by the model's context
    temperature: float = 0.0  # ours: greedy for reproducibility (official eval.py samples at 0.5, top-p 0.9)
    batch_size: int = 16  # requests per backend call; each call's outputs are appended to the file
    similarity_fallback: bool = True  # step 4 of the cascade, as the official scorer does

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_positive(self, "max_tokens", "batch_size")
        require_nonnegative(self, "temperature")


# ---------------------------------------------------------------------------------------------------
# answer extraction

@dataclass
class Extraction:
    first: str | None  # option letter of the first match (None: nothing found)
    last: str | None
    step: str  # "explicit", "letter", "text", "similar", "none"


_CJK = "\u4e00-\u9fff"
# A letter counts when it stands alone: not inside a word, not joined to one by "-" ("B-cell") or
# "'" ("O'Brien", "I'm"); a quote around it is fine ("'C'"). CJK characters count as separators.
_BEFORE = rf"(?:(?<![\w\-'])|(?<=[{_CJK}])|(?<=^')|(?<=[^\w]'))"
_AFTER = rf"(?=$|[^\w\-']|[{_CJK}]|'(?:[^\w]|$))"
_EXPLICIT = re.compile(r"answer\s*(?:is\s*:?|:)\s*(?:option\s+|choice\s+)?[\s*_(\[\"'`]*([A-Za-z])" + _AFTER, re.I)
_LOWER_END = re.compile(r"[\s*_)\]\"'`]*(?:[.,;:!?)\]]|$|\n)")  # "answer is c." / "(c)" / end of text
# Words around which a capital letter is a name, not an option: "vitamin B12", "hepatitis B", "type A".
_NAMING = re.compile(r"(?:\b(?:vitamins?|hepatitis|types?|groups?|factor|protein|class|phase|stage|grade|zone|band|"
                     r"cluster|lead|schedule|complex|strain|chain|site|wave|fraction|lane|inhibin|troponin|"
                     r"immunoglobulin|ig|apolipoprotein|apo)\s*|°)$", re.I)  # ... and units: "37 °C"
_NAMED_BY = re.compile(r"\s*(?:cells?|lymphocytes?|antigens?|waves?|fib(?:er|re)s?)\b", re.I)  # "B cell", "P wave"
# "A" then a space and a word is the article ("A patient"), unless the word is one that follows an
# option named as a subject ("A is wrong", "A looks tempting", "A and B").
_A_AS_LETTER = re.compile(r"\s+(?:is|was|are|and|or|nor|vs|versus|seems|looks|appears|would|could|can|cannot|may|"
                          r"might|must|should|does|doesn't|has|fits|matches|explains|describes|refers|represents|"
                          r"involves|causes|lacks|remains|best|correct|wrong|incorrect|also|too|then)\b", re.I)


def explicit_answers(text: str, letters: str) -> list[str]:
    """Step 1: letters named by "answer is X" / "answer: X", in order. A lowercase letter counts
    only when punctuation or the end follows ("the answer is a bit unclear" names nothing)."""
    out = []
    for m in _EXPLICIT.finditer(text):
        x = m.group(1)
        if x.islower() and not _LOWER_END.match(text, m.end()):
            continue
        if x.upper() in letters:
            out.append(x.upper())
    return out


def isolated_letters(text: str, letters: str) -> list[str]:
    """Step 2: capital option letters standing alone, in order."""
    if not letters:
        return []
    out = []
    for m in re.finditer(_BEFORE + f"([{letters}])" + _AFTER, text):
        x, rest = m.group(1), text[m.end():]
        if _NAMING.search(text[max(0, m.start() - 24):m.start()]) or _NAMED_BY.match(rest):
            continue
        if x == "I" and re.match(r"\s*'|\s+[a-z]", rest):  # the pronoun: "I think", "I'm"
            continue
        if x == "A" and re.match(r"\s+\w", rest) and not _A_AS_LETTER.match(rest):  # the article
            continue
        out.append(x)
    return out


def option_mentions(text: str, options: dict[str, str]) -> list[str]:
    """Step 3: options whose text appears in the output (whole words, case-folded), in order of
    appearance; where one option's text lies inside another's mention ("iron deficiency" inside
    "iron deficiency anemia"), only the longer one counts."""
    low = text.casefold()
    spans = []  # (start, end, letter)
    for k, v in options.items():
        v = v.strip().casefold()
        if v:
            spans += [(m.start(), m.end(), k) for m in re.finditer(r"(?<!\w)" + re.escape(v) + r"(?!\w)", low)]
    kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans)]
    return [k for _, _, k in sorted(kept)]


def most_similar_option(text: str, options: dict[str, str]) -> str:
    """Step 4: difflib ratio of each option's text to the output; ties go to the earlier option."""
    low = text.casefold()
    scores = [(difflib.SequenceMatcher(None, v.casefold(), low).ratio(), -i, k)
              for i, (k, v) in enumerate(options.items())]
    return max(scores)[2]


def extract_choice(output: str, options: dict[str, str], similarity_fallback: bool = True) -> Extraction:
    text = extract_final_response(output, "tolerant")
    letters = "".join(k for k in options if len(k) == 1)
    for step, found in (("explicit", lambda: explicit_answers(text, letters)),
                        ("letter", lambda: isolated_letters(text, letters)),
                        ("text", lambda: option_mentions(text, options))):
        matches = found()
        if matches:
            return Extraction(matches[0], matches[-1], step)
    if similarity_fallback and text.strip():
        k = most_similar_option(text, options)
        return Extraction(k, k, "similar")
    return Extraction(None, None, "none")


# ---------------------------------------------------------------------------------------------------
# prompting and generation

def render_prompt(item: MCQItem, template: str = FREE_PROMPT) -> str:
    """Fill {context}, {question}, {options} (`MCQItem.prompt_fields`) in one pass, so a user's
    template may contain other braces. Never the keyed answer: this prompt is the exam."""
    return render(template, **item.prompt_fields())


def generate_outputs(items: list[MCQItem], backend, outputs_path, cfg: EvalConfig = EvalConfig(),
                     concurrency: int | None = None) -> int:
    """Ask `backend` every item whose id is not yet in `outputs_path`; append {"id", "output"} lines
    as each batch completes (a rerun resumes). Returns the number of new outputs.
    concurrency: for a backend that serves requests independently (an HTTP server): up to that many
    items in flight, each output appended as soon as it arrives (so one slow reply holds up no
    others, and an interrupted run loses only the replies in flight)."""
    from tqdm import tqdm

    from minihuatuo.services.backends import ChatRequest

    done = read_outputs(outputs_path) if Path(outputs_path).exists() else {}
    todo = [it for it in items if it.id not in done]
    if not todo:
        return 0
    max_tokens = cfg.max_tokens
    messages = [[{"role": "user", "content": render_prompt(it, cfg.prompt)}] for it in todo]
    if hasattr(backend, "tokenizer") and hasattr(backend, "context_length"):  # a local model: fit its context
        longest = max(len(backend.tokenizer.apply_chat_template(m)) for m in messages)
        max_tokens = min(max_tokens, backend.context_length - longest)
        if max_tokens < 1:
            raise ValueError(f"the longest prompt has {longest} tokens, which leaves no room in the model's "
                             f"context of {backend.context_length} tokens")
    reqs = [ChatRequest(m, n=1, temperature=cfg.temperature, max_tokens=max_tokens) for m in messages]
    with JsonlAppender(outputs_path) as out, tqdm(total=len(todo), desc="eval", unit="item", file=sys.stderr) as bar:
        if concurrency:
            from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval") as pool:
                pending = {pool.submit(backend.complete, [r]): it for it, r in zip(todo, reqs)}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in finished:  # written by this thread only: the appender needs no lock
                        it = pending.pop(f)
                        if f.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise f.exception()
                        out.write({"id": it.id, "output": f.result()[0][0]})
                        bar.update(1)
            return len(todo)
        for s in range(0, len(todo), cfg.batch_size):
            part = reqs[s:s + cfg.batch_size]
            for it, completions in zip(todo[s:s + cfg.batch_size], backend.complete(part)):
                out.write({"id": it.id, "output": completions[0]})
            bar.update(len(part))
    return len(todo)


# ---------------------------------------------------------------------------------------------------
# scoring

SCORERS = ("strict", "official")
STEPS = ("explicit", "letter", "text", "similar", "none")
_ACC = ("acc_first", "acc_last", "acc_max")


def _extract(scorer: str, output: str | None, options: dict[str, str], similarity_fallback: bool) -> Extraction:
    if output is None:
        return Extraction(None, None, "missing")
    if scorer == "strict":
        return extract_choice(output, options, similarity_fallback)
    output = clean_output(output)
    return Extraction(*official_choice(output, options)) if output else Extraction(None, None, "dropped")


def score(items: list[MCQItem], outputs: dict[str, str], similarity_fallback: bool = True,
          scorer: str = "strict") -> dict:
    """The report, for both scorers (notes/eval.md "Report"): per source and per item, a "strict"
    and an "official" entry; the flat keys beside them repeat the chosen `scorer`'s figures.
    `similarity_fallback` applies to the strict scorer only (the official one always has step 4)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r} (expected one of {', '.join(SCORERS)})")
    per_item, sources = [], {}
    for it in items:
        out = outputs.get(it.id)
        row = {"id": it.id, "source": it.source, "answer_idx": it.answer_idx}
        src = sources.setdefault(it.source, {})
        for name in SCORERS:
            ex = _extract(name, out, it.options, similarity_fallback)
            ok = [x is not None and x.upper() == it.answer_idx.upper() for x in (ex.first, ex.last)]
            row[name] = {"first": ex.first, "last": ex.last, "step": ex.step,
                         "correct_first": ok[0], "correct_last": ok[1]}
            s = src.setdefault(name, {"n": 0, "correct_first": 0, "correct_last": 0, "missing": 0, "dropped": 0,
                                      "steps": {k: 0 for k in STEPS}})
            if ex.step == "dropped":  # official: not in the denominator
                s["dropped"] += 1
                continue
            s["n"] += 1
            s["correct_first"] += ok[0]
            s["correct_last"] += ok[1]
            if ex.step == "missing":
                s["missing"] += 1
            else:
                s["steps"][ex.step] += 1
        row.update(row[scorer])
        per_item.append(row)
    average = {}
    for name in SCORERS:
        scored = []
        for src in sources.values():
            s = src[name]
            if s["n"]:
                s["acc_first"], s["acc_last"] = s["correct_first"] / s["n"], s["correct_last"] / s["n"]
                s["acc_max"] = max(s["acc_first"], s["acc_last"])  # official: the better of the two, per source
                scored.append(s)
            else:  # every item of the source dropped
                s.update(dict.fromkeys(_ACC))
        average[name] = {k: sum(s[k] for s in scored) / len(scored) if scored else None for k in _ACC}
    for src in sources.values():  # the flat keys, as before this report had two scorers
        src.update(src[scorer], acc_official=src[scorer]["acc_max"])  # acc_official: the old name of acc_max
    if sources:
        average.update(average[scorer], acc_official=average[scorer]["acc_max"])
    else:
        average = {}
    known = {it.id for it in items}
    return {"scorer": scorer, "n_items": len(items), "sources": sources, "average": average,
            "missing_ids": [r["id"] for r in per_item if r["step"] == "missing"],
            "dropped_ids": [r["id"] for r in per_item if r["official"]["step"] == "dropped"],
            "unmatched_output_ids": sorted(i for i in outputs if i not in known), "items": per_item}


def format_table(report: dict) -> str:
    """The chosen scorer's figures: one row per source, then the average over sources."""
    name = report.get("scorer", "strict")
    official = name == "official"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    head = ("source", "n", "first %", "last %", "official %" if official else "max %", "missing")
    rows = [head + (("dropped",) if official else ()) + ("explicit/letter/text/similar/none",)]
    for src_name, src in report["sources"].items():
        s, st = src[name], src[name]["steps"]
        rows.append((src_name, str(s["n"]), pct(s["acc_first"]), pct(s["acc_last"]), pct(s["acc_max"]),
                     str(s["missing"])) + ((str(s["dropped"]),) if official else ())
                    + ("/".join(str(st[k]) for k in STEPS),))
    if report["average"]:
        a, ss = report["average"][name], [src[name] for src in report["sources"].values()]
        rows.append(("average", str(sum(s["n"] for s in ss)), pct(a["acc_first"]), pct(a["acc_last"]),
                     pct(a["acc_max"]), str(sum(s["missing"] for s in ss)))
                    + ((str(sum(s["dropped"] for s in ss)),) if official else ()) + ("",))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line

def cmd_eval(args) -> int:
    if args.model and args.endpoint:
        raise ValueError("--model and --endpoint: pass one (generate locally, or through a server)")
    if args.endpoint and not args.served_model:
        raise ValueError("--endpoint needs --served-model NAME: the model name the server serves")
    items = read_mcq(args.data, source=args.source, cop_base=args.cop_base)
    if not items:  # nothing to do is not an error: say so, generate and write nothing, exit 0
        print(f"minihuatuo eval: {args.data} holds no MCQs; nothing to do", file=sys.stderr)
        return 0
    if args.limit:
        items = items[:args.limit]
    prompt = load_prompt(args.prompt_file, ("{question}", "{options}")) if args.prompt_file else PROMPTS[args.prompt]
    cfg = EvalConfig(prompt=prompt,
                     max_tokens=args.max_tokens, temperature=args.temperature, batch_size=args.batch_size,
                     similarity_fallback=not args.no_similarity)
    if args.model:
        import torch

        from minihuatuo.services.backends import LocalBackend

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        backend = LocalBackend.from_dir(args.model, dtype=args.dtype, device=device, batch_size=args.batch_size,
                                        seed=args.seed)
        n = generate_outputs(items, backend, args.outputs, cfg)
        print(f"eval: {n} new outputs appended to {args.outputs}", file=sys.stderr)
    elif args.endpoint:
        from minihuatuo.services.http_client import BackendError, OpenAIBackend

        # No response cache: the outputs file is what makes a rerun resume. The key is read from the
        # environment variable at each request and is never printed.
        backend = OpenAIBackend(endpoint_base_url(args.endpoint), args.served_model, api_key_env=args.api_key_env,
                                timeout=args.request_timeout, concurrency=args.concurrency)
        try:
            n = generate_outputs(items, backend, args.outputs, cfg, concurrency=args.concurrency)
        except BackendError as e:  # the server's own message, one line; what arrived is kept
            print(f"minihuatuo eval: error: {e}; the outputs received so far are in {args.outputs}, and a rerun "
                  f"asks only for the others", file=sys.stderr)
            return 1
        print(f"eval: {n} new outputs appended to {args.outputs} ({backend.stats.sent} requests to "
              f"{backend.base_url}, {backend.stats.retries} retries)", file=sys.stderr)
    elif not Path(args.outputs).exists():
        raise FileNotFoundError(f"{args.outputs}: no such outputs file (pass --model DIR or --endpoint URL to "
                                f"generate it)")
    outputs, matching = match_outputs(items, read_output_records(args.outputs), args.outputs)
    report = score(items, outputs, cfg.similarity_fallback, scorer=args.scorer)
    report["data"], report["outputs"], report["output_matching"] = str(args.data), str(args.outputs), matching
    # reply-level diagnostics per source (stages/diagnostics.reply_stats): why a model scores what it does
    dcfg = DiagnosticsConfig(reflection_pattern=args.reflection_pattern) if args.reflection_pattern \
        else DiagnosticsConfig()
    by_source: dict[str, list[str]] = {}
    for it in items:
        if it.id in outputs:
            by_source.setdefault(it.source, []).append(outputs[it.id])
    report["replies"] = {src: reply_stats(outs, dcfg) for src, outs in by_source.items()}
    print(format_table(report))
    for src, st in report["replies"].items():
        if st["n"]:
            print(f"eval: {src} replies: {st['n']}, think-then-answer format {st['format_ok']:.1%}, unfinished "
                  f"{st['unfinished']:.1%}, with a reflection marker {st['reflection_markers']:.1%}, "
                  f"{st['mean_words']:.0f} words on average", file=sys.stderr)
    print(f"eval: scorer {args.scorer} (the report holds both: strict and official)", file=sys.stderr)
    if matching != "id":
        print(f"eval: the outputs carry no ids of {args.data}: matched to its items by {matching}", file=sys.stderr)
    if report["missing_ids"]:
        print(f"eval: {len(report['missing_ids'])} item(s) have no output and count as wrong", file=sys.stderr)
    if args.scorer == "official" and report["dropped_ids"]:
        print(f"eval: {len(report['dropped_ids'])} item(s) have an empty output and are dropped, as the official "
              "eval.py does (not in the denominator)", file=sys.stderr)
    if report["unmatched_output_ids"]:
        print(f"eval: {len(report['unmatched_output_ids'])} output id(s) match no item of {args.data}", file=sys.stderr)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="score a model's free-text answers on MCQ benchmarks (paper §4.1)")
    p.add_argument("--data", required=True, help="MCQ file (JSON, JSONL or {source: [items]}); see formats.py")
    p.add_argument("--outputs", required=True, help="JSONL of {\"id\", \"output\"}: read, or appended to with --model")
    p.add_argument("--report", default=None, help="write the report (accuracies, counts, per-item letters) as JSON")
    p.add_argument("--source", default=None, help="source tag of items that carry none (default: the file name)")
    p.add_argument("--cop-base", type=int, choices=(0, 1), default=None, help="MedMCQA cop numbering (default: detect)")
    p.add_argument("--limit", type=nonnegative_int, default=0, help="only the first N items (0 = all)")
    p.add_argument("--scorer", choices=SCORERS, default="strict",
                   help="whose figures the table shows: strict (ours, default) or official (the official "
                        "scorer exactly, quirks included); the report holds both")
    p.add_argument("--reflection-pattern", default=None, metavar="REGEX",
                   help="reply diagnostics: what counts as a reflection marker (case-insensitive, per sentence; "
                        "default: diagnostics.DiagnosticsConfig.reflection_pattern, 'Wait', 'let me verify', ...)")
    p.add_argument("--no-similarity", action="store_true",
                   help="strict scorer: no difflib fallback, unmatched outputs count as wrong")
    g = p.add_argument_group("generation (with --model; the prompt and sampling flags also apply to --endpoint)")
    g.add_argument("--model", default=None, help="checkpoint directory: generate missing outputs with it first")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--prompt", choices=sorted(PROMPTS), default="free", help="built-in prompt (default free)")
    g.add_argument("--prompt-file", default=None, help="your own template with {question}, {options}, {context}")
    g.add_argument("--max-tokens", type=positive_int, default=EvalConfig.max_tokens)
    g.add_argument("--temperature", type=nonnegative_float, default=EvalConfig.temperature)
    g.add_argument("--batch-size", type=positive_int, default=EvalConfig.batch_size)
    g.add_argument("--seed", type=seed_int, default=None)
    e = p.add_argument_group("generation through a server (with --endpoint): vLLM, sglang, minihuatuo serve, OpenAI")
    e.add_argument("--endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1: generate missing outputs through "
                        "its /chat/completions (resumable: a rerun asks only for items not in --outputs)")
    e.add_argument("--served-model", default=None, metavar="NAME", help="the model name the server serves")
    e.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight at once (default 8)")
    e.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (unset: no key is sent); never printed")
    e.add_argument("--request-timeout", type=option_type(False, lo=0, lo_open=True), default=600.0,
                   help="seconds one request may take (default 600: long replies on a busy server)")
    p.set_defaults(func=cmd_eval)
