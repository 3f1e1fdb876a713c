"""Stage 2, RL with verifier rewards (paper §3.2): PPO (ppo.py: config, math and the update; its run,
ppo_run.py) and the comparison variants RLOO, GRPO and DPO, sharing rollout.py as functions; the four
commands in commands.py. A layer of its own inside the stages: the same import rules (tests/test_layers.py).
"""
