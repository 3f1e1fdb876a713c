"""The decoder-only transformer behind every model in minihuatuo (policy, reference, value model,
verifier): the Llama-3.x family and the Qwen2/2.5 family, in one flat file.

    h_0     = E[x]                                        embedding
    a_l     = h_{l-1} + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),  n = RMSNorm(h_{l-1})
    h_l     = a_l + W_down · (silu(W_gate m) ⊙ W_up m),              m = RMSNorm(a_l)
    logits  = W_lm · RMSNorm(h_L)

The two families differ only in configuration (see notes/model.md): Qwen2 adds biases to q, k, v
and ties the LM head to the embedding in small sizes; Llama-3.1/3.2 rescale the RoPE frequencies
("llama3" rope scaling). Module names equal Hugging Face's (`model.layers.0.self_attn.q_proj`, ...),
so a checkpoint's tensor names map to ours one to one and an auditor can diff them directly.

One forward serves training (full causal sequences), batched prefill of left-padded prompts and
cached decoding: the KV cache is an explicit argument (`kv_cache.KVCache`), never state hidden in
the model, because PPO samples from and trains the very same weights.

Dimension letters used in shape comments: B batch, T query length, S key length (cache slots),
C hidden size, H query heads, K key/value heads, D head dim, V vocabulary, F MLP width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minihuatuo.engine import kernels
from minihuatuo.engine.masks import attention_mask_for, position_ids_from_mask


@dataclass
class ModelConfig:
    """Shape and numerics of one model. Field names follow Hugging Face's config.json where one exists."""

    family: str = "llama"  # "llama" or "qwen2": decides the architecture name written to config.json
    vocab_size: int = 32000  # V
    hidden_size: int = 256  # C
    intermediate_size: int = 688  # F, width of the SwiGLU MLP
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # H
    num_key_value_heads: int = 4  # K; grouped-query attention when K < H (each K head serves H/K query heads)
    head_dim: int = 0  # D; 0 means C // H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_position_embeddings: int = 2048
    qkv_bias: bool = False  # Qwen2: biases on q, k, v projections
    o_bias: bool = False  # Llama's attention_bias=True puts a bias on o as well
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix (Llama-3.2-1B/3B, Qwen2.5 <= 3B)
    lm_head: bool = True  # causal-LM head (absent in *ForSequenceClassification checkpoints)
    num_labels: int = 0  # >0: a bias-free `score` head C -> num_labels (HF *ForSequenceClassification; 1 = value model)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # config.json fields we carry through unchanged (id2label, ...)

    def __post_init__(self):
        # the values' rules (engine/ has no services/config.py: the same rules, written out); a bad value is
        # a ValueError naming the field (config.json's name too: engine/checkpoint.py puts the file in front)
        def need(name: str, ok, rule: str):
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"field {name!r}: expected {rule}, got {value!r}")

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return (integer(v) or isinstance(v, float)) and math.isfinite(v)

        def token_id(v):
            return v is None or (integer(v) and v >= 0)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            need(name, lambda v: integer(v) and v >= 1, "an integer >= 1")
        need("head_dim", lambda v: integer(v) and v >= 0, "an integer >= 0 (0: hidden_size / num_attention_heads)")
        need("num_labels", lambda v: integer(v) and v >= 0, "an integer >= 0")
        for name in ("rms_norm_eps", "rope_theta"):
            need(name, lambda v: number(v) and v > 0, "a number > 0")
        need("initializer_range", lambda v: number(v) and v >= 0, "a number >= 0")
        need("bos_token_id", token_id, "a token id (an integer >= 0) or null")
        need("pad_token_id", token_id, "a token id (an integer >= 0) or null")
        need("eos_token_id", lambda v: token_id(v) or (isinstance(v, list) and all(token_id(i) for i in v)),
             "a token id (an integer >= 0), a list of them or null")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd (hidden_size {self.hidden_size} / num_attention_heads "
                             f"{self.num_attention_heads}); RoPE rotates pairs of dimensions")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}: only the llama3 type is implemented")
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"unknown model family {self.family!r} (llama, qwen2)")


_LLAMA3_SCALING_8B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
_LLAMA3_SCALING_1B = {**_LLAMA3_SCALING_8B, "factor": 32.0}

# Named shapes. Published checkpoints' shapes (from their config.json) for benchmarks with random
# weights; `tiny` for tests; `llama-125m` is the ~125M-parameter Llama-shaped model of the decode benchmark.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "llama-125m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=12),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_SCALING_1B, max_position_embeddings=131072,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": ModelConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                num_attention_heads=24, num_key_value_heads=8, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_SCALING_1B, max_position_embeddings=131072,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_SCALING_8B, max_position_embeddings=131072,
                                bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": ModelConfig(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                                rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
                                tie_word_embeddings=True, eos_token_id=151643),
    "qwen2.5-7b": ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
                              eos_token_id=151643),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a named preset, with fields overridden (e.g. preset("tiny", num_labels=2, lm_head=False))."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- normalisation, RoPE

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g. Statistics in fp32 even for bf16/fp16 activations (a bf16
    mean of squares loses the small components); the result is cast back before the gain, as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernels = False  # set through Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and not torch.compiler.is_compiling():  # compiled: inductor fuses the ops below
            return kernels.rms_norm(x, self.weight, self.eps)
        # F.rms_norm without a weight is exactly x32 * rsqrt(mean(x32²) + eps), in one fused op
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """θ_i = theta^(-2i/D), i = 0..D/2-1 (RoFormer), with the llama3 frequency rescaling when configured:
    wavelengths longer than original_len/low_freq_factor are slowed by `factor`, shorter than
    original_len/high_freq_factor are kept, and the band in between is interpolated smoothly."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = cfg.rope_scaling
    if s is None or s.get("rope_type", "default") == "default":
        return inv_freq
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the long-wavelength edge, 1 at the short one
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(in_band, interpolated, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin of position · θ for each (B, T) position, shaped (B, 1, T, D) to broadcast
    over heads. Angles are duplicated over the two halves of D: the rotate-half layout of HF
    checkpoints (not the interleaved one of Meta's reference code). The sin of the first half is
    negated here, once per forward, so that `apply_rope` needs no negation per layer."""
    freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, D/2), always fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, D)
    half = inv_freq.shape[0]
    sign = torch.cat((emb.new_full((half,), -1.0), emb.new_ones(half)))  # (D,)
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by angle position·θ_i. x: (B, nh, T, D); cos, sin: (B, 1, T, D).

    The textbook form is x·cos + rotate_half(x)·sin with rotate_half(x) = (−x_2, x_1); rolling x by D/2
    gives (x_2, x_1), and the minus sign already sits in `sin_signed` (see rope_cos_sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


# ----------------------------------------------------------------------------- blocks

class Linear(nn.Linear):
    """nn.Linear (same parameters, same names), except for a single bf16 row on a CPU without gradient:
    torch's matrix product for one row of bfloat16 streams the weights no faster than fp32 weights
    twice their size (notes/benchmarks.md, "bf16 weights"), and batch-1 decoding is nothing but such
    products. There the matrix-vector product runs instead: torch.mv, or with `use_kernels` the GEMV
    of kernels/cpu/gemv.cpp, which streams bf16 weights faster still."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_kernels = False  # set through Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]
                and not torch.is_grad_enabled()):
            row = x.reshape(1, -1)
            y = kernels.gemv(row, self.weight)[0] if self.use_kernels else torch.mv(self.weight, row[0])
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, H, K, D = cfg.hidden_size, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = Linear(C, K * D, bias=cfg.qkv_bias)
        self.v_proj = Linear(C, K * D, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * D, C, bias=cfg.o_bias)
        self.use_kernels = False  # set through Transformer.use_kernels

    def forward(self, x, cos, sin, mask, is_causal, cache, cache_start):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.use_kernels and not torch.compiler.is_compiling():  # the kernel works in the (B, T, nh, D) layout
            q, k = kernels.rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos[:, 0], sin[:, 0])
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_start, k, v)  # (B, K, S, D): every key so far
        # enable_gqa lets each of the K key/value heads serve H/K query heads without copying them
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, Fw = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, Fw, bias=cfg.mlp_bias)
        self.up_proj = Linear(C, Fw, bias=cfg.mlp_bias)
        self.down_proj = Linear(Fw, C, bias=cfg.mlp_bias)
        self.use_kernels = False  # set through Transformer.use_kernels

    def forward(self, x):
        if self.use_kernels and not torch.compiler.is_compiling():
            return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP, each on an RMS-normalised copy of the stream."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """Decoder with an optional LM head and an optional `score` head (classifier / value head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if cfg.lm_head else None
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False) if cfg.num_labels else None
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # RoPE frequencies per device, kept fp32
        self.activation_checkpointing = False  # a training switch, set from outside (sft.py / ppo.py)
        self._use_kernels = False
        self.reset_parameters()

    @property
    def use_kernels(self) -> bool:
        """Fused kernels (minihuatuo/kernels.py) for RMSNorm, SwiGLU and RoPE, and the decoding GEMV of
        bf16 rows: a switch set from outside, off by default. Same results as the reference within the
        tolerances of tests/test_kernels.py. Inside torch.compile the elementwise kernels step aside
        (inductor fuses those ops itself); the GEMV, a custom op, stays."""
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, on: bool) -> None:
        self._use_kernels = bool(on)
        for m in self.modules():
            if m is not self and hasattr(m, "use_kernels"):  # RMSNorm, Attention, MLP, (Int8)Linear
                m.use_kernels = self._use_kernels

    def reset_parameters(self):
        """N(0, initializer_range) for matrices, zeros for biases, ones for norms (HF's init)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_start=0):
        """Final-norm hidden states (B, T, C) of `input_ids` (B, T).

        attention_mask: see `attention_mask_for`. position_ids: (B, T); by default counted from the
        2-D mask (left padding) or cache_start + t. cache: a `KVCache` whose slots [cache_start,
        cache_start + T) receive this call's keys and values.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]
            else:
                position_ids = torch.arange(cache_start, cache_start + T, device=device).expand(B, T)
        mask, is_causal = attention_mask_for(attention_mask, T, cache_start, device)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if mask is not None:
            # as an additive 0 / −inf mask: SDPA's CPU kernels run ~2x faster with it than with a
            # boolean one (decoding a left-padded batch); the probabilities are identical
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=device).masked_fill_(~mask, float("-inf"))
        cos, sin = rope_cos_sin(self.inv_freq(device), position_ids, x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only each block's input; recompute its activations during backward
                x = checkpoint(layer, x, cos, sin, mask, is_causal, cache, cache_start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, cache_start)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_start=0,
                last_only=False, logits_at=None, head=None):
        """LM logits (B, T, V); or (B, 1, V) for the last position only (decoding); or (N, V) for the N
        positions where the (B, T) bool mask `logits_at` is True (training: only target positions).
        The LM head is the largest matrix of a small model and its output the largest activation, so
        we never compute it for positions nobody samples from or scores.

        `head`, a function (h (N, C), lm_head.weight (V, C)) -> anything, replaces the LM head's matmul:
        the fused LM-head losses of kernels.py (linear_cross_entropy for SFT,
        linear_logprobs_and_entropy for PPO), which never hold the (N, V) logits. Passing them through
        forward keeps DDP / FSDP hooks around the whole computation."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, cache_start)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at]  # (N, C)
        if head is not None:
            return head(h, self.lm_head.weight)
        return self.lm_head(h)

    def values(self, input_ids, attention_mask=None, position_ids=None):
        """Per-token scalar values (B, T) from a 1-label score head: the PPO value model (TRL's layout)."""
        return self.score(self.hidden_states(input_ids, attention_mask, position_ids)).squeeze(-1)

    def classify(self, input_ids, attention_mask=None):
        """Sequence-classification logits (B, num_labels), read at the last non-pad token of each row
        (HF *ForSequenceClassification pooling, valid for left and right padding alike)."""
        h = self.hidden_states(input_ids, attention_mask)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            idx = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (idx * attention_mask.long()).argmax(-1)  # rightmost real token
        logits = self.score(h)  # (B, T, num_labels)
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    def inv_freq(self, device) -> torch.Tensor:
        # Not a registered buffer: .to(bfloat16) would round the frequencies, and a model built on
        # the meta device (checkpoint loading) would have none. Computed once per device instead.
        device = torch.device(device)
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.cfg).to(device)
        return self._inv_freq[device]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu", seed: int | None = None) -> Transformer:
    """A randomly initialised model (seeded when `seed` is given) in `dtype` on `device`."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype)
