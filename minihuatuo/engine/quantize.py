"""Int8 weight-only quantisation, for decoding on a CPU (issue 22, point 2).

Batch-1 decoding streams every weight matrix from memory once per token, so its speed is the bytes of
the weights over the memory bandwidth: bf16 halves the fp32 bytes, int8 halves them again. Only the
weights are quantised; activations, norms, attention, the KV cache and the embedding table keep the
model's dtype (fp32 or bf16), and each product sums in fp32 (kernels/cpu/gemv.cpp).

The scheme is the plainest one that holds up (symmetric, one scale per output row, as LLM.int8's
vector-wise or gpt-fast's int8 weight-only): for a row w of a weight matrix,

    scale = max|w| / 127,   q = round(w / scale) ∈ [−127, 127],   w ≈ scale · q,

so each weight is off by at most scale / 2 (half a quantisation step of its row). No calibration data,
no outlier handling: what it costs in accuracy is measured, not assumed (tests/test_quantize.py states
the tolerance; notes/benchmarks.md the token agreement with the unquantised model).

    quantize_int8(weight) -> (q, scale)        one matrix
    dequantize_int8(q, scale) -> weight        its fp32 approximation (the reference's weights)
    quantize_model_int8(model)                 every `model.Linear` replaced by an `Int8Linear`, in place

Inference only: an Int8Linear has no parameters to train (q and scale are buffers).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minihuatuo.engine import kernels
from minihuatuo.engine import reference_kernels as ref
from minihuatuo.engine.model import Linear


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (O, I), scale fp32 (O,)) with weight ≈ scale[:, None] · q, per output row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0, any scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class Int8Linear(nn.Module):
    """A `model.Linear` with int8 weights: y = x (scale · q)ᵀ + bias, in x's dtype. With `use_kernels`
    on a CPU the GEMV kernel computes it for any number of rows (it is made for the few rows of
    decoding; a long prompt's prefill is slower than fp32 BLAS); otherwise the reference."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.use_kernels = getattr(linear, "use_kernels", False)  # set through Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.use_kernels:
            y = kernels.gemv_int8(rows, self.qweight, self.scale)
        else:
            y = ref.gemv_int8(rows, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_model_int8(model: nn.Module) -> nn.Module:
    """Replace every `model.Linear` (attention, MLP and LM head projections) by an Int8Linear, in place,
    and return the model. A tied LM head gets an int8 copy of the embedding matrix (the embedding
    lookup keeps the full-precision table); a classifier's `score` head (a plain nn.Linear) stays."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, Int8Linear(child))
    return model
