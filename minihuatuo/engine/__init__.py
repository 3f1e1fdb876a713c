"""The engine: what runs a model. The transformer (model.py) and its masks, the KV cache and the
sampler, the tokenizer and its chat formats, HF-layout safetensors checkpoints, the fused-kernel
loader (kernels.py) and the PyTorch references it is checked against, and where bundled files live.

Imports: nothing else of minihuatuo (tests/test_layers.py). A porter needs this package and the
conformance vectors (notes/vectors/), nothing above it.
"""
