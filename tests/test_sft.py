"""The SFT trainer: loss mask, packing, gradient accumulation, exact resume, distributed equivalence,
overfitting into the think-then-answer format, and transformers loading what it saves."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_plain_tokenizer
from safetensors.torch import load_file

from minihuatuo.engine.checkpoint import load_model, save_model
from minihuatuo.engine.model import build_model, preset
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.config import build_config
from minihuatuo.services.formats import SFTExample
from minihuatuo.stages import sft
from minihuatuo.stages.sft import PRESETS, SFTConfig, param_groups, train
from minihuatuo.training.schedules import warmup_then_decay_lr
from minihuatuo.stages.sft_data import IGNORE, collate_packed, collate_padded, prepare, tokenize

ROWS = [{"Question": f"Patient {i} has fever and cough. Treatment?",
         "Complex_CoT": f"Hmm, fever and cough suggest pneumonia {i % 3}. Wait, check allergy. Also dose.",
         "Response": f"Give drug {i % 4}."} for i in range(12)]


@pytest.fixture
def world(tmp_path):
    """A tiny base checkpoint with the plain chat template and an SFT file on disk."""
    tok = write_plain_tokenizer(tmp_path / "tok")
    save_model(build_model(preset("tiny", vocab_size=320), seed=0), tmp_path / "base", copy_files_from=tok)
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return tmp_path


def cfg(**kw):
    base = dict(epochs=2, lr=3e-3, global_batch_size=8, micro_batch_size=8, max_length=256, warmup_ratio=0.0,
                weight_decay=0.0)
    base.update(kw)
    return SFTConfig(**base)


def weights(path):
    return load_file(Path(path) / "model.safetensors")


def test_loss_mask_covers_exactly_the_assistant_tokens(world):
    tok = Tokenizer.from_dir(world / "base")
    ex = SFTExample("Fever?", "Hmm.", "Rest.")
    t = tokenize(ex, tok)
    # Hand-rendered: the plain template puts the question in a user turn and the target in the assistant turn.
    prompt = tok.encode("<|user|>\nFever?<|end|>\n<|assistant|>\n", add_special_tokens=False)
    target = tok.encode("## Thinking\n\nHmm.\n\n## Final Response\n\nRest.<|end|>", add_special_tokens=False)
    assert t.ids == prompt + target and t.n_prompt == len(prompt)
    batch = collate_padded([t, tokenize(SFTExample("A much longer question here?", "", "No."), tok)], tok.pad_id)
    labels = batch.labels[0].tolist()
    # position i predicts token i+1: the first label sits on the last prompt token
    assert labels[:len(prompt) - 1] == [IGNORE] * (len(prompt) - 1)
    assert labels[len(prompt) - 1:len(t.ids) - 1] == target
    assert labels[len(t.ids) - 1:] == [IGNORE] * (batch.labels.shape[1] - len(t.ids) + 1)
    assert tok.decode(target, skip_special_tokens=False).endswith("Rest.<|end|>")
    # direct-response ablation: no thinking part, just the response and the end of turn
    direct = batch.labels[1][batch.labels[1] != IGNORE].tolist()
    assert direct == tok.encode("No.<|end|>", add_special_tokens=False)


def test_overlong_examples_are_counted_never_silent(world, capsys):
    tok = Tokenizer.from_dir(world / "base")
    exs = [SFTExample("Q?", "x " * 200, "A."), SFTExample("Q?", "short", "A.")]
    limit = len(tokenize(exs[1], tok).ids) + 2  # the short one fits, the long one does not
    kept = prepare(exs, tok, max_length=limit, overlong="truncate")
    assert [len(t.ids) for t in kept] == [limit, limit - 2]
    assert "1 example(s) truncated and 0 dropped" in capsys.readouterr().err
    assert len(prepare(exs, tok, max_length=limit, overlong="drop")) == 1
    assert "0 example(s) truncated and 1 dropped" in capsys.readouterr().err


def test_packed_examples_equal_each_example_alone(world):
    tok = Tokenizer.from_dir(world / "base")
    model = load_model(world / "base").eval()
    items = [tokenize(SFTExample(**{"question": r["Question"], "complex_cot": r["Complex_CoT"],
                                     "response": r["Response"]}), tok) for r in ROWS[:5]]
    packed = collate_packed(items, tok.pad_id, max_length=300)
    assert packed.input_ids.shape[0] < 5  # several examples really share a row
    with torch.no_grad():
        logits = model(packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids)
        k = 0
        for b in range(packed.input_ids.shape[0]):
            start = 0
            while k < len(items) and start + len(items[k].ids) <= packed.input_ids.shape[1] and \
                    packed.input_ids[b, start:start + len(items[k].ids)].tolist() == items[k].ids:
                alone = model(torch.tensor([items[k].ids]))[0]
                torch.testing.assert_close(logits[b, start:start + len(items[k].ids)], alone, atol=1e-5, rtol=0)
                start += len(items[k].ids)
                k += 1
    assert k == len(items)  # every example was found and checked


def test_learning_rate_schedule_hand_values():
    c = SFTConfig(lr=1.0, warmup_ratio=0.2, schedule="cosine", min_lr_ratio=0.0)
    # 10 steps: warmup 2 steps (0.5, 1.0), then cosine over the remaining 8
    assert [warmup_then_decay_lr(s, 10, c) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_then_decay_lr(2, 10, c) == pytest.approx(1.0)
    assert warmup_then_decay_lr(6, 10, c) == pytest.approx(0.5)  # halfway through the decay
    lin = SFTConfig(lr=2.0, warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.1)
    assert warmup_then_decay_lr(5, 10, lin) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))


def test_weight_decay_skips_norms_and_biases():
    m = build_model(preset("tiny", qkv_bias=True, o_bias=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert all("norm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])


def test_config_layers_preset_file_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.25\nepochs = 7\n")
    c = build_config(SFTConfig, PRESETS, "tiny-world", str(f), {"epochs": 9})
    assert (c.lr, c.epochs, c.max_length) == (0.25, 9, PRESETS["tiny-world"].max_length)
    (tmp_path / "bad.json").write_text('{"lrate": 1}')
    with pytest.raises(ValueError, match="bad.json: unknown field\\(s\\) lrate"):
        build_config(SFTConfig, PRESETS, None, str(tmp_path / "bad.json"))


def test_gradient_accumulation_equals_one_big_batch(world):
    big = train(cfg(max_steps=1, micro_batch_size=8), world / "base", world / "sft.jsonl", world / "big")
    acc = train(cfg(max_steps=1, micro_batch_size=2), world / "base", world / "sft.jsonl", world / "acc")
    assert big["loss"] == pytest.approx(acc["loss"], abs=1e-6)
    before, a, b = weights(world / "base"), weights(world / "big" / "final"), weights(world / "acc" / "final")
    for k in a:
        assert not torch.equal(a[k], before[k]) or "norm" in k  # the step changed the weights ...
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)  # ... identically


def test_resume_after_a_crash_continues_exactly(world, monkeypatch):
    c = cfg(epochs=3, global_batch_size=4, micro_batch_size=2, save_every=3, max_steps=6)
    train(c, world / "base", world / "sft.jsonl", world / "straight")
    real_save = sft.save_checkpoint

    def save_then_crash(path, *a, **k):
        real_save(path, *a, **k)
        if Path(path).name == "checkpoint-3":
            raise KeyboardInterrupt("killed after the step-3 checkpoint")

    monkeypatch.setattr(sft, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(c, world / "base", world / "sft.jsonl", world / "crashed")
    monkeypatch.undo()
    train(c, world / "base", world / "sft.jsonl", world / "crashed", resume=True)
    straight = [json.loads(l) for l in (world / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (world / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    a, b = weights(world / "straight" / "final"), weights(world / "crashed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (load_file(world / d / "final" / "trainer" / "optimizer.safetensors") for d in ("straight", "crashed"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def _torchrun(world, out, nproc, extra, program=("-m", "minihuatuo"), ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *program, "sft", "--model", str(world / "base"), "--data", str(world / "sft.jsonl"),
           "--out", str(out), "--preset", "tiny-world", "--epochs", "1", "--lr", "3e-3", "--global-batch-size", "8",
           "--micro-batch-size", "2", "--max-length", "256", "--warmup-ratio", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process(world, strategy):
    one = _torchrun(world, world / f"one-{strategy}", 1, ["--distributed", strategy])
    two = _torchrun(world, world / f"two-{strategy}", 2, ["--distributed", strategy])
    assert len(one) == len(two) == 2  # 12 examples, global batch 8: two steps, the last one partial
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = weights(world / f"one-{strategy}" / "final"), weights(world / f"two-{strategy}" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


# `minihuatuo sft ...` on every rank, stopped (as by a kill) right after checkpoint-2 is written
CRASH_AFTER_CHECKPOINT_2 = """
import sys
from pathlib import Path

from minihuatuo.cli import main
from minihuatuo.stages import sft

real_save = sft.save_checkpoint


def save_then_crash(path, *a, **k):
    real_save(path, *a, **k)
    if Path(path).name == "checkpoint-2":
        raise SystemExit(3)


sft.save_checkpoint = save_then_crash
sys.exit(main())
"""


def test_fsdp2_resumes_from_its_own_shards(world):
    """FSDP2 on 2 processes saves the trainer state as torch.distributed.checkpoint shards, one file per
    rank; a run stopped after checkpoint-2 and resumed from those shards equals the uninterrupted run
    bit for bit (the same shards, the same data order, the same reduction order), and one process
    resumes from them too (DCP reshards; equal to the 2-process run within the 1-vs-2-process tolerance)."""
    from minihuatuo.training.checkpoints import checkpoint_problem

    run = ["--distributed", "fsdp2", "--epochs", "2", "--global-batch-size", "4", "--save-every", "2"]
    straight = _torchrun(world, world / "straight", 2, run)
    driver = world / "crash_after_checkpoint_2.py"
    driver.write_text(CRASH_AFTER_CHECKPOINT_2)
    _torchrun(world, world / "crashed", 2, run, program=(str(driver),), ok=False)
    ckpt = world / "crashed" / "checkpoint-2"
    assert ckpt.is_dir() and not (world / "crashed" / "final").exists()

    # the trainer state: one shard file per rank + DCP's index, nothing gathered
    trainer = sorted(p.relative_to(ckpt / "trainer").as_posix() for p in (ckpt / "trainer").rglob("*") if p.is_file())
    assert trainer == ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "manifest.json",
                       "trainer_state.json"]
    assert checkpoint_problem(ckpt) is None
    # the export beside it is today's full HF-layout model, the same as the uninterrupted run's
    a, b = weights(world / "straight" / "checkpoint-2"), weights(ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an incomplete sharded checkpoint is recognised: DCP's index or a rank's shards missing
    for missing in ("dcp/.metadata", "dcp/__1_0.distcp"):
        damaged = world / f"damaged-{missing[4:]}"
        shutil.copytree(ckpt, damaged)
        (damaged / "trainer" / missing).unlink()
        assert f"trainer/{missing} is missing" in checkpoint_problem(damaged)

    shutil.copytree(world / "crashed", world / "one")  # the same stopped run, for the 1-process resume
    resumed = _torchrun(world, world / "crashed", 2, [*run, "--resume"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight]
    a, b = weights(world / "straight" / "final"), weights(world / "crashed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # another world size: one process (no sharding) reads the 2-rank shards
    one = cfg(global_batch_size=4, micro_batch_size=2, save_every=2, distributed="fsdp2")
    assert one == build_config(SFTConfig, PRESETS, "tiny-world", None, {
        "epochs": 2, "lr": 3e-3, "global_batch_size": 4, "micro_batch_size": 2, "max_length": 256,
        "warmup_ratio": 0.0, "save_every": 2, "distributed": "fsdp2"})  # the torchrun runs' config
    train(one, world / "base", world / "sft.jsonl", world / "one", resume=True)
    alone = [json.loads(l) for l in (world / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in alone] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(alone, straight):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    c = weights(world / "one" / "final")
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_overfits_and_generates_the_format(world):
    from minihuatuo.engine.sample import SamplingConfig, generate

    rows = [{"Question": q, "Complex_CoT": c, "Response": r} for q, c, r in [
        ("Fever and cough?", "Hmm, fever with cough. Wait, pneumonia.", "Amoxicillin."),
        ("Crushing chest pain?", "Chest pain, so check troponin. Also ECG.", "Aspirin now."),
        ("Itchy rash after penicillin?", "Rash after a drug: allergy.", "Stop penicillin."),
        ("Pregnant with a UTI?", "Pregnancy limits the choice. Wait, nitrofurantoin.", "Nitrofurantoin."),
    ]]
    (world / "four.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    last = train(cfg(epochs=150, global_batch_size=4, micro_batch_size=4), world / "base", world / "four.jsonl",
                 world / "fit")
    assert last["loss"] < 0.05
    tok = Tokenizer.from_dir(world / "fit" / "final")
    model = load_model(world / "fit" / "final").eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["Question"]}]) for r in rows]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=200, temperature=0,
                                                  stop_token_ids=tuple(tok.eos_ids)), pad_id=tok.pad_id)
    for r, ids in zip(rows, out.responses()):
        assert tok.decode(ids) == f"## Thinking\n\n{r['Complex_CoT']}\n\n## Final Response\n\n{r['Response']}"


def test_saved_checkpoint_loads_in_transformers(world):
    transformers = pytest.importorskip("transformers")
    train(cfg(max_steps=2), world / "base", world / "sft.jsonl", world / "hf")
    ours = load_model(world / "hf" / "final").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(world / "hf" / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_sft_loss_equals_transformers_loss_on_the_same_batch(tiny_checkpoint, tmp_path):
    """Oracle for the value of the SFT loss. sft.py's loss is (1/N) Σ −log π(target token), N = the
    target tokens of the whole global batch (token_nll_sum gives the sum and the count; train()
    divides by the global count across micro-batches). transformers' causal-LM loss with unshifted
    labels (input ids, -100 on prompt and padding) shifts them itself and takes the mean over the
    labelled tokens of the whole batch: the same reduction, so no adjustment is needed. The labels
    for transformers are built here from (ids, n_prompt), not from our shifted `batch.labels`.
    The examples have very different target lengths and the model has large weights (per-token
    losses far from uniform), so a per-sequence mean would differ: asserted below."""
    transformers = pytest.importorskip("transformers")
    examples = [SFTExample("Fever?", "Hmm.", "Rest."),
                SFTExample("The patient presents with fever, cough and pleuritic chest pain. Treatment?",
                           "Hmm, wait: the troponin is raised, so consider myocardial infarction. "
                           "Verification: the findings agree. A chest radiograph shows lobar consolidation.",
                           "The first-line treatment is amoxicillin."),
                SFTExample("In pregnancy, which drug?", "", "Avoid the drug and choose the alternative."),  # direct
                SFTExample("Chest radiograph?", "Lobar consolidation.", "Pneumonia.")]
    tok = Tokenizer.from_dir(tiny_checkpoint)
    items = prepare(examples, tok, max_length=512)
    assert len(items) == 4 and len({t.n_target for t in items}) == 4 and len({len(t.ids) for t in items}) == 4
    batch = collate_padded(items, tok.pad_id)  # right-padded, prompt and padding without label

    ours_model = load_model(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        nll, n = sft.token_nll_sum(ours_model, batch)
    ours = (nll / n).item()

    B, T = batch.input_ids.shape
    ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, t in enumerate(items):
        ids[b, :len(t.ids)] = torch.tensor(t.ids)
        mask[b, :len(t.ids)] = 1
        labels[b, t.n_prompt:len(t.ids)] = torch.tensor(t.ids[t.n_prompt:])  # the target tokens, unshifted
    assert torch.equal(ids, batch.input_ids) and int(n) == sum(t.n_target for t in items)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, labels=labels)
    assert ours == pytest.approx(out.loss.item(), abs=1e-5, rel=0)

    # the examples tell the reductions apart: the mean of per-sequence means is ~8e-3 from the per-token mean,
    # hundreds of times the tolerance above
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    tok_nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    per_sequence = (tok_nll.sum(1) / (target != -100).sum(1)).mean().item()
    assert abs(per_sequence - out.loss.item()) > 1e-3

    # the loss train() logs for its first step (before the update) on that global batch, split into micro-batches
    (tmp_path / "four.jsonl").write_text("\n".join(json.dumps({"Question": e.question, "Complex_CoT": e.complex_cot,
                                                                "Response": e.response}) for e in examples))
    last = train(cfg(max_steps=1, global_batch_size=4, micro_batch_size=3, max_length=512), tiny_checkpoint,
                 tmp_path / "four.jsonl", tmp_path / "out")
    assert last["step"] == 1 and last["loss"] == pytest.approx(out.loss.item(), abs=1e-5, rel=0)
