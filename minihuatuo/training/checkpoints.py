"""Trainer-state checkpoints, written atomically by rank 0 (under FSDP2: the trainer state by every
rank, its own shards) and read back on every rank for an exact resume. A checkpoint directory is
what an inference engine loads as it is, plus a `trainer/` subdirectory that only a resume reads
(vLLM and transformers load every *.safetensors beside config.json, so nothing else may sit there):

    DIR/                                 one model (SFT, RLOO, GRPO, DPO): save_checkpoint / load_checkpoint
      config.json  generation_config.json  model.safetensors (or shards + index)
      tokenizer.json  tokenizer_config.json  special_tokens_map.json  chat_template.jinja   (those there are)
      trainer/
        optimizer.safetensors            AdamW state, keyed "<parameter name>.<exp_avg|exp_avg_sq|step>"
        trainer_state.json               step / update counters, param groups, the config
        model_fp32.safetensors           the fp32 weights, only when the export is not fp32
        manifest.json                    every file of DIR with its size; written last

    DIR/                                 PPO: save_actor_critic / load_actor_critic
      policy/                            the HF causal LM (the layout above without trainer/)
      trainer/
        critic.safetensors               the critic (or the shared value head), always fp32
        policy_fp32.safetensors          only when the export is not fp32
        optimizer.safetensors  trainer_state.json  manifest.json

    DIR/trainer/ of an FSDP2 run (more than one process, `fully_shard`): sharded, not gathered
        dcp/                             torch.distributed.checkpoint: model + AdamW state, each rank
          __<rank>_0.distcp              writing (and on resume reading) only its own shards;
          .metadata                      the index, written by rank 0 once every rank's shards are there
        trainer_state.json  manifest.json    as above (no optimizer.safetensors, no fp32 weights file)

Training is fp32; `save_dtype` is the dtype of the exported weights only. When it is not fp32 the
trainer directory keeps the fp32 weights, so a resume continues from exactly the weights trained.
`checkpoint_problem` checks a directory against its manifest. Directories of the old layout (the
trainer files beside the weights, no manifest) still load.

Under FSDP2 the exported weights are still gathered (one parameter at a time, onto rank 0's CPU) and
written by rank 0, but the trainer state is not: every rank saves its own shards of the fp32 weights
and the AdamW moments into trainer/dcp/, into the same temporary directory, which rank 0 renames
into place once all have written. A sharded trainer/ is loaded by DCP whatever the process count
of the resuming run (DCP reshards on load: 2 processes' shards into 1 process's full tensors, say).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from minihuatuo.engine.checkpoint import (
    SAVE_DTYPES,
    atomic_dir,
    config_from_hf,
    load_model,
    load_safetensors,
    read_json,
    write_model_files,
)
from minihuatuo.training.distributed import Dist

TRAINER = "trainer"  # the subdirectory of what only a resume needs
MANIFEST = "manifest.json"
DCP = "dcp"  # trainer/dcp/: the sharded trainer state of an FSDP2 run
DCP_METADATA = ".metadata"  # DCP's index, written last by rank 0


def save_dtype_of(name) -> torch.dtype:
    """A --save-dtype value ("float32", "bfloat16", "float16" or a torch.dtype) as a torch.dtype."""
    if isinstance(name, torch.dtype) and name in SAVE_DTYPES.values():
        return name
    if name in SAVE_DTYPES:
        return SAVE_DTYPES[name]
    raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")


def full_state(model, optimizer):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter name, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def is_sharded(model, d: Dist) -> bool:
    """Whether `model` is sharded over processes (FSDP2's `fully_shard`): its trainer state is then
    saved shard by shard (trainer/dcp/), never gathered."""
    if d.world == 1:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 exports no fully_shard either: wrap_model cannot have sharded it
        return False
    return isinstance(model, FSDPModule)


def trainer_dir(path) -> Path:
    """Where a checkpoint's trainer files are: DIR/trainer/, or DIR itself in the old layout."""
    path = Path(path)
    return path / TRAINER if (path / TRAINER).is_dir() else path


def save_checkpoint(path, model, optimizer, state: dict, cfg, model_dir, d: Dist, save_dtype=torch.float32):
    """The HF-layout model in `save_dtype` + trainer/ (see the module docstring), atomically, by rank 0
    (a sharded model's trainer state by every rank: `_save_sharded`). A collective: every rank calls it."""
    save_dtype = save_dtype_of(save_dtype)
    sharded = is_sharded(model, d)  # then trainer/dcp/ holds the fp32 weights

    def weights(tmp, base, model_sd):
        write_model_files(base, tmp, copy_files_from=model_dir, state=model_sd, dtype=save_dtype)
        if save_dtype != torch.float32 and not sharded:
            save_file(_single_copy(base, model_sd), str(tmp / TRAINER / "model_fp32.safetensors"))

    _save(path, model, optimizer, state, cfg, d, weights)


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore model and optimizer from `save_checkpoint`'s files (either layout); return the trainer state."""
    path = Path(path)
    if (trainer_dir(path) / DCP).is_dir():
        return _load_sharded(path, model, optimizer)
    return _load(path, model, optimizer, _fp32_weights(path, trainer_dir(path) / "model_fp32.safetensors"))


def save_actor_critic(path, ac, optimizer, state: dict, cfg, policy_dir, d: Dist, save_dtype=torch.float32):
    """PPO's pair (`ActorCritic`: .policy, .critic or a shared .policy.score head): policy/ (HF causal
    LM in `save_dtype`, what stage 2 produces) and, for resuming, trainer/critic.safetensors (the
    critic, or the shared value head) + optimizer + state. The official run saves only the policy
    (notes/ppo.md checklist 36); we keep the critic so that a resume is exact."""
    save_dtype = save_dtype_of(save_dtype)

    def in_policy(key: str) -> bool:
        return key.startswith("policy.") and not key.startswith("policy.score.")

    def weights(tmp, base, model_sd):
        policy = base.policy
        with_head = policy.cfg
        policy.cfg = replace(policy.cfg, num_labels=0)  # a shared value head is not part of the policy checkpoint
        policy_sd = {k[len("policy."):]: v for k, v in model_sd.items() if in_policy(k)}
        try:
            (tmp / "policy").mkdir()
            write_model_files(policy, tmp / "policy", copy_files_from=policy_dir, state=policy_sd, dtype=save_dtype)
        finally:
            policy.cfg = with_head
        save_file({k: v.contiguous() for k, v in model_sd.items() if not in_policy(k)},
                  str(tmp / TRAINER / "critic.safetensors"))
        if save_dtype != torch.float32:
            save_file(_single_copy(policy, policy_sd), str(tmp / TRAINER / "policy_fp32.safetensors"))

    _save(path, ac, optimizer, state, cfg, d, weights)


def load_actor_critic(path, ac, optimizer) -> dict:
    """Restore PPO's pair and optimizer from `save_actor_critic`'s files (either layout); return the
    trainer state."""
    path = Path(path)
    t = trainer_dir(path)
    if (t / DCP).is_dir():  # the critic is in the shards with the policy
        return _load_sharded(path, ac, optimizer)
    weights = {f"policy.{k}": v for k, v in _fp32_weights(path / "policy", t / "policy_fp32.safetensors").items()}
    weights.update(load_safetensors(t / "critic.safetensors"))
    return _load(path, ac, optimizer, weights)


def _single_copy(model, state: dict) -> dict:
    """The fp32 state dict to keep beside an export in another dtype: tied weights stored once."""
    tied = model.cfg.tie_word_embeddings
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def _fp32_weights(model_dir: Path, fp32_file: Path) -> dict:
    """The trained fp32 weights: `fp32_file` when the export was in another dtype, else the exported
    weights themselves (fp32)."""
    if not fp32_file.exists():
        return load_model(model_dir, dtype=torch.float32).state_dict()
    weights = load_safetensors(fp32_file)
    cfg = config_from_hf(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    if cfg.tie_word_embeddings and cfg.lm_head and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def write_manifest(path: Path) -> None:
    """DIR/trainer/manifest.json: every other file of DIR (relative path → bytes). Written last, so
    its presence says every file was complete; its sizes catch a file cut short afterwards."""
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p != path / TRAINER / MANIFEST}
    with open(path / TRAINER / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)


def checkpoint_problem(path) -> str | None:
    """None when checkpoint directory `path` is complete; else what is wrong, in a few words. A
    directory of the old layout (no trainer/, no manifest) counts as complete when its trainer state is there."""
    path = Path(path)
    if not (path / TRAINER).is_dir():
        if (path / "trainer_state.json").is_file():
            return None  # the old layout: nothing to check it against
        return f"no {TRAINER}/ directory"
    manifest = path / TRAINER / MANIFEST
    if not manifest.is_file():
        return f"{TRAINER}/{MANIFEST} is missing (it is written last: the checkpoint was not finished)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(str(k), int(v)) for k, v in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{TRAINER}/{MANIFEST} is unreadable"
    dcp_dir = path / TRAINER / DCP
    if dcp_dir.is_dir() and not (dcp_dir / DCP_METADATA).is_file():
        # rank 0 writes the index only after every rank's shards: without it the shards are not a checkpoint
        return f"{TRAINER}/{DCP}/{DCP_METADATA} is missing (the sharded trainer state was not finished)"
    for name, size in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def _save(path, model, optimizer, state: dict, cfg, d: Dist, write_weights):
    """The shared part: full state dicts (a collective), then on rank 0, atomically, the weights
    (`write_weights(dir, unwrapped model, model state dict)`), trainer/optimizer.safetensors,
    trainer/trainer_state.json and, last, trainer/manifest.json. A sharded model: `_save_sharded`."""
    if is_sharded(model, d):
        return _save_sharded(path, model, optimizer, state, cfg, d, write_weights)
    model_sd, opt_sd = full_state(model, optimizer)  # collective: every rank takes part
    if d.main:
        base = model.module if hasattr(model, "module") else model
        tensors = {f"{name}.{k}": v for name, s in opt_sd["state"].items() for k, v in s.items()}
        with atomic_dir(path) as tmp:
            (tmp / TRAINER).mkdir()
            write_weights(tmp, base, model_sd)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TRAINER / "optimizer.safetensors"))
            groups = [{k: v for k, v in g.items()} for g in opt_sd["param_groups"]]
            with open(tmp / TRAINER / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump({**state, "param_groups": groups, "config": dataclasses.asdict(cfg)}, f, indent=2)
            write_manifest(tmp)
    if d.world > 1:
        dist.barrier()


def _load(path, model, optimizer, weights: dict) -> dict:
    """Set the model's full state dict `weights` and the optimizer's from trainer/optimizer.safetensors
    and the param groups of trainer/trainer_state.json (beside the weights in the old layout); return
    that trainer state. Every file is read before anything is set."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    t = trainer_dir(path)
    state = read_json(t / "trainer_state.json")
    opt_state: dict = {}
    for key, v in load_safetensors(t / "optimizer.safetensors").items():
        name, k = key.rsplit(".", 1)
        opt_state.setdefault(name, {})[k] = v
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": state["param_groups"]},
                             options=opts)
    return state



def _save_sharded(path, model, optimizer, state: dict, cfg, d: Dist, write_weights):
    """`_save` for an FSDP2 model (a collective): every rank writes its own shards of the model and
    optimizer state into trainer/dcp/ of one temporary directory (rank 0 makes it and tells the
    others its name); rank 0 adds the exported weights (gathered: `write_weights` as in `_save`),
    trainer_state.json and the manifest, and renames the directory into place after every rank's
    shards are written (dcp.save returns on rank 0 only then); the barrier keeps the other ranks
    from going on before the checkpoint is in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    # the export: full tensors on rank 0 only (cpu_offload), gathered one parameter at a time
    export_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model_sd, opt_sd = get_state_dict(model, optimizer)  # this rank's shards (DTensors), nothing gathered
    with contextlib.ExitStack() as stack:
        box = [None]
        if d.main:
            tmp = stack.enter_context(atomic_dir(path))
            (tmp / TRAINER).mkdir()
            box = [str(tmp)]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=tmp / TRAINER / DCP)
        if d.main:
            write_weights(tmp, model, export_sd)
            groups = [{k: v for k, v in g.items()} for g in opt_sd["param_groups"]]
            with open(tmp / TRAINER / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump({**state, "param_groups": groups, "config": dataclasses.asdict(cfg),
                           "sharded": {"format": "torch.distributed.checkpoint", "world": d.world}}, f, indent=2)
            write_manifest(tmp)
    dist.barrier()


def _load_sharded(path, model, optimizer) -> dict:
    """Restore model and optimizer from trainer/dcp/ (`_save_sharded`): each rank reads the parts of
    the shards its own parameters need, into state dicts shaped like its own (sharded under FSDP2,
    full tensors in one process or under DDP: DCP reshards). Return trainer/trainer_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    t = trainer_dir(path)
    state = read_json(t / "trainer_state.json")
    # the optimizer's state must exist to be loaded into: get_state_dict makes it (a zero-lr step)
    model_sd, opt_sd = get_state_dict(model, optimizer)
    both = {"model": model_sd, "optimizer": opt_sd}
    with warnings.catch_warnings():  # one process without a process group is what we mean: no warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(both, checkpoint_id=t / DCP)  # in place into these tensors; param groups replaced
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    return state
