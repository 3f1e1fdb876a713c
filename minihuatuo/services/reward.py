"""The reward rule of paper §3.2, the verifier evaluation of §4.2 (Figure 4), and their commands.

Reward (§3.2, "Rewards of RL"): for a policy output (ê, ŷ) and the ground truth y*,

    r'(x, ŷ, y*) = 1    if Verifier(ŷ, y*) = True
                   0.1  if Verifier(ŷ, y*) = False
                   0    if ŷ = null  (the output lacks the think-then-answer format)

The format is the SFT target of stage 1: "## Thinking\\n\\n{ê}\\n\\n## Final Response\\n\\n{ŷ}";
ŷ is read out of it by `response_format.extract_final_response` (rule "strict").
The KL term of the total reward belongs to PPO (ppo.py), not here.

Verifier evaluation: accuracy, balanced accuracy, precision and recall of each verifier on
labeled (response, reference, label) pairs, side by side; the paper reports accuracy on 200
hand-labeled pairs per stage (GPT-4o 96.5% / 94.5%, exact match 70.5% / 74.5%).

Commands (stdout carries only results):
  minihuatuo verify --verifier {exact,rule,llm,classifier} --reference TEXT --response TEXT
      prints True or False
  minihuatuo verify --verifier ... --pairs FILE.jsonl       ({"response", "reference"} per line)
      prints one True / False per line, in order
  minihuatuo verifier-eval --data LABELED.jsonl | --from-sft FILE [--verifiers exact,rule] [--json OUT]
      with a "category" per line (a hack set: `minihuatuo world pairs --adversarial`), also the True
      rate of each verifier per category: the wrong-True rate of each hack, the credit of honest answers
"""
from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from minihuatuo.services.config import fraction, require_finite, seed_int
from minihuatuo.services.records import FormatError, read_records
from minihuatuo.services.response_format import extract_final_response


# ----------------------------------------------------------------------------- reward rule

@dataclass
class RewardConfig:
    """Paper §3.2; the official RL code (ppo_trainer_medo1.py) uses the same three values."""

    correct: float = 1.0  # Verifier(ŷ, y*) = True
    incorrect: float = 0.1  # Verifier(ŷ, y*) = False: still above a format failure
    no_format: float = 0.0  # ŷ = null: no think-then-answer structure
    # False only for the "direct response" ablation of paper Table 3 (its SFT data has no thinking
    # part): ŷ is then the text after "## Final Response" if there is one, else the whole output
    require_thinking: bool = True

    def __post_init__(self):
        require_finite(self)  # any finite values; the paper's order correct > incorrect > no_format is not enforced


def reward(output: str, y_star: str, verifier, cfg: RewardConfig = RewardConfig()) -> float:
    return rewards([output], [y_star], verifier, cfg)[0]


def rewards(outputs: list[str], y_stars: list[str], verifier, cfg: RewardConfig = RewardConfig()) -> list[float]:
    """r' for a batch; the verifier sees only the well-formed final responses, in one batch."""
    if len(outputs) != len(y_stars):
        raise ValueError(f"{len(outputs)} outputs but {len(y_stars)} references")
    finals = [extract_final_response(o, "strict") if cfg.require_thinking
              else (extract_final_response(o, "exact").strip() or None) for o in outputs]
    todo = [i for i, f in enumerate(finals) if f is not None]
    verdicts = dict(zip(todo, verifier.verify_batch([(finals[i], y_stars[i]) for i in todo])))
    return [cfg.no_format if f is None else cfg.correct if verdicts[i] else cfg.incorrect
            for i, f in enumerate(finals)]


# ----------------------------------------------------------------------------- labeled pairs

@dataclass
class LabeledPair:
    response: str
    reference: str
    label: bool  # True: the response commits to the reference answer
    category: str | None = None  # optional: what kind of pair (a hack set's categories: `world pairs --adversarial`)


def _field(path, rec, name: str, kind: type):
    if name not in rec.data:
        raise FormatError(path, rec.line, name, "missing")
    v = rec.data[name]
    if not isinstance(v, kind):
        raise FormatError(path, rec.line, name, f"expected {kind.__name__}, got {type(v).__name__}")
    return v


def read_pairs(path) -> list[tuple[str, str]]:
    """(response, reference) from a JSON/JSONL file of {"response", "reference"} objects."""
    return [(_field(path, r, "response", str), _field(path, r, "reference", str)) for r in read_records(path)]


def read_labeled(path) -> list[LabeledPair]:
    """{"response", "reference", "label": true|false} per line, optionally with a "category" (a string)."""
    return [LabeledPair(_field(path, r, "response", str), _field(path, r, "reference", str),
                        _field(path, r, "label", bool),
                        _field(path, r, "category", str) if "category" in r.data else None)
            for r in read_records(path)]


def write_labeled(path, pairs: list[LabeledPair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            row = {k: v for k, v in asdict(p).items() if k != "category" or v is not None}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pairs_from_sft(path, seed: int = 0) -> list[LabeledPair]:
    """A labeled set from SFT-format data that carries "Response" and "Ground-True Answer" (the
    search script's output, e.g. the released demo data): each item's own Response against its own
    answer is a positive; against another item's answer (a different one, drawn with `seed`) a
    negative. Positives assume the released Responses are right, which is not always so; hand
    labels (tests/data/verifier_labels_150.jsonl) are the better measure."""
    records = read_records(path)
    items = [(_field(path, r, "Response", str), _field(path, r, "Ground-True Answer", str)) for r in records]
    rng = random.Random(seed)
    out = []
    for i, (response, answer) in enumerate(items):
        out.append(LabeledPair(response, answer, True))
        others = [a for j, (_, a) in enumerate(items) if j != i and a.strip().casefold() != answer.strip().casefold()]
        if others:
            out.append(LabeledPair(response, rng.choice(others), False))
    return out


def pairs_from_search(path) -> list[LabeledPair]:
    """The verdicts the search already gave (paper §3.1: every conclusion y_i is judged against y* by
    the verifier): one pair per entry of a search.jsonl record's `search.verifier_calls`, its
    `conclusion` against the record's "Ground-True Answer", labelled with its `verdict`, failed searches
    included (their rejections are the negatives). The labels are the search verifier's, not the
    truth: a classifier trained on them learns that verifier, errors included (notes/verifier.md).
    Exact repeats of a (conclusion, answer, verdict) are kept once, so that a held-out split does not
    hold copies of training pairs."""
    out, seen = [], set()
    for r in read_records(path):
        answer = _field(path, r, "Ground-True Answer", str)
        calls = (_field(path, r, "search", dict)).get("verifier_calls")
        if not isinstance(calls, list):
            raise FormatError(path, r.line, "search.verifier_calls", "missing or not a list")
        for k, call in enumerate(calls):
            if not (isinstance(call, dict) and isinstance(call.get("conclusion"), str)
                    and isinstance(call.get("verdict"), bool)):
                raise FormatError(path, r.line, f"search.verifier_calls[{k}]",
                                  'expected {"conclusion": string, "verdict": true|false}')
            key = (call["conclusion"], answer, call["verdict"])
            if key not in seen:
                seen.add(key)
                out.append(LabeledPair(*key, category="search"))
    return out


# ----------------------------------------------------------------------------- metrics

def binary_metrics(predictions: list[bool], labels: list[bool]) -> dict:
    """Accuracy, balanced accuracy (mean of the true-positive and true-negative rates: the fair
    number when positives are rare), precision and recall, with the four counts. A rate whose
    denominator is zero is NaN."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = sum(p and y for p, y in zip(predictions, labels))
    fp = sum(p and not y for p, y in zip(predictions, labels))
    fn = sum(y and not p for p, y in zip(predictions, labels))
    tn = len(labels) - tp - fp - fn

    def ratio(a, b):
        return a / b if b else math.nan

    tpr, tnr = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {"n": len(labels), "accuracy": ratio(tp + tn, len(labels)), "balanced_accuracy": (tpr + tnr) / 2,
            "precision": ratio(tp, tp + fp), "recall": tpr, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def evaluate(verifiers: dict, pairs: list[LabeledPair]) -> dict[str, dict]:
    """binary_metrics of each verifier on the pairs; when the pairs carry categories, each verifier's
    metrics also hold "categories" (by_category: the True rate per category, the hack set's measure)."""
    labels = [p.label for p in pairs]
    out = {}
    for name, v in verifiers.items():
        verdicts = v.verify_batch([(p.response, p.reference) for p in pairs])
        out[name] = binary_metrics(verdicts, labels)
        if any(p.category is not None for p in pairs):
            out[name]["categories"] = by_category(verdicts, pairs)
    return out


def by_category(verdicts: list[bool], pairs: list[LabeledPair]) -> dict[str, dict]:
    """Per category (in order of first appearance; None for pairs without one): n, its label (true,
    false, or "mixed"), how many verdicts were True and the True rate. On a label-false category (a hack)
    the True rate is the wrong-True rate; on a label-true one (an honest phrasing) it is the credit rate.
    Two summary rows: "all label-true" and "all label-false"."""
    groups: dict = {}
    for v, p in zip(verdicts, pairs):
        for key in (p.category, "all label-true" if p.label else "all label-false"):
            groups.setdefault(key, []).append((v, p.label))
    out = {}
    for key, rows in groups.items():
        labels = {y for _, y in rows}
        n, true = len(rows), sum(v for v, _ in rows)
        out[key] = {"n": n, "label": labels.pop() if len(labels) == 1 else "mixed", "true": true, "true_rate": true / n}
    return {k: out[k] for k in [k for k in out if not k.startswith("all label")] +
            [k for k in ("all label-true", "all label-false") if k in out]}


def format_categories(results: dict[str, dict]) -> str:
    """The True rate of every verifier per category (evaluate's "categories"), one row per category:
    on label-false rows (hacks, near misses) the wrong-True rate, on label-true rows the credit rate."""
    names = [n for n, m in results.items() if "categories" in m]
    if not names:
        return ""
    cats = results[names[0]]["categories"]
    head = f"{'category':<24}{'label':>7}{'n':>6}" + "".join(f"{n + ' True':>16}" for n in names)
    rows = [head, "-" * len(head)]
    for key, c in cats.items():
        if key == "all label-true":
            rows.append("-" * len(head))
        label = {True: "true", False: "false"}.get(c["label"], c["label"])
        rows.append(f"{str(key):<24}{label:>7}{c['n']:>6}" +
                    "".join(f"{100 * results[n]['categories'][key]['true_rate']:>15.1f}%" for n in names))
    return "\n".join(rows)


def format_table(results: dict[str, dict]) -> str:
    head = f"{'verifier':<12}{'n':>6}{'accuracy':>10}{'bal. acc':>10}{'precision':>11}{'recall':>8}" \
           f"{'TP':>6}{'FP':>6}{'TN':>6}{'FN':>6}"
    rows = [head, "-" * len(head)]
    for name, m in results.items():
        pct = [f"{100 * m[k]:.1f}%" if not math.isnan(m[k]) else "-" for k in
               ("accuracy", "balanced_accuracy", "precision", "recall")]
        rows.append(f"{name:<12}{m['n']:>6}{pct[0]:>10}{pct[1]:>10}{pct[2]:>11}{pct[3]:>8}"
                    f"{m['tp']:>6}{m['fp']:>6}{m['tn']:>6}{m['fn']:>6}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- commands

VERIFIERS = ("exact", "rule", "llm", "classifier")


def add_verifier_args(p, *, prefixed: bool = False, judge: bool = True) -> None:
    """The verifier's options: one vocabulary for every command that builds a verifier (verify,
    verifier-eval, search, ppo, rloo, grpo, dpo), read by `build_verifier`. The classifier's model,
    threshold and device each have two spellings, --X and --verifier-X (the verifier commands used the
    first, the RL commands the second; both work everywhere); prefixed=True lists --verifier-X first
    in the help. judge=False leaves out the LLM judge's options (a command whose --verifier has no llm)."""
    def option(name, **kw):  # --name and --verifier-name: one option, stored as `name`
        spellings = [f"--verifier-{name}", f"--{name}"] if prefixed else [f"--{name}", f"--verifier-{name}"]
        p.add_argument(*spellings, dest=name, metavar=spellings[0][2:].upper().replace("-", "_"), **kw)

    p.add_argument("--aliases", action="append", default=[], metavar="FILE",
                   help="rule: an extra alias file (TSV, one group per line), added to data/aliases.tsv; repeatable")
    option("model", help="classifier: a sequence-classification checkpoint directory")
    option("threshold", type=fraction, default=None,
           help="classifier: P(True) threshold (default: the checkpoint's minihuatuo_threshold, chosen by "
                "`verifier train`, else the official 0.4)")
    p.add_argument("--classifier-template", metavar="FILE",
                   help="classifier: input template with {response}, {reference} and {eos}; the released "
                        "verifier needs its own (notes/verifier.md), the built-in one is our wording")
    option("device", default="cpu", help=f"classifier{' / local judge' if judge else ''}: cpu, cuda, ...")
    if not judge:
        return
    p.add_argument("--judge-url", help="llm: OpenAI-compatible base URL ending in /v1")
    p.add_argument("--judge-model", help="llm: the model name at --judge-url")
    p.add_argument("--judge-checkpoint", help="llm: a local causal-LM checkpoint directory instead of a URL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="llm: environment variable holding the API key (never logged)")
    p.add_argument("--judge-prompt", metavar="FILE", help="llm: prompt file with {response} and {reference}")
    p.add_argument("--cache", metavar="DIR", help="llm: response cache directory (reruns cost nothing)")


def build_verifier(name: str, args):
    """A verifier from parsed options (`add_verifier_args`); an options object may leave out the
    ones its verifier does not use (other stages call this with their own namespace)."""
    from minihuatuo.services import verifier as V
    from minihuatuo.services.verifier_text import DEFAULT_ALIASES, load_aliases

    def opt(key, default=None):
        return getattr(args, key, default)

    if name == "exact":
        return V.ExactMatchVerifier()
    if name == "rule":
        return V.RuleVerifier(load_aliases([DEFAULT_ALIASES, *(opt("aliases") or [])]))
    if name == "classifier":
        if not opt("model"):
            raise ValueError("--verifier classifier needs --model (--verifier-model) CHECKPOINT_DIR")
        kw = {"template": V.load_prompt(opt("classifier_template"), V.PLACEHOLDERS + ("{eos}",))} \
            if opt("classifier_template") else {}
        if not kw and not V.saved_template(opt("model")):  # a checkpoint of `verifier train` knows its own
            # A classifier scores the exact text it was trained on; our built-in wording is not the
            # released verifier's, so its probabilities (and every reward built on them) are off.
            print("WARNING: --verifier classifier runs with minihuatuo's built-in input template, not the one "
                  "the checkpoint was trained with; for the released verifier pass its template with "
                  "--classifier-template FILE (notes/verifier.md)", file=sys.stderr)
        return V.ClassifierVerifier.from_dir(opt("model"), device=opt("device", "cpu"),
                                             threshold=opt("threshold"), **kw)
    if name == "llm":
        if opt("judge_checkpoint"):
            from minihuatuo.services.backends import LocalBackend
            backend = LocalBackend.from_dir(opt("judge_checkpoint"), device=opt("device", "cpu"))
        elif opt("judge_url") and opt("judge_model"):
            from minihuatuo.services.http_client import OpenAIBackend
            backend = OpenAIBackend(opt("judge_url"), opt("judge_model"),
                                    api_key_env=opt("api_key_env", "OPENAI_API_KEY"), cache_dir=opt("cache"))
        else:
            raise ValueError("--verifier llm needs --judge-url and --judge-model, or --judge-checkpoint")
        prompt = V.load_prompt(opt("judge_prompt")) if opt("judge_prompt") else V.JUDGE_PROMPT
        return V.LLMJudgeVerifier(backend, prompt=prompt, parse=opt("judge_parse", "strict"))
    raise ValueError(f"unknown verifier {name!r}; choose from {', '.join(VERIFIERS)}")


def cmd_verify(args) -> int:
    if args.pairs is None and (args.response is None or args.reference is None):
        raise ValueError("give --response and --reference together, or --pairs FILE")
    if args.pairs is not None and (args.response is not None or args.reference is not None):
        raise ValueError("--pairs cannot be combined with --response / --reference")
    pairs = read_pairs(args.pairs) if args.pairs else [(args.response, args.reference)]
    if not pairs:  # nothing to do is not an error: say so, print no verdict, exit 0
        print(f"minihuatuo verify: {args.pairs} holds no pairs; nothing to do", file=sys.stderr)
        return 0
    verdicts = build_verifier(args.verifier, args).verify_batch(pairs)
    sys.stdout.write("".join(f"{v}\n" for v in verdicts))
    return 0


def cmd_verifier_eval(args) -> int:
    names = [n.strip() for n in args.verifiers.split(",") if n.strip()]
    bad = [n for n in names if n not in VERIFIERS]
    if bad or not names:
        raise ValueError(f"--verifiers: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(VERIFIERS)}")
    pairs = read_labeled(args.data) if args.data else pairs_from_sft(args.from_sft, seed=args.seed)
    if not pairs:  # nothing to do is not an error: say so, write nothing (--write-set, --json), exit 0
        print(f"minihuatuo verifier-eval: {args.data or args.from_sft} holds no "
              f"{'labeled pairs' if args.data else 'SFT items'}; nothing to do", file=sys.stderr)
        return 0
    if args.write_set:
        write_labeled(args.write_set, pairs)
    results = evaluate({n: build_verifier(n, args) for n in names}, pairs)
    positives = sum(p.label for p in pairs)
    print(f"{len(pairs)} labeled pairs: {positives} positive, {len(pairs) - positives} negative")
    print(format_table(results))
    if any("categories" in m for m in results.values()):
        print("\nTrue rate per category (label false: wrong-True, e.g. a hack credited; label true: credit):")
        print(format_categories(results))
    if args.json:
        clean = {n: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
                 for n, m in results.items()}  # NaN is not JSON (a category's rates are never NaN)
        Path(args.json).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("verify", help="does a response commit to the reference answer? prints True/False")
    p.add_argument("--verifier", choices=VERIFIERS, default="rule")
    p.add_argument("--response", help="the response text")
    p.add_argument("--reference", help="the reference (ground-truth) answer")
    p.add_argument("--pairs", metavar="FILE", help='JSONL of {"response", "reference"}; one verdict per line')
    add_verifier_args(p)
    _add_judge_parse(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("verifier-eval", help="accuracy / precision / recall of verifiers on labeled pairs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help='labeled JSONL: {"response", "reference", "label"}')
    src.add_argument("--from-sft", metavar="FILE",
                     help="SFT-format data with Response and Ground-True Answer: own answer = positive, "
                          "another item's answer = negative")
    p.add_argument("--write-set", metavar="FILE", help="also write the labeled pairs used (JSONL)")
    p.add_argument("--seed", type=seed_int, default=0, help="--from-sft: which other item's answer is the negative")
    p.add_argument("--verifiers", default="exact,rule", help=f"comma-separated, from {', '.join(VERIFIERS)}")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    add_verifier_args(p)
    _add_judge_parse(p)
    p.set_defaults(func=cmd_verifier_eval)


def _add_judge_parse(p):
    # not in add_verifier_args: `search` has the same option as a SearchConfig field
    from minihuatuo.services.verifier import JUDGE_PARSES

    p.add_argument("--judge-parse", choices=JUDGE_PARSES, default="strict",
                   help="llm: strict = the reply is exactly True (ours); official = 'true' anywhere in it, "
                        "case-folded (so 'not true' counts as True; notes/search.md)")
