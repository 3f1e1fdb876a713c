"""Checkpoint directories that cannot be loaded give one clear error naming every problem, and no
code from a checkpoint is ever executed; saving is atomic."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from minihuatuo.engine import checkpoint
from minihuatuo.engine.checkpoint import CheckpointError, load_model, save_model
from minihuatuo.engine.model import build_model, preset


@pytest.fixture
def saved(tmp_path):
    model = build_model(preset("tiny"), seed=0)
    return model, save_model(model, tmp_path / "ckpt")


def test_round_trip_is_exact(saved):
    model, path = saved
    back = load_model(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    model = build_model(preset("tiny", tie_word_embeddings=True), seed=0)
    path = save_model(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    back = load_model(path)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_dtype_conversion_on_load(saved):
    _, path = saved
    assert load_model(path, dtype=torch.bfloat16).model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_missing_config_and_missing_weights(tmp_path, saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                   "hidden_size": 8, "intermediate_size": 8,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(empty)


def test_unknown_architecture_and_unsupported_fields(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu",
                                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="hidden_act.*gelu.*rope_type 'yarn'"):
        load_model(path)


def test_invalid_json_names_file_and_line(saved):
    _, path = saved
    (path / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: line 3: invalid JSON"):
        load_model(path)


def test_wrong_missing_and_unexpected_tensors_are_all_listed(saved):
    _, path = saved
    state = load_file(path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)  # wrong shape
    del state["model.norm.weight"]  # missing
    del state["model.layers.1.self_attn.k_proj.weight"]  # missing
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignorable, not an error
    state["value_head.weight"] = torch.zeros(1, 64)  # unexpected
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight, model.norm.weight" in msg
    assert "unexpected tensors: value_head.weight" in msg
    assert "model.layers.0.mlp.up_proj.weight (3, 3) (expected (172, 64))" in msg
    assert "inv_freq" not in msg


def test_sharded_index_naming_a_missing_shard(tmp_path):
    model = build_model(preset("tiny"), seed=0)
    path = save_model(model, tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard files that do not exist: {shards[-1].name}"):
        load_model(path)


class _Exploit:
    """Unpickling this writes a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(saved, tmp_path):
    _, path = saved
    (path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(CheckpointError, match="only pickle-based weights \\(pytorch_model.bin\\)"):
        load_model(path)
    assert not marker.exists()


def test_remote_code_fields_are_ignored(saved, tmp_path):
    """An `auto_map` pointing at Python files in the checkpoint is never followed."""
    model, path = saved
    marker = tmp_path / "ran"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)
    assert not marker.exists()


def test_save_is_atomic_and_replaces_an_existing_checkpoint(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    assert (path / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary directory left behind
    monkeypatch.undo()
    save_model(model, path)
    assert torch.equal(load_model(path).model.norm.weight, model.model.norm.weight)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_saving_copies_chat_template_jinja(tmp_path):
    """transformers >= 4.43 keeps the chat template in chat_template.jinja; a saved copy must keep it,
    or the new checkpoint would silently lose its chat format (here ChatML would become plain)."""
    from conftest import write_plain_tokenizer

    from minihuatuo.engine.tokenizer import Tokenizer

    src = write_plain_tokenizer(tmp_path / "tok")
    jinja = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nCopied along.<|im_end|>\\n' }}"
             "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
             "'<|im_end|>\\n' }}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    (src / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    out = save_model(build_model(preset("tiny", vocab_size=320), seed=0), tmp_path / "ckpt", copy_files_from=src)
    assert (out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    assert Tokenizer.from_dir(out).render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nCopied along.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # a source without the file: nothing is invented
    (src / "chat_template.jinja").unlink()
    out = save_model(build_model(preset("tiny", vocab_size=320), seed=0), tmp_path / "ckpt2", copy_files_from=src)
    assert not (out / "chat_template.jinja").exists()


@pytest.mark.parametrize("cut", ["empty", "header", "half"])
def test_a_truncated_safetensors_file_is_an_error_naming_it(tmp_path, cut):
    """A weights file cut short (a crash, a full disk) or empty: a CheckpointError that names the
    file and says it is incomplete, never the library's bare SafetensorError."""
    from minihuatuo.engine.checkpoint import CheckpointError, load_model, save_model
    from minihuatuo.engine.model import build_model, preset

    d = save_model(build_model(preset("tiny"), seed=0), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "header": data[:6], "half": data[: len(data) // 2]}[cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a complete safetensors file"):
        load_model(d)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_save_model_exports_in_another_dtype(saved, tmp_path, name):
    """`dtype`: the weights rounded to it, config.json saying so (what transformers' dtype="auto" and
    vLLM's default read); the model in memory is untouched."""
    model, _ = saved
    dtype = checkpoint.SAVE_DTYPES[name]
    path = save_model(model, tmp_path / name, dtype=dtype)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == name
    stored = load_file(path / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {dtype}
    back = load_model(path)  # kept as stored
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(back.state_dict()[k], v.to(dtype)), k
