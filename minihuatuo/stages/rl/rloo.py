"""Stage 2 variant: RLOO with verifier rewards — the paper's comparison (App. F, Table 2: k = 2, with
PPO's reward function and parameters), with TRL 0.13's RLOOTrainer semantics (notes/rl_variants.md).

One update, as pseudo-code (a sibling of ppo.py's; `diff` them — what is missing is the critic and GAE):

    rollout      k copies of every prompt, y ~ π_old at temperature T                 rl.rollout
    log-probs    log π_old (sampler), log π_ref                                       rl.response_logprobs
    reward       R_i = s_i − β Σ_{t≤L} (log π_old − log π_ref)_t     (sequence-level k1)   sequence_rewards
    advantage    A_i = R_i − (Σ_{j in group} R_j − R_i)/(k − 1)     (leave-one-out)    leave_one_out_advantages
    for epoch in 1..K, for each minibatch:
        ρ_i = exp(Σ_{t≤L} log π − Σ_{t≤L} log π_old)                 (one ratio per sequence)
        L = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1−ε, 1+ε))                            sequence_policy_loss
        AdamW step on L (clipped global norm); no value model, no entropy term

s_i is the paper's score (reward.rewards: 1 / 0.1 / 0). Shared with PPO as functions, not a class:
rollout and log-probs (rl.py), the prompt stream, prompt encoding, scoring and chunking (ppo_train.py),
the learning-rate schedule (ppo.learning_rate), checkpoints and DDP plumbing (sft.py).
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
class RLOOConfig:
    """Paper App. F runs RLOO with "parameters identical to PPO" plus k = 2, so every default here is
    PPOConfig's official value (notes/ppo.md § Presets) wherever RLOO has the same knob."""

    rloo_k: int = 2  # k samples per prompt (paper App. F); the leave-one-out baseline needs k >= 2
    response_length: int = 1300  # R, new tokens per response
    max_prompt_length: int = 1000  # prompts keep their FIRST max_prompt_length tokens
    temperature: float = 0.5  # sampling AND log-prob temperature
    early_stop: bool = False  # official: always generate R tokens, truncate afterwards
    stop_tokens: str = "eos_token"  # which ids end a response: "eos_token" (official) or "all" (ppo.PPOConfig)
    drop_last: bool = True  # official: a data epoch drops its last partial batch (ppo_train.update_prompts)
    batch_size: int = 128  # rollouts per update over all processes = batch_size / k distinct prompts (spec §6)
    micro_batch_size: int = 1  # sequences per forward/backward (memory only)
    num_mini_batches: int = 1  # optimizer steps per epoch
    ppo_epochs: int = 3  # TRL's RLOO keeps PPO's K epochs of clipped updates on each batch
    total_episodes: int = 20000  # rollouts in the run; updates = ceil(total_episodes / batch_size)
    lr: float = 5e-7  # paper §4.1, as PPO
    warmup_ratio: float = 0.05  # linear warmup over ceil(ratio · updates) updates, then linear decay to 0
    beta: float = 0.03  # β of the sequence-level KL penalty (paper §4.1, as PPO)
    clip: float = 0.2  # ε of the sequence-level clipped ratio
    normalize_advantage: bool = False  # whiten A over the rank's batch (TRL ≥ 0.14 option; 0.13 has none)
    missing_stop_penalty: float = 0.0  # subtracted from the score of a response without a stop token (0 = off)
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    seed: int = 42
    save_every: int = 20  # updates between checkpoints

    def __post_init__(self):
        if self.rloo_k < 2:
            raise ValueError(f"rloo_k must be >= 2 (the leave-one-out baseline needs another sample), "
                             f"got {self.rloo_k}")
        if self.batch_size % self.rloo_k:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of rloo_k {self.rloo_k}")


PRESETS = {
    "official": RLOOConfig(),  # PPO's official settings + k = 2 (paper App. F)
    # the bundled tiny world: PPO's tiny-world preset, with two samples per prompt
    "tiny-world": RLOOConfig(response_length=96, max_prompt_length=256, temperature=1.0, early_stop=True,
                             batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640, lr=1e-4,
                             warmup_ratio=0.0, beta=0.01, save_every=5, drop_last=False),
}


# ----------------------------------------------------------------------------- pure math

def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """R_i = s_i − β Σ_t kl_t (B,): the KL penalty summed over the sequence (TRL 0.13 RLOO); `kl` (B, R)
    must already be 0 off the policy mask."""
    return scores - beta * kl.sum(1)


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i − b_i, b_i = (Σ_j R_j − R_i)/(k − 1): the mean reward of the OTHER samples of the same
    prompt. Rows are k blocks of n prompts (row i and row i + n share a prompt), TRL 0.13's layout."""
    grouped = rewards.view(k, -1)  # (k, n): column = one prompt
    baseline = (grouped.sum(0, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()  # (k·n,) back in row order


MAX_LOG_RATIO = 20.0  # ρ ≤ e^20 ≈ 4.9e8; see sequence_policy_loss


def sequence_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float,
                         max_log_ratio: float = MAX_LOG_RATIO):
    """One clipped ratio per SEQUENCE: ρ_i = exp(Σ_{t≤L} log π − Σ_{t≤L} log π_old) (B,), loss_i =
    max(−A_i ρ_i, −A_i clip(ρ_i, 1−ε, 1+ε)). Returns (loss (B,), clipped (B,) bool, log ρ (B,)).

    We differ from TRL 0.13 in one place: log ρ is clamped at `max_log_ratio` before exp. A sum over
    hundreds of tokens passes 88.7 easily once the policy has moved, and exp then overflows fp32 to
    inf, the loss to inf and the gradient to NaN, which poisons the weights. Below the bound the
    numbers are TRL's exactly; above it the clamp's zero gradient only matters for A < 0 (for A > 0
    the clipped branch already has zero gradient there), where TRL's gradient is ∝ ρ > 4.9e8 and
    would be cut by the global-norm clip anyway. The returned log ρ is the unclamped one."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0).sum(1)  # select, not multiply: -inf·0 = NaN
    ratio = torch.exp(log_ratio.clamp(max=max_log_ratio))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped, log_ratio


# ----------------------------------------------------------------------------- one update

def update(u: int, num_updates: int, cfg: RLOOConfig, policy, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    t0 = time.perf_counter()
    base = policy.module if hasattr(policy, "module") else policy
    lr = learning_rate(u, num_updates, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    k = cfg.rloo_k
    mine = update_prompts(len(items), u, cfg.batch_size // k, cfg.seed, cfg.drop_last)[d.rank::d.world]
    prompts = [encode_prompt(tokenizer, items[i].x, cfg.max_prompt_length) for i in mine]
    references = [items[i].y_star for i in mine]
    # k copies in blocks (rows i and i + n are the same prompt), so a group never crosses processes
    prompts, references = prompts * k, references * k

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

    # 2. sequence rewards and leave-one-out advantages (one scalar per sequence)
    old_lp = ro.logprobs  # from the sampler, never recomputed (as PPO)
    kl = (old_lp - ref_lp) * ro.policy_mask
    rlhf_reward = sequence_rewards(scores, kl, cfg.beta)
    advantages = leave_one_out_advantages(rlhf_reward, k)
    if cfg.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # 3. epochs × minibatches; one optimizer step per minibatch
    logs = {k_: [] for k_ in ("pg_loss", "clipfrac", "approx_kl", "ratio", "entropy")}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 7919 + u * 131 + epoch))
        for mb in perm.tensor_split(cfg.num_mini_batches):
            micro = mb.split(cfg.micro_batch_size)
            for j, c in enumerate(micro):
                sub = select(ro, c)
                with no_grad_sync(policy, j == len(micro) - 1):
                    out = response_logprobs(policy, sub, cfg.temperature, with_entropy=epoch == 0)
                    new_lp, entropy = out if epoch == 0 else (out, None)
                    loss, clipped, log_ratio = sequence_policy_loss(new_lp, old_lp[c], advantages[c], sub.policy_mask,
                                                                    cfg.clip)
                    # equal weight per sequence: mean over the minibatch (TRL: micro-batch mean / accumulation)
                    (loss.sum() / len(mb)).backward()
                with torch.no_grad():
                    logs["pg_loss"].append(loss.mean().item())
                    logs["clipfrac"].append(clipped.float().mean().item())
                    logs["approx_kl"].append((0.5 * log_ratio ** 2).mean().item())  # sequence-level, as TRL RLOO
                    logs["ratio"].append(log_ratio.clamp(max=MAX_LOG_RATIO).exp().mean().item())
                    if entropy is not None:
                        logs["entropy"].append(masked_mean(entropy.detach(), sub.policy_mask).item())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    t_end = time.perf_counter()

    # 4. diagnostics (notes/rl_variants.md documents each; the same names as PPO's where they mean the same)
    k3 = (torch.exp(ref_lp - old_lp) - 1 - (ref_lp - old_lp)) * ro.policy_mask
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    local = torch.tensor([raw_scores.sum(), (raw_scores == reward_cfg.correct).sum(),
                          (raw_scores == reward_cfg.no_format).sum(), kl.sum(), k3.sum(), (ro.last + 1).sum(),
                          ro.has_stop.sum(), rlhf_reward.sum(), (advantages == 0).sum(), B], dtype=torch.float64)
    g = all_sum(local, d)
    n = g[9].item()
    return {"update": u + 1, "lr": lr, "score": g[0].item() / n, "verified": g[1].item() / n,
            "format_fail": g[2].item() / n, "kl_k1": g[3].item() / n, "kl_k3": g[4].item() / n,
            "response_len": g[5].item() / n, "stopped": g[6].item() / n, "rlhf_reward": g[7].item() / n,
            "zero_advantage": g[8].item() / n, "entropy": mean(logs["entropy"]), "clipfrac": mean(logs["clipfrac"]),
            "approx_kl": mean(logs["approx_kl"]), "ratio": mean(logs["ratio"]), "pg_loss": mean(logs["pg_loss"]),
            "time_rollout": t_rollout - t0, "time_ref": t_forward - t_rollout, "time_reward": t_reward - t_forward,
            "time_optimize": t_end - t_reward}


# ----------------------------------------------------------------------------- the run

def train(cfg: RLOOConfig, policy_dir, data_path, out_dir, verifier, resume=False,
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
    bar = tqdm(range(start, stop_at), desc="rloo", disable=not d.main, file=sys.stderr)
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


def cmd_rloo(args) -> int:
    cfg = build_config(RLOOConfig, PRESETS, args.preset, args.config, args)
    history = train(cfg, args.policy, args.data, args.out, verifier_from_args(args), resume=args.resume,
                    max_updates=args.max_updates)
    if history and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps({"out": str(Path(args.out) / "final"), **history[-1]}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("rloo", help="stage-2 RLOO (k samples per prompt, leave-one-out baseline; paper App. F)")
    p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint")
    p.add_argument("--data", required=True,
                   help="verifiable problems (Open-ended Verifiable Question, Ground-True Answer)")
    p.add_argument("--out", required=True, help="output directory: checkpoint-U/, final/ (the policy), metrics.jsonl")
    add_verifier_args(p)
    p.add_argument("--preset", default="official", choices=list(PRESETS))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-updates", type=int, default=0, help="stop after this many updates (0 = all)")
    add_config_args(p, RLOOConfig)
    p.set_defaults(func=cmd_rloo)
