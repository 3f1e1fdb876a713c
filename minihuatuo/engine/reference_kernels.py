"""Pure-PyTorch references of the fused kernels in kernels/: the code to read and to port.

Each function states the math of one kernel in plain tensor ops (autograd gives its backward), with
the same numerics as the model's own code path (minihuatuo/model.py), so that the fused kernels in
kernels/ (C++ for the CPU, CUDA for the GPU) are tested against it, and `minihuatuo.kernels` falls
back to it wherever no kernel is built. notes/kernels.md derives each backward.

The last two functions are the log-prob kernel's algorithm, written with torch ops on a block of rows:
forward keeps only three floats per row (log-prob, entropy, logsumexp) and backward recomputes the
softmax from them. The chunked LM head uses them where no compiled kernel is available.

Shapes: B batch, T tokens, H/K query/key heads, D head dim, C hidden size, V vocabulary, N rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 inputs (the model's .float()); float64 stays float64 (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight · round(x / sqrt(mean(x²) + eps)): statistics in fp32, the normalised value cast back
    to x's dtype before the gain (model.RMSNorm, HF's order). x: (..., C); weight: (C,)."""
    x32 = _at_least_fp32(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return weight * (x32 * rstd).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, silu(g) = g · sigmoid(g): the gated unit of the SwiGLU MLP (model.MLP)."""
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by its angle (rotate-half layout, model.apply_rope).
    x: (B, T, nh, D) — the projection's own layout, before the head transpose; cos, sin_signed:
    (B or 1, T, D) from model.rope_cos_sin (sin negated on the first half)."""
    D = x.shape[-1]
    return x * cos[:, :, None, :] + x.roll(D // 2, dims=-1) * sin_signed[:, :, None, :]


def rope_qk(q, k, cos, sin_signed):
    """The same rotation applied to queries (B, T, H, D) and keys (B, T, K, D)."""
    return rope(q, cos, sin_signed), rope(k, cos, sin_signed)


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               with_entropy: bool = True):
    """log π(a) of each target and the entropy of π = softmax(logits / temperature), per row.

    logits: (..., V); targets: (...) token ids; a target outside [0, V) (e.g. the -100 ignore label)
    gets log-prob 0. Returns two float32 tensors (...); with_entropy=False returns None for the
    entropy and skips its two (..., V) passes. This materialises the full (..., V) log-softmax (and
    its softmax) in fp32 — exactly what the fused kernel avoids.

    The one statement of the tempered log-prob in the package: the RL forwards (stages/rl/rollout.py
    `response_logprobs`, stages/rl/ppo.py `ActorCritic`) call it, and the kernels are tested against it.
    """
    z = _at_least_fp32(logits) / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    V = logits.shape[-1]
    valid = (targets >= 0) & (targets < V)
    logp = logp_all.gather(-1, targets.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp, None
    p = logp_all.exp()
    # -p·log p is 0 where p = 0 (a masked -inf logit), not 0·(-inf) = NaN; masking log p before the
    # product (not the product) keeps the gradient finite too
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def linear_logprobs_and_entropy(hidden, weight, targets, temperature: float = 1.0):
    """LM head then log-prob and entropy: logits = hidden @ weightᵀ, the whole (..., V) of them at once.
    hidden: (..., C); weight: (V, C) (lm_head.weight)."""
    return token_logprobs_and_entropy(hidden @ weight.t(), targets, temperature)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100):
    """Σ over labelled positions of −log softmax(hidden @ weightᵀ)[label]: the SFT loss of sft.py,
    on fp32 logits (N, V) held in full."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=ignore_index, reduction="sum")


# ----------------------------------------------------------------------------- the kernel's algorithm

def logprob_entropy_rows_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(logp, entropy, lse), each float32 (N,), of logits (N, V): what the kernel keeps of each row.
    H = lse − Σ p z, written as log s − Σ e^{z−m}(z−m) / s with m the row max, s = Σ e^{z−m}."""
    z = _at_least_fp32(logits) / temperature
    m = z.max(-1, keepdim=True).values  # (N, 1)
    d = z - m
    e = d.exp()
    s = e.sum(-1)
    t = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(-1)
    lse = m.squeeze(-1) + s.log()
    V = logits.shape[-1]
    valid = (targets >= 0) & (targets < V)
    za = z.gather(-1, targets.clamp(0, V - 1)[:, None]).squeeze(-1)
    logp = torch.where(valid, za - lse, torch.zeros_like(lse))
    return logp, s.log() - t / s, lse


def logprob_entropy_rows_backward(logits, targets, temperature: float, lse, entropy, dlogp=None, dentropy=None):
    """d logits (N, V), in logits' dtype, from the upstream gradients of logp and entropy (None = 0):

        d/dz_j logp_a = [j = a] − p_j          d/dz_j H = −p_j (log p_j + H)
        d logits = (1/temperature) · d z
    """
    z = _at_least_fp32(logits) / temperature
    logp_all = z - lse[:, None]  # (N, V)
    p = logp_all.exp()
    grad = torch.zeros_like(p)
    if dentropy is not None:
        grad += torch.where(p > 0, p * (-entropy[:, None] - logp_all), torch.zeros_like(p)) * dentropy[:, None]
    if dlogp is not None:
        V = logits.shape[-1]
        g = torch.where((targets >= 0) & (targets < V), dlogp, torch.zeros_like(dlogp)).to(p.dtype)
        grad -= p * g[:, None]
        grad.scatter_add_(1, targets.clamp(0, V - 1)[:, None], g[:, None])
    return (grad / temperature).to(logits.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, I) @ weight (O, I)ᵀ with fp32 sums, rounded once to x's dtype."""
    return F.linear(_at_least_fp32(x), _at_least_fp32(weight)).to(x.dtype)


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, I) @ (scale · qweight)ᵀ for int8 weights qweight (O, I) with one fp32 scale per row (O,):
    fp32 sums of x · q, times the row's scale, rounded once to x's dtype."""
    return (F.linear(_at_least_fp32(x), qweight.float()) * scale.float()).to(x.dtype)
