"""`minihuatuo demo --quick` end to end (issue 8, acceptance 3): every output parses and results.json
follows the contract. Accuracy is not asserted here: notes/demo.md reports it from full runs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

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
    assert len(sft) == sum(r["search"]["success"] for r in records)
    read_sft(out / "search" / "sft_simple_cot.jsonl")
    read_sft(out / "search" / "sft_direct.jsonl")
    steps = read_jsonl(out / "sft" / "metrics.jsonl")
    updates = read_jsonl(out / "ppo" / "metrics.jsonl")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert steps and all(s["loss"] > 0 for s in steps if "loss" in s)
    assert [u["update"] for u in updates] == list(range(1, config["ppo_updates"] + 1))
    for ckpt in (out / "sft" / "final", out / "ppo" / "final" / "policy"):
        model = load_model(ckpt)  # real safetensors checkpoints
        assert model.cfg.hidden_size == load_model(BASE).cfg.hidden_size
    assert "SFT + PPO" in run.stdout and "open-ended" in run.stdout  # the final table


def test_demo_refuses_to_mix_runs(quick_run):
    out, _ = quick_run
    r = subprocess.run([sys.executable, "-m", "minihuatuo", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "already holds a demo run" in r.stderr


def test_demo_settings_reach_the_training_exam_and_ppo(monkeypatch, tmp_path):
    """`train_contraindicated` shapes the training exam only (the held-out exam keeps its mix), and the
    PPO settings reach ppo_train; the stages themselves are replaced here (control flow only)."""
    import minihuatuo.stages.rl.ppo_train as ppo_train

    from minihuatuo.pipeline import demo

    seen = {}

    def stop_after_exam(cfg, out, train_items, verifier, timings):
        seen["train"] = train_items
        raise KeyboardInterrupt  # nothing after the exam is needed

    monkeypatch.setattr(demo, "huatuo_o1", stop_after_exam)
    for p in (0.0, 1.0):
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(demo.DemoConfig(n_train=200, train_contraindicated=p), tmp_path / f"p{p}")
        treat = [it.extra["world"] for it in seen["train"] if it.extra["world"]["qtype"] == "treatment"]
        with_context = [w for w in treat if w["context"]]
        assert len(with_context) > 20
        # p = 0: a named context rules the first-line drug out only where no harmless one fits the
        # patient; p = 1: every named context does
        n = sum(w["contraindicated"] for w in with_context)
        assert (n < 0.1 * len(with_context)) if p == 0.0 else (n == len(with_context)), (p, n, len(with_context))
        seen[p] = (tmp_path / f"p{p}" / "heldout.json").read_text(encoding="utf-8")
    assert seen[0.0] == seen[1.0] and len(json.loads(seen[0.0])) == 300  # the held-out exam is the same

    def fake_train(cfg, policy_dir, rl_path, out, verifier, reward_cfg):
        seen["ppo"] = cfg

    monkeypatch.setattr(ppo_train, "train", fake_train)
    cfg = demo.DemoConfig(ppo_updates=5, ppo_batch=8, ppo_warmup_ratio=0.2, ppo_lr=1e-4)
    policy = demo.reinforce(cfg, tmp_path, tmp_path / "rl.json", tmp_path / "ppo", None)
    assert policy == tmp_path / "ppo" / "final" / "policy"
    ppo = seen["ppo"]
    assert (ppo.total_episodes, ppo.batch_size, ppo.warmup_ratio, ppo.lr) == (40, 8, 0.2, 1e-4)
