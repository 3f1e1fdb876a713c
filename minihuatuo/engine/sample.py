"""Batched autoregressive sampling with a static KV cache.

    prefill:  run the left-padded prompts (B, P) once, filling cache slots [0, P)
    decode:   for each step n: pick token a_n from the last logits, write it at slot P + n

Prompts are left-padded so that every row's next token lands in the same cache slot; position ids
count real tokens only, so padding changes nothing about a row's computation. Each row finishes on
its own (stop token id, stop string or max_new_tokens); finished rows ride along with padding until
an eighth of the batch has finished, then they are dropped from the batch and from the cache, so a
batch of replies of mixed lengths costs about its mean length, not its longest (decoding is bound
by reading the KV cache: every row still in the batch costs its whole cache at every step). The
compiled step never cuts a batch below two rows (see decode_step.py); that extra row draws no random
number, so a seed gives the same tokens on both paths.

Besides the tokens, the sampler returns log π(a_n) of each sampled token under the temperature-scaled
distribution, log_softmax(logits / T) — before top-k / top-p truncation, which is what PPO's old
log-probs are (notes/ppo.md checklist 6–7: the policy's log-probs are recomputed under the same temperature).
For greedy decoding (temperature 0) they are log_softmax(logits) at the argmax.

Each decode step (the cached forward of the newest token and the pick of the next) is
`decode_step.step`; with `SamplingConfig.compile` it is the compiled form of the same function
(decode_step.py): same tokens, several times fewer dispatches per step for a small model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minihuatuo.engine import decode_step
from minihuatuo.engine.decode_step import filter_logits  # noqa: F401  (re-exported)
from minihuatuo.engine.kv_cache import KVCache
from minihuatuo.engine.masks import position_ids_from_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    stop_token_ids: tuple[int, ...] = ()  # e.g. the tokenizer's eos ids; the stop token is kept in the output
    stop_strings: tuple[str, ...] = ()  # checked on the decoded text of each row's newest tokens
    seed: int | None = None  # seeds a private torch.Generator: same seed, same prompts -> same tokens
    compile: bool | None = None  # the compiled decode step (decode_step.py): same tokens; None = the process default


@dataclass
class Generation:
    """The result of one batched `generate` call. Row b's response is tokens[b, mask[b]]."""

    prompt_ids: torch.Tensor  # (B, P) left-padded prompts
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    tokens: torch.Tensor  # (B, N) sampled ids; pad_id after a row finished
    logprobs: torch.Tensor  # (B, N) float32 log π(a_n); 0 where mask is False
    mask: torch.Tensor  # (B, N) bool, True for tokens that belong to the response (stop token included)
    finish_reasons: list[str] = field(default_factory=list)  # "stop_token", "stop_string" or "length"

    def responses(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None):
    """Pick one token per row from logits (B, V); return (ids (B,), log-probs (B,) float32)."""
    return decode_step.pick(logits, cfg.temperature, cfg.top_k, cfg.top_p, uniform(logits.shape[0], cfg, generator,
                                                                                  logits.device))


def uniform(rows: int, cfg: SamplingConfig, generator: torch.Generator | None, device):
    """The one uniform draw per row that inverse-CDF sampling uses (None when greedy). Drawn here, outside
    the (possibly compiled) step, so that both paths consume the same random stream."""
    if cfg.temperature == 0:
        return None
    return torch.rand((rows, 1), generator=generator, device=device)


def left_pad(prompts: list[list[int]], pad_id: int, device="cpu"):
    """(B, P) ids and 0/1 mask, real tokens flush right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p):] = 1
    return ids.to(device), mask.to(device)


class _StopStrings:
    """Detects stop strings by decoding only each row's newest tokens: a window of as many tokens as
    the longest stop string has characters (+8 for tokens that decode to partial characters), so the
    check costs O(window) per step instead of re-decoding the whole response."""

    def __init__(self, stop_strings, decode):
        self.stop_strings, self.decode = stop_strings, decode
        self.window = max(len(s) for s in stop_strings) + 8

    def hit(self, row_tokens: list[int]) -> bool:
        text = self.decode(row_tokens[-self.window:])
        return any(s in text for s in self.stop_strings)


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: SamplingConfig, pad_id: int, decode=None) -> Generation:
    """Sample up to cfg.max_new_tokens tokens after each prompt, all rows in one batch.

    decode: a function ids -> text (e.g. `Tokenizer.decode`), needed only for stop strings.
    """
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function (pass decode=tokenizer.decode)")
    device = model.model.embed_tokens.weight.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ids, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    N = cfg.max_new_tokens
    cache = KVCache.for_model(model, B, P + N)
    padded = bool((prompt_mask == 0).any())
    # key_valid[b, s]: may cache slot s be attended to? Prompt padding never; sampled tokens always.
    key_valid = torch.ones(B, P + N, dtype=torch.long, device=device)
    key_valid[:, :P] = prompt_mask
    position = position_ids_from_mask(prompt_mask)  # (B, P)

    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    mask = torch.zeros((B, N), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    reasons = ["length"] * B
    stop_ids = torch.tensor(list(cfg.stop_token_ids), dtype=torch.long, device=device)
    stops = _StopStrings(cfg.stop_strings, decode) if cfg.stop_strings else None
    rows: list[list[int]] = [[] for _ in range(B)] if stops else []

    logits = model(ids, attention_mask=key_valid[:, :P] if padded else None, position_ids=position,
                   cache=cache, cache_start=0, last_only=True)  # (B, 1, V)
    a, lp = sample_next(logits[:, -1], cfg, generator)
    next_pos = position[:, -1:] + 1  # (b, 1)
    row = torch.arange(B, device=device)  # row[i]: the output row of batch row i (b <= B rows left)
    compiled = cfg.compile if cfg.compile is not None else decode_step.compile_by_default
    step = decode_step.compiled_step if compiled else decode_step.step
    rider_at = None  # compiled path only: the batch position of a finished row kept to stay at batch >= 2
    for n in range(N):
        live = ~finished[row]
        tokens[row, n] = torch.where(live, a, pad_id)
        logprobs[row, n] = torch.where(live, lp, 0.0)
        mask[row, n] = live
        if len(stop_ids):
            hit = live & torch.isin(a, stop_ids)
            for b in row[hit].tolist():
                reasons[b] = "stop_token"
            finished[row[hit]] = True
        if stops:
            for i in live.nonzero().flatten().tolist():
                b = int(row[i])
                rows[b].append(int(a[i]))
                if not finished[b] and stops.hit(rows[b]):
                    finished[b] = True
                    reasons[b] = "stop_string"
        still = ~finished[row]
        if n == N - 1 or not bool(still.any()):
            break
        last = tokens[row, n:n + 1]
        if 8 * int((~still).sum()) >= len(row):  # drop the finished rows (module docstring)
            keep = still.nonzero().flatten()
            if compiled and len(keep) == 1 and len(row) > 1:
                # the compiled step keeps a second (finished) row: batch 1 is a graph of its own
                # (decode_step.py). It draws no uniform, so the random stream stays the eager path's.
                rider = (~still).nonzero().flatten()[:1]
                keep = torch.cat([keep, rider]).sort().values
                rider_at = int((keep == rider).nonzero())
            row, last, next_pos, key_valid = row[keep], last[keep], next_pos[keep], key_valid[keep]
            cache.keep_rows(keep)
        u = uniform(len(row) - (rider_at is not None), cfg, generator, device)
        if u is not None and rider_at is not None:
            u = torch.cat([u[:rider_at], u.new_zeros(1, 1), u[rider_at:]])
        a, lp = step(model, last, key_valid[:, :P + n + 1] if padded else None, next_pos, cache, P + n,
                     cfg.temperature, cfg.top_k, cfg.top_p, u)
        next_pos = next_pos + 1
    steps = n + 1  # columns actually sampled (fewer than N when every row stopped early)
    return Generation(ids, prompt_mask, tokens[:, :steps], logprobs[:, :steps], mask[:, :steps], reasons)
