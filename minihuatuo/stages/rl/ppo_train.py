"""The PPO loop (paper §3.2, Algorithm 1 stage two): models, data stream, one `update`, metrics,
checkpoints and exact resume, the `minihuatuo ppo` command. The math is in ppo.py; the rollout and
log-prob functions shared with the other RL variants are in rl.py.

    for u in updates:  update(u): rollout → rewards → GAE → epochs × minibatches → step → log
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minihuatuo.engine.checkpoint import CheckpointError, atomic_dir, load_model, read_json, write_model_files
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.config import add_config_args, build_config
from minihuatuo.services.formats import read_problems
from minihuatuo.services.reward import RewardConfig, rewards
from minihuatuo.stages.rl.ppo import (
    PRESETS,
    ActorCritic,
    PPOConfig,
    explained_variance,
    gae,
    learning_rate,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from minihuatuo.stages.rl.rollout import (
    Rollout,
    forward_inputs,
    response_logprobs,
    response_positions,
    rollout,
    stop_ids,
)
from minihuatuo.training.checkpoints import full_state
from minihuatuo.training.distributed import Dist, all_sum, init_distributed, no_grad_sync

# ----------------------------------------------------------------------------- models

def add_value_head(model, seed: int):
    """Turn a causal LM into a critic: drop the LM head, add a fresh bias-free C → 1 `score` head with
    N(0, 0.02) weights (the official value model: a 3B backbone with a new head; checklist 2)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, model.cfg.hidden_size, generator=g) * model.cfg.initializer_range
    model.score = torch.nn.Linear(model.cfg.hidden_size, 1, bias=False).to(model.model.embed_tokens.weight)
    with torch.no_grad():
        model.score.weight.copy_(w)
    return model


def load_critic(path, seed: int, device):
    model = load_model(path, dtype=torch.float32, device=device)
    if model.score is not None and model.cfg.num_labels == 1:
        return model  # already a value model (e.g. a checkpoint saved by this loop)
    model.lm_head = None
    model.cfg = replace(model.cfg, lm_head=False, num_labels=1, tie_word_embeddings=False)
    return add_value_head(model, seed)


def check_critic_vocabulary(policy_dir, value_dir, policy, critic) -> None:
    """The critic reads the policy's token ids (checklist 2), so both must share one vocabulary: the
    same token → id map when the critic directory has a tokenizer, and an embedding table that covers
    every id the policy can emit. (Embedding tables may be padded differently for one tokenizer, as
    in Qwen2.5 0.5B vs 7B, so the table sizes alone are not compared when both tokenizers are there.)
    Another vocabulary would be accepted by the forward pass and silently train a critic on noise."""
    from tokenizers import Tokenizer as RawTokenizer

    files = Path(policy_dir) / "tokenizer.json", Path(value_dir) / "tokenizer.json"
    if files[1].is_file() and files[0].is_file():
        vocabs = [RawTokenizer.from_file(str(f)).get_vocab(with_added_tokens=True) for f in files]
        if vocabs[0] != vocabs[1]:
            diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()), key=lambda kv: kv[1])[0]
            raise CheckpointError(
                f"--value-model {value_dir}: its tokenizer.json has another vocabulary than the policy's "
                f"({policy_dir}): {len(vocabs[1])} vs {len(vocabs[0])} tokens, first difference at token "
                f"{diff[0]!r} (id {diff[1]}); the critic must read the policy's token ids")
        needed = max(vocabs[0].values()) + 1
    else:
        needed = policy.cfg.vocab_size
    if critic.cfg.vocab_size < needed or (not files[1].is_file() and critic.cfg.vocab_size != needed):
        raise CheckpointError(
            f"--value-model {value_dir}: its embedding table has {critic.cfg.vocab_size} rows but the policy "
            f"({policy_dir}) uses {needed} token ids; the critic must read the policy's token ids")


def build_models(cfg: PPOConfig, policy_dir, value_dir, device):
    """Policy and frozen reference from the same weights (checklist 1); the critic."""
    policy = load_model(policy_dir, dtype=torch.float32, device=device)
    ref = load_model(policy_dir, dtype=torch.float32, device=device).eval().requires_grad_(False)
    if cfg.value_head == "shared":
        add_value_head(policy, cfg.seed)
        return ActorCritic(policy), ref
    critic = load_critic(value_dir or policy_dir, cfg.seed, device)
    if value_dir is not None:
        check_critic_vocabulary(policy_dir, value_dir, policy, critic)
    return ActorCritic(policy, critic), ref


# ----------------------------------------------------------------------------- data stream

def _epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def update_prompts(n_items: int, update: int, batch_size: int, seed: int, drop_last: bool = True) -> list[int]:
    """Item indices of update u's global batch, a pure function of (seed, u), so a resumed run sees
    the same prompts. Each data epoch is a seeded permutation of the items.

    drop_last=True (official: TRL's loader is a shuffled DataLoader with drop_last=True): an epoch
    gives ⌊n / batch⌋ batches and its last n mod batch items wait for the next permutation, so no
    batch holds a prompt twice. drop_last=False: one continuous stream of permutations, so a batch
    that straddles two epochs can hold a prompt twice (the `tiny-world` preset's order, which the
    demo's numbers were measured with)."""
    if drop_last:
        per_epoch = n_items // batch_size
        if per_epoch == 0:
            raise ValueError(f"{n_items} problems cannot fill one batch of {batch_size} prompts with drop_last; "
                             f"use a smaller batch or drop_last false (a batch then repeats prompts)")
        epoch, b = divmod(update, per_epoch)
        return _epoch_order(n_items, seed, epoch)[b * batch_size:(b + 1) * batch_size]
    out, pos = [], update * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_items)
        take = _epoch_order(n_items, seed, epoch)[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def encode_prompt(tokenizer, x: str, max_prompt_length: int) -> list[int]:
    """A single user turn through the chat template, cut to its FIRST max_prompt_length tokens (checklist 4)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": x}])[:max_prompt_length]


# ----------------------------------------------------------------------------- one update

def select(ro: Rollout, idx) -> Rollout:
    return Rollout(*(v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
                     for v in (getattr(ro, f.name) for f in dataclasses.fields(Rollout))))


def in_chunks(n: int, size: int):
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def by_length(ro: Rollout, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """idx cut into chunks of `size` rows of similar response length (shortest first), so that each
    chunk can be cut to its own longest response (`trim`)."""
    return list(idx[torch.argsort(ro.last[idx], stable=True)].split(size))


def trim(ro: Rollout) -> Rollout:
    """The rollout without the response slots no row uses (beyond every row's L + 1, the value
    mask's end): everything there is masked, so the numbers are unchanged and a forward over replies
    of 150-250 tokens no longer pays for the 384 slots of the longest one in the batch."""
    R = min(ro.response.shape[1], int(ro.last.max()) + 2)
    return Rollout(*(v[:, :R] if isinstance(v, torch.Tensor) and v.dim() == 2 and name not in ("query", "query_mask")
                     else v for name, v in ((f.name, getattr(ro, f.name)) for f in dataclasses.fields(Rollout))))


@torch.no_grad()
def score_rollout(cfg: PPOConfig, ro: Rollout, references, verifier, reward_cfg: RewardConfig):
    scores = torch.tensor(rewards(ro.texts, references, verifier, reward_cfg), device=ro.query.device)
    penalty = torch.where(ro.has_stop, 0.0, cfg.missing_stop_penalty)
    return scores - penalty, scores


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


def select_experience(exp: Experience, idx) -> Experience:
    """Rows idx of the experience, cut to the response slots they use (`trim`)."""
    ro = trim(select(exp.ro, idx))
    R = ro.response.shape[1]
    rows = (getattr(exp, f.name)[idx] for f in dataclasses.fields(Experience)[1:])
    return Experience(ro, *(x if x.dim() == 1 else x[:, :R] for x in rows))


@torch.no_grad()
def collect(u: int, cfg: PPOConfig, ac, ref, tokenizer, items, verifier, d: Dist, reward_cfg: RewardConfig,
            timings: dict) -> Experience:
    """Rollout → log π_ref, V_old → scores → per-token rewards → GAE → returns → whitened advantages."""
    t0 = time.perf_counter()
    base = ac.module if hasattr(ac, "module") else ac
    mine = update_prompts(len(items), u, cfg.batch_size, cfg.seed, cfg.drop_last)[d.rank::d.world]
    prompts = [encode_prompt(tokenizer, items[i].x, cfg.max_prompt_length) for i in mine]
    references = [items[i].y_star for i in mine]
    ro = rollout(base.policy, tokenizer, prompts, cfg.temperature, cfg.response_length, stop_ids(tokenizer, cfg.stop_tokens),
                 cfg.early_stop, seed=cfg.seed * 1_000_003 + u * 1009 + d.rank)
    t1 = time.perf_counter()
    ref_lp, old_values = torch.zeros_like(ro.logprobs), torch.zeros_like(ro.logprobs)
    for c in by_length(ro, torch.arange(len(prompts)), cfg.micro_batch_size):
        sub = trim(select(ro, c))
        R = sub.response.shape[1]
        ref_lp[c, :R] = response_logprobs(ref, sub, cfg.temperature)
        old_values[c, :R] = _values(base, sub)
    ref_lp, old_values = ref_lp * ro.policy_mask, old_values * ro.value_mask  # checklist 22
    t2 = time.perf_counter()
    scores, raw_scores = score_rollout(cfg, ro, references, verifier, reward_cfg)
    t3 = time.perf_counter()
    # old log-probs come from the sampler and are never recomputed (checklist 6, 35)
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


def update(u: int, num_updates: int, cfg: PPOConfig, ac, ref, tokenizer, items, verifier, optimizer,
           d: Dist, reward_cfg: RewardConfig) -> dict:
    """One PPO update: collect experience with the current policy, then learn from it."""
    lr = learning_rate(u, num_updates, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    timings: dict = {}
    exp = collect(u, cfg, ac, ref, tokenizer, items, verifier, d, reward_cfg, timings)
    t = time.perf_counter()
    logs = learn(u, cfg, ac, optimizer, exp)
    timings["time_optimize"] = time.perf_counter() - t
    return {"update": u + 1, "lr": lr, **diagnostics(exp, logs, reward_cfg, d), **timings}


def diagnostics(exp: Experience, logs: dict, reward_cfg: RewardConfig, d: Dist) -> dict:
    """Per-update metrics over all processes (documented in notes/ppo.md)."""
    ro = exp.ro
    log_ratio = (exp.ref_logprobs - ro.logprobs) * ro.policy_mask  # log π_ref/π_old per token
    k3 = (log_ratio.exp() - 1 - log_ratio) * ro.policy_mask
    local = torch.tensor([exp.raw_scores.sum(), (exp.raw_scores == reward_cfg.correct).sum(),
                          (exp.raw_scores == reward_cfg.no_format).sum(), exp.kl.sum(), k3.sum(),
                          (ro.last + 1).sum(), ro.has_stop.sum(), len(ro.texts)], dtype=torch.float64)
    g = all_sum(local, d)
    n = g[7].item()
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"score": g[0].item() / n, "verified": g[1].item() / n, "format_fail": g[2].item() / n,
            "kl_k1": g[3].item() / n, "kl_k3": g[4].item() / n, "response_len": g[5].item() / n,
            "stopped": g[6].item() / n, **{k: mean(v) for k, v in logs.items()},
            "value_ev": explained_variance(exp.old_values, exp.returns, ro.value_mask)}


@torch.no_grad()
def _values(base: ActorCritic, ro: Rollout) -> torch.Tensor:
    ids, mask, pos = forward_inputs(ro)
    return base.values(ids, mask, pos, response_positions(ro)).view(ro.response.shape)


# ----------------------------------------------------------------------------- checkpoints

def save(path, ac, optimizer, state: dict, cfg: PPOConfig, policy_dir, d: Dist):
    """policy/ (HF causal LM, what stage 2 produces) and, for resuming, critic/ + optimizer + state.
    The official run saves only the policy (checklist 36); we keep the critic so a resume is exact."""
    model_sd, opt_sd = full_state(ac, optimizer)
    if d.main:
        base = ac.module if hasattr(ac, "module") else ac
        with atomic_dir(path) as tmp:
            policy_sd = {k[len("policy."):]: v for k, v in model_sd.items()
                         if k.startswith("policy.") and not k.startswith("policy.score.")}
            pol = base.policy
            shared_cfg = pol.cfg
            pol.cfg = replace(pol.cfg, num_labels=0)  # a shared value head is not part of the policy checkpoint
            (tmp / "policy").mkdir()
            write_model_files(pol, tmp / "policy", copy_files_from=policy_dir, state=policy_sd)
            pol.cfg = shared_cfg
            critic_sd = {k: v for k, v in model_sd.items() if not k.startswith("policy.")
                         or k.startswith("policy.score.")}
            save_file({k: v.contiguous() for k, v in critic_sd.items()}, str(tmp / "critic.safetensors"))
            tensors = {f"{name}.{k}": v for name, s in opt_sd["state"].items() for k, v in s.items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
            with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump({**state, "param_groups": opt_sd["param_groups"], "config": dataclasses.asdict(cfg)}, f,
                          indent=2)
    if d.world > 1:
        dist.barrier()


def load(path, ac, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = read_json(path / "trainer_state.json")
    weights = {f"policy.{k}": v for k, v in load_model(path / "policy", dtype=torch.float32).state_dict().items()}
    weights.update(load_file(path / "critic.safetensors"))
    opt_state: dict = {}
    for key, v in load_file(path / "optimizer.safetensors").items():
        name, k = key.rsplit(".", 1)
        opt_state.setdefault(name, {})[k] = v
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(ac, weights, options=opts)
    set_optimizer_state_dict(ac, optimizer, {"state": opt_state, "param_groups": state["param_groups"]},
                             options=opts)
    return state


# ----------------------------------------------------------------------------- the run

def train(cfg: PPOConfig, policy_dir, data_path, out_dir, verifier, value_dir=None, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), max_updates: int = 0) -> list[dict]:
    d = init_distributed()
    out = Path(out_dir)
    tokenizer = Tokenizer.from_dir(policy_dir)
    items = read_problems(data_path)
    ac, ref = build_models(cfg, policy_dir, value_dir, d.device)
    for model in (ac.policy, ac.critic, ref):
        if model is not None:
            model.use_kernels = cfg.kernels  # RMSNorm / SwiGLU / RoPE kernels (the LM head: ActorCritic)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ac = DistributedDataParallel(ac, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(ac.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                  weight_decay=0.0)
    num_updates = math.ceil(cfg.total_episodes / cfg.batch_size)
    start = 0
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if resume else []
    if ckpts:
        start = load(ckpts[-1], ac, optimizer)["update"]
    history = []
    metrics = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    stop_at = min(num_updates, max_updates) if max_updates else num_updates
    bar = tqdm(range(start, stop_at), desc="ppo", disable=not d.main, file=sys.stderr)
    for u in bar:
        m = update(u, num_updates, cfg, ac, ref, tokenizer, items, verifier, optimizer, d, reward_cfg)
        history.append(m)
        if d.main:
            bar.set_postfix(score=f"{m['score']:.3f}", kl=f"{m['kl_k1']:.3f}", len=f"{m['response_len']:.0f}")
            metrics.write(json.dumps(m) + "\n")
            metrics.flush()
        if cfg.save_every and (u + 1) % cfg.save_every == 0 and u + 1 < num_updates:
            save(out / f"checkpoint-{u + 1}", ac, optimizer, {"update": u + 1}, cfg, policy_dir, d)
    save(out / "final", ac, optimizer, {"update": stop_at}, cfg, policy_dir, d)
    if d.main:
        metrics.close()
    return history


def add_verifier_args(p) -> None:
    """The reward's verifier, shared by the ppo, rloo, grpo and dpo commands."""
    p.add_argument("--verifier", default="rule", choices=["exact", "rule", "classifier"])
    p.add_argument("--verifier-model", default=None, help="classifier verifier checkpoint")
    p.add_argument("--verifier-threshold", type=float, default=0.4)
    p.add_argument("--verifier-device", default="cpu")
    p.add_argument("--classifier-template", metavar="FILE", default=None,
                   help="classifier: input template with {response}, {reference} and {eos}; the released "
                        "verifier needs its own (notes/verifier.md), the built-in one is our wording")
    p.add_argument("--aliases", action="append", default=[], help="extra alias file for the rule verifier")


def verifier_from_args(args):
    from minihuatuo.services.reward import build_verifier

    vargs = SimpleNamespace(aliases=args.aliases, model=args.verifier_model, threshold=args.verifier_threshold,
                            classifier_template=args.classifier_template, device=args.verifier_device)
    return build_verifier(args.verifier, vargs)


def cmd_ppo(args) -> int:
    cfg = build_config(PPOConfig, PRESETS, args.preset, args.config, args)
    verifier = verifier_from_args(args)
    history = train(cfg, args.policy, args.data, args.out, verifier, value_dir=args.value_model,
                    resume=args.resume, max_updates=args.max_updates)
    if history and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps({"out": str(Path(args.out) / "final"), **history[-1]}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("ppo", help="stage-2 PPO with verifier rewards (also under torchrun)")
    p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint")
    p.add_argument("--data", required=True, help="verifiable problems (Open-ended Verifiable Question, Ground-True Answer)")
    p.add_argument("--out", required=True, help="output directory: checkpoint-U/, final/policy, metrics.jsonl")
    p.add_argument("--value-model", default=None, help="critic start: a causal LM (new value head) or a 1-label "
                                                        "classifier checkpoint; default: the policy's weights")
    add_verifier_args(p)
    p.add_argument("--preset", default="official", choices=list(PRESETS))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-updates", type=int, default=0, help="stop after this many updates (0 = all)")
    add_config_args(p, PPOConfig)
    p.set_defaults(func=cmd_ppo)
