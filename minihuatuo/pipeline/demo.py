"""`minihuatuo demo`: the whole HuatuoGPT-o1 recipe on the bundled clinical world, on a CPU (issue 8).

    minihuatuo demo [--quick] [--out DIR] [--seed S] [--config FILE] [--field value ...] [--stage.field value ...]
    minihuatuo demo --ablation [--out DIR]            (ablation.py: paper Tables 2-3 in miniature)

`huatuo_o1` below is the paper's Algorithm 1 with the project's real modules and no shortcuts:
the world's MCQs become verifiable problems (problems.py, §2.1), the base model searches for
complex reasoning trajectories as its own search LLM with the alias-aware rule verifier
(search.py, §3.1), the base model is fine-tuned on the complex CoTs (sft.py), and the SFT model
is trained with PPO on verifier rewards (ppo_run.py, §3.2). `run_demo` then evaluates base, SFT
and SFT+PPO on held-out problems the same way (`evaluate_model`) and writes everything to DIR:

    DIR/results.json                  the contract: {"base"|"sft"|"ppo": {"accuracy", "n", ...}, ...}
    DIR/config.json                   the DemoConfig of the run, every stage's config in it
    DIR/problems/                     search.json, rl.json, dropped.jsonl, summary.json (problems.py)
    DIR/search/                       search.jsonl (+ provenance), sft.jsonl, sft_simple_cot.jsonl,
                                      sft_direct.jsonl, summary.json (search.py / search_cli.py)
    DIR/sft/, DIR/ppo/                metrics.jsonl per step / update, final/ checkpoints
    DIR/eval/{base,sft,ppo}.jsonl     every held-out reply with its grade (open-ended and MCQ)
    DIR/accuracy.csv, ppo_reward.csv  (and .png when matplotlib is installed)

Defaults were measured on a 2-core CPU (notes/demo.md §12): the full run takes about 12 minutes,
`--quick` (fewer problems and updates) under 2. What each setting does, and why it has the value
it has, is in notes/demo.md.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from minihuatuo.pipeline.demo_verifier import RLVerifierConfig, ppo_verifier, verifier_results
from minihuatuo.services.backends import ChatRequest, LocalBackend
from minihuatuo.services.config import ConfigError, require_nonnegative, require_positive, require_seed
from minihuatuo.services.formats import write_problems
from minihuatuo.stages.diagnostics import DiagnosticsConfig, read_reply, summarize
from minihuatuo.stages.evaluate import FREE_PROMPT, extract_choice, render_prompt
from minihuatuo.stages.problems import ProblemsConfig, build_problems
from minihuatuo.stages.rl.ppo import PRESETS as PPO_PRESETS
from minihuatuo.stages.rl.ppo import PPOConfig
from minihuatuo.stages.search import SearchConfig
from minihuatuo.stages.sft import PRESETS as SFT_PRESETS
from minihuatuo.stages.sft import SFTConfig
from minihuatuo.world.evaluation import world_verifier
from minihuatuo.world.exam import ExamConfig, generate_exam, open_problem
from minihuatuo.world.kb import DEFAULT_KB, WORLD_DIR, load_kb


@dataclass
class DemoConfig:
    """The demo's settings: its own, then one config per stage, each stage's default being the demo's
    values (stage settings not named below are the stage's `tiny-world` preset for SFT and PPO, its
    paper default for problems and search). Every field is a flag (services/config.py): --n-train
    for the demo's own, --STAGE.FIELD for a stage's (--ppo.lr, --search.max-depth, --sft.epochs);
    the flat flags of before (--ppo-lr, --max-depth, ...) still work (ALIASES). The values in DERIVED
    follow from the demo's own settings and are computed once, in __post_init__, so that config.json
    shows what every stage ran with."""

    seed: int = 0  # one seed for everything random: exam draw, split, search, SFT order, PPO
    base: str = str(WORLD_DIR / "base")  # the pretrained stand-in for an instruct LLM
    n_train: int = 1200  # training MCQs generated; the too-easy filter keeps about two thirds
    n_heldout: int = 300  # held-out problems (new combinations of findings), graded for each model
    heldout_seed: int = 1000  # fixed apart from `seed`, so that seeds differ in training only
    response_length: int = 384  # new tokens per search reply, PPO rollout and evaluation reply
    # keep no searched trajectory whose reflection says something false of the case (world/
    # reflection.py): the small search LLM writes them, SFT on them teaches "always reject" (§10).
    # search.false_reflection says how: "retry" (the attempt ends inside the search, §17) or "keep"
    # (kept by the search, discarded after it: the setting of §10-16)
    reflection_check: bool = True
    # the *training* exam (world/exam.py); the held-out exam keeps ExamConfig's defaults. Its
    # `contraindicated` (P(a treatment question's named context rules out the first-line drug)): the
    # too-easy filter keeps nearly every contraindicated question and drops about half of those with
    # a harmless context, so on D_RL "a named context means the alternative" is right 3 times in 4.
    # 0.4 evens that out, but its SFT models were weaker and PPO from them less stable (notes/demo.md §7)
    train_exam: ExamConfig = field(default_factory=lambda: ExamConfig(contraindicated=0.6))
    # §2.1 (stages/problems.py): D_search vs D_RL 50/50 (paper §4.1: 20K / 20K). Half of the too-easy
    # problems kept: the base model is both the filter's small model and the search LLM, so without them
    # no searched first answer is right and SFT data never shows a verification that confirms (§10)
    problems: ProblemsConfig = field(default_factory=lambda: ProblemsConfig(search_fraction=0.5, too_easy_keep=0.5))
    # stage 1: search (stages/search.py); the base model is the search LLM, the template reformatter writes ê
    search: SearchConfig = field(default_factory=lambda: SearchConfig(
        max_depth=3,  # N
        max_attempts=3,  # T
        reformat="template",  # no LLM offline (search_reformat.py)
        max_in_flight=512,  # problems searched at once (one batched sampler call per step)
        # a verified trajectory whose reflection is false ends its attempt and the next attempt starts, so
        # a patient with a named context keeps the trajectories that check it: contraindicated treatments
        # after PPO 7-18 % -> 44-60 % on the dev draw (notes/demo.md §17)
        false_reflection="retry",
    ))
    # stage 1: SFT (stages/sft.py)
    sft: SFTConfig = field(default_factory=lambda: replace(
        SFT_PRESETS["tiny-world"],
        epochs=3,  # with data whose verification discriminates, more passes teach the discrimination (§10)
        lr=5e-4,
        global_batch_size=16,
        micro_batch_size=16,
        max_length=1024,  # the model's context: no searched trajectory is cut before its answer
    ))
    # stage 2: PPO (stages/rl/ppo_run.py). 48 updates × 48 rollouts: after 24, PPO from the
    # 2,000-step base model had over-applied the contraindication check or dropped it; 48 gained 2-13
    # points more (notes/demo.md §7)
    ppo_updates: int = 48
    ppo: PPOConfig = field(default_factory=lambda: replace(
        PPO_PRESETS["tiny-world"],
        batch_size=48,  # rollouts per update
        micro_batch_size=16,  # rows per forward; rows of similar length together, cut to their longest
        # two optimizer steps per PPO epoch and two epochs per update: the ratio π/π_old leaves 1 after the
        # first step, so the clipped objective binds (clip fraction > 0 in every update; with one step per
        # update PPO is plain policy gradient), at half the former per-step rate (notes/demo.md §11)
        ppo_epochs=2,
        num_mini_batches=2,
        lr=1e-4,
        # linear warmup over ceil(ratio · updates) updates, the first at lr 0 (official 0.05 of ~160
        # updates). 0: the shipped SFT models take the full rate at once; where one did not, a warmup
        # only delayed the collapse (notes/demo.md §7)
        warmup_ratio=0.0,
        beta=0.03,  # paper §4.1
        temperature=0.7,  # rollouts (and their log-probs); 1.0 gave mostly unfinished replies
        value_head="separate",  # a critic network (official); a head on the policy trunk gained less
        vf_coef=0.1,  # official
        # GAE λ. The official 0.95 carries the end-of-reply score only ~20 tokens back (0.95^20 ≈
        # 0.36): the diagnosis written 250 tokens earlier depends on a critic that has had a few
        # updates to learn; in a sweep λ 0.95 collapsed the policy (notes/demo.md §3)
        lam=1.0,
        save_every=0,  # only the final checkpoint
    ))
    # stage 2's verifier: the world's rule verifier, or a classifier trained from the base model on world
    # pairs, whose reward hacking is audited against the ground truth update by update (demo_verifier.py)
    rl_verifier: RLVerifierConfig = field(default_factory=RLVerifierConfig)
    # machine
    batch_size: int = 512  # rows per batched generate call (finished rows leave the batch: sample.py)
    threads: int = 0  # torch threads (0 = torch's default: all cores)

    # stage settings that follow from the demo's own (set in __post_init__; no flag, an error in a file)
    DERIVED: ClassVar[dict[str, str]] = {
        "problems.seed": "seed", "search.seed": "seed", "sft.seed": "seed", "ppo.seed": "seed",
        "search.max_tokens": "response_length", "ppo.response_length": "response_length",
        "ppo.total_episodes": "ppo_updates × ppo.batch_size", "rl_verifier.train.seed": "seed",
    }
    # the flat names of before issue 18 (and --verifier, issue 20) -> the stage fields they set (as flags and
    # in config files)
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train_contraindicated": ("train_exam.contraindicated",),
        "search_fraction": ("problems.search_fraction",),
        "max_depth": ("search.max_depth",),
        "max_attempts": ("search.max_attempts",),
        "search_in_flight": ("search.max_in_flight",),
        "sft_epochs": ("sft.epochs",),
        "sft_lr": ("sft.lr",),
        "sft_batch": ("sft.global_batch_size", "sft.micro_batch_size"),
        "sft_max_length": ("sft.max_length",),
        "ppo_batch": ("ppo.batch_size",),
        "ppo_micro_batch": ("ppo.micro_batch_size",),
        "ppo_lr": ("ppo.lr",),
        "ppo_warmup_ratio": ("ppo.warmup_ratio",),
        "ppo_epochs": ("ppo.ppo_epochs",),
        "ppo_beta": ("ppo.beta",),
        "ppo_temperature": ("ppo.temperature",),
        "ppo_value_head": ("ppo.value_head",),
        "ppo_vf_coef": ("ppo.vf_coef",),
        "ppo_lam": ("ppo.lam",),
        "verifier": ("rl_verifier.kind",),  # demo --verifier classifier (issue 20)
    }

    def __post_init__(self):
        # the demo's own values first (services/config.py; each stage's config checks its own), so the
        # derived stage values below are valid
        require_positive(self, "n_train", "n_heldout", "response_length", "ppo_updates", "batch_size")
        require_nonnegative(self, "threads")
        require_seed(self, "seed", "heldout_seed")
        if self.search.false_reflection == "retry" and not self.reflection_check:
            raise ConfigError("search.false_reflection", '"retry" runs the reflection check inside the search; with '
                              'reflection_check false set it to "keep" (--search.false-reflection keep)')
        # the derived values, once: every stage gets the one seed; search replies and PPO rollouts the
        # one response length; PPO runs ppo_updates updates (ppo_run: ceil(total_episodes / batch_size))
        self.problems = replace(self.problems, seed=self.seed)
        self.search = replace(self.search, seed=self.seed, max_tokens=self.response_length)
        self.sft = replace(self.sft, seed=self.seed)
        self.ppo = replace(self.ppo, seed=self.seed, response_length=self.response_length,
                           total_episodes=self.ppo_updates * self.ppo.batch_size)
        self.rl_verifier = replace(self.rl_verifier, train=replace(self.rl_verifier.train, seed=self.seed))


def _quick() -> DemoConfig:
    cfg = DemoConfig(n_train=300, n_heldout=100, ppo_updates=3)
    rl_verifier = replace(cfg.rl_verifier, classifier_pairs=1500, classifier_adversarial=500,
                          train=replace(cfg.rl_verifier.train, epochs=1))  # only with --verifier classifier
    return replace(cfg, search=replace(cfg.search, max_attempts=2), ppo=replace(cfg.ppo, batch_size=32),
                   rl_verifier=rl_verifier)


PRESETS = {"default": DemoConfig(), "quick": _quick()}


# ---------------------------------------------------------------------------------------------------
# Algorithm 1


def huatuo_o1(cfg: DemoConfig, out: Path, train_items, verifier, timings: dict) -> dict:
    """Paper Algorithm 1 on the world's training MCQs, each stage with its config from cfg. Returns
    the checkpoint of each stage."""
    base = LocalBackend.from_dir(cfg.base, dtype="float32", batch_size=cfg.batch_size, seed=cfg.seed)
    with timed(timings, "problems"):  # §2.1: MCQs -> verifiable problems (x, y*), D_search and D_RL
        built = make_problems(cfg.problems, out / "problems", train_items, base)
    with timed(timings, "search"):  # stage 1, lines 1-12: a correct trajectory per problem, ê and ŷ
        worlds = {it.id: it.extra["world"] for it in train_items} if cfg.reflection_check else None
        search_trajectories(cfg.search, out / "search", built.search, base, verifier, worlds)
    del base
    with timed(timings, "sft"):  # stage 1, line 13: SFT of the base model on (x, ê, ŷ)
        sft_model = fine_tune(cfg.sft, cfg.base, out / "search" / "sft.jsonl", out / "sft")
    with timed(timings, "verifier"):  # stage 2's verifier: the rule verifier, or a classifier trained here
        rl_verifier = ppo_verifier(cfg.rl_verifier, cfg.base, cfg.seed, cfg.heldout_seed, out, verifier)
    with timed(timings, "ppo"):  # stage 2: PPO from the SFT model on D_RL with verifier rewards
        ppo_model = reinforce(cfg.ppo, sft_model, out / "problems" / "rl.json", out / "ppo", rl_verifier)
    return {"base": Path(cfg.base), "sft": sft_model, "ppo": ppo_model}


def make_problems(problems_cfg: ProblemsConfig, out: Path, train_items, base):
    """§2.1 with the base model as the too-easy filter's small model (what it already answers
    correctly teaches nothing) and the offline reformatter (there is no LLM here)."""
    built = build_problems(train_items, problems_cfg, filter_models={"base": base}, out_dir=out)
    say(f"problems: {len(train_items)} MCQs -> {len(built.search)} for search, {len(built.rl)} for RL "
        f"(dropped: {built.counts})")
    return built


def search_trajectories(search_cfg: SearchConfig, out: Path, problems, base, verifier, worlds=None) -> dict:
    """§3.1: the base model is LLM_init and LLM_k, the rule verifier with the world's aliases judges
    each conclusion, and the template reformatter writes ê and ŷ (search_reformat.py). Writes the
    SFT file and the two ablation files (simple CoT, direct response) of paper Table 2. With
    `worlds` (item id -> the world's record of it), a trajectory whose reflection says something
    false of its case is discarded (world/reflection.py; notes/demo.md §10), and its faults go to
    out/false_reflections.jsonl; with search.false_reflection = "retry" such a trajectory ends its
    attempt inside the search instead, and the next attempt starts (§17)."""
    from minihuatuo.stages.search import run_search
    from minihuatuo.stages.search_cli import format_summary, token_counter, write_outputs
    from minihuatuo.world.reflection import drop_false_reflections, reflection_faults

    kb = load_kb(DEFAULT_KB) if worlds is not None else None
    faults = None
    if worlds is not None:  # search.false_reflection = "retry": a false reflection ends the attempt
        def faults(p, actions):
            return reflection_faults(kb, worlds[p.extra["source_id"]], actions)
    records = run_search(problems, base, verifier, out, search_cfg, count_tokens=token_counter(base.tokenizer),
                         reflection_faults=faults)
    if worlds is not None:
        marked = drop_false_reflections(kb, records, worlds)
        retried = [{"id": r["id"], "source_id": r["source_id"], "attempt": o["attempt"], "faults": o["detail"]}
                   for r in records for o in r["search"]["outcomes"] if o["outcome"] == "false_reflection"]
        with open(out / "false_reflections.jsonl", "w", encoding="utf-8") as f:
            for r in marked:
                f.write(json.dumps({"id": r["id"], "source_id": r["source_id"], "faults": r["search"]["failure_detail"],
                                    "Complex_CoT": r["Complex_CoT"]}, ensure_ascii=False) + "\n")
            for line in retried:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        say(f"reflection check: {len(marked)} trajectories discarded for a false reflection" +
            (f", {len(retried)} attempts ended by one" if search_cfg.false_reflection == "retry" else ""))
    summary = write_outputs(out, records, search_cfg, "base model tokenizer")
    say(format_summary(summary, search_cfg))
    return summary


def fine_tune(sft_cfg: SFTConfig, model_dir, data_path: Path, out: Path, overwrite: bool = False) -> Path:
    """SFT into out/; `overwrite`: a crashed earlier attempt's files there are replaced (the ablation
    reruns an unfinished variant from scratch)."""
    from minihuatuo.stages.sft import train as train_sft

    train_sft(sft_cfg, model_dir, data_path, out, overwrite=overwrite)
    return out / "final"


def reinforce(ppo_cfg: PPOConfig, policy_dir, rl_path: Path, out: Path, verifier,
              require_thinking: bool = True, overwrite: bool = False) -> Path:
    """PPO with r' = 1 / 0.1 / 0 (reward.py). require_thinking=False only for the direct-response
    ablation, whose SFT model never writes a "## Thinking" part."""
    from minihuatuo.services.reward import RewardConfig
    from minihuatuo.stages.rl.ppo_run import train as train_ppo

    train_ppo(ppo_cfg, policy_dir, rl_path, out, verifier, reward_cfg=RewardConfig(require_thinking=require_thinking),
              overwrite=overwrite)
    return out / "final" / "policy"


# ---------------------------------------------------------------------------------------------------
# evaluation: the same requests for every model


# the word a conclusion that answers each question type contains (diagnostics.read_reply's `cue`)
ANSWER_CUE = {"diagnosis": "diagnosis", "investigation": "investigation", "treatment": "treatment",
              "complication": "complication"}


def question_type(world: dict) -> str:
    """The by-type key: the question type, treatments split by whether the patient's context rules
    out the first-line drug."""
    if world["qtype"] != "treatment":
        return world["qtype"]
    return "treatment_contraindicated" if world.get("contraindicated") else "treatment_plain"


def evaluate_model(model_dir, items, problems, verifier, cfg: DemoConfig, out_file: Path, name: str,
                   mcq: bool = True, thinking: bool = True) -> dict:
    """Held-out accuracy and reasoning diagnostics of one checkpoint, greedy:
      open-ended: the question x alone (what SFT and PPO train on); the verifier reads the final
                  response under the reward's own format rule (response_format "strict": `## Thinking`
                  then `## Final Response`, each once), so a reply that never reaches its final
                  response, or loops through it twice, is wrong, as it earns the reward's 0;
                  diagnostics.summarize adds unfinished, reflection, first-answer accuracy,
                  reflection gain, verdicts and accuracy by question type;
      MCQ:        evaluate.FREE_PROMPT; the benchmark scorer's extraction (evaluate.extract_choice).
    thinking=False grades a direct-response model (the ablation's direct arm) as its reward reads it: the
    whole reply is the final response (diagnostics.read_reply). Every reply, its grade and its reading go to out_file (JSONL)."""
    backend = LocalBackend.from_dir(model_dir, dtype="float32", batch_size=cfg.batch_size)

    def ask(texts):
        reqs = [ChatRequest([{"role": "user", "content": t}], temperature=0.0, max_tokens=cfg.response_length)
                for t in texts]
        return [r[0] for r in backend.complete_detailed(reqs)]

    opened = ask([p.x for p in problems])
    mcq_replies = [c.text for c in ask([render_prompt(it, FREE_PROMPT) for it in items])] if mcq else [""] * len(items)
    replies = [c.text for c in opened]
    worlds = [it.extra.get("world") or {"qtype": "unknown"} for it in items]
    cues = [ANSWER_CUE.get(w["qtype"]) for w in worlds]
    stopped = [c.finish_reason == "stop" for c in opened]
    diag = summarize(replies, [p.y_star for p in problems], verifier.verify, DiagnosticsConfig(),
                     tokens=[c.completion_tokens for c in opened], stopped=stopped,
                     types=[question_type(w) for w in worlds], cues=cues, hack=verifier.hack, thinking=thinking)
    rows, n_mcq = [], 0
    for it, p, c, mreply, w, cue, stop in zip(items, problems, opened, mcq_replies, worlds, cues, stopped):
        rd = read_reply(c.text, DiagnosticsConfig(), stop, cue, thinking)
        ok = rd.final is not None and verifier.verify(rd.final, p.y_star)
        first = rd.first_answer
        ex = extract_choice(mreply, it.options)
        mcq_ok = ex.first == ex.last == it.answer_idx
        n_mcq += mcq_ok
        rows.append({"id": it.id, "question": p.x, "answer": p.y_star, "reply": c.text, "correct": ok,
                     "finished": rd.finished, "finish_reason": c.finish_reason, "first_answer": first,
                     "first_correct": first is not None and verifier.verify(first, p.y_star),
                     "reflected": rd.reflected, "verdicts": [k for _, k in rd.verdicts],
                     "hack": rd.final is not None and verifier.hack(rd.final, p.y_star),
                     "type": question_type(w), "mcq_reply": mreply, "mcq_choice": ex.first, "mcq_key": it.answer_idx,
                     "mcq_correct": mcq_ok, "reply_tokens": c.completion_tokens, "world": it.extra.get("world")})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n = len(problems)
    return {**diag, "mcq_accuracy": n_mcq / n if mcq else None, "mcq_n": n if mcq else 0,
            "avg_response_tokens": diag["mean_tokens"], "checkpoint": str(model_dir), "name": name}


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
    train_items = generate_exam(kb, "train", cfg.n_train, cfg.seed, cfg.train_exam)
    verifier, heldout, problems = heldout_exam(cfg, kb)
    write_problems(out / "heldout.json", problems)
    timings: dict = {}
    models = huatuo_o1(cfg, out, train_items, verifier, timings)

    results: dict = {}
    for name, model_dir in models.items():
        with timed(timings, f"eval_{name}"):
            say(f"evaluating {name} on {len(problems)} held-out problems ...")
            results[name] = evaluate_model(model_dir, heldout, problems, verifier, cfg, out / "eval" / f"{name}.jsonl",
                                           name)
    made_by = {"base": None, "sft": ("search", "sft"), "ppo": ("verifier", "ppo")}
    for name, stages in made_by.items():
        results[name]["wall_s"] = round(sum(timings.get(s, 0.0) for s in stages), 1) if stages else 0.0
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    results["seed"] = cfg.seed
    results["heldout_seed"] = cfg.heldout_seed
    results["search"] = json.loads((out / "search" / "summary.json").read_text(encoding="utf-8"))
    results["search"].pop("config", None)
    results["problems"] = json.loads((out / "problems" / "summary.json").read_text(encoding="utf-8"))
    results["problems"].pop("config", None)
    results["rl_verifier"] = verifier_results(out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    write_plots(out, results)
    print_examples(out)
    print(results_table(results))
    return results


def heldout_exam(cfg: DemoConfig, kb=None):
    """(the world's verifier, the held-out items of draw cfg.heldout_seed, their open-ended problems):
    what every evaluation of a demo or ablation run grades on (the draw never touches training)."""
    kb = kb if kb is not None else load_kb(DEFAULT_KB)
    heldout = generate_exam(kb, "heldout", cfg.n_heldout, cfg.heldout_seed)
    return world_verifier(kb), heldout, [open_problem(it) for it in heldout]


def evaluate_run(run_dir, cfg: DemoConfig, out_dir) -> dict:
    """The checkpoints of an earlier demo run (base, sft/final, ppo/final/policy) graded on the held-out
    draw `cfg.heldout_seed`, as run_demo grades them: the protocol's test draws (notes/demo.md §9)
    without training again, since nothing a model is trained on depends on the held-out draw.
    Writes out_dir/results.json (the same keys, plus "evaluated_run") and out_dir/eval/."""
    from minihuatuo.pipeline.report import results_table

    run, out = Path(run_dir), Path(out_dir)
    if not (run / "results.json").exists():
        raise ValueError(f"{run}: not a finished demo run (no results.json)")
    if (out / "results.json").exists():
        raise ValueError(f"{out}: already holds results; choose another --out")
    trained = json.loads((run / "config.json").read_text(encoding="utf-8"))
    models = {"base": Path(trained["base"]), "sft": run / "sft" / "final", "ppo": run / "ppo" / "final" / "policy"}
    verifier, heldout, problems = heldout_exam(cfg)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name, model_dir in models.items():
        say(f"evaluating {name} ({model_dir}) on {len(problems)} held-out problems of draw {cfg.heldout_seed} ...")
        results[name] = evaluate_model(model_dir, heldout, problems, verifier, cfg, out / "eval" / f"{name}.jsonl", name)
    results.update(seed=trained["seed"], heldout_seed=cfg.heldout_seed, evaluated_run=str(run))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
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
