"""A trainer's output directory (training/run_dir.py, training/checkpoints.py), on real files with the
real trainers at toy size:
- final/ and checkpoint-N/ hold only what an inference engine loads (trainer state in trainer/), in
  the --save-dtype asked for, and load in our loader and in transformers with the fp32 model's logits;
- a second run into a directory that holds one is refused unless --resume or --overwrite;
- a resume logs every step once, says what it resumed from, and is exact with a bf16 export;
- a resume skips an incomplete or damaged checkpoint (manifest) and removes a killed write's leftovers;
- checkpoints of the old layout (trainer files beside the weights) still resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_plain_tokenizer
from safetensors.torch import load_file

from minihuatuo import cli
from minihuatuo.engine.checkpoint import CheckpointError, load_model, save_model
from minihuatuo.engine.model import build_model, preset
from minihuatuo.services.verifier import ExactMatchVerifier
from minihuatuo.stages import sft
from minihuatuo.stages.rl import ppo_run
from minihuatuo.stages.rl.ppo import PPOConfig
from minihuatuo.stages.sft import SFTConfig

# what vLLM / transformers / sglang read from a model directory; nothing else may be a file there
ENGINE_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# logits of the exported model vs the fp32 one, as a fraction of the largest logit: the weights'
# rounding (8 / 11 significant bits) and the forward pass in that dtype
LOGIT_ATOL = {"float32": 1e-5, "bfloat16": 0.05, "float16": 0.01}

ROWS = [{"Question": f"Patient {i} has fever and cough. Treatment?", "Complex_CoT": f"Hmm, pneumonia {i % 3}.",
         "Response": f"Give drug {i % 4}."} for i in range(12)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dirs")
    tok = write_plain_tokenizer(root / "tok")
    (tok / "chat_template.jinja").write_text(  # the plain format (world/pretrain.py PLAIN_JINJA)
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", encoding="utf-8")
    model = build_model(preset("tiny", vocab_size=320), seed=0)
    with torch.no_grad():  # logits of order 10 rather than 0.1, so that a dtype's rounding shows in them
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    save_model(model, root / "base", copy_files_from=tok)
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return root


def sft_cfg(**kw):
    base = dict(epochs=3, lr=3e-3, global_batch_size=4, micro_batch_size=4, max_length=128, warmup_ratio=0.0,
                weight_decay=0.0)
    return SFTConfig(**{**base, **kw})


def run_sft(world, out, **kw):
    cfg = {k: kw.pop(k) for k in list(kw) if k in SFTConfig.__dataclass_fields__}
    return sft.train(sft_cfg(**cfg), world / "base", world / "sft.jsonl", out, **kw)


def metric_steps(out, key="step"):
    return [json.loads(line)[key] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_engine_directory(d: Path, *also: str):
    """Only model files beside config.json: no other *.safetensors, nothing else but trainer/."""
    files = {p.name for p in d.iterdir() if p.is_file()}
    assert files <= ENGINE_FILES, files - ENGINE_FILES
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", *also} <= files
    assert [p.name for p in d.glob("*.safetensors")] == ["model.safetensors"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- layout and --save-dtype


@pytest.fixture(scope="module")
def sft_runs(world):
    """The same 2-step SFT run exported in each dtype (training is fp32 and deterministic: one model)."""
    for name in DTYPES:
        run_sft(world, world / f"export-{name}", max_steps=2, save_every=1, save_dtype=name)
    return world


@pytest.mark.parametrize("name", list(DTYPES))
def test_sft_final_is_an_inference_engine_directory_in_the_save_dtype(sft_runs, name):
    transformers = pytest.importorskip("transformers")
    dtype, out = DTYPES[name], sft_runs / f"export-{name}"
    for d in (out / "final", out / "checkpoint-1"):
        assert_engine_directory(d, "chat_template.jinja")
        assert {p.name for p in d.iterdir() if p.is_dir()} == {"trainer"}
        kept = {"optimizer.safetensors", "trainer_state.json", "manifest.json"}
        assert {p.name for p in (d / "trainer").iterdir()} == kept | ({"model_fp32.safetensors"} if name != "float32"
                                                                      else set())
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == name
    fp32 = load_model(sft_runs / "export-float32" / "final").eval()  # the trained weights
    ours = load_model(final).eval()  # dtype None: as stored
    assert ours.model.embed_tokens.weight.dtype == dtype
    for k, v in fp32.state_dict().items():  # the export is the fp32 model rounded, nothing else
        assert torch.equal(ours.state_dict()[k], v.to(dtype)), k
    if name != "float32":  # trainer/ keeps the exact fp32 weights
        assert same_tensors(load_file(final / "trainer" / "model_fp32.safetensors"),
                            load_file(sft_runs / "export-float32" / "final" / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype="auto").eval()
    assert next(hf.parameters()).dtype == dtype
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fp32(ids)
        scale = want.abs().max().item()
        assert scale > 2.0  # logits of a real scale, so the tolerance means something
        for got in (ours(ids), hf(ids).logits):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, atol=LOGIT_ATOL[name] * scale, rtol=0)


def ppo_cfg(**kw):
    base = dict(response_length=48, max_prompt_length=64, temperature=1.0, batch_size=8, micro_batch_size=8,
                ppo_epochs=1, total_episodes=32, lr=3e-4, warmup_ratio=0.0, save_every=2, seed=0,
                value_head="separate", drop_last=False)
    return PPOConfig(**{**base, **kw})


def run_ppo(toy, out, cfg=None, **kw):
    return ppo_run.train(cfg or ppo_cfg(), toy / "sft" / "final", toy / "problems.json", out, ExactMatchVerifier(),
                         **kw)


def test_ppo_final_policy_is_an_inference_engine_directory_and_the_critic_is_in_trainer(toy, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "ppo"
    run_ppo(toy, out, max_updates=2, save_dtype="bfloat16")
    for d in (out / "final", out / "checkpoint-2"):
        assert {p.name for p in d.iterdir()} == {"policy", "trainer"}  # final/policy stays where the demo reads it
        assert_engine_directory(d / "policy")
        assert {p.name for p in (d / "trainer").iterdir()} == {
            "critic.safetensors", "policy_fp32.safetensors", "optimizer.safetensors", "trainer_state.json",
            "manifest.json"}
    policy = out / "final" / "policy"
    ours = load_model(policy)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16 and ours.lm_head is not None
    fp32 = load_file(out / "final" / "trainer" / "policy_fp32.safetensors")
    assert all(torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in load_file(policy / "model.safetensors").items())
    critic = load_file(out / "final" / "trainer" / "critic.safetensors")
    assert "critic.score.weight" in critic and all(v.dtype == torch.float32 for v in critic.values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(policy, dtype="auto")
    assert next(hf.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- no silent overwrite


def sft_cli(world, out, *extra):
    return cli.main(["sft", "--model", str(world / "base"), "--data", str(world / "sft.jsonl"), "--out", str(out),
                     "--preset", "tiny-world", "--epochs", "1", "--global-batch-size", "4", "--micro-batch-size", "4",
                     "--max-length", "128", *extra])


def test_a_second_sft_run_into_a_used_directory_is_refused_unless_resume_or_overwrite(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert sft_cli(world, out, "--max-steps", "2", "--save-every", "1") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert sft_cli(world, out, "--max-steps", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("minihuatuo sft: error: --out ")
    assert str(out) in err and "--resume" in err and "--overwrite" in err and "final/" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    with pytest.raises(SystemExit) as e:  # the two options exclude each other (argparse: exit 2, one line)
        sft_cli(world, out, "--resume", "--overwrite")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    assert sft_cli(world, out, "--max-steps", "3", "--overwrite") == 0
    err = capsys.readouterr().err
    assert f"sft: --overwrite: removed the previous run in {out}: metrics.jsonl, checkpoint-1/, final/" in err
    assert metric_steps(out) == [1, 2, 3]  # one run's lines, not two runs mixed
    assert not (out / "checkpoint-1").exists()
    assert json.loads((out / "final" / "trainer" / "trainer_state.json").read_text())["step"] == 3


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "dpo"])
def test_rl_commands_refuse_a_used_directory_and_resume_from_final(algo, toy, tmp_path, capsys):
    """ppo / rloo / grpo / dpo: a second run is refused; --resume continues from final/ (a run
    stopped by --max-updates), says so, and metrics.jsonl then holds each update once."""
    data = tmp_path / "problems.json"
    data.write_text(json.dumps(json.loads((toy / "problems.json").read_text()) * 4))  # 16 problems
    common = ["--policy", str(toy / "sft" / "final"), "--data", str(data), "--verifier", "exact",
              "--preset", "tiny-world", "--response-length", "64", "--max-prompt-length", "64", "--out",
              str(tmp_path / algo)]
    if algo == "dpo":
        common += ["--samples-per-problem", "5", "--sample-batch-size", "16", "--batch-size", "2",
                   "--micro-batch-size", "2", "--epochs", "1", "--pairs-per-problem", "0", "--temperature", "1.0"]
        stop, more, key = ["--max-steps", "1"], ["--max-steps", "2"], "step"
    else:
        common += ["--batch-size", "8", "--micro-batch-size", "8", "--total-episodes", "24"]
        stop, more, key = ["--max-updates", "1"], ["--max-updates", "2"], "update"
    assert cli.main([algo, *common, *stop]) == 0
    capsys.readouterr()
    assert cli.main([algo, *common, *stop]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"minihuatuo {algo}: error: --out {tmp_path / algo} already holds a run" in err
    assert cli.main([algo, *common, *more, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{algo}: resumed from {tmp_path / algo / 'final'} at {key} 1" in err
    assert metric_steps(tmp_path / algo, key) == [1, 2]


def test_dpo_pairs_only_with_overwrite_is_an_error(toy, tmp_path, capsys):
    assert cli.main(["dpo", "--policy", str(toy / "sft" / "final"), "--data", str(toy / "problems.json"),
                     "--out", str(tmp_path / "d"), "--pairs-only", "--overwrite"]) == 2
    assert "--pairs-only trains nothing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume


def crash_in_step(monkeypatch, module, name, at):
    """Make module.`name` (called once per step / update with its 0-based index first) raise at index `at`."""
    real = getattr(module, name)

    def crashing(i, *a, **k):
        if i == at:
            raise KeyboardInterrupt(f"killed in step {at + 1}")
        return real(i, *a, **k)

    monkeypatch.setattr(module, name, crashing)


def test_sft_resume_logs_each_step_once_and_is_exact_with_a_bf16_export(world, tmp_path, monkeypatch, capsys):
    """Killed in step 5 (steps 1-4 logged, last checkpoint at step 3): the resumed run logs steps 4-6
    once each, and everything equals the uninterrupted run bit for bit, the bf16 export included
    (trainer/ keeps the fp32 weights the resume continues from)."""
    kw = dict(max_steps=6, save_every=3, save_dtype="bfloat16")
    run_sft(world, tmp_path / "straight", **kw)
    crash_in_step(monkeypatch, sft, "warmup_then_decay_lr", 4)
    with pytest.raises(KeyboardInterrupt):
        run_sft(world, tmp_path / "crashed", **kw)
    monkeypatch.undo()
    assert metric_steps(tmp_path / "crashed") == [1, 2, 3, 4]
    capsys.readouterr()
    run_sft(world, tmp_path / "crashed", resume=True, **kw)
    assert metric_steps(tmp_path / "crashed") == [1, 2, 3, 4, 5, 6]  # the old code: [1, 2, 3, 4, 4, 5, 6]
    err = capsys.readouterr().err
    assert f"sft: resumed from {tmp_path / 'crashed' / 'checkpoint-3'} at step 3" in err
    assert "dropped 1 line(s) logged after step 3" in err
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
    assert [drop(x) for x in resumed] == [drop(x) for x in straight]
    for f in ("model.safetensors", "trainer/model_fp32.safetensors", "trainer/optimizer.safetensors"):
        assert same_tensors(load_file(tmp_path / "straight" / "final" / f), load_file(tmp_path / "crashed" / "final" / f))


def test_ppo_resume_logs_each_update_once_says_so_and_is_exact_with_a_bf16_export(toy, tmp_path, monkeypatch, capsys):
    cfg = ppo_cfg(value_head="shared")
    run_ppo(toy, tmp_path / "straight", cfg, save_dtype="bfloat16")
    crash_in_step(monkeypatch, ppo_run, "update", 3)  # killed in update 4: update 3 logged, checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        run_ppo(toy, tmp_path / "crashed", cfg, save_dtype="bfloat16")
    monkeypatch.undo()
    capsys.readouterr()
    resumed = run_ppo(toy, tmp_path / "crashed", cfg, resume=True, save_dtype="bfloat16")
    assert [m["update"] for m in resumed] == [3, 4]
    assert metric_steps(tmp_path / "crashed", "update") == [1, 2, 3, 4]  # the old code: [1, 2, 3, 3, 4]
    assert f"ppo: resumed from {tmp_path / 'crashed' / 'checkpoint-2'} at update 2" in capsys.readouterr().err
    for f in ("policy/model.safetensors", "trainer/policy_fp32.safetensors", "trainer/critic.safetensors",
              "trainer/optimizer.safetensors"):
        assert same_tensors(load_file(tmp_path / "straight" / "final" / f), load_file(tmp_path / "crashed" / "final" / f))


# ----------------------------------------------------------------------------- damaged checkpoints


def damage(ckpt: Path, how: str):
    if how == "no manifest":  # killed before the manifest: what atomic_dir alone cannot rule out after a copy
        (ckpt / "trainer" / "manifest.json").unlink()
    elif how == "truncated optimizer":
        f = ckpt / "trainer" / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty weights":
        (ckpt / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("how", ["no manifest", "truncated optimizer", "empty weights"])
def test_resume_skips_a_damaged_latest_checkpoint_and_removes_leftover_temp_dirs(how, world, tmp_path, monkeypatch,
                                                                                 capsys):
    kw = dict(max_steps=6, save_every=2)
    run_sft(world, tmp_path / "straight", **kw)
    out = tmp_path / "crashed"
    crash_in_step(monkeypatch, sft, "warmup_then_decay_lr", 5)  # killed in step 6: checkpoint-2 and -4
    with pytest.raises(KeyboardInterrupt):
        run_sft(world, out, **kw)
    monkeypatch.undo()
    damage(out / "checkpoint-4", how)
    leftover = out / ".checkpoint-6.tmp-k1ll3d"  # a checkpoint write a kill interrupted
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()
    run_sft(world, out, resume=True, **kw)
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and warnings[0].startswith(f"sft: warning: skipping {out / 'checkpoint-4'}: ")
    assert {"no manifest": "manifest.json is missing", "truncated optimizer": "optimizer.safetensors has",
            "empty weights": "model.safetensors has 0 bytes"}[how] in warnings[0]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in err
    assert f"removed {leftover}" in err and not leftover.exists()
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert same_tensors(load_file(tmp_path / "straight" / "final" / "model.safetensors"),
                        load_file(out / "final" / "model.safetensors"))


def test_resume_with_no_complete_checkpoint_is_an_error(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert sft_cli(world, out, "--max-steps", "1") == 0
    damage(out / "final", "truncated optimizer")
    capsys.readouterr()
    assert sft_cli(world, out, "--max-steps", "2", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"sft: warning: skipping {out / 'final'}: trainer/optimizer.safetensors has")
    assert err[1] == (f"minihuatuo sft: error: --resume: {out} has no complete checkpoint (skipped: final); "
                      "pass --overwrite to start the run again")


# ----------------------------------------------------------------------------- the old layout


def to_old_layout(ckpt: Path):
    """What the trainers wrote before trainer/: its files beside the weights (PPO: beside policy/), no manifest."""
    for f in (ckpt / "trainer").iterdir():
        if f.name != "manifest.json":
            shutil.move(str(f), ckpt / f.name)
    shutil.rmtree(ckpt / "trainer")


def test_old_layout_checkpoints_still_resume_exactly(world, toy, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=3)
    run_sft(world, tmp_path / "straight", **kw)
    crash_in_step(monkeypatch, sft, "warmup_then_decay_lr", 3)
    with pytest.raises(KeyboardInterrupt):
        run_sft(world, tmp_path / "old", **kw)
    monkeypatch.undo()
    to_old_layout(tmp_path / "old" / "checkpoint-3")
    assert (tmp_path / "old" / "checkpoint-3" / "optimizer.safetensors").exists()
    run_sft(world, tmp_path / "old", resume=True, **kw)
    for f in ("model.safetensors", "trainer/optimizer.safetensors"):
        assert same_tensors(load_file(tmp_path / "straight" / "final" / f), load_file(tmp_path / "old" / "final" / f))

    cfg = ppo_cfg(total_episodes=24)  # 3 updates, checkpoint-2
    run_ppo(toy, tmp_path / "ppo-straight", cfg)
    run_ppo(toy, tmp_path / "ppo-old", cfg, max_updates=2)
    shutil.rmtree(tmp_path / "ppo-old" / "final")
    to_old_layout(tmp_path / "ppo-old" / "checkpoint-2")
    assert (tmp_path / "ppo-old" / "checkpoint-2" / "critic.safetensors").exists()
    assert [m["update"] for m in run_ppo(toy, tmp_path / "ppo-old", cfg, resume=True)] == [3]
    for f in ("policy/model.safetensors", "trainer/critic.safetensors"):
        assert same_tensors(load_file(tmp_path / "ppo-straight" / "final" / f),
                            load_file(tmp_path / "ppo-old" / "final" / f))


def test_a_truncated_optimizer_or_critic_file_is_a_checkpoint_error_naming_it(toy, tmp_path):
    from minihuatuo.stages.rl.rollout import adamw
    from minihuatuo.training.checkpoints import load_actor_critic

    run_ppo(toy, tmp_path / "ppo", max_updates=2)
    ckpt = tmp_path / "ppo" / "checkpoint-2"
    to_old_layout(ckpt)  # no manifest to catch it first: the loader itself must name the file
    for name in ("critic.safetensors", "optimizer.safetensors"):
        f = ckpt / name
        good = f.read_bytes()
        f.write_bytes(good[:100])
        ac, _ = ppo_run.build_models(ppo_cfg(), toy / "sft" / "final", None, "cpu")
        with pytest.raises(CheckpointError, match=rf"{name}: not a complete safetensors file \(100 bytes"):
            load_actor_critic(ckpt, ac, adamw(ac, ppo_cfg()))
        f.write_bytes(good)


def test_a_kill_between_the_two_renames_of_a_replacement_is_repaired(world, tmp_path, capsys):
    """atomic_dir replaces an existing X by renaming it to .X.old-* and the new one to X: a kill in
    between leaves no X. The next start puts the old one back (it is complete) and resumes from it."""
    out = tmp_path / "run"
    run_sft(world, out, max_steps=2)
    (out / "final").rename(out / ".final.old-k1ll3d")
    capsys.readouterr()
    run_sft(world, out, max_steps=3, resume=True)
    err = capsys.readouterr().err
    assert f"restored {out / 'final'} from .final.old-k1ll3d" in err
    assert f"resumed from {out / 'final'} at step 2" in err
    assert metric_steps(out) == [1, 2, 3] and not (out / ".final.old-k1ll3d").exists()


def test_truncate_metrics_keeps_lines_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    from minihuatuo.training.run_dir import truncate_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"update": u, "score": 0.5}) + "\n" for u in (1, 2, 3, 4)) + '{"update": 5, "sc')
    assert truncate_metrics(f, "update", 2) == 3
    assert [json.loads(x)["update"] for x in f.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(f, "update", 2) == 0 and truncate_metrics(tmp_path / "none.jsonl", "update", 0) == 0
