"""The stage-2 commands, `minihuatuo ppo | rloo | grpo | dpo` (each also under torchrun): a parser per
command and a function that builds the config (preset < --config < one flag per field), the verifier
(the same verifier options as `verify`: reward.add_verifier_args) and calls the algorithm's `train`.
The last line of stdout is a JSON summary.

Presets, the same words for every command (notes/rl_variants.md § Presets): `official` = the settings
of the authors' released PPO run for every knob a variant shares with PPO, `paper` = what the paper
states on top of that, `tiny-world` = the bundled world. DPO has no `official` (no DPO run was
released); grpo still accepts `default`, the old name of its `official`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from minihuatuo.services.config import add_config_args, build_config, nonnegative_int
from minihuatuo.services.reward import add_verifier_args, build_verifier
from minihuatuo.stages.rl import dpo, grpo, ppo, ppo_run, rloo
from minihuatuo.training.run_dir import add_output_args

DATA_HELP = "verifiable problems (Open-ended Verifiable Question, Ground-True Answer)"


def cmd_ppo(args) -> int:
    cfg = build_config(ppo.PPOConfig, ppo.PRESETS, args.preset, args.config, args)
    history = ppo_run.train(cfg, args.policy, args.data, args.out, build_verifier(args.verifier, args),
                            value_dir=args.value_model, resume=args.resume, max_updates=args.max_updates,
                            overwrite=args.overwrite, save_dtype=args.save_dtype)
    return _finish(args.out, history[-1] if history else None)


def cmd_rloo(args) -> int:
    cfg = build_config(rloo.RLOOConfig, rloo.PRESETS, args.preset, args.config, args)
    history = rloo.train(cfg, args.policy, args.data, args.out, build_verifier(args.verifier, args),
                         resume=args.resume, max_updates=args.max_updates, overwrite=args.overwrite,
                         save_dtype=args.save_dtype)
    return _finish(args.out, history[-1] if history else None)


def cmd_grpo(args) -> int:
    cfg = build_config(grpo.GRPOConfig, grpo.PRESETS, args.preset, args.config, args)
    history = grpo.train(cfg, args.policy, args.data, args.out, build_verifier(args.verifier, args),
                         resume=args.resume, max_updates=args.max_updates, overwrite=args.overwrite,
                         save_dtype=args.save_dtype)
    return _finish(args.out, history[-1] if history else None)


def cmd_dpo(args) -> int:
    cfg = build_config(dpo.DPOConfig, dpo.PRESETS, args.preset, args.config, args)
    stats, history = dpo.train(cfg, args.policy, args.data, args.out, build_verifier(args.verifier, args),
                               pairs_path=args.pairs, resume=args.resume, pairs_only=args.pairs_only,
                               max_steps=args.max_steps, overwrite=args.overwrite, save_dtype=args.save_dtype)
    return _finish(args.out, history[-1] if history else None, stats)


def _finish(out, last: dict | None, stats: dict | None = None) -> int:
    """Print the JSON summary on rank 0 (the pair statistics, then the final checkpoint and the last
    update's metrics, when there is one); end the process group under torchrun."""
    if (stats is not None or last is not None) and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps({**(stats or {}), **({"out": str(Path(out) / "final"), **last} if last else {})}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("ppo", help="stage-2 PPO with verifier rewards (also under torchrun)")
    p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="output directory: checkpoint-U/, final/ (policy/: the HF model; "
                                                "trainer/: critic, optimizer, state), metrics.jsonl")
    p.add_argument("--value-model", default=None, help="critic start: a causal LM (new value head) or a 1-label "
                                                        "classifier checkpoint; default: the policy's weights")
    _add_verifier_and_preset(p, ppo.PRESETS, "official")
    add_output_args(p, "update")
    p.add_argument("--max-updates", type=nonnegative_int, default=0, help="stop after this many updates (0 = all)")
    add_config_args(p, ppo.PPOConfig)
    p.set_defaults(func=cmd_ppo)

    for name, help, module, conf, cmd in (
            ("rloo", "stage-2 RLOO (k samples per prompt, leave-one-out baseline; paper App. F)",
             rloo, rloo.RLOOConfig, cmd_rloo),
            ("grpo", "stage-2 GRPO (group-normalised advantages, k3 KL loss; beyond the paper)",
             grpo, grpo.GRPOConfig, cmd_grpo)):
        p = sub.add_parser(name, help=help)
        p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint")
        p.add_argument("--data", required=True, help=DATA_HELP)
        p.add_argument("--out", required=True, help="output directory: checkpoint-U/, final/ (the policy; "
                                                    "trainer/: optimizer, state), metrics.jsonl")
        _add_verifier_and_preset(p, module.PRESETS, "official")
        add_output_args(p, "update")
        p.add_argument("--max-updates", type=nonnegative_int, default=0, help="stop after this many updates (0 = all)")
        add_config_args(p, conf)
        p.set_defaults(func=cmd)

    p = sub.add_parser("dpo", help="stage-2 DPO on verifier-labelled pairs of SFT samples (paper App. F)")
    p.add_argument("--policy", required=True, help="the stage-1 SFT checkpoint (sampler, start and reference)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="output directory: pairs.jsonl, checkpoint-S/, final/ (the policy; "
                                                "trainer/: optimizer, state), metrics.jsonl")
    p.add_argument("--pairs", default=None,
                   help="the pairs file (JSONL, appended to and resumed); default OUT/pairs.jsonl")
    p.add_argument("--pairs-only", action="store_true", help="build the pairs file and stop (run it in one process "
                                                             "before a torchrun training)")
    _add_verifier_and_preset(p, dpo.PRESETS, "paper")
    add_output_args(p, "step")
    p.add_argument("--max-steps", type=nonnegative_int, default=0,
                   help="stop after this many optimizer steps (0 = all)")
    add_config_args(p, dpo.DPOConfig)
    p.set_defaults(func=cmd_dpo)


def _add_verifier_and_preset(p, presets: dict, default: str) -> None:
    """The reward's verifier (exact / rule / classifier; the classifier's options as `verify` has them)
    and the preset."""
    p.add_argument("--verifier", default="rule", choices=["exact", "rule", "classifier"])
    add_verifier_args(p, prefixed=True, judge=False)
    p.add_argument("--preset", default=default, choices=list(presets))
