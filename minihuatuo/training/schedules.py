"""Learning-rate schedules: pure functions of the step, so there is no scheduler object to save and a
resumed run recomputes its rate from the step alone. Two shapes, named by what they do:

    warmup_then_decay_lr         SFT, world pretraining: warmup from lr/W, then cosine or linear decay to a floor
    warmup_from_zero_linear_lr   RL (PPO, RLOO, GRPO, DPO): warmup from 0, then linear decay towards 0 — the
                                 official PPO run's schedule (notes/ppo.md checklist 33)

Each reads its fields from the stage's config dataclass (any object with them will do).
"""
from __future__ import annotations

import math


def warmup_then_decay_lr(step: int, total_steps: int, cfg) -> float:
    """lr for optimizer step `step` (0-based) of `total_steps`: linear warmup over W = ceil(warmup_ratio ·
    total_steps) steps, step s at lr · (s + 1)/W (the first step already trains), then cosine
    (cfg.schedule = "cosine") or linear decay from lr to min_lr_ratio · lr at the last step.
    Reads cfg.lr, warmup_ratio, schedule, min_lr_ratio."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def warmup_from_zero_linear_lr(update: int, num_updates: int, cfg) -> float:
    """lr for update u (0-based) of U, stepped once per update (checklist 33): linear warmup over
    W = ceil(warmup_ratio · U) updates starting at 0 — so the first update trains at lr 0 when W > 0,
    as in the official run — then linear decay, reaching lr/(U − W) at the last update.
    Reads cfg.lr, warmup_ratio."""
    warmup = math.ceil(cfg.warmup_ratio * num_updates)
    if update < warmup:
        return cfg.lr * update / warmup
    return cfg.lr * (num_updates - update) / max(1, num_updates - warmup)
