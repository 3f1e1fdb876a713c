"""Trainer-state checkpoints: an HF-layout model directory plus optimizer.safetensors and
trainer_state.json, written atomically by rank 0 and read back on every rank for an exact resume."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from minihuatuo.engine.checkpoint import atomic_dir, load_model, read_json, write_model_files
from minihuatuo.training.distributed import Dist


def full_state(model, optimizer):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter name, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(path, model, optimizer, state: dict, cfg, model_dir, d: Dist):
    """HF-layout model + optimizer.safetensors + trainer_state.json, written atomically by rank 0."""
    model_sd, opt_sd = full_state(model, optimizer)  # collective: every rank takes part
    if d.main:
        base = model.module if hasattr(model, "module") else model
        tensors = {f"{name}.{k}": v for name, s in opt_sd["state"].items() for k, v in s.items()}
        with atomic_dir(path) as tmp:
            write_model_files(base, tmp, copy_files_from=model_dir, state=model_sd)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
            groups = [{k: v for k, v in g.items()} for g in opt_sd["param_groups"]]
            with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump({**state, "param_groups": groups, "config": dataclasses.asdict(cfg)}, f, indent=2)
    if d.world > 1:
        dist.barrier()


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore model and optimizer from `save_checkpoint`'s files; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = read_json(path / "trainer_state.json")
    weights = load_model(path, dtype=torch.float32).state_dict()
    flat = load_file(path / "optimizer.safetensors")
    opt_state: dict = {}
    for key, v in flat.items():
        name, k = key.rsplit(".", 1)
        opt_state.setdefault(name, {})[k] = v
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": state["param_groups"]},
                             options=opts)
    return state


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


