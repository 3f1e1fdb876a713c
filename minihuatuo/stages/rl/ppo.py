"""Stage 2: PPO with verifier rewards (paper §3.2, Algorithm 1 stage two, §4.1, Appendix F).

One update, as PPO pseudo-code (notes/ppo.md; `update` below is exactly this, top to bottom):

    1. rollout      y ~ π_old(· | x) at temperature T, cut after the first stop token   rollout.update_rollout
    2. forwards     log π_old (from the sampler), log π_ref, V_old                      response_logprobs, critic_values
    3. score        s(x, y) = 1 / 0.1 / 0 from the verifier                             rollout.score_rollout
    4. advantages   r_t = −β (log π_old − log π_ref)_t,  + s at the score slot          per_token_rewards
                    GAE(γ, λ) over all slots; R_t = A_t + V_t; A whitened over t ≤ L    gae, masked_whiten
    5. for epoch in 1..K, for each minibatch:
        L_π = mean_seq mean_{t≤L}   max(−A ρ, −A clip(ρ, 1−ε, 1+ε)),  ρ = π/π_old      policy_loss
        L_V = mean_seq ½ mean_{t≤L+1} max((V−R)², (clip(V, V_old±ε_V)−R)²)             value_loss
        step on L_π + c_V · L_V (one AdamW over policy and critic, clipped global norm)
    6. diagnostics  both KL estimators, entropy, clip fractions, explained variance    diagnostics

Score s (paper §3.2): 1 if the verifier accepts the final response, 0.1 if not, 0 without the
"## Thinking / ## Final Response" format (reward.rewards). Shared with RLOO / GRPO / DPO as functions:
rollout.py. The run around the update (models, resume, metrics, checkpoints) is ppo_run.py; the
command is commands.py.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from minihuatuo.engine import kernels
from minihuatuo.engine.reference_kernels import token_logprobs_and_entropy
from minihuatuo.services.config import (
    ConfigError,
    require_choice,
    require_finite,
    require_fraction,
    require_nonnegative,
    require_positive,
    require_seed,
)
from minihuatuo.services.reward import RewardConfig
from minihuatuo.stages.rl.rollout import (
    Rollout,
    by_length,
    forward_inputs,
    masked_mean,
    response_logprobs,
    response_positions,
    rollout_diagnostics,
    score_rollout,
    select,
    trim,
    update_rollout,
)
from minihuatuo.training.distributed import Dist, all_sum, no_grad_sync
from minihuatuo.training.schedules import warmup_from_zero_linear_lr


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
    drop_last: bool = True  # official: a data epoch drops its last partial batch (rollout.update_prompts)
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

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_finite(self)  # entropy_coef: any finite number
        require_positive(self, "response_length", "max_prompt_length", "batch_size", "micro_batch_size",
                         "num_mini_batches", "ppo_epochs", "total_episodes", "lr", "temperature", "max_grad_norm",
                         "adam_eps")
        require_nonnegative(self, "beta", "clip", "clip_value", "vf_coef", "missing_stop_penalty", "save_every")
        require_fraction(self, "warmup_ratio", "gamma", "lam")
        require_seed(self, "seed")
        require_choice(self, "stop_tokens", ("eos_token", "all"))
        require_choice(self, "score_slot", ("after_stop", "last"))
        require_choice(self, "whiten_scope", ("rank", "global"))
        require_choice(self, "value_head", ("separate", "shared"))
        if self.num_mini_batches > self.batch_size:  # each optimizer step needs a rollout
            raise ConfigError(("num_mini_batches", "batch_size"), f"num_mini_batches ({self.num_mini_batches}) "
                              f"cannot exceed batch_size ({self.batch_size})")


# The preset vocabulary of every RL command (notes/rl_variants.md § Presets): `official` = the authors'
# released PPO run, `paper` = what the paper states on top of it, `tiny-world` = the bundled world.
PRESETS = {
    "official": PPOConfig(),
    "paper": PPOConfig(vf_coef=1.0, early_stop=True),
    # the bundled tiny world: short answers, a small batch, a learning rate a 1M-parameter model feels
    "tiny-world": PPOConfig(response_length=96, max_prompt_length=256, temperature=1.0, early_stop=True,
                            batch_size=32, micro_batch_size=32, ppo_epochs=2, total_episodes=640, lr=1e-4,
                            warmup_ratio=0.0, vf_coef=0.5, save_every=5, drop_last=False),
}


# ----------------------------------------------------------------------------- the math

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


def explained_variance(values, returns, mask) -> float:
    """1 − Var(R − V)/Var(R) over the value region: 1 = the critic predicts returns perfectly."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


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
            logp, entropy = kernels.linear_logprobs_and_entropy(h, self.policy.lm_head.weight, actions, temperature)
        else:
            logp, entropy = token_logprobs_and_entropy(self.policy.lm_head(h), actions, temperature)
        if self.critic is None:
            return logp, entropy, self.policy.score(h).squeeze(-1)
        return logp, entropy, self.values(ids, mask, positions, at)

    def values(self, ids, mask, positions, at):
        """V (N,) at the N positions where `at` is True, without the policy's LM head and log-softmax
        (V_old in `collect` needs only this; with a separate critic the policy does not run at all)."""
        critic = self.critic if self.critic is not None else self.policy
        h = critic.hidden_states(ids, attention_mask=mask, position_ids=positions)[at]  # (N, C)
        return critic.score(h).squeeze(-1)


# ----------------------------------------------------------------------------- one update

@dataclass
class Experience:
    """Everything one update holds fixed for its K PPO epochs (checklist 25)."""

    ro: Rollout
    old_values: torch.Tensor  # (B, R) V_old, 0 beyond L + 1
    ref_logprobs: torch.Tensor  # (B, R) log π_ref, 0 off the policy mask
    scores: torch.Tensor  # (B,) the sequence score s (after any missing-stop penalty)
    raw_scores: torch.Tensor  # (B,) the reward rule's value (1 / 0.1 / 0)
    kl: torch.Tensor  # (B, R) k1 = log π_old − log π_ref on the policy mask
    advantages: torch.Tensor  # (B, R) whitened, 0 off the policy mask
    returns: torch.Tensor  # (B, R) unwhitened A + V_old


def update(u: int, num_updates: int, cfg: PPOConfig, ac, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    """One PPO update: collect experience with the current policy (1–4), learn from it (5), log (6)."""
    lr = warmup_from_zero_linear_lr(u, num_updates, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    timings: dict = {}
    exp = collect(u, cfg, ac, ref, tokenizer, items, verifier, d, reward_cfg, timings)
    t = time.perf_counter()
    logs = learn(u, cfg, ac, optimizer, exp)
    timings["time_optimize"] = time.perf_counter() - t
    return {"update": u + 1, "lr": lr, **diagnostics(exp, logs, reward_cfg, d), **timings}


@torch.no_grad()
def collect(u: int, cfg: PPOConfig, ac, ref, tokenizer, items, verifier, d: Dist, reward_cfg: RewardConfig,
            timings: dict) -> Experience:
    """Rollout → log π_ref, V_old → scores → per-token rewards → GAE → returns → whitened advantages."""
    t0 = time.perf_counter()
    base = ac.module if hasattr(ac, "module") else ac

    # 1. rollout: this process's share of update u's prompts, one response each
    ro, references = update_rollout(base.policy, tokenizer, items, u, cfg, d)
    t1 = time.perf_counter()

    # 2. frozen forwards: log π_ref and V_old, on chunks of similar length cut to their longest response
    ref_lp, old_values = torch.zeros_like(ro.logprobs), torch.zeros_like(ro.logprobs)
    for c in by_length(ro, torch.arange(ro.response.shape[0]), cfg.micro_batch_size):
        sub = trim(select(ro, c))
        R = sub.response.shape[1]
        ref_lp[c, :R] = response_logprobs(ref, sub, cfg.temperature)
        old_values[c, :R] = critic_values(base, sub)
    ref_lp, old_values = ref_lp * ro.policy_mask, old_values * ro.value_mask  # checklist 22
    t2 = time.perf_counter()

    # 3. score: the verifier's reward of each response
    scores, raw_scores = score_rollout(cfg, ro, references, verifier, reward_cfg)
    t3 = time.perf_counter()

    # 4. rewards and advantages; old log-probs come from the sampler, never recomputed (checklist 6, 35)
    per_token, kl = per_token_rewards(ro.logprobs, ref_lp, scores, ro.policy_mask, ro.last, cfg.beta, cfg.score_slot)
    advantages = gae(per_token, old_values, cfg.gamma, cfg.lam)
    returns = advantages + old_values  # from the unwhitened advantages (checklist 23)
    stats = None
    if cfg.whiten_scope == "global":
        m = ro.policy_mask.float()
        stats = tuple(all_sum(torch.stack([(advantages * m).sum(), (advantages ** 2 * m).sum(), m.sum()]), d))
    advantages = masked_whiten(advantages, ro.policy_mask, stats=stats)
    timings.update(time_rollout=t1 - t0, time_ref_value=t2 - t1, time_reward=t3 - t2)
    return Experience(ro, old_values, ref_lp, scores, raw_scores, kl, advantages, returns)


def learn(u: int, cfg: PPOConfig, ac, optimizer, exp: Experience) -> dict[str, list[float]]:
    """K epochs × minibatches of clipped policy + value loss; one optimizer step per minibatch (checklist 30)."""
    ro, B = exp.ro, exp.ro.response.shape[0]
    logs = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio", "entropy")}

    # 5. epochs × minibatches: loss, backward, one optimizer step per minibatch
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 7919 + u * 131 + epoch))
        for mb in perm.tensor_split(cfg.num_mini_batches):
            micro = by_length(ro, mb, cfg.micro_batch_size)  # the same sum of per-sequence losses, less padding
            for j, c in enumerate(micro):
                sub = select_experience(exp, c)
                ids, mask, pos = forward_inputs(sub.ro)
                R = sub.ro.response.shape[1]
                with no_grad_sync(ac, j == len(micro) - 1):
                    new_lp, entropy, vpred = (x.view(len(c), R) for x in ac(
                        ids, mask, pos, response_positions(sub.ro), sub.ro.response.reshape(-1), cfg.temperature,
                        cfg.kernels))
                    pl, pclip = policy_loss(new_lp, sub.ro.logprobs, sub.advantages, sub.ro.policy_mask, cfg.clip)
                    vl, vclip = value_loss(vpred, sub.old_values, sub.returns, sub.ro.value_mask, cfg.clip_value)
                    seq_loss = pl + cfg.vf_coef * vl
                    if cfg.entropy_coef:
                        seq_loss = seq_loss - cfg.entropy_coef * masked_mean(entropy, sub.ro.policy_mask, dim=1)
                    # equal weight per sequence: mean over the minibatch of per-sequence token means (checklist 29)
                    (seq_loss.sum() / len(mb)).backward()
                with torch.no_grad():
                    diff = (new_lp - sub.ro.logprobs) * sub.ro.policy_mask
                    logs["pg_loss"].append(pl.mean().item())
                    logs["vf_loss"].append(vl.mean().item())
                    logs["clipfrac"].append(pclip.mean().item())
                    logs["vf_clipfrac"].append(vclip.mean().item())
                    logs["approx_kl"].append(masked_mean(0.5 * diff ** 2, sub.ro.policy_mask).item())
                    logs["ratio"].append(masked_mean(diff.exp(), sub.ro.policy_mask).item())
                    if epoch == 0:
                        logs["entropy"].append(masked_mean(entropy, sub.ro.policy_mask).item())
            torch.nn.utils.clip_grad_norm_(ac.parameters(), cfg.max_grad_norm)  # checklist 32
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return logs


def diagnostics(exp: Experience, logs: dict, reward_cfg: RewardConfig, d: Dist) -> dict:
    """Per-update metrics over all processes (documented in notes/ppo.md)."""
    # 6. diagnostics: the samples (both KL estimators), the learning phase, the critic
    ro = exp.ro
    log_ratio = (exp.ref_logprobs - ro.logprobs) * ro.policy_mask  # log π_ref/π_old per token
    k3 = (log_ratio.exp() - 1 - log_ratio) * ro.policy_mask
    return {**rollout_diagnostics(ro, exp.raw_scores, exp.kl, k3, reward_cfg, d),
            **{k: sum(v) / max(1, len(v)) for k, v in logs.items()},
            "value_ev": explained_variance(exp.old_values, exp.returns, ro.value_mask)}


def select_experience(exp: Experience, idx) -> Experience:
    """Rows idx of the experience, cut to the response slots they use (`trim`)."""
    ro = trim(select(exp.ro, idx))
    R = ro.response.shape[1]
    rows = (getattr(exp, f.name)[idx] for f in dataclasses.fields(Experience)[1:])
    return Experience(ro, *(x if x.dim() == 1 else x[:, :R] for x in rows))


@torch.no_grad()
def critic_values(base: ActorCritic, ro: Rollout) -> torch.Tensor:
    """V_old (B, R) of the rollout's response slots (the critic alone)."""
    ids, mask, pos = forward_inputs(ro)
    return base.values(ids, mask, pos, response_positions(ro)).view(ro.response.shape)
