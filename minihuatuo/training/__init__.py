"""Training infrastructure shared by every trainer: process groups and collectives
(distributed.py), trainer-state checkpoints for exact resume (checkpoints.py), learning-rate
schedules (schedules.py).

Imports: the engine only (tests/test_layers.py).
"""
