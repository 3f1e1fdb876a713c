"""SFT data (paper §3.1 "Supervised Fine-Tuning"): examples → token ids with loss masks → batches.

Each example (x, ê, ŷ) becomes one chat turn

    prompt  = chat_template([user: x], generation prompt)             no loss
    target  = "## Thinking\n\n{ê}\n\n## Final Response\n\n{ŷ}" + end-of-turn token    loss

and the loss is the mean negative log-likelihood of the target tokens only. The ablation datasets of
the paper's Table 2 use the same code: "simple CoT" files put the simple chain of thought in the
Complex_CoT field; "direct response" files have no CoT, and the target is ŷ alone.

Labels are stored already shifted: labels[b, t] is the token that position t must predict, or IGNORE.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from minihuatuo.services.formats import SFTExample

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def target_text(ex: SFTExample) -> str:
    if ex.complex_cot:
        return f"## Thinking\n\n{ex.complex_cot}\n\n## Final Response\n\n{ex.response}"
    return ex.response  # direct-response ablation: no thinking part


@dataclass
class Tokenized:
    ids: list[int]  # prompt + target
    n_prompt: int  # the first n_prompt ids carry no loss

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.n_prompt


def tokenize(ex: SFTExample, tokenizer) -> Tokenized:
    """Token ids exactly as the model will see them at inference: the rendered conversation with the
    assistant turn, cut right after the end-of-turn token (ChatML's trailing newline is not trained)."""
    user = [{"role": "user", "content": ex.question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": target_text(ex)}],
                                         add_generation_prompt=False)
    eot = tokenizer.token_to_id(tokenizer.template.end_of_turn)
    if full[:len(prompt)] != prompt:  # a BPE merge across the boundary: keep the inference-time prompt
        full = prompt + tokenizer.encode(target_text(ex), add_special_tokens=False) + [eot]
    end = full.index(eot, len(prompt)) + 1
    return Tokenized(full[:end], len(prompt))


def prepare(examples: list[SFTExample], tokenizer, max_length: int, overlong: str = "truncate") -> list[Tokenized]:
    """Tokenize all examples. Over-long ones are truncated (target cut at max_length) or dropped,
    never silently: the counts are printed to stderr. An example whose prompt alone fills max_length
    is always dropped (no target token would remain)."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        t = tokenize(ex, tokenizer)
        if len(t.ids) > max_length:
            if overlong == "drop" or t.n_prompt >= max_length:
                dropped += 1
                continue
            t = Tokenized(t.ids[:max_length], t.n_prompt)
            truncated += 1
        out.append(t)
    if truncated or dropped:
        print(f"sft data: {truncated} example(s) truncated and {dropped} dropped at max_length={max_length} "
              f"(of {len(examples)})", file=sys.stderr)
    return out


def shifted_labels(t: Tokenized) -> list[int]:
    """labels[i] = ids[i + 1] where ids[i + 1] is a target token, else IGNORE."""
    return [t.ids[i + 1] if i + 1 >= t.n_prompt else IGNORE for i in range(len(t.ids) - 1)] + [IGNORE]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), already shifted; IGNORE where no loss
    attention_mask: torch.Tensor | None  # None (right padding, see collate_padded) or (B, T, T) bool (packed)
    position_ids: torch.Tensor  # (B, T)

    def to(self, device):
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids))


def collate_padded(items: list[Tokenized], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest row."""
    T = max(len(t.ids) for t in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for b, t in enumerate(items):
        n = len(t.ids)
        ids[b, :n] = torch.tensor(t.ids)
        labels[b, :n] = torch.tensor(shifted_labels(t))
    positions = torch.arange(T).expand(len(items), T)
    # Right padding needs no mask: with causal attention a real token never sees the pads after it, and
    # the pads' own outputs carry no loss. Dropping the mask lets SDPA take its causal fast path.
    return Batch(ids, labels, None, positions)


def pack_rows(items: list[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Greedy packing in the given order: start a new row when the next example does not fit."""
    rows, current, used = [], [], 0
    for t in items:
        if current and used + len(t.ids) > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(t)
        used += len(t.ids)
    if current:
        rows.append(current)
    return rows


def collate_packed(items: list[Tokenized], pad_id: int, max_length: int) -> Batch:
    """Several examples per row. They must not see each other, and each must see the same positions
    as when run alone, so we use BOTH a block-diagonal causal mask and per-example position reset
    (RoPE makes positions matter only relatively, but we keep them identical anyway).
    tests/test_sft.py checks each packed example's logits against the example run alone."""
    rows = pack_rows(items, max_length)
    T = max(sum(len(t.ids) for t in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which example each slot holds; -1 = padding
    for b, row in enumerate(rows):
        start = 0
        for k, t in enumerate(row):
            n = len(t.ids)
            ids[b, start:start + n] = torch.tensor(t.ids)
            labels[b, start:start + n] = torch.tensor(shifted_labels(t))
            positions[b, start:start + n] = torch.arange(n)
            segment[b, start:start + n] = k
            start += n
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    valid_key = (segment >= 0)[:, None, :]
    # padding queries see only themselves (a fully masked row would make attention return NaN)
    mask = (same & causal & valid_key) | torch.eye(T, dtype=torch.bool)
    return Batch(ids, labels, mask, positions)
