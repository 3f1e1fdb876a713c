"""Stage 2 variant: GRPO with verifier rewards — beyond the paper (Shao et al. 2024, DeepSeekMath §4.1).
A sibling of rloo.py (`diff` them: the advantage and the loss differ, the loop does not).

One update, as pseudo-code:

    rollout      G copies of every prompt, y ~ π_old at temperature T                 rl.rollout
    log-probs    log π_old (sampler), log π_ref                                       rl.response_logprobs
    advantage    Â_i = (s_i − mean_group s)/(std_group s + eps), the same for every token of y_i   group_advantages
    for epoch in 1..μ, for each minibatch:
        ρ_t = π(a_t)/π_old(a_t)                                       (one ratio per TOKEN)
        k3_t = π_ref/π − log(π_ref/π) − 1                             (KL to the reference, as a loss term)
        L = mean_i mean_{t≤L_i} [max(−Â_i ρ_t, −Â_i clip(ρ_t, 1−ε, 1+ε)) + β k3_t]              grpo_loss
        AdamW step on L (clipped global norm); no value model

The score s is the paper's (reward.rewards: 1 / 0.1 / 0); the KL is NOT in the reward (unlike PPO and
RLOO) but in the loss, with the k3 estimator, which is non-negative and unbiased for KL(π‖π_ref).
Shared with PPO and RLOO as functions: rollout and log-probs (rl.py), the prompt stream, prompt
encoding, scoring and chunking (ppo_train.py), the schedule (ppo.learning_rate), checkpoints (sft.py).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.config import add_config_args, build_config
from minihuatuo.services.formats import read_problems
from minihuatuo.services.reward import RewardConfig
from minihuatuo.stages.rl.ppo import learning_rate, masked_mean
from minihuatuo.stages.rl.ppo_train import (
    add_verifier_args,
    encode_prompt,
    in_chunks,
    score_rollout,
    select,
    update_prompts,
    verifier_from_args,
)
from minihuatuo.stages.rl.rollout import response_logprobs, rollout, stop_ids
from minihuatuo.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from minihuatuo.training.distributed import Dist, all_sum, init_distributed, no_grad_sync


@dataclass
class GRPOConfig:
    """GRPO is not in the paper. Knobs it shares with PPO take PPOConfig's official values (notes/ppo.md § Presets),
    so a GRPO run compares with the paper's PPO; GRPO's own knobs take DeepSeekMath's (§4.1, §5.2)."""

    group_size: int = 8  # G samples per prompt (DeepSeekMath: 64; 8 keeps 16 distinct prompts in 128 rollouts)
    response_length: int = 1300  # R, new tokens per response
    max_prompt_length: int = 1000  # prompts keep their FIRST max_prompt_length tokens
    temperature: float = 0.5  # sampling AND log-prob temperature
    early_stop: bool = False  # official PPO: always generate R tokens, truncate afterwards
    stop_tokens: str = "eos_token"  # which ids end a response: "eos_token" (official) or "all" (ppo.PPOConfig)
    drop_last: bool = True  # official: a data epoch drops its last partial batch (ppo_train.update_prompts)
    batch_size: int = 128  # rollouts per update over all processes = batch_size / G distinct prompts
    micro_batch_size: int = 1  # sequences per forward/backward (memory only)
    num_mini_batches: int = 1  # optimizer steps per epoch
    ppo_epochs: int = 1  # μ: DeepSeekMath makes one policy update per rollout batch (ρ = 1, the clip is idle)
    total_episodes: int = 20000  # rollouts in the run; updates = ceil(total_episodes / batch_size)
    lr: float = 5e-7  # as PPO (paper §4.1); DeepSeekMath used 1e-6
    warmup_ratio: float = 0.05  # linear warmup over ceil(ratio · updates) updates, then linear decay to 0
    beta: float = 0.04  # β of the k3 KL loss term (DeepSeekMath)
    clip: float = 0.2  # ε of the token-level clipped ratio
    adv_eps: float = 1e-4  # Â = (s − mean)/(std + eps); a group whose scores are all equal gets Â = 0
    missing_stop_penalty: float = 0.0  # subtracted from the score of a response without a stop token (0 = off)
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    seed: int = 42
    save_every: int = 20  # updates between checkpoints

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group's std needs two samples), got {self.group_size}")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of group_size {self.group_size}")


PRESETS = {
    "default": GRPOConfig(),  # PPO's official settings + DeepSeekMath's GRPO choices
    # the bundled tiny world: PPO's tiny-world preset, with groups of 4
    "tiny-world": GRPOConfig(group_size=4, response_length=96, max_prompt_length=256, temperature=1.0,
                             early_stop=True, batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640,
                             lr=1e-4, warmup_ratio=0.0, beta=0.04, save_every=5, drop_last=False),
}


# ----------------------------------------------------------------------------- pure math

def group_advantages(scores: torch.Tensor, G: int, eps: float) -> torch.Tensor:
    """Â_i = (s_i − mean_group)/(std_group + eps) (B,), std unbiased (torch's default, as TRL's GRPO).
    Rows are G blocks of n prompts (row i and row i + n share a prompt), the layout of rloo.py."""
    grouped = scores.view(G, -1)  # (G, n): column = one prompt
    return ((grouped - grouped.mean(0, keepdim=True)) / (grouped.std(0, keepdim=True) + eps)).flatten()


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The k3 estimator of KL(π‖π_ref) per token: π_ref/π − log(π_ref/π) − 1 >= 0 (DeepSeekMath eq. 4).
    With `mask`, slots off the mask are 0. The mask is applied to the log-ratio BEFORE exp: a padding
    slot may hold any log π (after temperature it can be −100), and exp(100) is inf in fp32, which a
    mask applied afterwards turns into inf·0 = NaN (tests/test_rl_variants.py pins this)."""
    d = ref_logprobs - logprobs
    if mask is None:
        return torch.exp(d) - d - 1
    d = torch.where(mask.bool(), d, 0.0)  # select, not multiply: inf·0 = NaN
    return torch.exp(d) - d - 1  # 0 where d = 0


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip: float, beta: float):
    """Per-sequence token mean over t ≤ L of max(−Â ρ_t, −Â clip(ρ_t, 1−ε, 1+ε)) + β k3_t, the negated
    DeepSeekMath objective (eq. 3: 1/G Σ_i 1/|o_i| Σ_t). Returns (loss (B,), clip fraction (B,), mean k3 (B,))."""
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))  # masked before exp, as k3
    adv = advantages[:, None]  # (B, 1): one advantage for every token of the sequence
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    kl = k3(logprobs, ref_logprobs, mask)
    loss = masked_mean(torch.maximum(unclipped, clipped) + beta * kl, mask, dim=1)
    return loss, masked_mean((clipped > unclipped).float(), mask, dim=1), masked_mean(kl, mask, dim=1)


# ----------------------------------------------------------------------------- one update

def update(u: int, num_updates: int, cfg: GRPOConfig, policy, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    t0 = time.perf_counter()
    base = policy.module if hasattr(policy, "module") else policy
    lr = learning_rate(u, num_updates, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    G = cfg.group_size
    mine = update_prompts(len(items), u, cfg.batch_size // G, cfg.seed, cfg.drop_last)[d.rank::d.world]
    prompts = [encode_prompt(tokenizer, items[i].x, cfg.max_prompt_length) for i in mine]
    references = [items[i].y_star for i in mine]
    # G copies in blocks (rows i and i + n are the same prompt), so a group never crosses processes
    prompts, references = prompts * G, references * G

    # 1. rollout and the frozen quantities of this update
    ro = rollout(base, tokenizer, prompts, cfg.temperature, cfg.response_length, stop_ids(tokenizer, cfg.stop_tokens),
                 cfg.early_stop, seed=cfg.seed * 1_000_003 + u * 1009 + d.rank)
    t_rollout = time.perf_counter()
    B = len(prompts)
    with torch.no_grad():
        ref_lp = torch.cat([response_logprobs(ref, select(ro, c), cfg.temperature)
                            for c in in_chunks(B, cfg.micro_batch_size)]) * ro.policy_mask
    t_forward = time.perf_counter()
    scores, raw_scores = score_rollout(cfg, ro, references, verifier, reward_cfg)
    t_reward = time.perf_counter()

    # 2. group-normalised advantages from the scores alone (the KL is a loss term, not a reward)
    old_lp = ro.logprobs  # from the sampler, never recomputed (as PPO)
    kl = (old_lp - ref_lp) * ro.policy_mask
    advantages = group_advantages(scores, G, cfg.adv_eps)

    # 3. epochs × minibatches; one optimizer step per minibatch
    logs = {k_: [] for k_ in ("pg_loss", "clipfrac", "kl_loss", "approx_kl", "ratio", "entropy")}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 7919 + u * 131 + epoch))
        for mb in perm.tensor_split(cfg.num_mini_batches):
            micro = mb.split(cfg.micro_batch_size)
            for j, c in enumerate(micro):
                sub = select(ro, c)
                with no_grad_sync(policy, j == len(micro) - 1):
                    out = response_logprobs(policy, sub, cfg.temperature, with_entropy=epoch == 0)
                    new_lp, entropy = out if epoch == 0 else (out, None)
                    loss, clipfrac, kl_now = grpo_loss(new_lp, old_lp[c], ref_lp[c], advantages[c], sub.policy_mask,
                                                       cfg.clip, cfg.beta)
                    # equal weight per sequence: the mean over the minibatch of per-sequence token means (eq. 3)
                    (loss.sum() / len(mb)).backward()
                with torch.no_grad():
                    diff = (new_lp - old_lp[c]) * sub.policy_mask
                    logs["pg_loss"].append(loss.mean().item())
                    logs["clipfrac"].append(clipfrac.mean().item())
                    logs["kl_loss"].append(kl_now.mean().item())
                    logs["approx_kl"].append(masked_mean(0.5 * diff ** 2, sub.policy_mask).item())
                    logs["ratio"].append(masked_mean(diff.exp(), sub.policy_mask).item())
                    if entropy is not None:
                        logs["entropy"].append(masked_mean(entropy.detach(), sub.policy_mask).item())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    t_end = time.perf_counter()

    # 4. diagnostics (notes/rl_variants.md documents each; the same names as PPO's where they mean the same)
    k3_old = k3(old_lp, ref_lp, ro.policy_mask)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    local = torch.tensor([raw_scores.sum(), (raw_scores == reward_cfg.correct).sum(),
                          (raw_scores == reward_cfg.no_format).sum(), kl.sum(), k3_old.sum(), (ro.last + 1).sum(),
                          ro.has_stop.sum(), (advantages == 0).sum(), B], dtype=torch.float64)
    g = all_sum(local, d)
    n = g[8].item()
    return {"update": u + 1, "lr": lr, "score": g[0].item() / n, "verified": g[1].item() / n,
            "format_fail": g[2].item() / n, "kl_k1": g[3].item() / n, "kl_k3": g[4].item() / n,
            "response_len": g[5].item() / n, "stopped": g[6].item() / n, "zero_advantage": g[7].item() / n,
            "entropy": mean(logs["entropy"]), "clipfrac": mean(logs["clipfrac"]), "kl_loss": mean(logs["kl_loss"]),
            "approx_kl": mean(logs["approx_kl"]), "ratio": mean(logs["ratio"]), "pg_loss": mean(logs["pg_loss"]),
            "time_rollout": t_rollout - t0, "time_ref": t_forward - t_rollout, "time_reward": t_reward - t_forward,
            "time_optimize": t_end - t_reward}


# ----------------------------------------------------------------------------- the run

def train(cfg: GRPOConfig, policy_dir, data_path, out_dir, verifier, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), max_updates: int = 0) -> list[dict]:
    """out_dir/checkpoint-U/ and out_dir/final/: the policy (HF layout) + optimizer + trainer_state.json
    (sft.save_checkpoint's layout: there is no critic to keep); metrics.jsonl, one line per update."""
    d = init_distributed()
    out = Path(out_dir)
    tokenizer = Tokenizer.from_dir(policy_dir)
    items = read_problems(data_path)
    policy = load_model(policy_dir, dtype=torch.float32, device=d.device)
    ref = load_model(policy_dir, dtype=torch.float32, device=d.device).eval().requires_grad_(False)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        policy = DistributedDataParallel(policy, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                  weight_decay=0.0)
    num_updates = math.ceil(cfg.total_episodes / cfg.batch_size)
    start = 0
    ckpt = latest_checkpoint(out) if resume and out.exists() else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, policy, optimizer)["update"]
    history = []
    metrics = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    stop_at = min(num_updates, max_updates) if max_updates else num_updates
    bar = tqdm(range(start, stop_at), desc="grpo", disable=not d.main, file=sys.stderr)
    for u in bar:
        m = update(u, num_updates, cfg, policy, ref, tokenizer, items, verifier, optimizer, d, reward_cfg)
        history.append(m)
        if d.main:
            bar.set_postfix(score=f"{m['score']:.3f}", kl=f"{m['kl_k1']:.3f}", len=f"{m['response_len']:.0f}")
            metrics.write(json.dumps(m) + "\n")
            metrics.flush()
        if cfg.save_every and (u + 1) % cfg.save_every == 0 and u + 1 < num_updates:
            save_checkpoint(out / f"checkpoint-{u + 1}", policy, optimizer, {"update": u + 1}, cfg, policy_dir, d)
    save_checkpoint(out / "final", policy, optimizer, {"update": stop_at}, cfg, policy_dir, d)
    if d.main:
        metrics.close()
    return history


def cmd_grpo(args) -> int:
    cfg = build_config(GRPOConfig, PRESETS, args.preset, args.config, args)
    history = train(cfg, args.policy, args.data, args.out, verifier_from_args(args), resume=args.resume,
                    max_updates=args.max_updates)
    if history and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps({"out": str(Path(args.out) / "final"), **history[-1]}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("grpo", help="stage-2 GRPO (group-normalised advantages, k3 KL loss; beyond the paper)")
    p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint")
    p.add_argument("--data", required=True,
                   help="verifiable problems (Open-ended Verifiable Question, Ground-True Answer)")
    p.add_argument("--out", required=True, help="output directory: checkpoint-U/, final/ (the policy), metrics.jsonl")
    add_verifier_args(p)
    p.add_argument("--preset", default="default", choices=list(PRESETS))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-updates", type=int, default=0, help="stop after this many updates (0 = all)")
    add_config_args(p, GRPOConfig)
    p.set_defaults(func=cmd_grpo)
