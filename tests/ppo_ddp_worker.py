"""Run by tests/test_ppo.py under torchrun (1 or 2 processes): one PPO learning phase on a fixed batch.

Every process collects the same full batch of experience as a single process would (greedy-free
sampling with a fixed seed, one generate call), then learns from its strided share under DDP. With
one minibatch per epoch, 2 processes must produce the same update as 1 (issue 6, acceptance 4)."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.formats import read_problems
from minihuatuo.services.reward import RewardConfig
from minihuatuo.services.verifier import ExactMatchVerifier
from minihuatuo.stages.rl.ppo import PPOConfig, collect, learn, select_experience
from minihuatuo.stages.rl.ppo_run import build_models
from minihuatuo.training.distributed import Dist, init_distributed

root, out = Path(sys.argv[1]), Path(sys.argv[2])
d = init_distributed()
cfg = PPOConfig(response_length=64, max_prompt_length=64, temperature=1.0, early_stop=True, batch_size=16,
                micro_batch_size=4, ppo_epochs=2, num_mini_batches=1, lr=1e-3, vf_coef=0.5, beta=0.01,
                value_head="separate", seed=3, drop_last=False)
policy_dir = root / "sft" / "final"
tok = Tokenizer.from_dir(policy_dir)
ac, ref = build_models(cfg, policy_dir, None, "cpu")
exp = collect(0, cfg, ac, ref, tok, read_problems(root / "problems.json"), ExactMatchVerifier(), Dist(),
              RewardConfig(), {})
share = select_experience(exp, torch.arange(d.rank, cfg.batch_size, d.world))
model = ac
if d.world > 1:
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(ac)
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
learn(0, cfg, model, optimizer, share)
if d.rank == 0:
    save_file({k: v.contiguous() for k, v in ac.state_dict().items()}, str(out))
