"""Services the stages call: verifiers and the reward rule, LLM backends (local, OpenAI-compatible
HTTP) and the server, records and data formats, configuration from dataclasses.

Imports: training and the engine; never a stage, the pipeline, the world or the face
(tests/test_layers.py).
"""
