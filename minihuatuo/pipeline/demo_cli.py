"""The `minihuatuo demo` command: the demo (demo.py) or its ablation (ablation.py)."""
from __future__ import annotations

from minihuatuo.pipeline.ablation import SIMPLE_ATTEMPTS, evaluate_ablation, run_ablation
from minihuatuo.pipeline.demo import PRESETS, DemoConfig, evaluate_run, run_demo
from minihuatuo.services.config import add_config_args, build_config, positive_int


def use_threads(cfg: DemoConfig) -> None:
    """--threads for grading too (run_demo and run_ablation set it themselves)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def cmd_demo(args) -> int:
    if args.ablation and args.evaluate:
        cfg = build_config(DemoConfig, PRESETS, "quick" if args.quick else "default", args.config, args)
        use_threads(cfg)
        evaluate_ablation(args.evaluate, cfg, args.out or f"{args.evaluate}_heldout{cfg.heldout_seed}")
        return 0
    if args.ablation:
        run_ablation(build_config(DemoConfig, PRESETS, "quick" if args.quick else "default", args.config, args),
                     args.out or "demo_ablation", seeds=args.seeds, simple_attempts=args.simple_attempts)
        return 0
    cfg = build_config(DemoConfig, PRESETS, "quick" if args.quick else "default", args.config, args)
    if args.evaluate:
        use_threads(cfg)
        evaluate_run(args.evaluate, cfg, args.out or f"{args.evaluate}_heldout{cfg.heldout_seed}")
        return 0
    run_demo(cfg, args.out or ("demo_quick" if args.quick else "demo_out"))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the whole recipe on the bundled clinical world (CPU, minutes)")
    p.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes on 2 cores)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default demo_out or demo_quick)")
    p.add_argument("--ablation", action="store_true",
                   help="SFT on direct response / simple CoT / complex CoT, each then PPO, over --seeds")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds of the ablation (default 3)")
    p.add_argument("--simple-attempts", type=positive_int, default=SIMPLE_ATTEMPTS,
                   help=f"the ablation's simple CoTs: fresh first chains tried per problem (default {SIMPLE_ATTEMPTS})")
    p.add_argument("--evaluate", metavar="RUN", default=None,
                   help="grade the checkpoints of the earlier run RUN (a demo run, or with --ablation an ablation "
                        "run) on the held-out draw --heldout-seed (no training; the protocol's test draws, "
                        "notes/demo.md §9)")
    add_config_args(p, DemoConfig)
    p.set_defaults(func=cmd_demo)
