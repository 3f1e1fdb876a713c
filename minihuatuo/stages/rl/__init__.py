"""Stage 2, RL with verifier rewards (paper §3.2): the shared rollout (rollout.py), PPO (ppo.py and
its loop ppo_train.py) and the comparison variants RLOO, GRPO and DPO. A layer of its own inside the
stages: the same import rules (tests/test_layers.py).
"""
