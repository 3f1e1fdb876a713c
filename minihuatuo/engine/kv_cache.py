"""A static key/value cache: one preallocated (B, K, S_max, D) buffer per layer for keys and one for
values, sized once at set-up (gpt-fast's design). Decoding writes each step's keys and values in place
instead of concatenating, so memory is fixed up front and nothing is reallocated per token.

The cache is opt-in and explicit: the sampler allocates it and passes it to `Transformer.forward`
together with `cache_start`, the first slot this call writes. The model holds no cache of its own,
so the same weights can be trained (no cache) and sampled from (with one).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)  # (B, K, S_max, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "KVCache":
        """A cache shaped for `model`, in the dtype and on the device of its weights."""
        cfg = model.cfg
        w = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype=w.dtype, device=w.device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (1-D indices), in this order: the sampler drops finished rows."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) into slots [start, start + T) of `layer`; return all keys and values
        written so far, slots [0, start + T), as views (B, K, start + T, D)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to slot {end} in a cache of {self.max_len} slots")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
