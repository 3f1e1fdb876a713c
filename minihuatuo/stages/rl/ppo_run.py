"""A PPO run around ppo.py's update: the models (policy, frozen reference, critic), DDP and the
optimizer, then `update` once per update with exact resume, metrics.jsonl and checkpoints
(training/loop.py; PPO's policy/ + trainer/ checkpoints: training/checkpoints.py `save_actor_critic`;
the output directory: training/run_dir.py).

    train: build_models → AdamW → for u in updates: ppo.update(u) → metrics line → checkpoint
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from minihuatuo.engine.checkpoint import CheckpointError, load_model
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.reward import RewardConfig
from minihuatuo.stages.rl.ppo import ActorCritic, PPOConfig, update
from minihuatuo.stages.rl.rollout import adamw, policy_and_reference, read_rl_problems, update_postfix
from minihuatuo.training.checkpoints import load_actor_critic, save_actor_critic, save_dtype_of
from minihuatuo.training.distributed import init_distributed, wrap_model
from minihuatuo.training.loop import run_updates
from minihuatuo.training.run_dir import RunDir

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
    policy, ref = policy_and_reference(policy_dir, device)
    if cfg.value_head == "shared":
        add_value_head(policy, cfg.seed)
        return ActorCritic(policy), ref
    critic = load_critic(value_dir or policy_dir, cfg.seed, device)
    if value_dir is not None:
        check_critic_vocabulary(policy_dir, value_dir, policy, critic)
    return ActorCritic(policy, critic), ref


# ----------------------------------------------------------------------------- the run

def train(cfg: PPOConfig, policy_dir, data_path, out_dir, verifier, value_dir=None, resume=False,
          reward_cfg: RewardConfig = RewardConfig(), max_updates: int = 0, overwrite: bool = False,
          save_dtype="float32") -> list[dict]:
    """out_dir/checkpoint-U/ and out_dir/final/: policy/ (HF layout, weights in `save_dtype`) +
    trainer/ (critic, optimizer, trainer_state.json; training/checkpoints.py); metrics.jsonl, one line
    per update. A directory that already holds a run needs `resume` or `overwrite`
    (training/run_dir.py). Returns the metrics of each update run."""
    d = init_distributed()
    save_dtype = save_dtype_of(save_dtype)
    run = RunDir("ppo", out_dir, "update", d, resume=resume, overwrite=overwrite)
    tokenizer = Tokenizer.from_dir(policy_dir)
    items = read_rl_problems(data_path, cfg.batch_size, cfg.drop_last)
    ac, ref = build_models(cfg, policy_dir, value_dir, d.device)
    for model in (ac.policy, ac.critic, ref):
        if model is not None:
            model.use_kernels = cfg.kernels  # RMSNorm / SwiGLU / RoPE kernels (the LM head: ActorCritic)
    ac = wrap_model(ac, "ddp", d)
    optimizer = adamw(ac, cfg)  # one optimizer over policy and critic (checklist 31)
    num_updates = math.ceil(cfg.total_episodes / cfg.batch_size)
    return run_updates(
        run, num_updates, max_updates=max_updates, save_every=cfg.save_every,
        update=lambda u: update(u, num_updates, cfg, ac, ref, tokenizer, items, verifier, optimizer, d, reward_cfg),
        save=lambda path, state: save_actor_critic(path, ac, optimizer, state, cfg, policy_dir, d, save_dtype),
        load=lambda path: load_actor_critic(path, ac, optimizer), postfix=update_postfix)
