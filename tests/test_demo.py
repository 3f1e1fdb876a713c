"""`minihuatuo demo --quick` end to end (issue 8, acceptance 3): every output parses and results.json
follows the contract. Accuracy is not asserted here: notes/demo.md reports it from full runs."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from dataclasses import replace
from functools import reduce
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "world" / "base"

pytestmark = pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="no shipped base model")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # every line must parse


def test_results_json_follows_the_contract(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for stage in ("base", "sft", "ppo"):
        r = results[stage]
        assert isinstance(r["accuracy"], float) and 0.0 <= r["accuracy"] <= 1.0
        assert isinstance(r["n"], int) and r["n"] == config["n_heldout"]
        graded = read_jsonl(out / "eval" / f"{stage}.jsonl")
        assert len(graded) == r["n"]
        assert sum(g["correct"] for g in graded) / r["n"] == pytest.approx(r["accuracy"])  # the file backs the number
        assert 0.0 <= r["mcq_accuracy"] <= 1.0 and r["avg_response_tokens"] > 0
        # the reasoning diagnostics (issue 19 contract), each backed by the graded file
        for key in ("unfinished", "reflection", "first_accuracy"):
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
        assert -1.0 <= r["reflection_gain"] <= 1.0  # signed: (wrong → right) − (right → wrong), over n
        n = r["n"]
        assert sum(not g["finished"] for g in graded) / n == pytest.approx(r["unfinished"])
        assert sum(g["reflected"] for g in graded) / n == pytest.approx(r["reflection"])
        assert sum(g["first_correct"] for g in graded) / n == pytest.approx(r["first_accuracy"])
        gain = sum((not g["first_correct"] and g["correct"]) - (g["first_correct"] and not g["correct"])
                   for g in graded if g["reflected"])
        assert gain / n == pytest.approx(r["reflection_gain"])
        assert sum(t["n"] for t in r["by_type"].values()) == n
        for t, v in r["by_type"].items():
            rows = [g for g in graded if g["type"] == t]
            assert len(rows) == v["n"] and sum(g["correct"] for g in rows) / len(rows) == pytest.approx(v["accuracy"])
        assert sum(g["hack"] for g in graded) / n == pytest.approx(r["hack_rate"])  # issue 25: gaming, per stage
    assert results["heldout_seed"] == config["heldout_seed"]


def test_every_output_parses(quick_run):
    out, run = quick_run
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.services.formats import read_problems, read_sft

    for path in out.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))
    for path in out.rglob("*.jsonl"):
        read_jsonl(path)
    for path in out.rglob("*.csv"):
        rows = list(csv.reader(path.open(encoding="utf-8")))
        assert len(rows) >= 2 and all(len(row) == len(rows[0]) for row in rows)
    search, rl = read_problems(out / "problems" / "search.json"), read_problems(out / "problems" / "rl.json")
    records = read_jsonl(out / "search" / "search.jsonl")
    assert len(search) > 0 and len(rl) > 0 and len(records) == len(search)
    assert len({r["id"] for r in records}) == len(records)
    sft = read_sft(out / "search" / "sft.jsonl")
    # search.jsonl is the search's own record. A found trajectory whose reflection is false of its case
    # is left out of the SFT files (world/reflection.py) and listed with its faults (search.false_reflection
    # "keep"); with "retry" the check ends such an attempt inside the search, and each one is listed
    lines = read_jsonl(out / "search" / "false_reflections.jsonl")
    dropped = [d for d in lines if "Complex_CoT" in d]
    ended = [d for d in lines if "attempt" in d]
    assert all(d["faults"] for d in lines) and len(dropped) + len(ended) == len(lines)
    assert {d["id"] for d in dropped} <= {r["id"] for r in records if r["search"]["success"]}
    by_id = {r["id"]: r for r in records}
    assert all({"attempt": d["attempt"], "outcome": "false_reflection", "detail": d["faults"]}
               in by_id[d["id"]]["search"]["outcomes"] for d in ended)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (dropped, ended)[config["search"]["false_reflection"] == "keep"] == []
    assert len(sft) == sum(r["search"]["success"] for r in records) - len(dropped)
    summary = json.loads((out / "search" / "summary.json").read_text(encoding="utf-8"))
    assert summary["discarded"].get("false_reflection", 0) == len(dropped) + sum(
        r["search"]["failure_reason"] == "false_reflection" for r in records)
    read_sft(out / "search" / "sft_simple_cot.jsonl")
    read_sft(out / "search" / "sft_direct.jsonl")
    steps = read_jsonl(out / "sft" / "metrics.jsonl")
    updates = read_jsonl(out / "ppo" / "metrics.jsonl")
    assert steps and all(s["loss"] > 0 for s in steps if "loss" in s)
    assert [u["update"] for u in updates] == list(range(1, config["ppo_updates"] + 1))
    # issue 19 point 4: the shipped PPO takes several optimizer steps per update (epochs × minibatches),
    # so the ratio leaves 1 and the clipped objective binds, in every update whose learning rate is at
    # least half its peak (the official schedule decays it linearly to 0: the last updates barely move)
    assert config["ppo"]["ppo_epochs"] * config["ppo"]["num_mini_batches"] > 1
    peak = max(u["lr"] for u in updates)
    assert all(u["clipfrac"] > 0 for u in updates if u["lr"] >= peak / 2), [(u["lr"], u["clipfrac"]) for u in updates]
    for ckpt in (out / "sft" / "final", out / "ppo" / "final" / "policy"):
        model = load_model(ckpt)  # real safetensors checkpoints
        assert model.cfg.hidden_size == load_model(BASE).cfg.hidden_size
    assert "SFT + PPO" in run.stdout and "open-ended" in run.stdout  # the final table


def test_demo_refuses_to_mix_runs(quick_run):
    out, _ = quick_run
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "already holds a demo run" in r.stderr


def test_evaluate_regrades_a_run_exactly(quick_run, tmp_path):
    """`demo --evaluate RUN` grades RUN's checkpoints on a held-out draw without training: on the run's
    own draw it reproduces the run's figures exactly (greedy decoding, the same grader), which is what
    lets the protocol's test draws (notes/demo.md §9) be graded from the dev-draw runs."""
    run, _ = quick_run
    out = tmp_path / "regraded"
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--evaluate", str(run), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    before = json.loads((run / "results.json").read_text(encoding="utf-8"))
    after = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert after["evaluated_run"] == str(run) and after["heldout_seed"] == before["heldout_seed"]
    for stage in ("base", "sft", "ppo"):
        for key in ("accuracy", "n", "unfinished", "reflection", "first_accuracy", "reflection_gain", "by_type",
                    "mean_tokens", "hack_rate"):
            assert after[stage][key] == before[stage][key], (stage, key)
    again = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--evaluate", str(run), "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already holds results" in again.stderr


def test_heldout_seed_changes_the_heldout_exam_only(monkeypatch, tmp_path):
    """The contract's `--heldout-seed S`: a new held-out exam, the same training exam and the same
    stage configs (the protocol of notes/demo.md §9 rests on it)."""
    from minihuatuo.pipeline import demo

    seen = {}

    def stop_after_exam(cfg, out, train_items, verifier, timings):
        seen[cfg.heldout_seed] = ([(it.id, it.question, it.extra["world"]) for it in train_items],
                                  {k: v for k, v in dataclasses.asdict(cfg).items() if k != "heldout_seed"})
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "huatuo_o1", stop_after_exam)
    for s in (1000, 2001):
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(demo.DemoConfig(n_train=200, heldout_seed=s), tmp_path / str(s))
    assert seen[1000] == seen[2001]
    held = [(tmp_path / str(s) / "heldout.json").read_text(encoding="utf-8") for s in (1000, 2001)]
    assert held[0] != held[1]


def test_demo_settings_reach_the_training_exam_and_ppo(monkeypatch, tmp_path):
    """`train_exam` shapes the training exam only (the held-out exam keeps its mix), and each stage of
    huatuo_o1 receives its own config from DemoConfig, derived values filled in; the stages themselves
    are replaced here (control flow only)."""
    from minihuatuo.pipeline import demo
    from minihuatuo.stages import sft
    from minihuatuo.stages.rl import ppo_run
    from minihuatuo.world.exam import ExamConfig

    seen = {}

    def stop_after_exam(cfg, out, train_items, verifier, timings):
        seen["train"] = train_items
        raise KeyboardInterrupt  # nothing after the exam is needed

    with monkeypatch.context() as m:
        m.setattr(demo, "huatuo_o1", stop_after_exam)
        for p in (0.0, 1.0):
            with pytest.raises(KeyboardInterrupt):
                cfg = demo.DemoConfig(n_train=200, train_exam=ExamConfig(contraindicated=p))
                demo.run_demo(cfg, tmp_path / f"p{p}")
            treat = [it.extra["world"] for it in seen["train"] if it.extra["world"]["qtype"] == "treatment"]
            with_context = [w for w in treat if w["context"]]
            assert len(with_context) > 20
            # p = 0: a named context rules the first-line drug out only where no harmless one fits the
            # patient; p = 1: every named context does
            n = sum(w["contraindicated"] for w in with_context)
            assert (n < 0.1 * len(with_context)) if p == 0.0 else (n == len(with_context)), (p, n, len(with_context))
            seen[p] = (tmp_path / f"p{p}" / "heldout.json").read_text(encoding="utf-8")
    assert seen[0.0] == seen[1.0] and len(json.loads(seen[0.0])) == 300  # the held-out exam is the same

    def stage(name, returns=None):
        def run(cfg, *args, **kwargs):
            seen[name] = cfg
            return returns
        return run

    monkeypatch.setattr(demo.LocalBackend, "from_dir", lambda *a, **k: None)
    monkeypatch.setattr(demo, "make_problems", stage("problems", returns=SimpleNamespace(search=[])))
    monkeypatch.setattr(demo, "search_trajectories", stage("search"))
    monkeypatch.setattr(sft, "train", stage("sft"))
    monkeypatch.setattr(ppo_run, "train", stage("ppo"))
    d = demo.DemoConfig()
    cfg = demo.DemoConfig(seed=7, response_length=99, ppo_updates=5,
                          ppo=replace(d.ppo, batch_size=8, warmup_ratio=0.2, lr=3e-4), sft=replace(d.sft, lr=0.5))
    models = demo.huatuo_o1(cfg, tmp_path / "run", [], None, {})
    assert models["ppo"] == tmp_path / "run" / "ppo" / "final" / "policy"
    ppo = seen["ppo"]
    assert (ppo.total_episodes, ppo.batch_size, ppo.warmup_ratio, ppo.lr) == (40, 8, 0.2, 3e-4)
    assert (ppo.response_length, seen["search"].max_tokens) == (99, 99)
    assert (seen["sft"].lr, seen["sft"].epochs) == (0.5, d.sft.epochs) and d.sft.epochs == 3  # the demo's value kept
    assert {seen[s].seed for s in ("problems", "search", "sft", "ppo")} == {7}
    assert (seen["problems"], seen["search"], seen["sft"], ppo) == (cfg.problems, cfg.search, cfg.sft, cfg.ppo)


def demo_config(argv: list[str]):
    """The DemoConfig `minihuatuo demo ARGV` would run with (the real parser and build_config)."""
    from minihuatuo.cli import build_parser
    from minihuatuo.pipeline.demo import PRESETS, DemoConfig
    from minihuatuo.services.config import build_config

    args = build_parser().parse_args(["demo", *argv])
    return build_config(DemoConfig, PRESETS, "quick" if args.quick else "default", args.config, args)


def test_nested_flags_and_config_file_reach_the_stage_configs(tmp_path):
    from minihuatuo.pipeline.demo import PRESETS

    (tmp_path / "c.toml").write_text('n_train = 50\n[ppo]\nbatch_size = 8\nvf_coef = 1\n[search]\nmax_depth = 1\n')
    (tmp_path / "c.json").write_text('{"n_train": 50, "ppo": {"batch_size": 8, "vf_coef": 1}, '
                                     '"search": {"max_depth": 1}}')
    for f in ("c.toml", "c.json"):
        cfg = demo_config(["--quick", "--config", str(tmp_path / f), "--ppo.lr", "1e-5", "--sft.epochs", "2",
                           "--search.max-attempts", "1", "--seed", "3"])
        quick = PRESETS["quick"]
        assert cfg.n_train == 50 and (cfg.ppo.batch_size, cfg.ppo.vf_coef, cfg.ppo.lr) == (8, 1.0, 1e-5)
        assert (cfg.search.max_depth, cfg.search.max_attempts, cfg.sft.epochs) == (1, 1, 2)
        assert cfg.ppo.total_episodes == quick.ppo_updates * 8  # derived from the file's batch size
        assert {cfg.problems.seed, cfg.search.seed, cfg.sft.seed, cfg.ppo.seed} == {3}
        # what neither the file nor a flag names keeps the preset's value, not the stage class's default
        assert (cfg.ppo.temperature, cfg.ppo.micro_batch_size, cfg.search.reformat, cfg.n_heldout) == \
               (quick.ppo.temperature, quick.ppo.micro_batch_size, "template", quick.n_heldout)
        assert cfg.sft.max_length == quick.sft.max_length == 1024


def test_old_flat_flags_keep_their_meaning(tmp_path):
    """Every flag of the flat DemoConfig (before issue 18; and --verifier, issue 20) sets the stage field(s) it
    names; in a config file too."""
    from minihuatuo.pipeline.demo import DemoConfig

    default = demo_config([])
    values = {int: 5, float: 0.25, str: "shared"}  # none of them a default; "shared": ppo.value_head

    def flag(name):
        return "--" + name.replace("_", "-")

    for old, paths in DemoConfig.ALIASES.items():
        value = {"rl_verifier.kind": "classifier"}.get(paths[0]) or values[type(reduce(getattr, paths[0].split("."), default))]
        by_old = demo_config([flag(old), str(value)])
        by_new = demo_config([x for path in paths for x in (flag(path), str(value))])  # --ppo.batch-size 5
        assert by_old == by_new != default, old
        (tmp_path / f"{old}.json").write_text(json.dumps({old: value}))
        assert demo_config(["--config", str(tmp_path / f"{old}.json")]) == by_old, old
    sft = demo_config(["--sft-batch", "8"]).sft
    assert (sft.global_batch_size, sft.micro_batch_size) == (8, 8)
    sft = demo_config(["--sft-batch", "8", "--sft.micro-batch-size", "4"]).sft  # the named field wins
    assert (sft.global_batch_size, sft.micro_batch_size) == (8, 4)
    # the demo's own flags are unchanged
    cfg = demo_config(["--ppo-updates", "7", "--response-length", "64", "--n-train", "10", "--seed", "2"])
    assert (cfg.ppo.total_episodes, cfg.ppo.response_length, cfg.search.max_tokens, cfg.n_train, cfg.sft.seed) == \
           (7 * 48, 64, 64, 10, 2)


def test_config_file_errors_name_the_file_and_field(tmp_path):
    cases = {
        '{"ppo": {"lrate": 1}}': "unknown field\\(s\\) ppo.lrate",
        '{"ppo": {"lr": "fast"}}': "ppo.lr: expected float, got str 'fast'",
        '{"search": {"max_depth": 2.5}}': "search.max_depth: expected int, got float 2.5",
        '{"ppo": {"total_episodes": 10}}': "ppo.total_episodes is derived from ppo_updates",
        '{"sft": {"seed": 1}}': "sft.seed is derived from seed",
        '{"ppo": 3}': "ppo: expected a table of PPOConfig fields",
        '{"n_trian": 3}': "unknown field\\(s\\) n_trian for DemoConfig",
    }
    for i, (text, message) in enumerate(cases.items()):
        f = tmp_path / f"bad{i}.json"
        f.write_text(text)
        with pytest.raises(ValueError, match=f"bad{i}.json: {message}"):
            demo_config(["--config", str(f)])
    with pytest.raises(SystemExit):  # derived fields have no flag
        demo_config(["--ppo.seed", "1"])


def test_search_verdicts_become_labelled_pairs(quick_run):
    """Issue 20, point 2: the quick demo's real search.jsonl → one pair per distinct verifier call, labelled
    with the verdict the search recorded, against that record's ground truth."""
    from minihuatuo.services.reward import pairs_from_search

    out, _ = quick_run
    records = [json.loads(x) for x in (out / "search" / "search.jsonl").read_text().splitlines()]
    expected = list(dict.fromkeys((c["conclusion"], r["Ground-True Answer"], c["verdict"])
                                  for r in records for c in r["search"]["verifier_calls"]))
    pairs = pairs_from_search(out / "search" / "search.jsonl")
    assert [(p.response, p.reference, p.label) for p in pairs] == expected
    assert {p.label for p in pairs} == {True, False}  # accepted and rejected conclusions both


def test_fair_ablation_trains_three_arms_of_the_same_problems(quick_run, tmp_path):
    """`demo --ablation` end to end on the quick run's problems and search (copied, so the ablation does
    not search again): the first-chain search, three SFT sets of the same problems in the same order, an
    SFT and a PPO model per arm, the summary; the base model graded as the demo grades it; a rerun
    trains nothing again, and other settings in the same directory are refused."""
    import shutil

    run, _ = quick_run
    out = tmp_path / "ablation"
    for stage in ("problems", "search"):
        shutil.copytree(run / stage, out / "seed0" / stage)
    cmd = [sys.executable, "-m", "minihuatuo", "demo", "--quick", "--ablation", "--seeds", "1", "--simple-attempts", "2",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    counts = json.loads((out / "seed0" / "data" / "counts.json").read_text(encoding="utf-8"))
    sft_ids = [x["id"] for x in read_jsonl(run / "search" / "sft.jsonl")]
    simple_ok = {x["id"] for x in read_jsonl(out / "seed0" / "simple_search" / "search.jsonl") if x["search"]["success"]}
    common = [i for i in sft_ids if i in simple_ok]
    assert counts == {"complex_found": len(sft_ids), "simple_found": len(simple_ok), "common": len(common)}
    assert len(common) > 0
    for variant in ("direct", "simple", "complex"):
        assert [x["id"] for x in read_jsonl(out / "seed0" / "data" / f"{variant}.jsonl")] == common
        assert (out / "seed0" / variant / "ppo" / "final" / "policy" / "model.safetensors").exists()
        assert len(read_jsonl(out / "seed0" / variant / "eval_ppo.jsonl")) == 100
    summary = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    demo = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert summary["base"] == demo["base"]["accuracy"]  # the same held-out problems and grader as the demo
    for variant, s in summary["variants"].items():
        assert s["sft_examples"]["runs"] == [len(common)], variant
        assert 0 <= s["ppo"]["mean"] <= 1 and s["rl_gain"]["mean"] == pytest.approx(s["ppo"]["mean"] - s["sft"]["mean"])
    assert set(summary["order_after_ppo"]) == {"simple_minus_direct", "complex_minus_simple"}
    # the direct arm is graded as its reward reads it (the whole reply), not by the think-then-answer format
    # under which every direct reply would count as unfinished
    assert summary["variants"]["direct"]["ppo_unfinished"]["mean"] < 0.5
    assert summary["variants"]["direct"]["ppo_reflection"]["mean"] == 0.0
    assert len(read_jsonl(out / "runs.jsonl")) == 3
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "SFT on" not in again.stderr  # every arm was read back, none retrained
    assert len(read_jsonl(out / "runs.jsonl")) == 3
    other = subprocess.run(cmd[:-2] + ["--ppo.lr", "1e-5", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 2 and "other settings" in other.stderr
    # --evaluate regrades every arm's checkpoints; on the run's own draw it reproduces the run exactly
    regraded = tmp_path / "regraded"
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--ablation", "--evaluate", str(out),
                        "--out", str(regraded)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_jsonl(regraded / "runs.jsonl") == read_jsonl(out / "runs.jsonl")
    again = json.loads((regraded / "ablation.json").read_text(encoding="utf-8"))
    assert again["variants"] == summary["variants"] and again["evaluated_run"] == str(out)
    # resumable: an arm graded before a crash is read back, only the missing ones are graded again
    kept = read_jsonl(regraded / "runs.jsonl")
    (regraded / "runs.jsonl").write_text(json.dumps(kept[0]) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--ablation", "--evaluate", str(out),
                        "--out", str(regraded)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"evaluating seed 0, {kept[0]['variant']}" not in r.stderr and r.stderr.count("evaluating seed") == 2
    assert read_jsonl(regraded / "runs.jsonl") == kept
    # the same directory for another draw is refused
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--ablation", "--evaluate", str(out),
                        "--heldout-seed", "7", "--out", str(regraded)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "another run or draw" in r.stderr


@pytest.mark.parametrize("ablation", [False, True])
def test_evaluate_grades_with_the_threads_asked_for(monkeypatch, ablation):
    """`demo --evaluate RUN --threads N` (and its ablation form) grades on N threads, as the run itself
    trained: the grading functions are replaced by a probe of torch's thread count."""
    import argparse

    import torch

    from minihuatuo.pipeline import demo_cli

    seen = []
    monkeypatch.setattr(demo_cli, "evaluate_ablation" if ablation else "evaluate_run",
                        lambda run, cfg, out: seen.append((torch.get_num_threads(), cfg.threads)))
    parser = argparse.ArgumentParser()
    demo_cli.add_cli(parser.add_subparsers())
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            args = parser.parse_args(["demo", "--quick", "--evaluate", "RUN", "--threads", str(n)]
                                     + (["--ablation"] if ablation else []))
            assert demo_cli.cmd_demo(args) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, 1), (2, 2)]
