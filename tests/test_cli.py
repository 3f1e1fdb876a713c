"""The command line, run as a user runs it (subprocesses on real checkpoint files).

Contract: `minihuatuo generate --model DIR --prompt TEXT --max-new-tokens N --temperature 0 --raw`
prints exactly the decoded completion (special tokens skipped, no chat template) and nothing else."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import ClassVar

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

PROMPT = "The patient presents with fever and cough. Hmm, wait:"


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minihuatuo", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def oracle_completion(ckpt, ids, n):
    """Greedy completion by transformers on the same files, decoded by the `tokenizers` library."""
    transformers = pytest.importorskip("transformers")
    from minihuatuo.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    return HFTokenizer.from_file(str(ckpt / "tokenizer.json")).decode(out[0, len(ids):].tolist(),
                                                                      skip_special_tokens=True)


def test_generate_raw_contract_stdout_is_exactly_the_completion(tiny_checkpoint):
    r = run("generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "20",
            "--temperature", "0", "--raw")
    assert r.returncode == 0, r.stderr
    ids = HFTokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(PROMPT).ids  # BOS added
    expected = oracle_completion(tiny_checkpoint, ids, 20)
    assert expected.strip()  # a non-trivial completion, so equality means something
    assert r.stdout == expected


def test_generate_quantize_int8_is_transformers_on_the_dequantised_weights(tiny_checkpoint, tmp_path):
    """`--quantize int8` decodes with int8 projections: the completion transformers writes on the same
    checkpoint with every projection rounded to its int8 values (the function the int8 model computes)."""
    from minihuatuo.engine.checkpoint import load_model, save_model
    from minihuatuo.engine.model import Linear
    from minihuatuo.engine.quantize import dequantize_int8, quantize_int8

    r = run("generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "20",
            "--temperature", "0", "--raw", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    rounded = tmp_path / "rounded"
    model = load_model(tiny_checkpoint)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear):
                m.weight.copy_(dequantize_int8(*quantize_int8(m.weight)))
    save_model(model, rounded)
    for f in tiny_checkpoint.iterdir():  # the tokenizer files
        if not (rounded / f.name).exists():
            shutil.copy(f, rounded / f.name)
    ids = HFTokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(PROMPT).ids
    assert r.stdout == oracle_completion(rounded, ids, 20)
    # (on this checkpoint int8 rounding leaves the 20 greedy tokens unchanged, so check that the
    # command's loader did quantise)
    import argparse

    from minihuatuo import cli
    from minihuatuo.engine.quantize import Int8Linear

    args = argparse.Namespace(model=str(tiny_checkpoint), chat_template=None, dtype="float32", device="cpu",
                              quantize="int8")
    loaded, _ = cli._load(args, chat=False)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 7 * 2 + 1 and loaded.use_kernels


def test_console_script_matches_module(tiny_checkpoint):
    exe = shutil.which("minihuatuo")
    if exe is None:
        pytest.skip("console script not on PATH (package not installed)")
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12",
            "--temperature", "0", "--raw"]
    a = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert a.returncode == 0 and a.stdout == run(*args).stdout


def test_generate_applies_the_chat_template_without_raw(tiny_checkpoint):
    from minihuatuo.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    r = run("generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--system", "Be brief.",
            "--max-new-tokens", "15", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == oracle_completion(tiny_checkpoint, ids, 15)


def test_sampling_with_seed_is_reproducible_from_the_cli(tiny_checkpoint):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "15",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--raw"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_chat_keeps_the_conversation(tiny_checkpoint):
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.engine.sample import SamplingConfig, generate
    from minihuatuo.engine.tokenizer import Tokenizer

    r = run("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "10", "--temperature", "0",
            stdin="What is the first-line treatment?\nAnd in pregnancy?\n/exit\n")
    assert r.returncode == 0, r.stderr
    # The second reply must be generated from the whole conversation, first reply included.
    tok, model = Tokenizer.from_dir(tiny_checkpoint), load_model(tiny_checkpoint).eval()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, stop_token_ids=tuple(tok.eos_ids))
    history, expected_stdout = [], ""
    for question in ["What is the first-line treatment?", "And in pregnancy?"]:
        history.append({"role": "user", "content": question})
        out = generate(model, [tok.apply_chat_template(history)], cfg, pad_id=tok.pad_id)
        reply = tok.decode(out.responses()[0])
        history.append({"role": "assistant", "content": reply})
        expected_stdout += reply + "\n"
    assert r.stdout == expected_stdout
    assert r.stderr.count("you> ") == 3  # the prompts went to stderr


def test_bad_checkpoint_gives_a_clear_error_and_no_stdout(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--raw")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "no tokenizer.json" in r.stderr and str(tmp_path / "missing") in r.stderr


def test_version_flag_and_declared_python_range():
    """`minihuatuo --version` prints the package version; setup.cfg declares the Python range CI tests
    (>= 3.11: config.py reads TOML with the standard library's tomllib, new in 3.11)."""
    import configparser
    import subprocess
    import sys
    from pathlib import Path

    import minihuatuo

    r = subprocess.run([sys.executable, "-m", "minihuatuo", "--version"], capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip()) == (0, f"minihuatuo {minihuatuo.__version__}")
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert cfg["options"]["python_requires"].strip() == ">=3.11"
    assert sys.version_info >= (3, 11)
    assert (Path(__file__).resolve().parents[1] / "LICENSE").read_text().startswith("MIT License")


# ----------------------------------------------------------------------------- configuration (services/config.py)
# Nested configs on made-up dataclasses: the rules, apart from any stage (the demo's own: test_demo.py).


@dataclass
class Inner:
    lr: float = 1.0
    steps: int = 10
    name: str = "a"
    seed: int = 0


@dataclass
class Outer:
    seed: int = 0
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5))  # the outer config's own inner defaults
    DERIVED: ClassVar[dict[str, str]] = {"inner.seed": "seed"}
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"inner_lr": ("inner.lr",), "both": ("inner.steps", "seed")}

    def __post_init__(self):
        self.inner = replace(self.inner, seed=self.seed)


def test_nested_config_flags_files_and_layers(tmp_path):
    import argparse

    from minihuatuo.services.config import add_config_args, build_config

    parser = argparse.ArgumentParser()
    add_config_args(parser, Outer)
    flags = {o for a in parser._actions for o in a.option_strings}
    assert {"--seed", "--inner.lr", "--inner-lr", "--inner.steps", "--both"} <= flags and "--inner.seed" not in flags
    (tmp_path / "c.toml").write_text('seed = 2\n[inner]\nname = "file"\nsteps = 4\n')
    (tmp_path / "c.json").write_text('{"seed": 2, "inner": {"name": "file", "steps": 4}}')
    for f in ("c.toml", "c.json"):
        args = parser.parse_args(["--config", str(tmp_path / f), "--inner.steps", "3", "--inner-lr", "0.25"])
        assert build_config(Outer, {}, None, args.config, args) == Outer(seed=2, inner=Inner(0.25, 3, "file"))
    # a nested config given in part keeps the outer field's default (lr 0.5), a preset's when one is named
    presets = {"p": Outer(inner=Inner(lr=0.1, name="preset"))}
    assert build_config(Outer, {}, None, str(tmp_path / "c.json")).inner == Inner(0.5, 4, "file", seed=2)
    assert build_config(Outer, presets, "p", None, {"inner.steps": 9}).inner == Inner(0.1, 9, "preset")
    assert build_config(Outer, {}, None, None, {"inner.steps": 9}) == build_config(Outer, {}, None, None,
                                                                                    {"inner": {"steps": 9}})
    # an alias setting several fields; a field named as well wins over it
    assert build_config(Outer, {}, None, None, parser.parse_args(["--both", "5"])) == Outer(5, Inner(0.5, 5, seed=5))
    assert build_config(Outer, {}, None, None, {"both": 5, "inner": {"steps": 6}}).inner.steps == 6


def test_config_file_type_errors_name_the_file_and_field(tmp_path):
    from minihuatuo.services.config import build_config
    from minihuatuo.stages.sft import PRESETS, SFTConfig

    for text, message in (('{"epochs": "3"}', "epochs: expected int, got str '3'"),
                          ('{"epochs": true}', "epochs: expected int, got bool True"),
                          ('{"pack": 1}', "pack: expected bool, got int 1"),
                          ('{"inner": {"steps": 1.5}}', "inner.steps: expected int, got float 1.5"),
                          ('{"inner": {"seed": 1}}', "inner.seed is derived from seed"),
                          ('{"inner": {"step": 1}}', "unknown field\\(s\\) inner.step"),
                          ('{"inner": []}', "inner: expected a table of Inner fields")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=f"bad.json: {message}"):
            build_config(Outer if "inner" in text else SFTConfig, {}, None, str(tmp_path / "bad.json"))
    (tmp_path / "ok.json").write_text('{"lr": 1}')  # an int where a float is expected is a float
    lr = build_config(SFTConfig, PRESETS, "tiny-world", str(tmp_path / "ok.json")).lr
    assert lr == 1.0 and isinstance(lr, float)


def test_every_help_opens_with_a_summary_and_ends_with_a_runnable_example():
    """Issue 21 point 7: `minihuatuo CMD --help` says in its first line what CMD does and ends with an
    example that parses with the real parser and names only files that exist or that an earlier step
    of the recipe writes."""
    import argparse
    import shlex

    from minihuatuo.cli import build_parser

    def walk(parser, path):
        yield path, parser
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, path + [name])

    seen = 0
    for path, parser in walk(build_parser(), ["minihuatuo"]):
        lines = parser.format_help().rstrip("\n").splitlines()
        assert lines[0] and not lines[0].startswith("usage") and lines[1] == "", (path, lines[:2])
        assert lines[0][0].isalpha() and lines[0].endswith((".", "?", ")")), (path, lines[0])
        assert lines[-2].startswith("example") and lines[-1].startswith("  minihuatuo "), (path, lines[-2:])
        argv = shlex.split(lines[-1])[1:]
        if len(path) > 1:  # the example is of this command
            assert argv[:len(path) - 1] == path[1:] or path[-1] in ("world", "problems"), (path, argv)
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{' '.join(path)}: its example does not parse: {lines[-1]}") from e
        for word in argv:
            if word.startswith("data/"):
                assert (Path(__file__).resolve().parents[1] / word).exists(), (path, word)
        seen += 1
    assert seen >= 21
