"""`minihuatuo demo`: the whole HuatuoGPT-o1 recipe on the bundled clinical world, on a CPU (issue 8).

    minihuatuo demo [--quick] [--out DIR] [--seed S] [--config FILE] [--field value ...]
    minihuatuo demo --ablation [--out DIR]            (demo_ablation.py: paper Tables 2-3 in miniature)

`huatuo_o1` below is the paper's Algorithm 1 with the project's real modules and no shortcuts:
the world's MCQs become verifiable problems (problems.py, §2.1), the base model searches for
complex reasoning trajectories as its own search LLM with the alias-aware rule verifier
(search.py, §3.1), the base model is fine-tuned on the complex CoTs (sft.py), and the SFT model
is trained with PPO on verifier rewards (ppo_train.py, §3.2). `run_demo` then evaluates base, SFT
and SFT+PPO on held-out problems the same way (`evaluate_model`) and writes everything to DIR:

    DIR/results.json                  the contract: {"base"|"sft"|"ppo": {"accuracy", "n", ...}, ...}
    DIR/config.json                   the DemoConfig of the run
    DIR/problems/                     search.json, rl.json, dropped.jsonl, summary.json (problems.py)
    DIR/search/                       search.jsonl (+ provenance), sft.jsonl, sft_simple_cot.jsonl,
                                      sft_direct.jsonl, summary.json (search.py / search_cli.py)
    DIR/sft/, DIR/ppo/                metrics.jsonl per step / update, final/ checkpoints
    DIR/eval/{base,sft,ppo}.jsonl     every held-out reply with its grade (open-ended and MCQ)
    DIR/accuracy.csv, ppo_reward.csv  (and .png when matplotlib is installed)

Defaults were measured on a 2-core CPU (notes/demo.md): the full run takes under 10 minutes,
`--quick` (fewer problems and updates) under 2. What each setting does, and why it has the value
it has, is in notes/demo.md.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from minihuatuo.services.backends import ChatRequest, LocalBackend
from minihuatuo.services.formats import write_problems
from minihuatuo.stages.evaluate import FREE_PROMPT, extract_choice, final_response, render_prompt
from minihuatuo.stages.problems import ProblemsConfig, build_problems
from minihuatuo.world.evaluation import world_verifier
from minihuatuo.world.exam import ExamConfig, generate_exam, open_problem
from minihuatuo.world.kb import DEFAULT_KB, WORLD_DIR, load_kb


@dataclass
class DemoConfig:
    """The demo's knobs. Stage settings not listed here are the stage's own `tiny-world` preset
    (sft.PRESETS, ppo.PRESETS) or its paper default (SearchConfig: depth 3, 3 attempts)."""

    seed: int = 0  # one seed for everything random: exam draw, split, search, SFT order, PPO
    base: str = str(WORLD_DIR / "base")  # the pretrained stand-in for an instruct LLM
    n_train: int = 1200  # training MCQs generated; the too-easy filter keeps about two thirds
    n_heldout: int = 300  # held-out problems (new combinations of findings), graded for each model
    heldout_seed: int = 1000  # fixed apart from `seed`, so that seeds differ in training only
    # P(a treatment question's named context rules out the first-line drug), in the *training* exam
    # only (world_exam.ExamConfig.contraindicated; the held-out exam keeps 0.6). The too-easy filter
    # keeps nearly every contraindicated question and drops about half of those with a harmless
    # context, so on D_RL "a named context means the alternative" is right 3 times in 4. 0.4 evens
    # that out, but its SFT models were weaker and PPO from them less stable (notes/demo.md §7).
    train_contraindicated: float = 0.6
    search_fraction: float = 0.5  # D_search vs D_RL (paper §4.1: 20K / 20K)
    # stage 1: search (search.py; the base model is the search LLM, the template reformatter writes ê)
    max_depth: int = 3  # N
    max_attempts: int = 3  # T
    search_in_flight: int = 512  # problems searched at once (one batched sampler call per step)
    # stage 1: SFT (sft.py, preset tiny-world)
    sft_epochs: int = 1  # one pass: SFT teaches the reflection, PPO then finishes it (notes/demo.md §3)
    sft_lr: float = 5e-4
    sft_batch: int = 16
    sft_max_length: int = 1024  # the model's context: no searched trajectory is cut before its answer
    # stage 2: PPO (ppo_train.py, preset tiny-world)
    # 48 × 48 rollouts: after 24, PPO from the 2,000-step base model had over-applied the
    # contraindication check or dropped it; 48 gained 2-13 points more (notes/demo.md §7)
    ppo_updates: int = 48
    ppo_batch: int = 48
    ppo_micro_batch: int = 16  # rows per forward; rows of similar length together, cut to their longest
    ppo_lr: float = 2e-4
    # linear warmup over ceil(ratio · updates) updates, the first at lr 0 (ppo.py; official 0.05 of
    # ~160 updates). 0: the shipped SFT models take the full rate at once; where one did not, a warmup
    # only delayed the collapse (notes/demo.md §7)
    ppo_warmup_ratio: float = 0.0
    ppo_epochs: int = 1
    ppo_beta: float = 0.03  # paper §4.1
    ppo_temperature: float = 0.7  # rollouts (and their log-probs); 1.0 gave mostly unfinished replies
    ppo_value_head: str = "separate"  # a critic network (official); a head on the policy trunk gained less
    ppo_vf_coef: float = 0.1  # official
    # GAE λ. The official 0.95 carries the end-of-reply score only ~20 tokens back (0.95^20 ≈ 0.36):
    # the diagnosis written 250 tokens earlier depends on a critic that has had a few updates to learn;
    # in a sweep λ 0.95 collapsed the policy (notes/demo.md §3)
    ppo_lam: float = 1.0
    response_length: int = 384  # new tokens per rollout / evaluation reply
    # machine
    batch_size: int = 512  # rows per batched generate call (finished rows leave the batch: sample.py)
    threads: int = 0  # torch threads (0 = torch's default: all cores)


PRESETS = {
    "default": DemoConfig(),
    "quick": DemoConfig(n_train=300, n_heldout=100, max_attempts=2, ppo_updates=3, ppo_batch=32),
}


# ---------------------------------------------------------------------------------------------------
# Algorithm 1


def huatuo_o1(cfg: DemoConfig, out: Path, train_items, verifier, timings: dict) -> dict:
    """Paper Algorithm 1 on the world's training MCQs. Returns the checkpoint of each stage."""
    base = LocalBackend.from_dir(cfg.base, dtype="float32", batch_size=cfg.batch_size, seed=cfg.seed)
    with timed(timings, "problems"):  # §2.1: MCQs -> verifiable problems (x, y*), D_search and D_RL
        built = make_problems(cfg, out / "problems", train_items, base)
    with timed(timings, "search"):  # stage 1, lines 1-12: a correct trajectory per problem, ê and ŷ
        search_trajectories(cfg, out / "search", built.search, base, verifier)
    del base
    with timed(timings, "sft"):  # stage 1, line 13: SFT of the base model on (x, ê, ŷ)
        sft_model = fine_tune(cfg, cfg.base, out / "search" / "sft.jsonl", out / "sft")
    with timed(timings, "ppo"):  # stage 2: PPO from the SFT model on D_RL with verifier rewards
        ppo_model = reinforce(cfg, sft_model, out / "problems" / "rl.json", out / "ppo", verifier)
    return {"base": Path(cfg.base), "sft": sft_model, "ppo": ppo_model}


def make_problems(cfg: DemoConfig, out: Path, train_items, base):
    """§2.1 with the base model as the too-easy filter's small model (what it already answers
    correctly teaches nothing) and the offline reformatter (there is no LLM here)."""
    built = build_problems(train_items, ProblemsConfig(seed=cfg.seed, search_fraction=cfg.search_fraction),
                           filter_models={"base": base}, out_dir=out)
    say(f"problems: {len(train_items)} MCQs -> {len(built.search)} for search, {len(built.rl)} for RL "
        f"(dropped: {built.counts})")
    return built


def search_trajectories(cfg: DemoConfig, out: Path, problems, base, verifier) -> dict:
    """§3.1: the base model is LLM_init and LLM_k, the rule verifier with the world's aliases judges
    each conclusion, and the template reformatter writes ê and ŷ (search_reformat.py). Writes the
    SFT file and the two ablation files (simple CoT, direct response) of paper Table 2."""
    from minihuatuo.stages.search import SearchConfig, run_search
    from minihuatuo.stages.search_cli import format_summary, token_counter, write_outputs

    search_cfg = SearchConfig(max_depth=cfg.max_depth, max_attempts=cfg.max_attempts, reformat="template",
                              seed=cfg.seed, max_in_flight=cfg.search_in_flight, max_tokens=cfg.response_length)
    records = run_search(problems, base, verifier, out, search_cfg, count_tokens=token_counter(base.tokenizer))
    summary = write_outputs(out, records, search_cfg, "base model tokenizer")
    say(format_summary(summary, search_cfg))
    return summary


def fine_tune(cfg: DemoConfig, model_dir, data_path: Path, out: Path) -> Path:
    from minihuatuo.stages.sft import PRESETS as SFT_PRESETS
    from minihuatuo.stages.sft import train as train_sft

    sft_cfg = replace(SFT_PRESETS["tiny-world"], epochs=cfg.sft_epochs, lr=cfg.sft_lr, seed=cfg.seed,
                      global_batch_size=cfg.sft_batch, micro_batch_size=cfg.sft_batch, max_length=cfg.sft_max_length)
    train_sft(sft_cfg, model_dir, data_path, out)
    return out / "final"


def reinforce(cfg: DemoConfig, policy_dir, rl_path: Path, out: Path, verifier, require_thinking: bool = True) -> Path:
    """PPO with r' = 1 / 0.1 / 0 (reward.py). require_thinking=False only for the direct-response
    ablation, whose SFT model never writes a "## Thinking" part."""
    from minihuatuo.services.reward import RewardConfig
    from minihuatuo.stages.rl.ppo import PRESETS as PPO_PRESETS
    from minihuatuo.stages.rl.ppo_train import train as train_ppo

    ppo_cfg = replace(PPO_PRESETS["tiny-world"], seed=cfg.seed, batch_size=cfg.ppo_batch,
                      micro_batch_size=cfg.ppo_micro_batch, total_episodes=cfg.ppo_updates * cfg.ppo_batch,
                      lr=cfg.ppo_lr, warmup_ratio=cfg.ppo_warmup_ratio, ppo_epochs=cfg.ppo_epochs,
                      beta=cfg.ppo_beta, response_length=cfg.response_length, temperature=cfg.ppo_temperature,
                      value_head=cfg.ppo_value_head, vf_coef=cfg.ppo_vf_coef, lam=cfg.ppo_lam, save_every=0)
    train_ppo(ppo_cfg, policy_dir, rl_path, out, verifier, reward_cfg=RewardConfig(require_thinking=require_thinking))
    return out / "final" / "policy"


# ---------------------------------------------------------------------------------------------------
# evaluation: the same requests for every model


def evaluate_model(model_dir, items, problems, verifier, cfg: DemoConfig, out_file: Path, name: str,
                   mcq: bool = True) -> dict:
    """Held-out accuracy of one checkpoint, greedy:
      open-ended: the question x alone (what SFT and PPO train on); the verifier reads the final
                  response (text after "## Final Response", else the whole reply), as the reward does;
      MCQ:        evaluate.FREE_PROMPT; the benchmark scorer's extraction (evaluate.extract_choice).
    Every reply and grade goes to out_file (JSONL)."""
    backend = LocalBackend.from_dir(model_dir, dtype="float32", batch_size=cfg.batch_size)
    tok = backend.tokenizer

    def ask(texts):
        reqs = [ChatRequest([{"role": "user", "content": t}], temperature=0.0, max_tokens=cfg.response_length)
                for t in texts]
        return [r[0] for r in backend.complete(reqs)]

    open_replies = ask([p.x for p in problems])
    mcq_replies = ask([render_prompt(it, FREE_PROMPT) for it in items]) if mcq else [""] * len(items)
    rows, n_ok, n_mcq, tokens = [], 0, 0, []
    for it, p, reply, mreply in zip(items, problems, open_replies, mcq_replies):
        ok = verifier.verify(final_response(reply), p.y_star)
        ex = extract_choice(mreply, it.options)
        mcq_ok = ex.first == ex.last == it.answer_idx
        n_ok, n_mcq = n_ok + ok, n_mcq + mcq_ok
        tokens.append(len(tok.encode(reply)))
        rows.append({"id": it.id, "question": p.x, "answer": p.y_star, "reply": reply, "correct": ok,
                     "mcq_reply": mreply, "mcq_choice": ex.first, "mcq_key": it.answer_idx, "mcq_correct": mcq_ok,
                     "reply_tokens": tokens[-1], "world": it.extra.get("world")})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n = len(problems)
    return {"accuracy": n_ok / n, "n": n, "mcq_accuracy": n_mcq / n if mcq else None, "mcq_n": n if mcq else 0,
            "avg_response_tokens": statistics.mean(tokens), "checkpoint": str(model_dir), "name": name}


# ---------------------------------------------------------------------------------------------------
# the run


def run_demo(cfg: DemoConfig, out_dir) -> dict:
    import torch

    from minihuatuo.pipeline.report import print_examples, results_table, write_plots

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    if (out / "results.json").exists() or (out / "search").exists():
        raise ValueError(f"{out}: already holds a demo run; choose another --out (runs are not mixed)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    kb = load_kb(DEFAULT_KB)
    verifier = world_verifier(kb)
    train_items = generate_exam(kb, "train", cfg.n_train, cfg.seed,
                                ExamConfig(contraindicated=cfg.train_contraindicated))
    heldout = generate_exam(kb, "heldout", cfg.n_heldout, cfg.heldout_seed)
    problems = [open_problem(it) for it in heldout]
    write_problems(out / "heldout.json", problems)
    timings: dict = {}
    models = huatuo_o1(cfg, out, train_items, verifier, timings)

    results: dict = {}
    for name, model_dir in models.items():
        with timed(timings, f"eval_{name}"):
            say(f"evaluating {name} on {len(problems)} held-out problems ...")
            results[name] = evaluate_model(model_dir, heldout, problems, verifier, cfg, out / "eval" / f"{name}.jsonl",
                                           name)
    made_by = {"base": None, "sft": ("search", "sft"), "ppo": ("ppo",)}
    for name, stages in made_by.items():
        results[name]["wall_s"] = round(sum(timings[s] for s in stages), 1) if stages else 0.0
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    results["seed"] = cfg.seed
    results["search"] = json.loads((out / "search" / "summary.json").read_text(encoding="utf-8"))
    results["search"].pop("config", None)
    results["problems"] = json.loads((out / "problems" / "summary.json").read_text(encoding="utf-8"))
    results["problems"].pop("config", None)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    write_plots(out, results)
    print_examples(out)
    print(results_table(results))
    return results


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def timed(timings: dict, key: str):
    """with timed(timings, "stage"): ... adds the block's wall time to timings["stage"]."""
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
