"""The stages of the recipe (paper Algorithm 1), each a command working on files: verifiable
problems (problems*.py, decontam.py), strategy search (search*.py), SFT (sft*.py), RL (rl/: PPO and
its siblings) and benchmark evaluation (evaluate.py, scorer_official.py).

Imports: services, training and the engine; never the pipeline, the world or the face
(tests/test_layers.py).
"""
