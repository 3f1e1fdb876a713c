"""The `minihuatuo` command line. Each stage of the recipe is a subcommand working on files.

Only results go to stdout; progress, warnings and diagnostics go to stderr, so that stdout can be
piped (the `generate --raw` contract: stdout is exactly the decoded completion).

Bad input ends with one line on stderr, `minihuatuo CMD: error: ...` naming the option, file, line
or field, and exit status 2: argparse's errors (an unknown option, an option's value out of its
range) and the commands' own (ValueError, FileNotFoundError, CheckpointError: `main`). A command
with nothing to do (search, verify, verifier-eval on an empty file) says so on stderr and exits 0;
a trainer on an empty data file is an error.
"""
from __future__ import annotations

import argparse
import sys

import torch

from minihuatuo.engine.chat_templates import KINDS

from minihuatuo.engine.checkpoint import DTYPES
from minihuatuo.services.config import nonnegative_float, nonnegative_int, positive_int, seed_int, top_p_float


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors, as `main`'s: `minihuatuo CMD: error: MESSAGE`, exit 2
    (argparse prints its usage first; `--help` shows it). Subcommands' parsers are of this class too.
    `--help` opens with the command's one-line summary and ends with a runnable example (`EXAMPLES`)."""

    summary: str = ""
    example: str = ""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        text = super().format_help()
        if self.summary:
            text = f"{self.summary}\n\n{text}"
        if self.example:
            text = text.rstrip("\n") + f"\n\n{self.example}\n"
        return text


# One runnable example per command, run from a clone's root: the bundled world's files, or what the
# example of an earlier step of the recipe writes (the line above the command says which).
# tests/test_cli.py checks that every command has one, that it parses, and that its data/ files exist.
_RECIPE = "the recipe on the bundled world, step by step (each step reads what the one before wrote)"
EXAMPLES = {
    "minihuatuo": "example (the whole recipe on the bundled world, about 2 minutes on 2 cores):\n"
                  "  minihuatuo demo --quick --out demo_quick",
    "generate": "example:\n  minihuatuo generate --model data/world/base --temperature 0 --prompt \"A 58-year-old "
                "woman presents with pleuritic chest pain, tachycardia and sudden breathlessness. What is the most "
                "likely diagnosis?\"",
    "chat": "example:\n  minihuatuo chat --model data/world/base --temperature 0",
    "verify": "example (prints True: an alias of the reference):\n  minihuatuo verify --aliases data/world/aliases.tsv "
              "--response \"The most likely diagnosis is PE.\" --reference \"pulmonary embolism\"",
    "verifier-eval": "example (after `minihuatuo world pairs --adversarial --n 500 --seed 1 --out pairs.jsonl`):\n"
                     "  minihuatuo verifier-eval --data pairs.jsonl --aliases data/world/aliases.tsv",
    "world": "example:\n  minihuatuo world exam --out exam",
    "world pretrain": "example (a fresh tiny base model, about a minute):\n  minihuatuo world pretrain --size tiny "
                      "--out tiny_base",
    "world exam": f"example ({_RECIPE}: 1):\n  minihuatuo world exam --out exam --n-train 300 --n-heldout 100",
    "world eval": "example:\n  minihuatuo world eval --model data/world/base --n 100",
    "world pairs": "example:\n  minihuatuo world pairs --adversarial --n 500 --seed 1 --out pairs.jsonl",
    "verifier": "example (after `minihuatuo world pairs --n 4000 --seed 1 --out pairs.jsonl`):\n"
                "  minihuatuo verifier train --model data/world/base --pairs pairs.jsonl --out verifier "
                "--preset tiny-world",
    "verifier train": "example (after `minihuatuo world pairs --n 4000 --seed 1 --out pairs.jsonl`; then "
                      "`minihuatuo verify --verifier classifier --model verifier/final --pairs pairs.jsonl`):\n"
                      "  minihuatuo verifier train --model data/world/base --pairs pairs.jsonl --out verifier "
                      "--preset tiny-world",
    "problems": "example:\n  minihuatuo problems build --mcq exam/train.jsonl --out problems --filter-model data/world/base",
    "problems build": f"example ({_RECIPE}: 2, after `minihuatuo world exam --out exam`):\n"
                      "  minihuatuo problems build --mcq exam/train.jsonl --out problems --filter-model data/world/base",
    "search": f"example ({_RECIPE}: 3, after `minihuatuo problems build ... --out problems`):\n"
              "  minihuatuo search --data problems/search.json --out search --search-checkpoint data/world/base "
              "--verifier rule --aliases data/world/aliases.tsv --reformat template --max-tokens 384",
    "sft": f"example ({_RECIPE}: 4, after `minihuatuo search ... --out search`):\n"
           "  minihuatuo sft --model data/world/base --data search/sft.jsonl --out sft --preset tiny-world",
    "ppo": f"example ({_RECIPE}: 5, after `minihuatuo sft ... --out sft`):\n"
           "  minihuatuo ppo --policy sft/final --data problems/rl.json --out ppo --preset tiny-world "
           "--verifier rule --aliases data/world/aliases.tsv",
    "rloo": "example (after `minihuatuo sft ... --out sft`, as for ppo):\n"
            "  minihuatuo rloo --policy sft/final --data problems/rl.json --out rloo --preset tiny-world "
            "--verifier rule --aliases data/world/aliases.tsv",
    "grpo": "example (after `minihuatuo sft ... --out sft`, as for ppo):\n"
            "  minihuatuo grpo --policy sft/final --data problems/rl.json --out grpo --preset tiny-world "
            "--verifier rule --aliases data/world/aliases.tsv",
    "dpo": "example (after `minihuatuo sft ... --out sft`, as for ppo):\n"
           "  minihuatuo dpo --policy sft/final --data problems/rl.json --out dpo --preset tiny-world "
           "--verifier rule --aliases data/world/aliases.tsv",
    "eval": "example (after `minihuatuo world exam --out exam`; generates with the model, then scores):\n"
            "  minihuatuo eval --data exam/heldout.jsonl --outputs outputs.jsonl --model data/world/base --limit 50",
    "serve": "example (then POST http://127.0.0.1:8000/v1/chat/completions):\n"
             "  minihuatuo serve --model data/world/base --port 8000",
    "demo": "example:\n  minihuatuo demo --quick --out demo_quick",
}


def add_help_texts(parser: argparse.ArgumentParser, path: str = "minihuatuo", summary: str = "") -> None:
    """Each (sub)command's summary (its `help=` line in the parent's list) and example (EXAMPLES),
    walked once when the parser is built, so that the command modules keep declaring only flags."""
    if not summary:  # the top level: its description is the summary
        summary, parser.description = parser.description or "", None
    parser.summary = summary
    parser.example = EXAMPLES.get(path.removeprefix("minihuatuo ") if path != "minihuatuo" else path, "")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                help_line = helps.get(name) or ""
                add_help_texts(sub, f"{path} {name}", help_line if help_line.endswith((".", "?", ")")) else help_line + ".")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights dtype; 'auto' keeps the stored one (default float32)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: int8 weight-only projections for CPU decoding (engine/quantize.py; activations "
                        "stay in --dtype; the int8 GEMV kernel on CPU)")
    p.add_argument("--device", default=_default_device(), help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=nonnegative_float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=top_p_float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=seed_int, default=None)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--chat-template", default=None, metavar="NAME", choices=KINDS,
                   help=f"use this hand-written chat format ({', '.join(KINDS)}) instead of recognising "
                        "the checkpoint's own template (needed when it has none or one we do not recognise)")


def _load(args, chat: bool = True):
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model, chat_format=args.chat_template)
    if chat and not tokenizer.has_chat_template:  # say so before the weights are read
        raise ValueError(tokenizer.template_error)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device).eval()
    if args.quantize == "int8":
        from minihuatuo.engine.quantize import quantize_model_int8

        model = quantize_model_int8(model)
        model.use_kernels = model.model.embed_tokens.weight.device.type == "cpu"  # the int8 GEMV kernel
    return model, tokenizer


def _sampling(args, tokenizer):
    from minihuatuo.engine.sample import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop_token_ids=tuple(tokenizer.eos_ids), seed=args.seed)


def cmd_generate(args) -> int:
    from minihuatuo.engine.sample import generate

    model, tokenizer = _load(args, chat=not args.raw)
    if args.raw:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": args.prompt}])
    out = generate(model, [prompt], _sampling(args, tokenizer), pad_id=tokenizer.pad_id)
    text = tokenizer.decode(out.responses()[0], skip_special_tokens=True)
    sys.stdout.write(text + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()
    return 0


def cmd_chat(args) -> int:
    """A multi-turn conversation on the terminal: one line in, one reply out. /reset clears, /exit quits."""
    from minihuatuo.engine.sample import generate

    model, tokenizer = _load(args)
    cfg = _sampling(args, tokenizer)
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = len(history)
    print("minihuatuo chat: type a message; /reset to start over, /exit to quit.", file=sys.stderr)
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)  # the prompt is not output: stderr
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            del history[start:]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        out = generate(model, [tokenizer.apply_chat_template(history)], cfg, pad_id=tokenizer.pad_id)
        reply = tokenizer.decode(out.responses()[0], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from minihuatuo import __version__

    parser = Parser(prog="minihuatuo", description="HuatuoGPT-o1's recipe from scratch in PyTorch: verifiable "
                    "problems, strategy search, SFT, PPO with verifier rewards, evaluation; one subcommand per step.")
    parser.add_argument("--version", action="version", version=f"minihuatuo {__version__}")
    parser.add_argument("--compile-decode", action="store_true",
                        help="decode with the compiled decode step in every stage of this command (same tokens; "
                        "pays off on long decodes, costs a one-off compilation of 5-40 s; engine/decode_step.py)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt with a checkpoint")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="encode the prompt as is, without the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a checkpoint on the terminal")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    # Each command module declares its own subcommands in `add_cli(sub)`; this list is the whole
    # wiring (one line per module, in the order of the recipe).
    from minihuatuo.pipeline import demo_cli
    from minihuatuo.services import reward, serve
    from minihuatuo.stages import evaluate, problems, search_cli, sft, verifier_train
    from minihuatuo.stages.rl import commands as rl_commands  # ppo, rloo, grpo, dpo
    from minihuatuo.world import pretrain as world_pretrain

    for module in (reward, verifier_train, sft, serve, evaluate, rl_commands, problems, world_pretrain, search_cli,
                   demo_cli):
        module.add_cli(sub)
    add_help_texts(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minihuatuo.engine import decode_step
    from minihuatuo.engine.checkpoint import CheckpointError

    decode_step.compile_by_default = args.compile_decode

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"minihuatuo {args.command}: error: {e}", file=sys.stderr)
        return 2
