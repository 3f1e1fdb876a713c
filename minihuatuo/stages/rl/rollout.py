"""What every stage-2 RL algorithm here shares (PPO, RLOO, GRPO, DPO's sampling): the rollout, its
masks, and temperature-scaled log-probs. Paper §3.2. "checklist N" = item N of the PPO checklist in
notes/ppo.md.

Shapes: B rollouts, P prompt slots (left-padded), R response slots (response_length), V vocabulary.
Response slot t holds action a_t; L_b is the index of row b's last real token (its stop token, or
R − 1 when it has none). Two explicit masks replace the official code's padding tricks:

    policy_mask[b, t] = t <= L_b              tokens the policy chose: ratio, KL and policy loss live here
    value_mask[b, t]  = t <= L_b + 1 (< R)    + the state after the stop token: the critic is trained there too

(the official code writes a placeholder log-prob 1.0 into padding and keeps two masks that differ by one
slot; checklist 9–10. tests/test_ppo.py checks that our masks give the same numbers.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minihuatuo.engine.masks import position_ids_from_mask
from minihuatuo.engine.sample import SamplingConfig, generate


@dataclass
class Rollout:
    query: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    response: torch.Tensor  # (B, R) sampled ids, pad_id after the first stop token
    policy_mask: torch.Tensor  # (B, R) bool, t <= L
    value_mask: torch.Tensor  # (B, R) bool, t <= L + 1
    last: torch.Tensor  # (B,) L, index of the last real response token
    has_stop: torch.Tensor  # (B,) bool, the response ended with a stop token
    logprobs: torch.Tensor  # (B, R) behaviour log π_old(a_t) under logits / T, from the sampler; 0 off policy_mask
    texts: list[str]  # decoded responses (special tokens skipped)

    @property
    def sequence(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.query, self.response], dim=1)

    @property
    def sequence_mask(self) -> torch.Tensor:  # (B, P + R): real prompt tokens + response up to L + 1
        return torch.cat([self.query_mask.bool(), self.value_mask], dim=1)


def stop_ids(tokenizer, which: str) -> list[int]:
    """The ids that end a response (checklist 8). "eos_token": only the tokenizer's eos_token — the
    official run (TRL's PPOTrainer truncates at tokenizer.eos_token_id; for Llama-3.1-Instruct that is
    <|eot_id|>, so <|end_of_text|> and <|eom_id|> do not end a response there). "all": also every
    generation_config.json eos_token_id, as `generate`, `serve` and evaluation stop."""
    if which == "eos_token":
        if tokenizer.eos_token_id is None:
            raise ValueError("stop_tokens 'eos_token': the tokenizer names no eos_token")
        return [tokenizer.eos_token_id]
    if which == "all":
        return list(tokenizer.eos_ids)
    raise ValueError(f"stop_tokens must be 'eos_token' or 'all', got {which!r}")


def truncate_after_stop(tokens: torch.Tensor, stop_ids, pad_id: int):
    """Keep each row up to and including its FIRST stop token; pad the rest (checklist 8).
    Returns (truncated tokens, L = index of the last kept token, has_stop)."""
    R = tokens.shape[1]
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))  # (B, R)
    has_stop = is_stop.any(-1)
    first = torch.where(has_stop, is_stop.float().argmax(-1), torch.full_like(has_stop, R - 1, dtype=torch.long))
    t = torch.arange(R, device=tokens.device)
    return torch.where(t[None] <= first[:, None], tokens, pad_id), first, has_stop


def masks_from_last(last: torch.Tensor, R: int):
    t = torch.arange(R, device=last.device)[None]  # (1, R)
    return t <= last[:, None], t <= last[:, None] + 1


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[list[int]], temperature: float, response_length: int,
            stop_ids, early_stop: bool = True, seed: int | None = None) -> Rollout:
    """Sample one response per prompt. early_stop=False reproduces the official run, which always
    generates response_length tokens and truncates afterwards (checklist 5). early_stop=True stops
    each row at its stop token: every kept token has the same DISTRIBUTION either way, but not the
    same value for a seed — the sampler draws one uniform per row still in the batch, and once
    finished rows leave the batch (sample.py) the later rows' draws shift. So a seed reproduces a
    run only with the same early_stop (and the same batch composition)."""
    cfg = SamplingConfig(max_new_tokens=response_length, temperature=temperature,
                         stop_token_ids=tuple(stop_ids) if early_stop else (), seed=seed)
    gen = generate(policy, prompts, cfg, pad_id=tokenizer.pad_id)
    B, n = gen.tokens.shape
    tokens = torch.full((B, response_length), tokenizer.pad_id, dtype=torch.long, device=gen.tokens.device)
    tokens[:, :n] = gen.tokens
    logprobs = torch.zeros((B, response_length), device=gen.tokens.device)
    logprobs[:, :n] = gen.logprobs
    response, last, has_stop = truncate_after_stop(tokens, stop_ids, tokenizer.pad_id)
    policy_mask, value_mask = masks_from_last(last, response_length)
    texts = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(response, policy_mask)]
    return Rollout(gen.prompt_ids, gen.prompt_mask, response, policy_mask, value_mask, last, has_stop,
                   logprobs * policy_mask, texts)


def response_positions(ro: Rollout) -> torch.Tensor:
    """(B, P + R) bool: the positions whose outputs score the response slots. Position P − 1 + t reads
    the state before a_t; we take t = 0 .. R − 1, i.e. positions P − 1 .. P + R − 2."""
    B, P = ro.query.shape
    R = ro.response.shape[1]
    at = torch.zeros((B, P + R), dtype=torch.bool, device=ro.query.device)
    at[:, P - 1:P + R - 1] = True
    return at


def forward_inputs(ro: Rollout):
    """Inputs for a forward over query ⊕ response: the mask hides prompt padding and everything after
    slot L + 1; positions count real tokens only (the sampler's recipe, checklist 3)."""
    mask = ro.sequence_mask.long()
    return ro.sequence, mask, position_ids_from_mask(mask)


def response_logprobs(model, ro: Rollout, temperature: float, with_entropy: bool = False):
    """log π(a_t) under softmax(logits / T) for each response slot (B, R), and optionally the entropy
    of that distribution (B, R). Both the reference and the current policy go through here, so KL and
    ratio compare the same tempered distributions (checklist 7)."""
    ids, mask, pos = forward_inputs(ro)
    B, R = ro.response.shape
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_at=response_positions(ro))  # (B·R, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    taken = logp.gather(-1, ro.response.reshape(-1, 1)).view(B, R)
    if not with_entropy:
        return taken
    entropy = -(logp.exp() * logp).sum(-1).view(B, R)
    return taken, entropy


def response_values(value_model, ro: Rollout) -> torch.Tensor:
    """V_t (B, R): the value head at position P − 1 + t, the state before a_t (TRL's layout)."""
    ids, mask, pos = forward_inputs(ro)
    B, R = ro.response.shape
    h = value_model.hidden_states(ids, attention_mask=mask, position_ids=pos)  # (B, P + R, C)
    return value_model.score(h[response_positions(ro)]).view(B, R)
