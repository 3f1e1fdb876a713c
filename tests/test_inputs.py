"""Inputs that cannot hurt (issue 25, points 4 and 5): a bad value or an empty file ends with one line
on stderr naming the option, file or field, and exit status 2 (never a traceback, nothing in --out
touched); a command with nothing to do (search, verify, verifier-eval, eval, problems build on an
empty file) says so on stderr and exits 0. The rules themselves: services/config.py (`require_*` in
each config's __post_init__, the `type=` functions of plain options) and engine/model.py (ModelConfig)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil

import pytest

from minihuatuo.cli import build_parser, main


def cli(capsys, *argv):
    """(exit status, stdout, stderr) of `minihuatuo ARGV`; argparse's errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, *needles):
    code, out, err = result
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("minihuatuo "), err
    for needle in needles:
        assert str(needle) in err, (needle, err)


TRAIN = {  # the required options of each trainer; none of the files is read before the config is built
    "sft": ("--model", "M", "--data", "D", "--out"),
    "ppo": ("--policy", "M", "--data", "D", "--out"),
    "rloo": ("--policy", "M", "--data", "D", "--out"),
    "grpo": ("--policy", "M", "--data", "D", "--out"),
    "dpo": ("--policy", "M", "--data", "D", "--out"),
}


# ----------------------------------------------------------------------------- config fields: flags and files

@pytest.mark.parametrize("command, flag, value, message", [
    ("sft", "--global-batch-size", "0", "--global-batch-size: expected an integer >= 1, got 0"),
    ("sft", "--micro-batch-size", "0", "--micro-batch-size: expected an integer >= 1, got 0"),
    ("sft", "--lr", "0", "--lr: expected a number > 0, got 0.0"),
    ("sft", "--lr", "nan", "--lr: expected a"),
    ("sft", "--warmup-ratio", "1.5", "--warmup-ratio: expected a number in [0, 1], got 1.5"),
    ("sft", "--adam-beta2", "1", "--adam-beta2: expected a number in [0, 1), got 1.0"),
    ("sft", "--max-steps", "-1", "--max-steps: expected an integer >= 0, got -1"),
    ("sft", "--seed", "-1", "--seed: expected an integer in [0, 4294967295], got -1"),
    ("sft", "--schedule", "cosin", "--schedule: expected one of cosine, linear, got 'cosin'"),
    ("ppo", "--batch-size", "0", "--batch-size: expected an integer >= 1, got 0"),
    ("ppo", "--micro-batch-size", "0", "--micro-batch-size: expected an integer >= 1, got 0"),
    ("ppo", "--temperature", "0", "--temperature: expected a number > 0, got 0.0"),
    ("ppo", "--gamma", "inf", "--gamma: expected a"),
    ("ppo", "--num-mini-batches", "500", "--num-mini-batches: num_mini_batches (500) cannot exceed batch_size (128)"),
    ("rloo", "--batch-size", "0", "--batch-size: expected an integer >= 1, got 0"),
    ("rloo", "--rloo-k", "3", "--rloo-k: batch_size (128) must be a multiple of rloo_k (3)"),
    ("grpo", "--micro-batch-size", "0", "--micro-batch-size: expected an integer >= 1, got 0"),
    ("grpo", "--adv-eps", "0", "--adv-eps: expected a number > 0, got 0.0"),
    ("dpo", "--batch-size", "0", "--batch-size: expected an integer >= 1, got 0"),
    ("dpo", "--label-smoothing", "0.7", "--label-smoothing: expected a number in [0, 0.5], got 0.7"),
])
def test_config_flags_out_of_range(capsys, tmp_path, command, flag, value, message):
    assert_one_line_error(cli(capsys, command, *TRAIN[command], tmp_path / "out", flag, value),
                          f"minihuatuo {command}: error: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (("search", "--data", "D", "--out", "O", "--max-tokens", "0"), "--max-tokens: expected an integer >= 1, got 0"),
    (("search", "--data", "D", "--out", "O", "--temperature", "-1"), "--temperature: expected a number >= 0"),
    (("problems", "build", "--mcq", "M", "--out", "O", "--search-fraction", "2"),
     "--search-fraction: expected a number in [0, 1], got 2.0"),
    (("problems", "build", "--mcq", "M", "--out", "O", "--request-chunk", "0"), "--request-chunk: expected an integer"),
    (("world", "pretrain", "--out", "O", "--steps", "0"), "--steps: expected an integer >= 1, got 0"),
    (("world", "pretrain", "--out", "O", "--slip", "2"), "--slip: expected a number in [0, 1], got 2.0"),
    (("demo", "--ppo.batch-size", "0"), "--ppo.batch-size: expected an integer >= 1, got 0"),
    (("demo", "--sft-batch", "0"), "--sft-batch: expected an integer >= 1, got 0"),  # an alias setting two fields
    (("demo", "--ppo-updates", "0"), "--ppo-updates: expected an integer >= 1, got 0"),
    (("demo", "--train-exam.contraindicated", "1.5"), "--train-exam.contraindicated: expected a number in [0, 1]"),
])
def test_config_flags_of_other_commands(capsys, argv, message):
    assert_one_line_error(cli(capsys, *argv), f"error: {message}")


@pytest.mark.parametrize("suffix, text, message", [
    (".json", '{"batch_size": 0}', "c.json: batch_size: expected an integer >= 1, got 0"),
    (".toml", "micro_batch_size = 0\n", "c.toml: micro_batch_size: expected an integer >= 1, got 0"),
    (".json", '{"lr": 1e999}', "c.json: lr: expected a"),  # JSON's 1e999 is infinity
    (".json", '{"lr": 1' + "0" * 400 + "}", "c.json: lr: expected a finite number"),  # too large for a float
])
def test_config_file_values_out_of_range(capsys, tmp_path, suffix, text, message):
    (tmp_path / f"c{suffix}").write_text(text)
    assert_one_line_error(cli(capsys, "ppo", *TRAIN["ppo"], tmp_path / "out", "--config", tmp_path / f"c{suffix}"),
                          tmp_path / f"c{suffix}", message)


def test_nested_config_file_values_and_the_source_named(capsys, tmp_path):
    f = tmp_path / "demo.json"
    for text, message in (('{"ppo": {"lr": -1}}', "demo.json: ppo.lr: expected a number > 0, got -1.0"),
                          ('{"search": {"max_attempts": 0}}', "demo.json: search.max_attempts: expected an integer"),
                          ('{"sft_batch": 0}', "demo.json: sft.global_batch_size: expected an integer >= 1"),
                          ('{"train_exam": {"diagnosis": 0, "investigation": 0, "treatment": 0, "complication": 0}}',
                           "demo.json: train_exam.diagnosis: the four question-type weights must not all be 0")):
        f.write_text(text)
        assert_one_line_error(cli(capsys, "demo", "--config", f, "--out", tmp_path / "out"), message)
    # a flag wins over the file: the error names what set the value it holds
    f.write_text('{"ppo": {"batch_size": 0}}')
    assert_one_line_error(cli(capsys, "demo", "--config", f, "--ppo.batch-size", "-3"),
                          "error: --ppo.batch-size: expected an integer >= 1, got -3")
    assert not (tmp_path / "out").exists()


def test_build_config_names_the_source_of_a_relation():
    from minihuatuo.services.config import build_config
    from minihuatuo.stages.rl.rloo import PRESETS, RLOOConfig

    with pytest.raises(ValueError, match=r"^overrides: rloo_k: batch_size \(128\) must be a multiple of rloo_k"):
        build_config(RLOOConfig, PRESETS, "official", None, {"rloo_k": 3})
    with pytest.raises(ValueError, match=r"^overrides: batch_size: batch_size \(30\) must be a multiple"):
        build_config(RLOOConfig, PRESETS, "official", None, {"batch_size": 30, "rloo_k": 4})
    with pytest.raises(ValueError, match=r"^batch_size: expected an integer >= 1, got 0$"):  # in code: the field
        RLOOConfig(batch_size=0)


# ----------------------------------------------------------------------------- plain options (argparse)

@pytest.mark.parametrize("argv, message", [
    (("search", "--data", "D", "--out", "O", "--limit", "-1"), "argument --limit: expected an integer >= 0, got -1"),
    (("search", "--data", "D", "--out", "O", "--concurrency", "0"), "argument --concurrency: expected an integer >= 1"),
    (("search", "--data", "D", "--out", "O", "--batch-size", "x"), "argument --batch-size: expected an integer >= 1"),
    (("generate", "--model", "M", "--prompt", "p", "--max-new-tokens", "0"), "argument --max-new-tokens: expected"),
    (("generate", "--model", "M", "--prompt", "p", "--top-p", "0"), "argument --top-p: expected a number in (0, 1]"),
    (("generate", "--model", "M", "--prompt", "p", "--temperature", "-0.5"), "argument --temperature: expected"),
    (("chat", "--model", "M", "--top-k", "-1"), "argument --top-k: expected an integer >= 0, got -1"),
    (("serve", "--model", "M", "--port", "70000"), "argument --port: expected an integer in [0, 65535], got 70000"),
    (("serve", "--model", "M", "--batch-size", "0"), "argument --batch-size: expected an integer >= 1, got 0"),
    (("verify", "--response", "a", "--reference", "b", "--threshold", "1.5"),
     "argument --threshold/--verifier-threshold: expected a number in [0, 1], got 1.5"),
    (("eval", "--data", "D", "--outputs", "O", "--max-tokens", "0"), "argument --max-tokens: expected an integer >= 1"),
    (("ppo", *TRAIN["ppo"], "O", "--max-updates", "-1"), "argument --max-updates: expected an integer >= 0, got -1"),
    (("dpo", *TRAIN["dpo"], "O", "--max-steps", "-2"), "argument --max-steps: expected an integer >= 0, got -2"),
    (("world", "exam", "--out", "O", "--seed", "-1"), "argument --seed: expected an integer in [0, 4294967295]"),
    (("world", "pairs", "--out", "O", "--n", "0"), "argument --n: expected an integer >= 1, got 0"),
    (("demo", "--ablation", "--seeds", "0"), "argument --seeds: expected an integer >= 1, got 0"),
])
def test_plain_options_out_of_range(capsys, argv, message):
    assert_one_line_error(cli(capsys, *argv), "error: " + message)


def test_every_plain_numeric_option_has_a_rule():
    """No option is parsed by the bare int/float (a config field's flag is checked by its config;
    --cop-base has choices)."""
    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif a.type in (int, float) and not a.dest.startswith("cfg_") and a.choices is None:
                yield f"{path} {a.option_strings[0]}"

    assert list(walk(build_parser(), "minihuatuo")) == []


# ----------------------------------------------------------------------------- every config field has a rule

def config_classes():
    from minihuatuo.engine.model import ModelConfig
    from minihuatuo.pipeline.demo import DemoConfig
    from minihuatuo.services.reward import RewardConfig
    from minihuatuo.stages.decontam import DecontamConfig
    from minihuatuo.stages.evaluate import EvalConfig
    from minihuatuo.stages.problems import ProblemsConfig
    from minihuatuo.stages.rl.dpo import DPOConfig
    from minihuatuo.stages.rl.grpo import GRPOConfig
    from minihuatuo.stages.rl.ppo import PPOConfig
    from minihuatuo.stages.rl.rloo import RLOOConfig
    from minihuatuo.stages.search import SearchConfig
    from minihuatuo.stages.sft import SFTConfig
    from minihuatuo.world.exam import ExamConfig
    from minihuatuo.world.pretrain import PretrainConfig
    from minihuatuo.world.text import CorpusConfig
    from minihuatuo.world.tutor import TutorConfig

    return (SFTConfig, PPOConfig, RLOOConfig, GRPOConfig, DPOConfig, SearchConfig, ProblemsConfig, DecontamConfig,
            EvalConfig, RewardConfig, TutorConfig, CorpusConfig, ExamConfig, PretrainConfig, DemoConfig, ModelConfig)


def test_every_numeric_field_of_every_config_is_checked():
    """No int field takes -1 (counts >= 1, 'off/all' counts >= 0, seeds and ids >= 0) and no float
    field takes NaN, infinity or a string; the defaults and every preset pass."""
    import typing

    for cls in config_classes():
        cls()  # the defaults pass
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            t = next((a for a in typing.get_args(t) if a is not type(None)), t)  # int | None -> int
            if t is int:
                bad = (-1, "3")
            elif t is float:
                bad = (math.nan, math.inf, "0.5")
            else:
                continue
            for value in bad:
                with pytest.raises(ValueError, match=f"{f.name}"):
                    cls(**{f.name: value})


def test_presets_pass_their_rules():
    from minihuatuo.pipeline.demo import PRESETS as DEMO
    from minihuatuo.stages.rl import dpo, grpo, ppo, rloo
    from minihuatuo.stages.sft import PRESETS as SFT
    from minihuatuo.world.pretrain import SIZES

    for presets in (DEMO, SFT, SIZES, ppo.PRESETS, rloo.PRESETS, grpo.PRESETS, dpo.PRESETS):
        for cfg in presets.values():
            assert dataclasses.replace(cfg) == cfg  # __post_init__ again, on the preset's values


def test_diagnostics_patterns_must_be_regular_expressions():
    from minihuatuo.stages.diagnostics import DiagnosticsConfig

    with pytest.raises(ValueError, match=r"reflection_pattern: not a regular expression"):
        DiagnosticsConfig(reflection_pattern="(wait")


# ----------------------------------------------------------------------------- empty data files

def test_trainers_refuse_an_empty_data_file_and_keep_the_previous_run(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for name, text in (("empty.jsonl", ""), ("empty.json", "[]")):
        data = tmp_path / name
        data.write_text(text)
        for command in ("ppo", "rloo", "grpo", "dpo", "sft"):
            what = "no SFT examples" if command == "sft" else "no problems"
            model = "--model" if command == "sft" else "--policy"
            assert_one_line_error(cli(capsys, command, model, tiny_checkpoint, "--data", data, "--out", out,
                                      "--overwrite"), f"minihuatuo {command}: error: {data}: {what}; nothing to train")
        assert_one_line_error(cli(capsys, "dpo", "--policy", tiny_checkpoint, "--data", data, "--out", tmp_path / "p",
                                  "--pairs-only"), f"{data}: no problems")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # --overwrite removed nothing
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("text", ["", "[]"])
def test_nothing_to_do_on_an_empty_file_is_said_and_exits_0(capsys, tmp_path, text):
    data = tmp_path / "empty.json"
    data.write_text(text)
    out = tmp_path / "out"
    for argv, message in (
            (("search", "--data", data, "--out", out, "--search-checkpoint", tmp_path / "none"),
             f"minihuatuo search: {data} holds no problems; nothing to do"),
            (("verify", "--pairs", data), f"minihuatuo verify: {data} holds no pairs; nothing to do"),
            (("verifier-eval", "--data", data, "--json", out / "m.json"),
             f"minihuatuo verifier-eval: {data} holds no labeled pairs; nothing to do"),
            (("verifier-eval", "--from-sft", data, "--write-set", out / "set.jsonl"),
             f"minihuatuo verifier-eval: {data} holds no SFT items; nothing to do"),
            (("eval", "--data", data, "--outputs", out / "o.jsonl", "--report", out / "r.json"),
             f"minihuatuo eval: {data} holds no MCQs; nothing to do"),
            (("problems", "build", "--mcq", data, "--out", out),
             f"minihuatuo problems build: {data} holds no MCQs; nothing to do"),
    ):
        assert cli(capsys, *argv) == (0, "", message + "\n")
        assert not out.exists()  # nothing written


# ----------------------------------------------------------------------------- a model's config.json

@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", "four", "field 'num_hidden_layers': expected an integer >= 1, got 'four'"),
    ("hidden_size", -8, "field 'hidden_size': expected an integer >= 1, got -8"),
    ("num_attention_heads", 0, "field 'num_attention_heads': expected an integer >= 1, got 0"),
    ("rms_norm_eps", "small", "field 'rms_norm_eps': expected a number > 0, got 'small'"),
    ("rope_theta", None, "field 'rope_theta': expected a number > 0, got None"),
    ("vocab_size", 3.5, "field 'vocab_size': expected an integer >= 1, got 3.5"),
    ("eos_token_id", "end", "field 'eos_token_id': expected a token id"),
    ("id2label", 3, "field 'id2label': expected an object, got 3"),
])
def test_bad_model_config_json_names_the_file_and_field(capsys, tmp_path, tiny_checkpoint, field, value, message):
    model = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, field: value}))
    assert_one_line_error(cli(capsys, "generate", "--model", model, "--prompt", "x", "--raw"),
                          f"minihuatuo generate: error: {model / 'config.json'}: {message}")


def test_rl_data_that_cannot_fill_one_batch_is_refused_before_the_old_run_is_replaced(toy, tmp_path, capsys):
    """With drop_last (the official loader), 4 problems cannot fill a batch of 8 distinct prompts: the
    error comes when the data are read, so --overwrite has not yet removed the previous run."""
    from minihuatuo.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"update": 1}\n')
    rc = main(["ppo", "--policy", str(toy / "sft" / "final"), "--data", str(toy / "problems.json"), "--out", str(out),
               "--preset", "tiny-world", "--batch-size", "8", "--drop-last", "true", "--overwrite",
               "--verifier", "exact"])
    assert rc == 2 and (out / "metrics.jsonl").read_text() == '{"update": 1}\n'
    assert "4 problems cannot fill one batch of 8 distinct prompts" in capsys.readouterr().err
