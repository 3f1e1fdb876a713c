"""The pipeline: the demo (demo.py, the paper's Algorithm 1 as one function, `run_demo`), its
ablation and its report, and the `minihuatuo demo` command (demo_cli.py).

Imports: the world, the stages, services, training and the engine; never the face
(tests/test_layers.py).
"""
