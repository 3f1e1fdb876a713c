"""Stage 2 variant: GRPO with verifier rewards — beyond the paper (Shao et al. 2024, DeepSeekMath §4.1).
A sibling of rloo.py and ppo.py with the same numbered sections (`diff grpo.py rloo.py`: the advantage
and the loss differ, the loop does not).

One update, as pseudo-code:

    1. rollout      G copies of every prompt, y ~ π_old at temperature T                 rollout.update_rollout
    2. forwards     log π_old (from the sampler), log π_ref                              rollout.reference_logprobs
    3. score        s(x, y) = 1 / 0.1 / 0 from the verifier                              rollout.score_rollout
    4. advantages   Â_i = (s_i − mean_group s)/(std_group s + eps), the same for every token of y_i
                                                                                         group_advantages
    5. for epoch in 1..μ, for each minibatch:
        ρ_t = π(a_t)/π_old(a_t)                                       (one ratio per TOKEN)
        k3_t = π_ref/π − log(π_ref/π) − 1                             (KL to the reference, as a loss term)
        L = mean_i mean_{t≤L_i} [max(−Â_i ρ_t, −Â_i clip(ρ_t, 1−ε, 1+ε)) + β k3_t]     grpo_loss
        AdamW step on L (clipped global norm); no value model
    6. diagnostics  both KL estimators, entropy, clip fraction, the k3 loss term         diagnostics

The score s is the paper's (reward.rewards: 1 / 0.1 / 0); the KL is NOT in the reward (unlike PPO and
RLOO) but in the loss, with the k3 estimator, which is non-negative and unbiased for KL(π‖π_ref).
Shared with PPO, RLOO and DPO as functions: rollout.py (the prompt stream, rollout, scoring,
log-probs, the run), training/ (schedule, checkpoints, DDP plumbing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minihuatuo.services.config import (
    ConfigError,
    require_choice,
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_range,
    require_seed,
)
from minihuatuo.services.reward import RewardConfig
from minihuatuo.stages.rl.rollout import (
    Rollout,
    masked_mean,
    reference_logprobs,
    response_logprobs,
    rollout_diagnostics,
    score_rollout,
    select,
    train_policy,
    update_rollout,
)
from minihuatuo.training.distributed import Dist, no_grad_sync
from minihuatuo.training.schedules import warmup_from_zero_linear_lr


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
    drop_last: bool = True  # official: a data epoch drops its last partial batch (rollout.update_prompts)
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

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_range(self, 2, None, "group_size")  # a group's std needs two samples
        require_positive(self, "response_length", "max_prompt_length", "batch_size", "micro_batch_size",
                         "num_mini_batches", "ppo_epochs", "total_episodes", "lr", "temperature", "adv_eps",
                         "max_grad_norm", "adam_eps")
        require_nonnegative(self, "beta", "clip", "missing_stop_penalty", "save_every")
        require_fraction(self, "warmup_ratio")
        require_seed(self, "seed")
        require_choice(self, "stop_tokens", ("eos_token", "all"))
        if self.batch_size % self.group_size:
            raise ConfigError(("batch_size", "group_size"), f"batch_size ({self.batch_size}) must be a multiple of "
                              f"group_size ({self.group_size})")
        if self.num_mini_batches > self.batch_size:  # each optimizer step needs a rollout
            raise ConfigError(("num_mini_batches", "batch_size"), f"num_mini_batches ({self.num_mini_batches}) "
                              f"cannot exceed batch_size ({self.batch_size})")


# The preset vocabulary of every RL command (notes/rl_variants.md § Presets): `official` = the authors'
# released PPO run, `paper` = what the paper states on top of it, `tiny-world` = the bundled world.
# GRPO is in neither (no official GRPO run exists): its own knobs are DeepSeekMath's in every preset.
PRESETS = {
    "official": GRPOConfig(),  # PPO's official settings + DeepSeekMath's GRPO choices
    "paper": GRPOConfig(early_stop=True),  # PPO's `paper` preset + DeepSeekMath's GRPO choices
    # the bundled tiny world: PPO's tiny-world preset, with groups of 4
    "tiny-world": GRPOConfig(group_size=4, response_length=96, max_prompt_length=256, temperature=1.0,
                             early_stop=True, batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640,
                             lr=1e-4, warmup_ratio=0.0, beta=0.04, save_every=5, drop_last=False),
}
PRESETS["default"] = PRESETS["official"]  # the name `official` had before issue 18; still accepted


# ----------------------------------------------------------------------------- the math

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

@dataclass
class Experience:
    """Everything one update holds fixed for its μ epochs."""

    ro: Rollout
    ref_logprobs: torch.Tensor  # (B, R) log π_ref, 0 off the policy mask
    scores: torch.Tensor  # (B,) the sequence score s (after any missing-stop penalty)
    raw_scores: torch.Tensor  # (B,) the reward rule's value (1 / 0.1 / 0)
    kl: torch.Tensor  # (B, R) k1 = log π_old − log π_ref on the policy mask (a diagnostic only)
    advantages: torch.Tensor  # (B,) group-normalised, one per sequence


def update(u: int, num_updates: int, cfg: GRPOConfig, policy, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    """One GRPO update: collect experience with the current policy (1–4), learn from it (5), log (6)."""
    lr = warmup_from_zero_linear_lr(u, num_updates, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    timings: dict = {}
    exp = collect(u, cfg, policy, ref, tokenizer, items, verifier, d, reward_cfg, timings)
    t = time.perf_counter()
    logs = learn(u, cfg, policy, optimizer, exp)
    timings["time_optimize"] = time.perf_counter() - t
    return {"update": u + 1, "lr": lr, **diagnostics(exp, logs, reward_cfg, d), **timings}


@torch.no_grad()
def collect(u: int, cfg: GRPOConfig, policy, ref, tokenizer, items, verifier, d: Dist, reward_cfg: RewardConfig,
            timings: dict) -> Experience:
    """Rollout (G per prompt) → log π_ref → scores → group-normalised advantages."""
    t0 = time.perf_counter()
    base = policy.module if hasattr(policy, "module") else policy

    # 1. rollout: this process's share of update u's prompts, G responses each (rows i and i + n: one prompt)
    ro, references = update_rollout(base, tokenizer, items, u, cfg, d, copies=cfg.group_size)
    t1 = time.perf_counter()

    # 2. frozen forwards: log π_ref (there is no critic)
    ref_lp = reference_logprobs(ref, ro, cfg.temperature, cfg.micro_batch_size)
    t2 = time.perf_counter()

    # 3. score: the verifier's reward of each response
    scores, raw_scores = score_rollout(cfg, ro, references, verifier, reward_cfg)
    t3 = time.perf_counter()

    # 4. advantages from the scores alone (the KL is a loss term, not a reward); old log-probs from the sampler
    kl = (ro.logprobs - ref_lp) * ro.policy_mask
    advantages = group_advantages(scores, cfg.group_size, cfg.adv_eps)
    timings.update(time_rollout=t1 - t0, time_ref=t2 - t1, time_reward=t3 - t2)
    return Experience(ro, ref_lp, scores, raw_scores, kl, advantages)


def learn(u: int, cfg: GRPOConfig, policy, optimizer, exp: Experience) -> dict[str, list[float]]:
    """μ epochs × minibatches of the token-level clipped loss + β k3; one optimizer step per minibatch."""
    ro, B = exp.ro, exp.ro.response.shape[0]
    logs = {k: [] for k in ("pg_loss", "clipfrac", "kl_loss", "approx_kl", "ratio", "entropy")}

    # 5. epochs × minibatches: loss, backward, one optimizer step per minibatch
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 7919 + u * 131 + epoch))
        for mb in perm.tensor_split(cfg.num_mini_batches):
            micro = mb.split(cfg.micro_batch_size)
            for j, c in enumerate(micro):
                sub = select(ro, c)
                with no_grad_sync(policy, j == len(micro) - 1):
                    out = response_logprobs(policy, sub, cfg.temperature, with_entropy=epoch == 0)
                    new_lp, entropy = out if epoch == 0 else (out, None)
                    loss, clipfrac, kl_now = grpo_loss(new_lp, sub.logprobs, exp.ref_logprobs[c], exp.advantages[c],
                                                       sub.policy_mask, cfg.clip, cfg.beta)
                    # equal weight per sequence: the mean over the minibatch of per-sequence token means (eq. 3)
                    (loss.sum() / len(mb)).backward()
                with torch.no_grad():
                    diff = (new_lp - sub.logprobs) * sub.policy_mask
                    logs["pg_loss"].append(loss.mean().item())
                    logs["clipfrac"].append(clipfrac.mean().item())
                    logs["kl_loss"].append(kl_now.mean().item())
                    logs["approx_kl"].append(masked_mean(0.5 * diff ** 2, sub.policy_mask).item())
                    logs["ratio"].append(masked_mean(diff.exp(), sub.policy_mask).item())
                    if epoch == 0:
                        logs["entropy"].append(masked_mean(entropy.detach(), sub.policy_mask).item())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return logs


def diagnostics(exp: Experience, logs: dict, reward_cfg: RewardConfig, d: Dist) -> dict:
    """Per-update metrics over all processes (notes/rl_variants.md; PPO's names where they mean the same)."""
    # 6. diagnostics: the samples (both KL estimators), the learning phase, the groups without a signal
    ro = exp.ro
    k3_old = k3(ro.logprobs, exp.ref_logprobs, ro.policy_mask)
    return {**rollout_diagnostics(ro, exp.raw_scores, exp.kl, k3_old, reward_cfg, d,
                                  zero_advantage=exp.advantages == 0),
            **{k: sum(v) / max(1, len(v)) for k, v in logs.items()}}


# ----------------------------------------------------------------------------- the run

def train(cfg: GRPOConfig, policy_dir, data_path, out_dir, verifier, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), max_updates: int = 0, overwrite: bool = False,
          save_dtype="float32") -> list[dict]:
    """out_dir/checkpoint-U/ and out_dir/final/: the policy (HF layout, weights in `save_dtype`) +
    trainer/ (optimizer, trainer_state.json; there is no critic to keep); metrics.jsonl, one line per
    update (rollout.train_policy)."""
    return train_policy("grpo", update, cfg, policy_dir, data_path, out_dir, verifier, resume, reward_cfg,
                        max_updates, overwrite=overwrite, save_dtype=save_dtype)
