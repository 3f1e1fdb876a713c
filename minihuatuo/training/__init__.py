"""Training infrastructure shared by every trainer: process groups and collectives
(distributed.py), trainer-state checkpoints for exact resume (checkpoints.py: an inference-ready
model directory + trainer/), the output directory of a run (run_dir.py: refuse / resume / overwrite,
metrics.jsonl), learning-rate schedules (schedules.py) and the outer loop of the RL trainers
(loop.py: resume, metrics, checkpoint cadence).

Imports: the engine only (tests/test_layers.py).
"""
