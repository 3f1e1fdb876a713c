"""Train the classifier verifier: a causal LM fine-tuned into a two-label sequence classifier on
labelled (response y, reference y*, label) pairs — the step the official release ships the result of
(a 3B `*ForSequenceClassification` checkpoint, label 1 = correct, P(True) > 0.4 in the RL code) but
never described. Our recipe and its measurement: notes/verifier.md, "Training the verifier". This file is
the loop; the classifier, its inputs and loss are verifier_model.py, and the pure choices (class balance,
the held-out split, early stopping, the threshold study) verifier_selection.py.

    for each optimizer step:                         global batch = G pairs over all processes
        for each micro-batch of this rank's share:
            text  = ClassifierVerifier.text(y, y*)    exactly the verifier's input at inference
            z     = score(h_last real token)          (B, 2) logits; the causal-LM head is dropped
            loss += Σ_i w_i · CE(z_i, label_i) · world / Σ_{global batch} w_i
        clip → AdamW → learning rate of the next step → log → evaluate → checkpoint

    evaluate: P(True) on the held-out pairs → balanced accuracy at 0.5 → early stopping
    end:      the best evaluation's weights → threshold study on the held-out pairs → final/

Class balance (`balance`): "weights" (default) weights each pair by n / (2 n_c) of its class c, the
loss being the weighted mean over the global batch (torch's CrossEntropyLoss(weight=...) reduction);
"sampler" draws each epoch's order with replacement, each class with probability 1/2; "none". The
default is the weights: every pair is seen once per epoch (a sampler repeats minority pairs and skips
majority ones), the order stays a permutation, and the expected loss is the same balanced risk.

The held-out pairs are --eval-pairs, or a seeded, label-stratified `eval_fraction` of --pairs. The
checkpoints reuse SFT's machinery (training/checkpoints.py, run_dir.py: atomic, --resume, --overwrite;
distributed.py: torchrun with DDP or FSDP2); a checkpoint's trainer/ also keeps the best weights so far
(best.safetensors) so that early stopping survives a resume. final/ is the Hugging Face layout of the
released verifier: `LlamaForSequenceClassification` (or Qwen2's), num_labels 2, id2label
{0: "False", 1: "True"}, a bias-free `score.weight`, the tokenizer files, and "minihuatuo_threshold",
which `--verifier classifier` uses when no --threshold is given.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from minihuatuo.engine.checkpoint import load_safetensors, write_model_files
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.config import (
    add_config_args,
    build_config,
    require_choice,
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_range,
    require_seed,
)
from minihuatuo.services.reward import LabeledPair, binary_metrics, pairs_from_search, read_labeled
from minihuatuo.services.verifier import (
    CLASSIFIER_TEMPLATE,
    PLACEHOLDERS,
    ClassifierVerifier,
    _eos_text,
    load_prompt,
)
from minihuatuo.stages.sft import epoch_order, global_batches, param_groups
from minihuatuo.stages.verifier_model import (
    classifier_from_causal_lm,
    collate_left,
    eval_p_true,
    weighted_ce_sum,
)
from minihuatuo.stages.verifier_selection import (
    balanced_order,
    early_stopping,
    format_study,
    pair_weights,
    split_pairs,
    threshold_study,
)
from minihuatuo.training import checkpoints
from minihuatuo.training.distributed import (
    Dist,
    all_sum,
    init_distributed,
    no_grad_sync,
    wrap_model,
)
from minihuatuo.training.run_dir import RunDir, add_output_args
from minihuatuo.training.schedules import warmup_then_decay_lr

THRESHOLD_KEY = "minihuatuo_threshold"  # config.json: the threshold chosen by the threshold study
TEMPLATE_KEY = "minihuatuo_classifier_template"  # config.json: the input template trained on
LOWERCASE_KEY = "minihuatuo_classifier_lowercase"  # config.json: pairs case-folded before the template


@dataclass
class VerifierTrainConfig:
    """Nothing here is from the paper or the official code (neither says how the verifier was trained);
    the defaults are common fine-tuning practice for a 1-8B model, the tiny-world preset is measured
    in notes/verifier.md."""

    epochs: int = 2
    lr: float = 1e-5  # peak learning rate (whole model and the new head)
    global_batch_size: int = 32  # pairs per optimizer step over all processes
    micro_batch_size: int = 4  # pairs per forward/backward on one process
    max_length: int = 4000  # tokens per pair; the official inference truncation (right side), kept equal
    lowercase: bool = False  # case-fold response and reference before the template (saved; inference does too)
    eval_fraction: float = 0.1  # held-out share of --pairs (label-stratified, seeded) without --eval-pairs
    balance: str = "weights"  # "weights" (class weights n / 2n_c), "sampler" (balanced draws) or "none"
    eval_every: int = 0  # evaluate every N steps (0 = at the end of each epoch)
    patience: int = 3  # stop after this many evaluations without a better balanced accuracy (0 = never)
    weight_decay: float = 0.0  # AdamW; never on norm gains and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # decay after warmup to min_lr_ratio · lr: "cosine" or "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 = off
    bf16: bool = True  # bf16 autocast on GPU (fp32 master weights); ignored on CPU
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp2"
    seed: int = 42  # the split, the data order and the new head's initialisation
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs)
    save_every: int = 0  # checkpoint every N steps (0 = only final/)
    log_every: int = 1

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_positive(self, "epochs", "lr", "global_batch_size", "micro_batch_size", "max_length", "adam_eps",
                         "log_every")
        require_nonnegative(self, "weight_decay", "max_grad_norm", "max_steps", "save_every", "eval_every", "patience")
        require_fraction(self, "warmup_ratio", "min_lr_ratio")
        require_range(self, 0, 1, "eval_fraction", lo_open=True, hi_open=True)
        require_range(self, 0, 1, "adam_beta1", "adam_beta2", hi_open=True)
        require_seed(self, "seed")
        require_choice(self, "balance", ("weights", "sampler", "none"))
        require_choice(self, "schedule", ("cosine", "linear"))
        require_choice(self, "distributed", ("ddp", "fsdp2"))


PRESETS = {
    "default": VerifierTrainConfig(),
    # the bundled world's 2.2M-parameter base model (notes/verifier.md): ~4000 world pairs, CPU, minutes
    # (3 epochs of case-folded pairs: 95-96% on unseen draws where 2 epochs as written reached 91-94%)
    "tiny-world": VerifierTrainConfig(epochs=3, lr=1e-3, global_batch_size=32, micro_batch_size=32, max_length=512,
                                      eval_every=25, patience=4, warmup_ratio=0.05, lowercase=True),
}


# ----------------------------------------------------------------------------- checkpoints

BEST = "best.safetensors"  # trainer/: the best evaluation's weights, for early stopping across a resume


def save_checkpoint(path, model, optimizer, state: dict, cfg, model_dir, d: Dist, save_dtype, best=None,
                    config_extra=None):
    """checkpoints.save_checkpoint's layout (HF model + trainer/) plus, for the verifier, the best
    evaluation's weights so far in trainer/best.safetensors (`best`, when given) and extra config.json
    fields (`config_extra`: the chosen threshold, the template). A collective: every rank calls it.
    Built on checkpoints._save, the writer save_checkpoint and save_actor_critic share."""
    save_dtype = checkpoints.save_dtype_of(save_dtype)

    def weights(tmp, base, model_sd):
        write_model_files(base, tmp, copy_files_from=model_dir, state=model_sd, dtype=save_dtype)
        if config_extra:
            hf = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            (tmp / "config.json").write_text(json.dumps({**hf, **config_extra}, indent=2), encoding="utf-8")
        trainer = tmp / checkpoints.TRAINER
        if save_dtype != torch.float32:  # keep the trained fp32 weights for an exact resume
            save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()},
                      str(trainer / "model_fp32.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(trainer / BEST))

    checkpoints._save(path, model, optimizer, state, cfg, d, weights)


def _full_weights(model) -> dict:
    """The full model state dict on the CPU, on every rank (gathered from FSDP2 shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    # not cpu_offload: with it only rank 0 gets the tensors, and every rank sets them back at the end
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone().cpu() for k, v in sd.items()}


def _set_weights(model, weights: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- the loop

def pair_encoder(model_dir, template: str | None, max_length: int, lowercase: bool = False) -> ClassifierVerifier:
    """The inference verifier's text and ids (ClassifierVerifier.text / encode: the template, the eos
    appended as text, no special tokens, right truncation) without a model: a pair is trained on
    exactly what `--verifier classifier` will feed the saved checkpoint."""
    tokenizer = Tokenizer.from_dir(model_dir)
    return ClassifierVerifier(None, tokenizer, eos_text=_eos_text(Path(model_dir), tokenizer),
                              template=template or CLASSIFIER_TEMPLATE, max_length=max_length, lowercase=lowercase)


def read_split(cfg: VerifierTrainConfig, pairs_path, eval_path=None, search_paths=()) -> tuple[list[LabeledPair],
                                                                                               list[LabeledPair]]:
    """(train, held-out) pairs: the labelled pairs of `pairs_path` (may be None) and the search verdicts of
    each of `search_paths` (search.jsonl: reward.pairs_from_search); errors name the file (and its line and
    field)."""
    pairs = read_labeled(pairs_path) if pairs_path else []
    for path in search_paths:
        pairs += pairs_from_search(path)
    if not pairs:
        raise ValueError(f"{pairs_path or ', '.join(map(str, search_paths))}: no labelled pairs; nothing to train")
    pairs_path = pairs_path or search_paths[0]
    train_pairs, held = (pairs, read_labeled(eval_path)) if eval_path else split_pairs(pairs, cfg.eval_fraction,
                                                                                       cfg.seed)
    for name, part, where in (("training", train_pairs, pairs_path), ("held-out", held, eval_path or pairs_path)):
        if len({p.label for p in part}) < 2:
            raise ValueError(f"{where}: the {name} pairs need both labels (true and false); got "
                             f"{sum(p.label for p in part)} true of {len(part)}")
    return train_pairs, held


def train(cfg: VerifierTrainConfig, model_dir, pairs_path, out_dir, eval_path=None, template: str | None = None,
          resume: bool = False, overwrite: bool = False, save_dtype="float32", search_paths=()) -> dict:
    """out_dir/final/ (the HF classifier + trainer/), checkpoint-N/ every save_every steps, metrics.jsonl
    and threshold_study.json. Returns a summary: the last step's metrics, the best evaluation, the study."""
    train_pairs, held = read_split(cfg, pairs_path, eval_path, search_paths)
    d = init_distributed()
    out = Path(out_dir)
    run = RunDir("verifier train", out, "step", d, resume=resume, overwrite=overwrite)
    encoder = pair_encoder(model_dir, template, cfg.max_length, cfg.lowercase)
    template, tokenizer, eos_text = encoder.template, encoder.tokenizer, encoder.eos_text
    ids = [encoder.encode(p.response, p.reference) for p in train_pairs]
    held_ids = [encoder.encode(p.response, p.reference) for p in held]
    labels = [p.label for p in train_pairs]
    held_labels = [p.label for p in held]
    weights = pair_weights(labels, cfg.balance)

    base = classifier_from_causal_lm(model_dir, tokenizer, eos_text, cfg.seed, d.device)
    base.activation_checkpointing = cfg.activation_checkpointing
    model = wrap_model(base.train(), cfg.distributed, d)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    steps_per_epoch = math.ceil(len(ids) / cfg.global_batch_size)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "evals": [], "eval_steps": [], "best_step": None,
             "done": False}
    best = None  # the best evaluation's weights so far (full state dict, on the CPU)
    if run.checkpoint is not None:
        saved = checkpoints.load_checkpoint(run.checkpoint, model, optimizer)
        state = {k: saved.get(k, v) for k, v in state.items()}
        best_file = checkpoints.trainer_dir(run.checkpoint) / BEST
        best = load_safetensors(best_file) if best_file.exists() else None
    pad = tokenizer.pad_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and d.device.type == "cuda")
    metrics_file = run.begin(state["step"])
    if run.checkpoint is not None and (state["done"] or state["step"] >= total):
        if d.main:
            metrics_file.close()
            print(f"verifier train: {run.checkpoint} has {state['step']} of {total} steps done"
                  f"{' (stopped early)' if state['done'] and state['step'] < total else ''}: nothing to do",
                  file=sys.stderr)
        return {}

    bar = tqdm(total=total, initial=state["step"], desc="verifier train", disable=not d.main, file=sys.stderr)
    last, stop = {}, False
    while state["step"] < total and not stop:
        order = (balanced_order(labels, cfg.seed, state["epoch"]) if cfg.balance == "sampler"
                 else epoch_order(len(ids), cfg.seed, state["epoch"]))
        batches = global_batches(order, cfg.global_batch_size)
        for b in range(state["batch_in_epoch"], len(batches)):
            if state["step"] >= total:
                break
            t0 = time.perf_counter()
            lr = warmup_then_decay_lr(state["step"], total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            members = batches[b]
            w_total = sum(weights[i] for i in members)  # the global batch's weight, known to all ranks
            share = members[d.rank::d.world] or members[:1]  # an empty share still joins the all-reduce ...
            on = 1.0 if members[d.rank::d.world] else 0.0  # ... with zero weight
            micro = [share[i:i + cfg.micro_batch_size] for i in range(0, len(share), cfg.micro_batch_size)]
            loss_sum = torch.zeros((), device=d.device)
            for j, rows in enumerate(micro):
                y = torch.tensor([int(labels[i]) for i in rows], device=d.device)  # (B,)
                w = torch.tensor([weights[i] * on for i in rows], device=d.device)  # (B,)
                with no_grad_sync(model, j == len(micro) - 1), autocast:
                    loss = weighted_ce_sum(model(*collate_left([ids[i] for i in rows], pad, d.device)), y, w)
                    (loss * d.world / w_total).backward()
                loss_sum += loss.detach()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.zeros(()))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.update(step=state["step"] + 1, batch_in_epoch=b + 1)
            dt = time.perf_counter() - t0
            last = {"step": state["step"], "epoch": state["epoch"], "loss": (all_sum(loss_sum, d) / w_total).item(),
                    "lr": lr, "grad_norm": float(grad_norm), "pairs_per_s": len(members) / dt,
                    "tokens_per_s": sum(len(ids[i]) for i in members) / dt}
            eval_now = state["step"] % cfg.eval_every == 0 if cfg.eval_every else b == len(batches) - 1
            if eval_now:
                p = eval_p_true(model, held_ids, pad, cfg.micro_batch_size, d)
                bal_acc = binary_metrics([x > 0.5 for x in p], held_labels)["balanced_accuracy"]
                state["evals"].append(bal_acc)
                state["eval_steps"].append(state["step"])
                best_i, stop = early_stopping(state["evals"], cfg.patience)
                if best_i == len(state["evals"]) - 1:  # a new best: keep a copy of these weights
                    state["best_step"], best = state["step"], _full_weights(model)
                last.update(eval_balanced_accuracy=bal_acc, best_eval_step=state["best_step"])
            if d.main:
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}",
                                **({"bal_acc": f"{last['eval_balanced_accuracy']:.3f}"}
                                   if "eval_balanced_accuracy" in last else {}))
                bar.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] == total or "eval_balanced_accuracy" in last:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
            if stop:
                break
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                save_checkpoint(out / f"checkpoint-{state['step']}", model, optimizer, state, cfg, model_dir, d,
                                save_dtype, best)
        else:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    # Done (all steps, or stopped early) or only paused by --max-steps: final/ holds the best evaluation's
    # weights when done (the verifier to use), the current ones otherwise (a --resume continues them).
    state["done"] = stop or state["step"] >= total
    if state["done"] and best is not None:
        _set_weights(model, best)
    p = eval_p_true(model, held_ids, pad, cfg.micro_batch_size, d)
    study = threshold_study(p, held_labels)
    extra = {THRESHOLD_KEY: study["chosen"], TEMPLATE_KEY: template, LOWERCASE_KEY: cfg.lowercase}
    save_checkpoint(out / "final", model, optimizer, state, cfg, model_dir, d, save_dtype,
                    None if state["done"] else best, config_extra=extra)
    summary = {"steps": state["step"], "stopped_early": stop, "evals": state["evals"],
               "eval_steps": state["eval_steps"], "best_step": state["best_step"], "threshold": study["chosen"],
               "held_out_balanced_accuracy": study["chosen_balanced_accuracy"], "last": last}
    if d.main:
        metrics_file.write(json.dumps({"step": state["step"], "final_threshold": study["chosen"],
                                       "final_balanced_accuracy": study["chosen_balanced_accuracy"]}) + "\n")
        metrics_file.close()
        (out / "threshold_study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    return {**summary, "study": study}


# ----------------------------------------------------------------------------- CLI

def cmd_verifier_train(args) -> int:
    cfg = build_config(VerifierTrainConfig, PRESETS, args.preset, args.config, args)
    if not args.pairs and not args.search_pairs:
        raise ValueError("verifier train: give --pairs FILE, --search-pairs FILE, or both")
    template = load_prompt(args.classifier_template, PLACEHOLDERS + ("{eos}",)) if args.classifier_template else None
    result = train(cfg, args.model, args.pairs, args.out, eval_path=args.eval_pairs, template=template,
                   resume=args.resume, overwrite=args.overwrite, save_dtype=args.save_dtype,
                   search_paths=args.search_pairs)
    if int(os.environ.get("RANK", "0")) == 0 and result:
        study = result.pop("study")
        print(f"threshold study on {study['n']} held-out pairs ({study['positives']} true): "
              "True iff P(True) > threshold")
        print(format_study(study))
        print(json.dumps({"out": str(Path(args.out) / "final"), **result}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("verifier", help="train the classifier verifier (the released verifier's layout)")
    vsub = p.add_subparsers(dest="verifier_command", required=True)
    t = vsub.add_parser("train", help="fine-tune a causal LM into a two-label classifier verifier on labelled "
                                      "pairs (also under torchrun)")
    t.add_argument("--model", required=True, help="causal-LM checkpoint directory to start from (Llama / Qwen2)")
    t.add_argument("--pairs", metavar="FILE", default=None,
                   help='labelled JSONL: {"response", "reference", "label": true|false} per line (world pairs, '
                        "verifier-eval --write-set)")
    t.add_argument("--search-pairs", metavar="FILE", action="append", default=[],
                   help="a search's search.jsonl (repeatable): every verifier call of the search, its conclusion "
                        "against the ground truth, labelled with the search verifier's verdict (paper §3.1)")
    t.add_argument("--out", required=True, help="output directory: final/ (the HF classifier, config.json's "
                                                f"{THRESHOLD_KEY}; trainer/), checkpoint-N/, metrics.jsonl, "
                                                "threshold_study.json")
    t.add_argument("--eval-pairs", metavar="FILE", default=None,
                   help="held-out labelled pairs (default: a seeded eval_fraction of --pairs)")
    t.add_argument("--classifier-template", metavar="FILE", default=None,
                   help="input template with {response}, {reference} and {eos} (default: the built-in one of "
                        "--verifier classifier); pass the same file at inference")
    t.add_argument("--preset", default="default", choices=list(PRESETS))
    add_output_args(t, "step")
    add_config_args(t, VerifierTrainConfig)
    t.set_defaults(func=cmd_verifier_train)
