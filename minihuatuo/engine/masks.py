"""Attention masks and position ids for padded batches, packed rows and a KV cache.

The transformer (model.py) takes a caller's mask in one of three forms; `attention_mask_for` turns
it into what `scaled_dot_product_attention` takes, choosing SDPA's causal fast path whenever no
padding is present. The sampler (left-padded prompts) and RL (prompt + reply rows) count positions
over real tokens only, with `position_ids_from_mask`.
"""

import torch


def attention_mask_for(attention_mask, T: int, cache_start: int, device):
    """Turn the caller's mask into what scaled_dot_product_attention takes: (bool mask or None, is_causal).

    The query at cache slot p = cache_start + t may attend to key slot s when s <= p and key s is not
    padding. `attention_mask` is either None (no padding anywhere), a (B, S) 0/1 key-padding mask over
    all S = cache_start + T key slots, or a (B, T, S) boolean matrix the caller built in full (e.g.
    block-diagonal for packed sequences), used as given.
    """
    S = cache_start + T
    if attention_mask is not None and attention_mask.dim() == 2 and cache_start == 0 and bool(attention_mask.all()):
        attention_mask = None  # no padding at all: use SDPA's causal fast path instead of an explicit mask
    if attention_mask is None:
        if cache_start == 0:
            return None, T > 1  # plain causal: SDPA's fast path
        if T == 1:
            return None, False  # one new query sees every cached key
        attention_mask = torch.ones(1, S, dtype=torch.bool, device=device)
    if attention_mask.dim() == 3:
        return attention_mask[:, None], False  # (B, 1, T, S)
    key_valid = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    if T == 1:
        return key_valid, False
    q_slot = torch.arange(cache_start, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    # A padding query (left of a left-padded prompt) would see no key at all and SDPA would return
    # NaN; letting every query see its own slot keeps the row finite. Its output is never used.
    mask = ((k_slot <= q_slot) & key_valid) | (k_slot == q_slot)  # (B, 1, T, S)
    return mask, False


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt starts at position 0 (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
