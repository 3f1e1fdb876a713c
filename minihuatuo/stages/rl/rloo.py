"""Stage 2 variant: RLOO with verifier rewards — the paper's comparison (App. F, Table 2: k = 2, with
PPO's reward function and parameters), with TRL 0.13's RLOOTrainer semantics (notes/rl_variants.md).

One update, as pseudo-code — a sibling of ppo.py's, with the same numbered sections (`diff rloo.py
ppo.py`: what RLOO lacks is the critic and GAE; its reward, ratio and loss are per sequence):

    1. rollout      k copies of every prompt, y ~ π_old at temperature T                 rollout.update_rollout
    2. forwards     log π_old (from the sampler), log π_ref                              rollout.reference_logprobs
    3. score        s(x, y) = 1 / 0.1 / 0 from the verifier                              rollout.score_rollout
    4. advantages   R_i = s_i − β Σ_{t≤L} (log π_old − log π_ref)_t   (sequence-level k1)   sequence_rewards
                    A_i = R_i − (Σ_{j in group} R_j − R_i)/(k − 1)   (leave-one-out)      leave_one_out_advantages
    5. for epoch in 1..K, for each minibatch:
        ρ_i = exp(Σ_{t≤L} log π − Σ_{t≤L} log π_old)                 (one ratio per sequence)
        L = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1−ε, 1+ε))                            sequence_policy_loss
        AdamW step on L (clipped global norm); no value model, no entropy term
    6. diagnostics  both KL estimators, entropy, clip fraction, the sequence rewards     diagnostics

Shared with PPO, GRPO and DPO as functions, not a class: rollout.py (the prompt stream, rollout,
scoring, log-probs, the run), training/ (schedule, checkpoints, DDP plumbing).
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
class RLOOConfig:
    """Paper App. F runs RLOO with "parameters identical to PPO" plus k = 2, so every default here is
    PPOConfig's official value (notes/ppo.md § Presets) wherever RLOO has the same knob."""

    rloo_k: int = 2  # k samples per prompt (paper App. F); the leave-one-out baseline needs k >= 2
    response_length: int = 1300  # R, new tokens per response
    max_prompt_length: int = 1000  # prompts keep their FIRST max_prompt_length tokens
    temperature: float = 0.5  # sampling AND log-prob temperature
    early_stop: bool = False  # official: always generate R tokens, truncate afterwards
    stop_tokens: str = "eos_token"  # which ids end a response: "eos_token" (official) or "all" (ppo.PPOConfig)
    drop_last: bool = True  # official: a data epoch drops its last partial batch (rollout.update_prompts)
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

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)
        require_range(self, 2, None, "rloo_k")  # the leave-one-out baseline needs another sample
        require_positive(self, "response_length", "max_prompt_length", "batch_size", "micro_batch_size",
                         "num_mini_batches", "ppo_epochs", "total_episodes", "lr", "temperature", "max_grad_norm",
                         "adam_eps")
        require_nonnegative(self, "beta", "clip", "missing_stop_penalty", "save_every")
        require_fraction(self, "warmup_ratio")
        require_seed(self, "seed")
        require_choice(self, "stop_tokens", ("eos_token", "all"))
        if self.batch_size % self.rloo_k:
            raise ConfigError(("batch_size", "rloo_k"), f"batch_size ({self.batch_size}) must be a multiple of "
                              f"rloo_k ({self.rloo_k})")
        if self.num_mini_batches > self.batch_size:  # each optimizer step needs a rollout
            raise ConfigError(("num_mini_batches", "batch_size"), f"num_mini_batches ({self.num_mini_batches}) "
                              f"cannot exceed batch_size ({self.batch_size})")


# The preset vocabulary of every RL command (notes/rl_variants.md § Presets): `official` = the authors'
# released PPO run, `paper` = what the paper states on top of it, `tiny-world` = the bundled world.
PRESETS = {
    "official": RLOOConfig(),  # PPO's official settings + k = 2 (paper App. F)
    "paper": RLOOConfig(early_stop=True),  # PPO's `paper` preset + k = 2 (its vf_coef has no RLOO counterpart)
    # the bundled tiny world: PPO's tiny-world preset, with two samples per prompt
    "tiny-world": RLOOConfig(response_length=96, max_prompt_length=256, temperature=1.0, early_stop=True,
                             batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640, lr=1e-4,
                             warmup_ratio=0.0, beta=0.01, save_every=5, drop_last=False),
}


# ----------------------------------------------------------------------------- the math

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

@dataclass
class Experience:
    """Everything one update holds fixed for its K epochs."""

    ro: Rollout
    ref_logprobs: torch.Tensor  # (B, R) log π_ref, 0 off the policy mask
    scores: torch.Tensor  # (B,) the sequence score s (after any missing-stop penalty)
    raw_scores: torch.Tensor  # (B,) the reward rule's value (1 / 0.1 / 0)
    kl: torch.Tensor  # (B, R) k1 = log π_old − log π_ref on the policy mask
    rewards: torch.Tensor  # (B,) R_i = s_i − β Σ_t kl_t
    advantages: torch.Tensor  # (B,) leave-one-out, one per sequence


def update(u: int, num_updates: int, cfg: RLOOConfig, policy, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    """One RLOO update: collect experience with the current policy (1–4), learn from it (5), log (6)."""
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
def collect(u: int, cfg: RLOOConfig, policy, ref, tokenizer, items, verifier, d: Dist, reward_cfg: RewardConfig,
            timings: dict) -> Experience:
    """Rollout (k per prompt) → log π_ref → scores → sequence rewards → leave-one-out advantages."""
    t0 = time.perf_counter()
    base = policy.module if hasattr(policy, "module") else policy

    # 1. rollout: this process's share of update u's prompts, k responses each (rows i and i + n: one prompt)
    ro, references = update_rollout(base, tokenizer, items, u, cfg, d, copies=cfg.rloo_k)
    t1 = time.perf_counter()

    # 2. frozen forwards: log π_ref (there is no critic)
    ref_lp = reference_logprobs(ref, ro, cfg.temperature, cfg.micro_batch_size)
    t2 = time.perf_counter()

    # 3. score: the verifier's reward of each response
    scores, raw_scores = score_rollout(cfg, ro, references, verifier, reward_cfg)
    t3 = time.perf_counter()

    # 4. rewards and advantages, one scalar per sequence; old log-probs come from the sampler (as PPO)
    kl = (ro.logprobs - ref_lp) * ro.policy_mask
    rlhf_reward = sequence_rewards(scores, kl, cfg.beta)
    advantages = leave_one_out_advantages(rlhf_reward, cfg.rloo_k)
    if cfg.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    timings.update(time_rollout=t1 - t0, time_ref=t2 - t1, time_reward=t3 - t2)
    return Experience(ro, ref_lp, scores, raw_scores, kl, rlhf_reward, advantages)


def learn(u: int, cfg: RLOOConfig, policy, optimizer, exp: Experience) -> dict[str, list[float]]:
    """K epochs × minibatches of the sequence-level clipped loss; one optimizer step per minibatch."""
    ro, B = exp.ro, exp.ro.response.shape[0]
    logs = {k: [] for k in ("pg_loss", "clipfrac", "approx_kl", "ratio", "entropy")}

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
                    loss, clipped, log_ratio = sequence_policy_loss(new_lp, sub.logprobs, exp.advantages[c],
                                                                    sub.policy_mask, cfg.clip)
                    # equal weight per sequence: mean over the minibatch (TRL: micro-batch mean / accumulation)
                    (loss.sum() / len(mb)).backward()
                with torch.no_grad():
                    logs["pg_loss"].append(loss.mean().item())
                    logs["clipfrac"].append(clipped.float().mean().item())
                    logs["approx_kl"].append((0.5 * log_ratio ** 2).mean().item())  # sequence-level, as TRL RLOO
                    logs["ratio"].append(log_ratio.clamp(max=MAX_LOG_RATIO).exp().mean().item())
                    if epoch == 0:
                        logs["entropy"].append(masked_mean(entropy.detach(), sub.policy_mask).item())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return logs


def diagnostics(exp: Experience, logs: dict, reward_cfg: RewardConfig, d: Dist) -> dict:
    """Per-update metrics over all processes (notes/rl_variants.md; PPO's names where they mean the same)."""
    # 6. diagnostics: the samples (both KL estimators), the learning phase, the sequence rewards
    ro = exp.ro
    k3 = (torch.exp(exp.ref_logprobs - ro.logprobs) - 1 - (exp.ref_logprobs - ro.logprobs)) * ro.policy_mask
    return {**rollout_diagnostics(ro, exp.raw_scores, exp.kl, k3, reward_cfg, d, rlhf_reward=exp.rewards,
                                  zero_advantage=exp.advantages == 0),
            **{k: sum(v) / max(1, len(v)) for k, v in logs.items()}}


# ----------------------------------------------------------------------------- the run

def train(cfg: RLOOConfig, policy_dir, data_path, out_dir, verifier, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), max_updates: int = 0, overwrite: bool = False,
          save_dtype="float32") -> list[dict]:
    """out_dir/checkpoint-U/ and out_dir/final/: the policy (HF layout, weights in `save_dtype`) +
    trainer/ (optimizer, trainer_state.json; there is no critic to keep); metrics.jsonl, one line per
    update (rollout.train_policy)."""
    return train_policy("rloo", update, cfg, policy_dir, data_path, out_dir, verifier, resume, reward_cfg,
                        max_updates, overwrite=overwrite, save_dtype=save_dtype)
