"""`minihuatuo world pretrain`: the world's tokenizer and tiny base model, trained from scratch.

    minihuatuo world pretrain --out data/world/base            the shipped checkpoint (notes/world.md)
    minihuatuo world pretrain --size tiny --steps 3 --out DIR  a smoke run (tests/test_world.py)
    minihuatuo world exam --out DIR                            MCQ files in formats.py's layout
    minihuatuo world eval --model DIR                          held-out accuracy of a checkpoint

The base model is the stand-in for the pretrained instruct LLM of the paper (§4.1 starts from
Llama-3.1-8B-Instruct). Steps, in order:
  1. corpus: textbook, fact questions and the biased tutor's exercises (text.py);
  2. tokenizer: byte-level BPE trained with `tokenizers` on that text, with the project's "plain"
     chat tokens (<|user|> ... <|end|>) and one token for each fixed piece of the prompts the recipe
     sends (the search prompts' instructions, the JSON skeleton of a reply). A tiny model then
     spends its CPU minutes on the medicine, not on re-reading 200 tokens of instructions; the
     text itself is unchanged, so any other prompt still works, it is only longer;
  3. pre-tokenise once (building text on the fly cost ~20% of the speed, world-notes.md) and pack
     whole documents into rows of `context` tokens (first fit, padded: an answer never loses its
     question to a row boundary);
  4. causal-LM pretraining of a Llama-shaped model (model.py) with a plain AdamW loop, the
     learning-rate schedule and parameter groups of sft.py, bf16 autocast on CPU;
  5. save in the Hugging Face layout (checkpoint.save_model) with the tokenizer files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minihuatuo.engine.checkpoint import save_model
from minihuatuo.engine.model import ModelConfig, build_model
from minihuatuo.engine.tokenizer import ChatTemplate
from minihuatuo.services.config import (
    ConfigError,
    add_config_args,
    build_config,
    nonnegative_int,
    positive_int,
    require_choice,
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_seed,
    seed_int,
)
from minihuatuo.stages.evaluate import FREE_PROMPT
from minihuatuo.stages.problem_prompts import TOO_EASY_PROMPT
from minihuatuo.stages.search_prompts import SearchPrompts
from minihuatuo.stages.sft import param_groups
from minihuatuo.training.schedules import warmup_then_decay_lr
from minihuatuo.world.exam import write_exam
from minihuatuo.world.kb import DEFAULT_KB, WORLD_DIR, load_kb
from minihuatuo.world.text import CorpusConfig, build_corpus
from minihuatuo.world.tutor import TutorConfig, cot_reply

SPECIALS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# transformers' apply_chat_template renders this exactly like tokenizer.ChatTemplate("plain")
PLAIN_JINJA = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class PretrainConfig:
    """Model shape, optimisation, corpus and tutor of `world pretrain`. Defaults: the shipped base
    model ("base"); world-notes.md measured this shape (~2M parameters) as enough for this world."""

    hidden_size: int = 192  # C
    intermediate_size: int = 512  # F (SwiGLU width)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    context: int = 1024  # max_position_embeddings = training row length; the refine prompts need ~700
    vocab_size: int = 2048  # BPE vocabulary before the prompt-piece tokens are added
    # optimizer steps: 1,000 learned the facts; 2,000 made a better search LLM and SFT start (notes/world.md §5)
    steps: int = 2000
    batch_size: int = 4  # rows of `context` tokens per step (more, smaller steps learned faster here)
    lr: float = 3e-3  # peak; a 2M-parameter model from scratch takes a large one
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    bf16: bool = True  # bf16 autocast (fp32 master weights); on this CPU 1.4-1.5x faster (notes/world.md)
    threads: int = 0  # torch threads; 0 = torch's default
    seed: int = 0  # model init and data order (the corpus has its own seed below)
    # the corpus (text.CorpusConfig: documents of each kind)
    textbook_passes: int = CorpusConfig.textbook_passes
    fact_questions: int = CorpusConfig.fact_questions
    init_exercises: int = CorpusConfig.init_exercises
    refine_exercises: int = CorpusConfig.refine_exercises
    direct_exercises: int = CorpusConfig.direct_exercises
    mcq_exercises: int = CorpusConfig.mcq_exercises
    free_mcq_exercises: int = CorpusConfig.free_mcq_exercises
    corpus_seed: int = 0
    # the tutor's habits (tutor.TutorConfig)
    anchor: float = TutorConfig.anchor
    skip_check: float = TutorConfig.skip_check
    slip: float = TutorConfig.slip
    alias: float = TutorConfig.alias

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "context", "vocab_size", "steps", "batch_size", "lr")
        if self.hidden_size % (2 * self.num_attention_heads):  # RoPE rotates pairs: an even head size
            raise ConfigError(("hidden_size", "num_attention_heads"), f"hidden_size ({self.hidden_size}) must be a "
                              f"multiple of 2 × num_attention_heads ({self.num_attention_heads})")
        require_fraction(self, "warmup_ratio", "min_lr_ratio", "anchor", "skip_check", "slip", "alias")
        require_choice(self, "schedule", ("cosine", "linear"))
        require_nonnegative(self, "weight_decay", "max_grad_norm", "threads", "textbook_passes", "fact_questions",
                            "init_exercises", "refine_exercises", "direct_exercises", "mcq_exercises",
                            "free_mcq_exercises")
        require_seed(self, "seed", "corpus_seed")

    def corpus(self) -> CorpusConfig:
        names = {f.name for f in dataclasses.fields(CorpusConfig)} - {"seed"}
        return CorpusConfig(seed=self.corpus_seed, **{k: getattr(self, k) for k in names})

    def tutor(self) -> TutorConfig:
        return TutorConfig(anchor=self.anchor, skip_check=self.skip_check, slip=self.slip, alias=self.alias)

    def model_config(self, vocab_size: int, eos: int, pad: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_attention_heads, max_position_embeddings=self.context,
                           tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad)


SIZES = {
    "base": PretrainConfig(),
    # a smoke run for tests: a one-layer model, a few hundred documents, a few steps
    "tiny": PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=600, steps=3, batch_size=2, textbook_passes=1, fact_questions=40,
                           init_exercises=20, refine_exercises=20, direct_exercises=20, mcq_exercises=10,
                           free_mcq_exercises=5),
}


# ---------------------------------------------------------------------------------------------------
# tokenizer


def prompt_pieces(prompts: SearchPrompts = SearchPrompts()) -> list[str]:
    """The fixed text between the placeholders of the prompts the recipe sends, and the JSON
    skeleton of search replies and of {previous_reasoning}: each becomes one added token."""
    pieces = []
    for template in (prompts.init, prompts.refine, TOO_EASY_PROMPT, FREE_PROMPT):
        pieces += re.split(r"\{(?:question|previous_reasoning|strategy|context|options)\}", template)
    pieces += list(prompts.strategies.values())
    mark = "\u00a7"  # a character the JSON skeleton never holds: split the rendered skeleton on it
    sample = [{"action": a, "title": mark, "content": mark} if a == "Inner Thinking" else {"action": a, "content": mark}
              for a in ("Inner Thinking", "Inner Thinking", "Final Conclusion", "Verification", "Inner Thinking")]
    pieces += cot_reply(sample).split(mark) + cot_reply(sample[3:]).split(mark)
    pieces += json.dumps(sample, ensure_ascii=False, indent=2).split(mark)  # previous_reasoning (search_reformat)
    return [p for p in dict.fromkeys(pieces) if len(p.strip()) >= 4]


def train_tokenizer(texts: list[str], vocab_size: int, pieces: list[str], out_dir) -> Path:
    """Byte-level BPE (the GPT-2 / Llama-3 family of tokenizers) trained on `texts`, plus the
    plain chat tokens (special) and the prompt pieces (added, not special: decoded as text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the pieces will be single tokens: learning merges inside them would waste the vocabulary
    split = re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)))
    tok.train_from_iterator((split.sub("\n", t) for t in texts), trainer)
    tok.add_tokens([AddedToken(p, normalized=False) for p in pieces])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|end|>",
        "pad_token": "<|pad|>", "chat_template": PLAIN_JINJA}, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.token_to_id("<|end|>"), "pad_token_id": tok.token_to_id("<|pad|>")}, indent=2) + "\n",
        encoding="utf-8")
    return out


def render_doc(doc, template: ChatTemplate = ChatTemplate("plain")) -> str:
    """A passage ends with <|end|> like a chat turn, so documents never run into each other."""
    return doc + "<|end|>\n" if isinstance(doc, str) else template.render(doc, add_generation_prompt=False)


# ---------------------------------------------------------------------------------------------------
# pretraining


def pack(docs: list[list[int]], T: int, pad_id: int, open_rows: int = 16) -> torch.Tensor:
    """Whole documents packed into rows of T+1 tokens (inputs [:, :-1], targets [:, 1:]), first fit
    among the last `open_rows` rows, the rest padded with pad_id (no loss there). A document cut in
    two would lose its question from the context of its answer; first fit wastes <1% on padding
    (0.4% on the shipped corpus). Documents longer than a row are cut."""
    rows: list[list[int]] = []
    for ids in docs:
        ids = ids[:T + 1]
        for row in rows[-open_rows:]:
            if len(row) + len(ids) <= T + 1:
                row.extend(ids)
                break
        else:
            rows.append(list(ids))
    out = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def pretrain(cfg: PretrainConfig, out_dir, kb_path=DEFAULT_KB, progress: bool = True) -> dict:
    """Corpus -> tokenizer -> pre-tokenised rows -> AdamW loop -> checkpoint in out_dir. Returns
    the summary also written to out_dir/pretrain.json."""
    from tqdm import tqdm

    from minihuatuo.engine.tokenizer import Tokenizer

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    kb = load_kb(kb_path)
    docs = build_corpus(kb, cfg.corpus(), cfg.tutor())
    texts = [render_doc(d) for _, d in docs]
    tok_dir = out.parent / f".{out.name}.tokenizer"
    train_tokenizer(texts, cfg.vocab_size, prompt_pieces(), tok_dir)
    tokenizer = Tokenizer.from_dir(tok_dir)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)  # pre-tokenised once
    per_kind: dict[str, list[int]] = {}
    for (kind, _), ids in zip(docs, encoded):
        per_kind.setdefault(kind, []).append(len(ids))
    rows = pack(encoded, cfg.context, tokenizer.pad_id)
    n_tokens = sum(map(len, encoded))
    t_data = time.time() - t0

    V = math.ceil(tokenizer.vocab_size / 64) * 64  # a multiple of 64: friendlier matrix shapes
    model = build_model(cfg.model_config(V, tokenizer.eos_ids[0], tokenizer.pad_id), seed=cfg.seed).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    order, pos, losses, log = torch.randperm(len(rows), generator=g), 0, [], []
    t1 = time.time()
    bar = tqdm(range(cfg.steps), desc="world pretrain", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        if pos + cfg.batch_size > len(order):  # a new epoch: a fresh order of the rows
            order, pos = torch.randperm(len(rows), generator=g), 0
        batch = rows[order[pos:pos + cfg.batch_size]]  # (B, T+1)
        pos += cfg.batch_size
        lr = warmup_then_decay_lr(step, cfg.steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        targets = batch[:, 1:].masked_fill(batch[:, 1:] == tokenizer.pad_id, -100)  # (B, T); no loss on padding
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.steps - 1:
            tok_s = (step + 1) * cfg.batch_size * cfg.context / (time.time() - t1)
            log.append({"step": step, "loss": round(losses[-1], 4), "lr": lr, "tokens_per_s": round(tok_s)})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:.0f}")
    bar.close()
    t_train = time.time() - t1
    save_model(model.eval(), out, copy_files_from=tok_dir)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    trained_tokens = cfg.steps * cfg.batch_size * cfg.context
    summary = {
        "command": "minihuatuo world pretrain " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["world", "pretrain"] else None,
        "config": dataclasses.asdict(cfg), "parameters": model.num_parameters(), "vocab_size": tokenizer.vocab_size,
        "documents": {k: len(v) for k, v in per_kind.items()},
        "tokens": {k: sum(v) for k, v in per_kind.items()}, "corpus_tokens": n_tokens, "rows": len(rows),
        "padding": round(1 - n_tokens / rows.numel(), 4),
        "mean_tokens": {k: round(sum(v) / len(v), 1) for k, v in per_kind.items()},
        "trained_tokens": trained_tokens, "epochs": round(cfg.steps * cfg.batch_size / len(rows), 2),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "wall_time_s": {"data_and_tokenizer": round(t_data, 1), "training": round(t_train, 1),
                        "total": round(time.time() - t0, 1)},
        "tokens_per_s": round(trained_tokens / t_train), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "log": log,
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------------
# commands


def cmd_pretrain(args) -> int:
    cfg = build_config(PretrainConfig, SIZES, args.size, args.config, args)
    s = pretrain(cfg, args.out, args.kb, progress=not args.quiet)
    print(f"world pretrain: {s['parameters']:,} parameters, vocabulary {s['vocab_size']}, corpus "
          f"{s['corpus_tokens']:,} tokens, trained on {s['trained_tokens']:,} ({s['epochs']} epochs) at "
          f"{s['tokens_per_s']:,} tokens/s; final loss {s['final_loss']}; wall time {s['wall_time_s']['total']} s "
          f"-> {args.out}")
    if args.eval:
        from minihuatuo.world.evaluation import evaluate_base, format_report

        print(format_report(evaluate_base(args.out, n=args.eval, kb_path=args.kb)))
    return 0


def cmd_exam(args) -> int:
    counts = write_exam(load_kb(args.kb), args.out, args.n_train, args.n_heldout, args.seed)
    print(f"world exam: {counts['train']} train and {counts['heldout']} held-out MCQs -> {args.out} "
          "(train.jsonl, heldout.jsonl, heldout_open.json, aliases.tsv)")
    return 0


def cmd_world_eval(args) -> int:
    from minihuatuo.world.evaluation import evaluate_base, format_report

    report = evaluate_base(args.model, n=args.n, seed=args.seed, kb_path=args.kb, batch_size=args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_report(report))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("world", help="the bundled offline clinical world: exam, base model, evaluation")
    wsub = p.add_subparsers(dest="world_command", required=True)
    t = wsub.add_parser("pretrain", help="train the world's tokenizer and tiny base model from scratch")
    t.add_argument("--out", default=str(WORLD_DIR / "base"), help="checkpoint directory (default data/world/base)")
    t.add_argument("--size", default="base", choices=sorted(SIZES), help="preset: base (shipped) or tiny (smoke test)")
    t.add_argument("--kb", default=str(DEFAULT_KB), help="knowledge base (default data/world/kb.json)")
    t.add_argument("--eval", type=nonnegative_int, default=0, metavar="N", help="then evaluate on N held-out questions")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(t, PretrainConfig)
    t.set_defaults(func=cmd_pretrain)
    e = wsub.add_parser("exam", help="write the world's MCQs (train, held-out) and its alias file")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--n-train", type=positive_int, default=2000)
    e.add_argument("--n-heldout", type=positive_int, default=500)
    e.add_argument("--seed", type=seed_int, default=0)
    e.add_argument("--kb", default=str(DEFAULT_KB))
    e.set_defaults(func=cmd_exam)
    v = wsub.add_parser("eval", help="held-out accuracy of a checkpoint: chain of thought, direct answer, MCQ")
    v.add_argument("--model", default=str(WORLD_DIR / "base"), help="checkpoint (default data/world/base)")
    v.add_argument("--n", type=positive_int, default=500, help="held-out questions")
    v.add_argument("--seed", type=seed_int, default=0)
    v.add_argument("--batch-size", type=positive_int, default=32)
    v.add_argument("--kb", default=str(DEFAULT_KB))
    v.add_argument("--out", default=None, metavar="FILE", help="write the report as JSON")
    v.set_defaults(func=cmd_world_eval)
    from minihuatuo.world.pairs import add_pairs_cli

    add_pairs_cli(wsub)
