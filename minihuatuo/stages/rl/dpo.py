"""Stage 2 variant: DPO on verifier-labelled pairs — the paper's offline comparison (App. F, Table 2).

Two steps, each a function below:

    1. pairs (build_pairs; append-only JSONL, resumable)
       for every RL problem x: N = 5 responses y ~ π_SFT(· | x) (our sampler, rollout.rollout);
       s = reward.rewards(y, y*) (1 verified / 0.1 not / 0 no format); chosen = a verified response
       (s = 1), rejected = one that is not (s < 1); problems without both kinds give no pair.
    2. training (train; sigmoid DPO, Rafailov et al. 2023, with a frozen reference π_ref = π_SFT)
       L = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])      dpo_loss
       log π(y|x) = Σ over the response tokens (stop token included) of log π(y_t | x, y_<t)    sequence_logprobs

The sequence log-probs use the rollout's forward (rollout.response_logprobs) at temperature 1: DPO scores
the model's own distribution, not the tempered sampling one. Shared with PPO, RLOO and GRPO as functions:
rollout.py (sampling, prompt encoding, log-probs); training/ (schedule, checkpoints, the run loop, DDP).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.sample import left_pad
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.config import (
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_range,
    require_seed,
)
from minihuatuo.services.formats import X_KEY, Y_KEY
from minihuatuo.services.records import FormatError, JsonlAppender, read_records
from minihuatuo.services.reward import RewardConfig, rewards
from minihuatuo.stages.rl.rollout import (
    Rollout,
    adamw,
    encode_prompt,
    in_chunks,
    masks_from_last,
    read_rl_problems,
    response_logprobs,
    rollout,
)
from minihuatuo.stages.sft import epoch_order, global_batches
from minihuatuo.training.checkpoints import load_checkpoint, save_checkpoint, save_dtype_of
from minihuatuo.training.distributed import Dist, all_sum, init_distributed, no_grad_sync, wrap_model
from minihuatuo.training.loop import run_updates
from minihuatuo.training.run_dir import RunDir
from minihuatuo.training.schedules import warmup_from_zero_linear_lr


@dataclass
class DPOConfig:
    """Paper App. F states N = 5, β = 1, lr 1e-6, batch 128; the rest is not stated, and the defaults
    are those of TRL 0.13's DPOTrainer / transformers' TrainingArguments (notes/rl_variants.md)."""

    samples_per_problem: int = 5  # N responses per RL problem (App. F)
    response_length: int = 1300  # not stated: PPO's response length
    max_prompt_length: int = 1000  # prompts keep their FIRST max_prompt_length tokens (as PPO)
    temperature: float = 0.5  # sampling temperature; not stated: PPO's
    early_stop: bool = True  # stop each row at its stop token (saves time; same distribution, other draws: rl.rollout)
    sample_batch_size: int = 8  # problems per sampling call (× N rows); the call's seed fixes its samples
    pairs_per_problem: int = 1  # (verified, not verified) pairs kept per problem; 0 = all min(n_w, n_l) disjoint pairs
    beta: float = 1.0  # App. F "regularization parameter 1" (TRL's default is 0.1)
    label_smoothing: float = 0.0  # 0 = the plain sigmoid loss (TRL default)
    lr: float = 1e-6  # App. F
    batch_size: int = 128  # pairs per optimizer step over all processes (App. F)
    micro_batch_size: int = 1  # pairs per forward/backward (chosen and rejected share one forward)
    epochs: int = 3  # not stated: TrainingArguments' default
    warmup_ratio: float = 0.0  # not stated: TrainingArguments' default (then linear decay to 0)
    max_grad_norm: float = 1.0  # TrainingArguments' default
    adam_eps: float = 1e-8
    seed: int = 42  # sampling and pair order
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end)

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_range(self, 2, None, "samples_per_problem")  # a pair needs two samples
        require_positive(self, "response_length", "max_prompt_length", "temperature", "sample_batch_size", "beta",
                         "lr", "batch_size", "micro_batch_size", "epochs", "max_grad_norm", "adam_eps")
        require_nonnegative(self, "pairs_per_problem", "save_every")
        require_fraction(self, "warmup_ratio")
        require_range(self, 0, 0.5, "label_smoothing")  # TRL's range: at 0.5 the loss no longer prefers a side
        require_seed(self, "seed")


PRESETS = {
    "paper": DPOConfig(),
    # the bundled tiny world: short answers, a learning rate a 1M-parameter model feels
    "tiny-world": DPOConfig(response_length=96, max_prompt_length=256, temperature=1.0, sample_batch_size=32,
                            batch_size=16, micro_batch_size=16, epochs=2, lr=1e-4, beta=0.1, save_every=0),
}


# ----------------------------------------------------------------------------- pure math

def make_pairs(scores: list[float], correct: float, limit: int) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices: verified responses (score == correct) zipped in sample order
    with the others, so no response is in two pairs; at most `limit` pairs (0 = no limit)."""
    won = [i for i, s in enumerate(scores) if s == correct]
    lost = [i for i, s in enumerate(scores) if s != correct]
    pairs = list(zip(won, lost))
    return pairs[:limit] if limit else pairs


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Per pair (B,): −log σ(β Δ), Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l));
    with label smoothing ε: −(1−ε) log σ(βΔ) − ε log σ(−βΔ). Returns (loss, chosen reward β(log π −
    log π_ref)(y_w), rejected reward), the rewards detached (they are diagnostics)."""
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


# ----------------------------------------------------------------------------- sequence log-probs

def pair_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> Rollout:
    """A Rollout of given (prompt, response) ids — left-padded prompts, right-padded responses, the masks
    of rollout.py — so the rollout's forward scores stored responses. (has_stop and logprobs are unused.)"""
    query, query_mask = left_pad(prompts, pad_id, device)
    R = max(len(r) for r in responses)
    response = torch.full((len(responses), R), pad_id, dtype=torch.long)
    for b, r in enumerate(responses):
        response[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    last = torch.tensor([len(r) - 1 for r in responses], device=device)
    policy_mask, value_mask = masks_from_last(last, R)
    return Rollout(query, query_mask, response.to(device), policy_mask, value_mask, last,
                   torch.ones_like(last, dtype=torch.bool), torch.zeros(len(responses), R, device=device),
                   [""] * len(responses))


def sequence_logprobs(model, batch: Rollout) -> torch.Tensor:
    """log π(y | x) = Σ_{t ≤ L} log π(y_t | x, y_<t) (B,), at temperature 1."""
    return (response_logprobs(model, batch, 1.0) * batch.policy_mask).sum(1)


# ----------------------------------------------------------------------------- 1. pairs

def build_pairs(cfg: DPOConfig, policy, tokenizer, items, verifier, path, reward_cfg: RewardConfig = RewardConfig(),
                progress: bool = True) -> dict:
    """Sample, score and pair every problem not yet in `path` (one JSONL line per problem, written as
    soon as its sampling call ends; a rerun continues where a crash stopped)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: the pairs file must be a .jsonl file (one line per problem)")
    N = cfg.samples_per_problem
    with JsonlAppender(path) as out:  # opening drops a line cut short by a crash
        done = {r.problem for r in read_pair_records(path, items, N)}
        calls = in_chunks(len(items), cfg.sample_batch_size)
        for call, chunk in enumerate(tqdm(calls, desc="dpo pairs", disable=not progress, file=sys.stderr)):
            todo = [i for i in chunk.tolist() if i not in done]
            if not todo:
                continue
            prompts = [encode_prompt(tokenizer, items[i].x, cfg.max_prompt_length) for i in todo]
            # N copies in blocks: row j + n·len(todo) is sample n of problem todo[j]
            ro = rollout(policy, tokenizer, prompts * N, cfg.temperature, cfg.response_length, tokenizer.eos_ids,
                         cfg.early_stop, seed=cfg.seed * 1_000_003 + call)
            scores = rewards(ro.texts, [items[i].y_star for i in todo] * N, verifier, reward_cfg)
            for j, i in enumerate(todo):
                rows = [j + n * len(todo) for n in range(N)]
                s = [scores[r] for r in rows]
                out.write({"problem": i, X_KEY: items[i].x, Y_KEY: items[i].y_star,
                           "responses": [ro.texts[r] for r in rows],
                           "response_ids": [ro.response[r][ro.policy_mask[r]].tolist() for r in rows],
                           "scores": s, "pairs": make_pairs(s, reward_cfg.correct, cfg.pairs_per_problem)})
    records = read_pair_records(path, items, N)
    verified = sum(s == reward_cfg.correct for r in records for s in r.scores)
    return {"pairs_file": str(path), "problems": len(records),
            "problems_with_pair": sum(bool(r.pairs) for r in records), "pairs": sum(len(r.pairs) for r in records),
            "verified_rate": verified / max(1, N * len(records))}


@dataclass
class PairRecord:
    problem: int
    response_ids: list[list[int]]
    scores: list[float]
    pairs: list[tuple[int, int]]


def read_pair_records(path, items, samples_per_problem: int) -> list[PairRecord]:
    """The pairs file, checked against the problems it was built from (bad input names file, line, field)."""
    path = Path(path)
    if not path.exists():
        return []
    out, seen = [], set()
    for rec in read_records(path):
        def field(name, kind):
            if name not in rec.data:
                raise FormatError(path, rec.line, name, "missing")
            if not isinstance(rec.data[name], kind):
                got = type(rec.data[name]).__name__
                raise FormatError(path, rec.line, name, f"expected {kind.__name__}, got {got}")
            return rec.data[name]

        i = field("problem", int)
        if i in seen:
            raise FormatError(path, rec.line, "problem", f"item {i} appears twice")
        seen.add(i)
        if not 0 <= i < len(items) or field(X_KEY, str) != items[i].x:
            raise FormatError(path, rec.line, "problem", f"item {i} is not in the data file (built from other data?)")
        ids, scores, pairs = field("response_ids", list), field("scores", list), field("pairs", list)
        if len(ids) != samples_per_problem or len(scores) != samples_per_problem:
            raise FormatError(path, rec.line, "response_ids", f"expected {samples_per_problem} responses "
                              f"(samples_per_problem), got {len(ids)}")
        if any(not r or not all(isinstance(t, int) for t in r) for r in ids):
            raise FormatError(path, rec.line, "response_ids", "every response must be a non-empty list of token ids")
        if any(not (isinstance(p, list) and len(p) == 2 and all(isinstance(k, int) and 0 <= k < len(ids) for k in p))
               for p in pairs):
            raise FormatError(path, rec.line, "pairs", "expected [chosen, rejected] index pairs into the responses")
        out.append(PairRecord(i, ids, scores, [tuple(p) for p in pairs]))
    return out


# ----------------------------------------------------------------------------- 2. training

def step(s: int, total: int, cfg: DPOConfig, policy, ref, pairs, batch: list[int], optimizer, d: Dist,
         pad_id: int) -> dict:
    """One optimizer step on a global batch of pairs: every pair has equal weight in the mean loss."""
    lr = warmup_from_zero_linear_lr(s, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    mine = batch[d.rank::d.world]
    micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
    sums = torch.zeros(7, dtype=torch.float64)
    for j, idx in enumerate(micro):
        n = len(idx)
        prompts = [pairs[i][0] for i in idx]
        rows = pair_batch(prompts + prompts, [pairs[i][1] for i in idx] + [pairs[i][2] for i in idx], pad_id,
                          d.device)
        with torch.no_grad():
            ref_lp = sequence_logprobs(ref, rows)  # (2n,): chosen rows first, then rejected
        with no_grad_sync(policy, j == len(micro) - 1):
            lp = sequence_logprobs(policy, rows)
            loss, r_w, r_l = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], cfg.beta, cfg.label_smoothing)
            # DDP averages gradients over processes, hence × world: the result is the mean over the global batch
            (loss.sum() * d.world / len(batch)).backward()
        with torch.no_grad():
            sums += torch.tensor([loss.sum(), (r_w > r_l).sum(), (r_w - r_l).sum(), r_w.sum(), r_l.sum(),
                                  lp[:n].sum(), lp[n:].sum()], dtype=torch.float64)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    g = all_sum(sums, d) / len(batch)
    return {"step": s + 1, "lr": lr, "loss": g[0].item(), "reward_accuracy": g[1].item(), "reward_margin": g[2].item(),
            "chosen_reward": g[3].item(), "rejected_reward": g[4].item(), "logp_chosen": g[5].item(),
            "logp_rejected": g[6].item(), "grad_norm": float(grad_norm)}


def train(cfg: DPOConfig, policy_dir, data_path, out_dir, verifier, pairs_path=None, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), pairs_only: bool = False, max_steps: int = 0,
          overwrite: bool = False, save_dtype="float32"):
    """Build (or finish) the pairs file, then train. Returns (pair statistics, per-step metrics).
    out_dir/pairs.jsonl (default), checkpoint-S/ and final/ (policy, HF layout, weights in
    `save_dtype`, + trainer/), metrics.jsonl. A directory that already holds a training run needs
    `resume` or `overwrite` (training/run_dir.py; the pairs file is always resumed, and kept by
    `overwrite`)."""
    d = init_distributed()
    out = Path(out_dir)
    save_dtype = save_dtype_of(save_dtype)
    if pairs_only and overwrite:
        raise ValueError("--overwrite replaces a training run; --pairs-only trains nothing (the pairs file is "
                         "resumed: delete it to sample again)")
    run = None if pairs_only else RunDir("dpo", out, "step", d, resume=resume, overwrite=overwrite)
    pairs_path = Path(pairs_path) if pairs_path else out / "pairs.jsonl"
    tokenizer = Tokenizer.from_dir(policy_dir)
    items = read_rl_problems(data_path)
    policy = load_model(policy_dir, dtype=torch.float32, device=d.device)  # = π_SFT until the first step
    if d.world == 1:
        stats = build_pairs(cfg, policy, tokenizer, items, verifier, pairs_path, reward_cfg)
    else:
        records = read_pair_records(pairs_path, items, cfg.samples_per_problem)
        if len(records) < len(items):
            raise ValueError(f"{pairs_path}: {len(records)} of {len(items)} problems sampled; build the pairs in "
                             "one process first: minihuatuo dpo --pairs-only ...")
        stats = {"pairs_file": str(pairs_path), "problems": len(records), "pairs": sum(len(r.pairs) for r in records)}
    if pairs_only:
        return stats, []
    records = read_pair_records(pairs_path, items, cfg.samples_per_problem)
    pairs = [(encode_prompt(tokenizer, items[r.problem].x, cfg.max_prompt_length), r.response_ids[w], r.response_ids[l])
             for r in records for w, l in r.pairs]
    if not pairs:
        raise ValueError(f"{pairs_path}: no problem has both a verified and an unverified response; nothing to train")

    ref = load_model(policy_dir, dtype=torch.float32, device=d.device).eval().requires_grad_(False)
    policy = wrap_model(policy, "ddp", d)
    optimizer = adamw(policy, cfg)
    # a batch smaller than the number of processes would leave a process without work (and DDP waiting)
    batches = [b for e in range(cfg.epochs)
               for b in global_batches(epoch_order(len(pairs), cfg.seed, e), cfg.batch_size) if len(b) >= d.world]
    total = len(batches)
    history = run_updates(
        run, total, max_updates=max_steps, save_every=cfg.save_every,
        update=lambda s: step(s, total, cfg, policy, ref, pairs, batches[s], optimizer, d, tokenizer.pad_id),
        save=lambda path, state: save_checkpoint(path, policy, optimizer, state, cfg, policy_dir, d, save_dtype),
        load=lambda path: load_checkpoint(path, policy, optimizer), postfix=_postfix)
    return stats, history


def _postfix(m: dict) -> dict:
    return {"loss": f"{m['loss']:.3f}", "acc": f"{m['reward_accuracy']:.2f}", "margin": f"{m['reward_margin']:.2f}"}
