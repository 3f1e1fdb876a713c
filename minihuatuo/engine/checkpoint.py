"""Hugging Face-layout checkpoints: config.json + model.safetensors (or shards with
model.safetensors.index.json), read and written so that transformers, vLLM and sglang load what we
write and we load what they publish.

Safety: weights are read only through safetensors, which holds raw tensors and cannot run code. A
directory with only pickle-based files (pytorch_model.bin, *.pt) is refused, never unpickled, and
config.json is read as plain JSON (no `auto_map` / remote code is ever followed).

Our parameter names equal HF's (see model.py), so loading is a name check plus a shape check; every
missing, unexpected or wrongly shaped tensor is collected and reported in one error.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minihuatuo.engine.model import ModelConfig, Transformer

# architecture in config.json -> (family, has LM head, has score head)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True, False),
    "LlamaForSequenceClassification": ("llama", False, True),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen2ForSequenceClassification": ("qwen2", False, True),
}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}
# Tensors some exporters write that carry nothing we need (RoPE tables are recomputed from config).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the --dtype choices of the commands that load a model: "auto" keeps the stored dtype
DTYPES = {**_DTYPES, "auto": None}
# the --save-dtype choices of the trainers (the dtype of the exported weights)
SAVE_DTYPES = dict(_DTYPES)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the directory and every problem."""


# ----------------------------------------------------------------------------- config.json

def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).
    A field of the wrong type or out of its range (ModelConfig's rules) is a CheckpointError naming `source`."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"{source}: field 'architectures' is {archs!r}; supported: {', '.join(ARCHITECTURES)}")
    family, lm_head, score = ARCHITECTURES[arch]
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"field 'hidden_act' is {hf['hidden_act']!r}, only 'silu' is supported")
    if hf.get("use_sliding_window"):
        problems.append("field 'use_sliding_window' is true: sliding-window attention is not implemented")
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] not in ("default", "llama3"):
            problems.append(f"field 'rope_scaling' has rope_type {scaling['rope_type']!r}; only llama3 is supported")
        if scaling["rope_type"] == "default":
            scaling = None
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    problems += [f"missing field {k!r}" for k in missing]
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    if "id2label" in hf and not isinstance(hf["id2label"], dict):
        raise CheckpointError(f"{source}: field 'id2label': expected an object, got {hf['id2label']!r}")
    num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
    attention_bias = bool(hf.get("attention_bias", False))
    extra = {k: hf[k] for k in ("id2label", "label2id", "problem_type") if k in hf}
    if isinstance(rope_theta, int) and not isinstance(rope_theta, bool):
        rope_theta = float(rope_theta)  # anything else: ModelConfig names it
    try:
        return ModelConfig(
            family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0, rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=family == "qwen2" or attention_bias, o_bias=family == "llama" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            lm_head=lm_head, num_labels=num_labels if score else 0,
            initializer_range=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"), extra=extra)
    except ValueError as e:  # ModelConfig's rules: "field 'num_hidden_layers': expected an integer >= 1, got 'four'"
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for `cfg`. RoPE is written in both the 4.x and the 5.x spelling so that either
    transformers generation (and vLLM / sglang, which read the 4.x fields) reads it."""
    if cfg.family == "qwen2" and cfg.o_bias:
        raise CheckpointError("Qwen2 has no bias on o_proj; such a model cannot be saved as Qwen2")
    if cfg.family == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError("Llama's attention_bias covers q, k, v and o together; qkv_bias must equal o_bias")
    if cfg.lm_head and cfg.num_labels:
        raise CheckpointError("a model with both an LM head and a score head has no HF architecture; "
                              "save the score head separately")
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[cfg.family]
    arch = prefix + ("ForCausalLM" if cfg.lm_head else "ForSequenceClassification")
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    hf = {
        "architectures": [arch], "model_type": _MODEL_TYPE[cfg.family], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True,
    }
    if cfg.family == "llama":
        hf.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if cfg.num_labels:
        id2label = cfg.extra.get("id2label") or {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf.update(id2label=id2label, label2id=cfg.extra.get("label2id") or {v: int(k) for k, v in id2label.items()},
                  num_labels=cfg.num_labels)
        if "problem_type" in cfg.extra:
            hf["problem_type"] = cfg.extra["problem_type"]
    return hf


# ----------------------------------------------------------------------------- weights

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards named by the index, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' is missing or not an object")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: names shard files that do not exist: {', '.join(absent)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise CheckpointError(f"{path}: has only pickle-based weights ({', '.join(pickles)}). They are not loaded "
                              "because unpickling can execute code; convert them to safetensors first.")
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file")


def load_safetensors(f, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file. A file cut short by a crash or a full disk (its header
    promises more bytes than it has), an empty one or one that is not safetensors at all is a
    CheckpointError naming the file, not the library's bare message."""
    f = Path(f)
    try:
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            return {name: st.get_tensor(name) for name in st.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises SafetensorError (and OSError for unreadable files)
        size = f.stat().st_size if f.exists() else 0
        raise CheckpointError(f"{f}: not a complete safetensors file ({size} bytes; {e}); it was probably cut "
                              f"short while being written: use another checkpoint or write it again") from None


def read_state_dict(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    tensors = {}
    for f in weight_files(path):
        tensors.update(load_safetensors(f, device))
    return tensors


def load_model(path, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """Load a causal-LM or sequence-classification checkpoint directory.

    dtype: None keeps the dtype the weights were stored in; otherwise they are converted.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json")
    cfg = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    state = read_state_dict(path, device)
    with torch.device("meta"):
        model = Transformer(cfg)  # no memory: real tensors are assigned below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some exporters write the tied copy as well
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith(_IGNORABLE_SUFFIXES))
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k]]
    if wrong:
        problems.append("wrongly shaped tensors: " + ", ".join(wrong))
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    target_dtype = dtype or next(iter(state.values())).dtype
    # strict=False only because a tied lm_head.weight is not in `expected`; names were checked above.
    model.load_state_dict({k: state[k].to(target_dtype) for k in expected}, assign=True, strict=False)
    model.tie_weights()
    return model


def save_model(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, copy_files_from=None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF checkpoint directory, atomically (see `atomic_dir`).
    copy_files_from: a directory whose tokenizer / chat-template / generation-config files are copied alongside.
    dtype: the dtype of the written weights (and of config.json's torch_dtype); None keeps the model's."""
    if any(name.endswith(".qweight") for name, _ in model.named_buffers()):
        # int8 projections (engine/quantize.py) are a decoding format with no HF layout to write
        raise ValueError(f"{path}: this model has int8-quantised projections (quantize_model_int8); "
                         "save the model before quantising it")
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, max_shard_bytes, copy_files_from, dtype=dtype)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory of `path`; on success it is renamed to `path`, so a crash
    never leaves a half-written directory there (on failure it is deleted, and the old `path`, if
    any, is untouched). A directory cannot be renamed over a non-empty one, so an existing `path` is
    first renamed aside and deleted only after the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_model_files(model: Transformer, out: Path, max_shard_bytes: int = 5 * 2**30, copy_files_from=None,
                      state: dict | None = None, dtype: torch.dtype | None = None):
    """config.json + model.safetensors (or shards + index) into the existing directory `out`.
    state: the full state dict to write instead of model.state_dict() (e.g. gathered from FSDP shards).
    dtype: convert the floating-point tensors to it (e.g. an fp32-trained model exported as bfloat16:
    round to nearest even); None keeps the model's dtype. config.json's torch_dtype says which."""
    out = Path(out)
    state = state or model.state_dict()
    if dtype is None:
        dtype = model.model.embed_tokens.weight.dtype
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    else:
        state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
                 for k, v in state.items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config_to_hf(model.cfg, dtype), f, indent=2)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if copy_files_from is not None:
        # chat_template.jinja: transformers >= 4.43 keeps the chat template there (and may leave it
        # out of tokenizer_config.json); without it a saved chat model would lose its chat format.
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                     "chat_template.jinja"):
            src = Path(copy_files_from) / name
            if src.exists():
                shutil.copy2(src, out / name)
