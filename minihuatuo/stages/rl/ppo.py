"""Stage 2: PPO with verifier rewards (paper §3.2, Algorithm 1 stage two, §4.1, Appendix F).

One update, as PPO pseudo-code (notes/ppo.md; `ppo_train.update` is exactly this):

    rollout      y ~ π_old(· | x) at temperature T, cut after the first stop token   rl.rollout
    log-probs    log π_old (sampler), log π_ref, V_old                               rl.response_logprobs / _values
    rewards      r_t = −β (log π_old − log π_ref)_t,  + s(x, y) at the score slot    per_token_rewards
    advantages   GAE(γ, λ) over all slots; R_t = A_t + V_t; A whitened over t ≤ L    gae, masked_whiten
    for epoch in 1..K, for each minibatch:
        L_π = mean_seq mean_{t≤L}   max(−A ρ, −A clip(ρ, 1−ε, 1+ε)),  ρ = π/π_old     policy_loss
        L_V = mean_seq ½ mean_{t≤L+1} max((V−R)², (clip(V, V_old±ε_V)−R)²)            value_loss
        step on L_π + c_V · L_V (one AdamW over policy and critic, clipped global norm)

Score s (paper §3.2): 1 if the verifier accepts the final response, 0.1 if not, 0 without the
"## Thinking / ## Final Response" format (reward.rewards). The loop lives in ppo_train.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PPOConfig:
    """Defaults = the official run (notes/ppo.md § Presets and checklist); the `paper` preset changes what the paper states."""

    response_length: int = 1300  # R, new tokens per response
    max_prompt_length: int = 1000  # prompts keep their FIRST max_prompt_length tokens (checklist 4)
    temperature: float = 0.5  # sampling AND log-prob temperature (checklist 6–7)
    early_stop: bool = False  # official: always generate R tokens, truncate afterwards (checklist 5)
    # which ids end a response (checklist 8): "eos_token" = only the tokenizer's eos_token (official:
    # TRL stops at tokenizer.eos_token_id); "all" = also every generation_config.json eos_token_id, as
    # `generate` and `serve` do (Llama-3.1-Instruct lists <|end_of_text|>, <|eom_id|>, <|eot_id|>)
    stop_tokens: str = "eos_token"
    drop_last: bool = True  # official: a data epoch drops its last partial batch (ppo_train.update_prompts)
    batch_size: int = 128  # rollouts per update over all processes (paper §4.1)
    micro_batch_size: int = 1  # sequences per forward/backward (memory only)
    num_mini_batches: int = 1  # optimizer steps per PPO epoch
    ppo_epochs: int = 3  # paper §4.1
    total_episodes: int = 20000  # number of updates = ceil(total_episodes / batch_size)
    lr: float = 5e-7  # paper §4.1; policy and critic share it (checklist 31)
    warmup_ratio: float = 0.05  # linear warmup over ceil(ratio · updates), then linear decay to 0
    beta: float = 0.03  # KL coefficient β in the per-token reward (paper §4.1)
    clip: float = 0.2  # ε of the clipped surrogate (paper §4.1)
    clip_value: float = 0.2  # absolute clip of the value prediction around V_old
    vf_coef: float = 0.1  # official code; the paper states 1.0 (preset `paper`)
    gamma: float = 1.0  # paper §4.1
    lam: float = 0.95  # GAE λ (official; not stated in the paper)
    score_slot: str = "after_stop"  # "after_stop": index L+1 if it exists (official); "last": index L
    missing_stop_penalty: float = 0.0  # subtracted from the score of a response without a stop token (0 = off)
    whiten_scope: str = "rank"  # advantage whitening statistics: "rank" (official) or "global"
    entropy_coef: float = 0.0  # no entropy bonus unless configured
    kernels: bool = False  # fused kernels (kernels.py): RMSNorm/SwiGLU/RoPE and the LM head fused with log-prob + entropy
    max_grad_norm: float = 1.0  # global norm over policy + critic (checklist 32)
    adam_eps: float = 1e-8
    value_head: str = "separate"  # "separate" critic network (official) or "shared" (a head on the policy trunk)
    seed: int = 42
    save_every: int = 20  # updates between checkpoints (official save_steps 20)


PRESETS = {
    "official": PPOConfig(),
    "paper": PPOConfig(vf_coef=1.0, early_stop=True),
    # the bundled tiny world: short answers, a small batch, a learning rate a 1M-parameter model feels
    "tiny-world": PPOConfig(response_length=96, max_prompt_length=256, temperature=1.0, early_stop=True,
                            batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640, lr=1e-4,
                            warmup_ratio=0.0, vf_coef=0.5, save_every=5, drop_last=False),
}


# ----------------------------------------------------------------------------- pure math

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, stats=None) -> torch.Tensor:
    """(x − μ)/sqrt(σ² + eps) with μ and the UNBIASED σ² over masked entries only, then 0 off the mask
    (checklist 24). `stats` = (sum, sum of squares, count) from all processes for global whitening."""
    m = mask.to(x.dtype)
    s, ss, n = stats if stats is not None else ((x * m).sum(), (x * x * m).sum(), m.sum())
    mean = s / n
    var = (ss / n - mean * mean) * n / (n - 1).clamp(min=1)  # unbiased; a single token has variance 0
    return (x - mean) * torch.rsqrt(var + eps) * m


def per_token_rewards(logprobs, ref_logprobs, scores, policy_mask, last, beta: float, score_slot: str):
    """r_t = −β·kl_t with kl_t = log π_old − log π_ref (the k1 estimator, 0 off the policy mask;
    checklist 18), plus the sequence score at its slot (checklist 19): one past the stop token when
    that slot exists ("after_stop", official), else — or always with "last" — on the last real token."""
    B, R = logprobs.shape
    kl = (logprobs - ref_logprobs) * policy_mask
    rewards = -beta * kl
    slot = last + 1 if score_slot == "after_stop" else last
    slot = torch.where(slot < R, slot, last)
    rewards[torch.arange(B, device=rewards.device), slot] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over all R slots, backwards (Schulman et al. 2016):
    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  with V_R = 0 and A_R = 0 (no bootstrap past
    the last slot; checklist 21). `values` must already be 0 beyond each row's value region."""
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    return advantages


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float):
    """Per-sequence clipped surrogate, token-averaged over t ≤ L (checklist 26):
    mean_t max(−A ρ, −A clip(ρ, 1−ε, 1+ε)). Returns (loss per sequence (B,), clip fraction per sequence).
    The log-ratio is masked before exp: a padding slot may hold any log-probs, and an overflow there
    would turn into inf·0 = NaN in the masked mean."""
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return masked_mean(loss, mask, dim=1), masked_mean((clipped > unclipped).float(), mask, dim=1)


def value_loss(values, old_values, returns, mask, clip_value: float):
    """Per-sequence pessimistic clipped value loss over t ≤ L+1 (checklist 27):
    ½ mean_t max((V − R)², (clip(V, V_old ± ε_V) − R)²). Returns (loss (B,), clip fraction (B,))."""
    clipped_v = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    a, b = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask, dim=1), masked_mean((b > a).float(), mask, dim=1)


def learning_rate(update: int, num_updates: int, cfg: PPOConfig) -> float:
    """lr for update u (0-based), stepped once per update (checklist 33): linear warmup over
    W = ceil(warmup_ratio · U) updates starting at 0 — so the first update trains at lr 0 when W > 0,
    as in the official run — then linear decay to 0 at the end."""
    warmup = math.ceil(cfg.warmup_ratio * num_updates)
    if update < warmup:
        return cfg.lr * update / warmup
    return cfg.lr * (num_updates - update) / max(1, num_updates - warmup)


def explained_variance(values, returns, mask) -> float:
    """1 − Var(R − V)/Var(R) over the value region: 1 = the critic predicts returns perfectly."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


# ----------------------------------------------------------------------------- the trained pair

class ActorCritic(nn.Module):
    """Policy and critic behind one forward, so one DDP wrapper and one optimizer cover both
    (checklist 31–32). With value_head="shared" the critic is a `score` head on the policy trunk."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, ids, mask, positions, at, actions, temperature: float, fused: bool = False):
        """log π(a) (N,), entropy (N,) of softmax(z / T), and values (N,) at the N positions where `at`
        (B, T) is True; actions (N,) are the tokens taken there. fused: the LM head and the log-softmax
        run as one chunked kernel that never holds the (N, V) logits (kernels.py)."""
        h = self.policy.hidden_states(ids, attention_mask=mask, position_ids=positions)[at]  # (N, C)
        if fused:
            from minihuatuo.engine import kernels

            logp, entropy = kernels.token_logprobs_and_entropy(h, self.policy.lm_head.weight, actions, temperature)
        else:
            logp_all = torch.log_softmax(self.policy.lm_head(h).float() / temperature, -1)  # (N, V)
            logp = logp_all.gather(-1, actions[:, None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        if self.critic is None:
            return logp, entropy, self.policy.score(h).squeeze(-1)
        return logp, entropy, self.values(ids, mask, positions, at)

    def values(self, ids, mask, positions, at):
        """V (N,) at the N positions where `at` is True, without the policy's LM head and log-softmax
        (V_old in `collect` needs only this; with a separate critic the policy does not run at all)."""
        critic = self.critic if self.critic is not None else self.policy
        h = critic.hidden_states(ids, attention_mask=mask, position_ids=positions)[at]  # (N, C)
        return critic.score(h).squeeze(-1)
