"""Stage 1 supervised fine-tuning (paper §3.1 and §4.1: 3 epochs, lr 5e-6, batch 128).

The loop, in the order a reader expects:

    for each optimizer step:                       global batch = G sequences over all processes
        for each micro-batch of this rank's share:
            forward → Σ target-token NLL → scale by world/N_tokens(global batch) → backward
        clip gradients → AdamW step → learning rate for the next step → log → checkpoint

The loss is L = (1/N) Σ_{target tokens t} −log π(y_t | y_<t, x), N = number of target tokens in the
whole global batch. Normalising by the global N (not per micro-batch) is what makes 4 micro-batches
of 2 equal to 1 batch of 8, and 2 processes equal to 1 (DDP and FSDP2 average gradients over
processes, hence the factor `world`).

Runs in one process or under torchrun (`--distributed ddp|fsdp2`); each rank reads a strided share
of every global batch, so the global batch is the same whatever the number of processes.
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
import torch.nn.functional as F
from tqdm import tqdm

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.kernels import linear_cross_entropy
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
from minihuatuo.services.formats import read_sft
from minihuatuo.stages.sft_data import IGNORE, Batch, collate_packed, collate_padded, prepare
from minihuatuo.training.checkpoints import load_checkpoint, save_checkpoint, save_dtype_of
from minihuatuo.training.distributed import Dist, all_sum, init_distributed, no_grad_sync, wrap_model
from minihuatuo.training.run_dir import RunDir, add_output_args
from minihuatuo.training.schedules import warmup_then_decay_lr

@dataclass
class SFTConfig:
    """Defaults: the paper's §4.1 setting where it states one, common practice otherwise (notes/sft.md)."""

    epochs: int = 3  # paper §4.1
    lr: float = 5e-6  # paper §4.1 (peak learning rate)
    global_batch_size: int = 128  # sequences per optimizer step over all processes (paper §4.1)
    micro_batch_size: int = 2  # sequences per forward/backward on one process
    max_length: int = 8192  # tokens per example (prompt + target)
    overlong: str = "truncate"  # over-long examples: "truncate" (counted) or "drop" (counted)
    pack: bool = False  # several examples per row (block-diagonal mask + position reset)
    weight_decay: float = 0.1  # AdamW; never applied to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.05  # fraction of steps with linear warmup from 0
    schedule: str = "cosine"  # decay after warmup: "cosine" or "linear", to min_lr_ratio · lr
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # global gradient-norm clipping; 0 = off
    bf16: bool = True  # bf16 autocast on GPU (fp32 master weights); ignored on CPU
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    kernels: bool = False  # fused kernels (notes/kernels.md): RMSNorm/SwiGLU/RoPE + chunked LM head & loss
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp2"
    seed: int = 42  # data order (and nothing else is random: no dropout)
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    eval_every: int = 0  # held-out loss every N steps (0 = only at the end, if --eval-data)
    log_every: int = 1

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_positive(self, "epochs", "lr", "global_batch_size", "micro_batch_size", "max_length", "adam_eps",
                         "log_every")
        require_nonnegative(self, "weight_decay", "max_grad_norm", "max_steps", "save_every", "eval_every")
        require_fraction(self, "warmup_ratio", "min_lr_ratio")
        require_range(self, 0, 1, "adam_beta1", "adam_beta2", hi_open=True)  # torch's AdamW: 0 <= β < 1
        require_seed(self, "seed")
        require_choice(self, "overlong", ("truncate", "drop"))
        require_choice(self, "schedule", ("cosine", "linear"))
        require_choice(self, "distributed", ("ddp", "fsdp2"))


PRESETS = {
    "paper": SFTConfig(),
    # the bundled tiny world (minihuatuo demo): a 1-2M parameter model learns in a few hundred steps
    "tiny-world": SFTConfig(epochs=3, lr=1e-3, global_batch_size=16, micro_batch_size=16, max_length=512,
                            warmup_ratio=0.05, weight_decay=0.0),
}


# ----------------------------------------------------------------------------- pure pieces

def param_groups(model, weight_decay: float):
    """Weight decay on matrices only: decaying norm gains and biases pulls them toward 0, not toward
    their identity values, and regularises nothing useful."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def token_nll_sum(model, batch: Batch, kernels: bool = False):
    """Σ −log π(label) over positions with a label, and their count. The LM head runs only there;
    with `kernels`, fused with the loss and chunked over tokens, so the (N, V) logits never exist."""
    has_label = batch.labels != IGNORE  # (B, T)
    if kernels:
        labels = batch.labels[has_label]  # (N,)
        nll = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_at=has_label, head=lambda h, w: linear_cross_entropy(h, w, labels))
        return nll, has_label.sum()
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_at=has_label)  # (N, V)
    return F.cross_entropy(logits.float(), batch.labels[has_label], reduction="sum"), has_label.sum()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


# ----------------------------------------------------------------------------- the loop

def train(cfg: SFTConfig, model_dir, data_path, out_dir, eval_path=None, resume: bool = False,
          overwrite: bool = False, save_dtype="float32") -> dict:
    """out_dir/checkpoint-N/ every save_every steps and out_dir/final/: the model in HF layout (weights
    in `save_dtype`) + trainer/ (training/checkpoints.py); metrics.jsonl. A directory that already
    holds a run needs `resume` or `overwrite` (training/run_dir.py). Returns the last step's metrics."""
    d = init_distributed()
    out = Path(out_dir)
    save_dtype = save_dtype_of(save_dtype)
    run = RunDir("sft", out, "step", d, resume=resume, overwrite=overwrite)
    tokenizer = Tokenizer.from_dir(model_dir)
    examples = read_sft(data_path)
    if not examples:
        raise ValueError(f"{data_path}: no SFT examples; nothing to train")
    data = prepare(examples, tokenizer, cfg.max_length, cfg.overlong)
    held_out = prepare(read_sft(eval_path), tokenizer, cfg.max_length, cfg.overlong) if eval_path else []
    if not data:
        raise ValueError(f"{data_path}: no usable SFT example")
    if eval_path and not held_out:
        raise ValueError(f"{eval_path}: no usable held-out SFT example (--eval-data)")
    base = load_model(model_dir, dtype=torch.float32, device=d.device)
    base.activation_checkpointing = cfg.activation_checkpointing
    base.use_kernels = cfg.kernels
    model = wrap_model(base.train(), cfg.distributed, d)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    steps_per_epoch = math.ceil(len(data) / cfg.global_batch_size)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if run.checkpoint is not None:
        state = {k: v for k, v in load_checkpoint(run.checkpoint, model, optimizer).items() if k in state}
    collate = ((lambda items: collate_packed(items, tokenizer.pad_id, cfg.max_length)) if cfg.pack
               else (lambda items: collate_padded(items, tokenizer.pad_id)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and d.device.type == "cuda")
    metrics_file = run.begin(state["step"])  # rank 0; says what it resumed from
    if run.checkpoint is not None and state["step"] >= total:  # resumed at the end
        if d.main:
            metrics_file.close()
            print(f"sft: {run.checkpoint} has {state['step']} of {total} steps done: nothing to do", file=sys.stderr)
        return {}
    bar = tqdm(total=total, initial=state["step"], desc="sft", disable=not d.main, file=sys.stderr)
    last = {}
    while state["step"] < total:
        batches = global_batches(epoch_order(len(data), cfg.seed, state["epoch"]), cfg.global_batch_size)
        for b in range(state["batch_in_epoch"], len(batches)):
            if state["step"] >= total:
                break
            t0 = time.perf_counter()
            lr = warmup_then_decay_lr(state["step"], total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            members = [data[i] for i in batches[b]]
            n_tokens = sum(t.n_target for t in members)  # the global batch's target tokens, known to all ranks
            share = members[d.rank::d.world] or members[:1]  # an empty share still joins the all-reduce ...
            weight = 1.0 if members[d.rank::d.world] else 0.0  # ... with zero weight
            micro = [share[i:i + cfg.micro_batch_size] for i in range(0, len(share), cfg.micro_batch_size)]
            nll_sum = torch.zeros((), device=d.device)
            for j, items in enumerate(micro):
                with no_grad_sync(model, j == len(micro) - 1), autocast:
                    nll, _ = token_nll_sum(model, collate(items).to(d.device), cfg.kernels)
                    (nll * weight * d.world / n_tokens).backward()
                nll_sum += nll.detach() * weight
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.zeros(()))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.update(step=state["step"] + 1, batch_in_epoch=b + 1)
            loss = (all_sum(nll_sum, d) / n_tokens).item()
            dt = time.perf_counter() - t0
            tokens = sum(len(t.ids) for t in members)
            last = {"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr,
                    "grad_norm": float(grad_norm), "tokens": tokens, "tokens_per_s": tokens / dt}
            if held_out and cfg.eval_every and state["step"] % cfg.eval_every == 0:
                last["eval_loss"] = eval_loss(model, held_out, collate, cfg.micro_batch_size, d, cfg.kernels)
            if d.main:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] == total:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                save_checkpoint(out / f"checkpoint-{state['step']}", model, optimizer, state, cfg, model_dir, d,
                                save_dtype)
        else:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    if held_out:
        last["eval_loss"] = eval_loss(model, held_out, collate, cfg.micro_batch_size, d, cfg.kernels)
        if d.main:
            metrics_file.write(json.dumps({"step": state["step"], "eval_loss": last["eval_loss"]}) + "\n")
    save_checkpoint(out / "final", model, optimizer, state, cfg, model_dir, d, save_dtype)
    if d.main:
        metrics_file.close()
    return last


@torch.no_grad()
def eval_loss(model, items, collate, micro_batch_size: int, d: Dist, kernels: bool = False) -> float:
    """Mean target-token NLL over a held-out set (each rank a strided share, summed over ranks)."""
    model.eval()
    total = torch.zeros(2, device=d.device)
    mine = items[d.rank::d.world]
    for i in range(0, len(mine), micro_batch_size):
        nll, n = token_nll_sum(model, collate(mine[i:i + micro_batch_size]).to(d.device), kernels)
        total += torch.stack([nll, n.float()])
    model.train()
    total = all_sum(total, d)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- CLI

def cmd_sft(args) -> int:
    cfg = build_config(SFTConfig, PRESETS, args.preset, args.config, args)
    last = train(cfg, args.model, args.data, args.out, eval_path=args.eval_data, resume=args.resume,
                 overwrite=args.overwrite, save_dtype=args.save_dtype)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": str(Path(args.out) / "final"), **last}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on SFT-format data (also under torchrun)")
    p.add_argument("--model", required=True, help="checkpoint directory to start from")
    p.add_argument("--data", required=True, help="SFT file (JSON or JSONL: Question, Complex_CoT, Response)")
    p.add_argument("--out", required=True, help="output directory: checkpoint-N/, final/ (the HF model; trainer/: "
                                                "optimizer, state), metrics.jsonl")
    p.add_argument("--eval-data", default=None, help="held-out SFT file for the eval loss")
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    add_output_args(p, "step")
    add_config_args(p, SFTConfig)
    p.set_defaults(func=cmd_sft)
