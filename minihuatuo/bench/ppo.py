"""Where one PPO update spends its time: rollout (sampling), reference + value forwards, reward
(verifier), optimisation (epochs × minibatches of forward + backward + AdamW).

    python -m minihuatuo.bench ppo [--preset tiny] [--batch 32] [--response-length 96] [--updates 3] [--json]

A random-weight model of the given preset is saved with a real tokenizer, the verifiable problems are
synthetic, the verifier is the rule verifier, and the PPO settings are the `tiny-world` preset's
(overridable here). Fractions are of the update's wall time, median over the updates after the first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from .generate import machine

PARTS = ("time_rollout", "time_ref_value", "time_reward", "time_optimize")


def write_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer with the plain chat template's special tokens, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["## Thinking\n\nfever and cough suggest pneumonia.\n\n## Final Response\n\namoxicillin"] * 50,
                            trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<|pad|>"}))
    return path


def main(argv=None) -> int:
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset
    from minihuatuo.services.verifier import RuleVerifier
    from minihuatuo.services.verifier_text import load_aliases
    from minihuatuo.stages.rl.ppo import PRESETS
    from minihuatuo.stages.rl.ppo_run import train

    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench ppo", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--response-length", type=int, default=96)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = replace(PRESETS["tiny-world"], batch_size=args.batch, micro_batch_size=args.batch,
                  response_length=args.response_length, total_episodes=args.batch * args.updates, save_every=0,
                  early_stop=False)  # every response has the full length: a fixed amount of work per update
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = write_tokenizer(d / "tok")
        model = build_model(preset(args.preset, vocab_size=400), seed=0)
        save_model(model, d / "policy", copy_files_from=tok)
        problems = [{"Open-ended Verifiable Question": f"Patient {i} has fever and cough. Treatment?",
                     "Ground-True Answer": "amoxicillin"} for i in range(args.batch)]
        (d / "problems.json").write_text(json.dumps(problems))
        history = train(cfg, d / "policy", d / "problems.json", d / "out", RuleVerifier(load_aliases()))
    steady = history[1:] or history
    parts = {k: statistics.median(m[k] for m in steady) for k in PARTS}
    total = sum(parts.values())
    report = {"machine": machine(), "preset": args.preset, "params_M": round(model.num_parameters() / 1e6, 2),
              "batch": args.batch, "response_length": args.response_length, "ppo_epochs": cfg.ppo_epochs,
              "seconds": parts, "fractions": {k: v / total for k, v in parts.items()}, "update_seconds": total}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {args.preset} ({report['params_M']}M params), "
          f"batch {args.batch}, {args.response_length} response tokens, {cfg.ppo_epochs} PPO epochs")
    for k in PARTS:
        print(f"  {k[5:]:>10}: {parts[k]:7.3f} s  {parts[k] / total:6.1%}")
    print(f"  {'update':>10}: {total:7.3f} s")
    return 0
