"""What every stage-2 RL algorithm here shares (PPO, RLOO, GRPO, and DPO's sampling), as functions:
the prompt stream, the rollout and its masks, scoring with the verifier, tempered log-probs and
values, row selection, the sample diagnostics and the models a run starts from. Paper §3.2.
"checklist N" = item N of the PPO checklist in notes/ppo.md.

Shapes: B rollouts, P prompt slots (left-padded), R response slots (response_length), V vocabulary.
Response slot t holds action a_t; L_b is the index of row b's last real token (its stop token, or
R − 1 when it has none). Two explicit masks replace the official code's padding tricks:

    policy_mask[b, t] = t <= L_b              tokens the policy chose: ratio, KL and policy loss live here
    value_mask[b, t]  = t <= L_b + 1 (< R)    + the state after the stop token: the critic is trained there too

(the official code writes a placeholder log-prob 1.0 into padding and keeps two masks that differ by one
slot; checklist 9–10. tests/test_ppo.py checks that our masks give the same numbers.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.masks import position_ids_from_mask
from minihuatuo.engine.reference_kernels import token_logprobs_and_entropy
from minihuatuo.engine.sample import SamplingConfig, generate
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.formats import read_problems
from minihuatuo.services.reward import RewardConfig, rewards
from minihuatuo.training.checkpoints import load_checkpoint, save_checkpoint, save_dtype_of
from minihuatuo.training.distributed import Dist, all_sum, init_distributed, wrap_model
from minihuatuo.training.loop import run_updates
from minihuatuo.training.run_dir import RunDir


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


# ----------------------------------------------------------------------------- the prompt stream

def read_rl_problems(path, prompts_per_batch: int = 1, drop_last: bool = False) -> list:
    """The verifiable problems of an RL run's --data; an empty file is an error (there is nothing to
    train), and so, with drop_last, is one that cannot fill a single batch of distinct prompts — said
    here, before anything of a previous run in --out is replaced, not at the first update."""
    items = read_problems(path)
    if not items:
        raise ValueError(f"{path}: no problems; nothing to train")
    if drop_last and len(items) < prompts_per_batch:
        raise ValueError(f"{path}: {len(items)} problems cannot fill one batch of {prompts_per_batch} distinct "
                         f"prompts (drop_last); use a smaller batch_size or drop_last false")
    return items


def _epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def update_prompts(n_items: int, update: int, batch_size: int, seed: int, drop_last: bool = True) -> list[int]:
    """Item indices of update u's global batch, a pure function of (seed, u), so a resumed run sees
    the same prompts. Each data epoch is a seeded permutation of the items.

    drop_last=True (official: TRL's loader is a shuffled DataLoader with drop_last=True): an epoch
    gives ⌊n / batch⌋ batches and its last n mod batch items wait for the next permutation, so no
    batch holds a prompt twice. drop_last=False: one continuous stream of permutations, so a batch
    that straddles two epochs can hold a prompt twice (the `tiny-world` preset's order, which the
    demo's numbers were measured with)."""
    if drop_last:
        per_epoch = n_items // batch_size
        if per_epoch == 0:
            raise ValueError(f"{n_items} problems cannot fill one batch of {batch_size} prompts with drop_last; "
                             f"use a smaller batch or drop_last false (a batch then repeats prompts)")
        epoch, b = divmod(update, per_epoch)
        return _epoch_order(n_items, seed, epoch)[b * batch_size:(b + 1) * batch_size]
    out, pos = [], update * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_items)
        take = _epoch_order(n_items, seed, epoch)[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def encode_prompt(tokenizer, x: str, max_prompt_length: int) -> list[int]:
    """A single user turn through the chat template, cut to its FIRST max_prompt_length tokens (checklist 4)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": x}])[:max_prompt_length]


# ----------------------------------------------------------------------------- the rollout

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


def update_rollout(policy, tokenizer, items, u: int, cfg, d: Dist, copies: int = 1) -> tuple[Rollout, list[str]]:
    """Update u's rollout on this process, and the reference answers y* of its rows. The global batch
    is cfg.batch_size rollouts: batch_size / copies prompts of the stream, each sampled `copies` times
    in blocks (rows i and i + n share a prompt, TRL's `repeat` layout, so a group never crosses
    processes); process r takes prompts r, r + W, ... The sampling seed is a function of (seed, u, r)."""
    mine = update_prompts(len(items), u, cfg.batch_size // copies, cfg.seed, cfg.drop_last)[d.rank::d.world]
    prompts = [encode_prompt(tokenizer, items[i].x, cfg.max_prompt_length) for i in mine] * copies
    references = [items[i].y_star for i in mine] * copies
    ro = rollout(policy, tokenizer, prompts, cfg.temperature, cfg.response_length, stop_ids(tokenizer, cfg.stop_tokens),
                 cfg.early_stop, seed=cfg.seed * 1_000_003 + u * 1009 + d.rank)
    return ro, references


@torch.no_grad()
def score_rollout(cfg, ro: Rollout, references, verifier, reward_cfg: RewardConfig):
    """(s − missing_stop_penalty for a row without a stop token, s) per row (B,), s = the paper's score
    1 / 0.1 / 0 (reward.rewards); cfg.missing_stop_penalty is 0 unless set (checklist 17)."""
    scores = torch.tensor(rewards(ro.texts, references, verifier, reward_cfg), device=ro.query.device)
    penalty = torch.where(ro.has_stop, 0.0, cfg.missing_stop_penalty)
    return scores - penalty, scores


# ----------------------------------------------------------------------------- forwards over query ⊕ response

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
    of that distribution (B, R) (reference_kernels.token_logprobs_and_entropy). Both the reference and
    the current policy go through here, so KL and ratio compare the same tempered distributions
    (checklist 7)."""
    ids, mask, pos = forward_inputs(ro)
    B, R = ro.response.shape
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_at=response_positions(ro))  # (B·R, V)
    taken, entropy = token_logprobs_and_entropy(logits, ro.response.reshape(-1), temperature, with_entropy)
    return (taken.view(B, R), entropy.view(B, R)) if with_entropy else taken.view(B, R)


@torch.no_grad()
def reference_logprobs(ref, ro: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """log π_ref (B, R) of the rollout's actions, micro_batch_size rows per forward; 0 off the policy mask."""
    B = ro.response.shape[0]
    chunks = [response_logprobs(ref, select(ro, c), temperature) for c in in_chunks(B, micro_batch_size)]
    return torch.cat(chunks) * ro.policy_mask


def response_values(value_model, ro: Rollout) -> torch.Tensor:
    """V_t (B, R): the value head at position P − 1 + t, the state before a_t (TRL's layout)."""
    ids, mask, pos = forward_inputs(ro)
    B, R = ro.response.shape
    h = value_model.hidden_states(ids, attention_mask=mask, position_ids=pos)  # (B, P + R, C)
    return value_model.score(h[response_positions(ro)]).view(B, R)


# ----------------------------------------------------------------------------- rows of a rollout

def select(ro: Rollout, idx) -> Rollout:
    return Rollout(*(v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
                     for v in (getattr(ro, f.name) for f in dataclasses.fields(Rollout))))


def in_chunks(n: int, size: int):
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def by_length(ro: Rollout, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """idx cut into chunks of `size` rows of similar response length (shortest first), so that each
    chunk can be cut to its own longest response (`trim`)."""
    return list(idx[torch.argsort(ro.last[idx], stable=True)].split(size))


def trim(ro: Rollout) -> Rollout:
    """The rollout without the response slots no row uses (beyond every row's L + 1, the value
    mask's end): everything there is masked, so the numbers are unchanged and a forward over replies
    of 150-250 tokens no longer pays for the 384 slots of the longest one in the batch."""
    R = min(ro.response.shape[1], int(ro.last.max()) + 2)
    return Rollout(*(v[:, :R] if isinstance(v, torch.Tensor) and v.dim() == 2 and name not in ("query", "query_mask")
                     else v for name, v in ((f.name, getattr(ro, f.name)) for f in dataclasses.fields(Rollout))))


# ----------------------------------------------------------------------------- means and diagnostics

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def rollout_diagnostics(ro: Rollout, raw_scores, kl, k3, reward_cfg: RewardConfig, d: Dist, **per_row) -> dict:
    """Means over all processes' rollouts of what every variant logs about its samples (notes/ppo.md
    § Diagnostics): score, verified, format_fail, kl_k1 and kl_k3 (per-sequence sums of the (B, R)
    `kl` and `k3`, 0 off the policy mask), response_len, stopped; and of each extra (B,) `per_row`."""
    names = ["score", "verified", "format_fail", "kl_k1", "kl_k3", "response_len", "stopped", *per_row]
    local = torch.tensor([raw_scores.sum(), (raw_scores == reward_cfg.correct).sum(),
                          (raw_scores == reward_cfg.no_format).sum(), kl.sum(), k3.sum(), (ro.last + 1).sum(),
                          ro.has_stop.sum(), *(v.sum() for v in per_row.values()), len(ro.texts)], dtype=torch.float64)
    g = all_sum(local, d)
    n = g[-1].item()
    return {name: g[i].item() / n for i, name in enumerate(names)}


def update_postfix(m: dict) -> dict:
    """The progress bar of an RL run: score, KL (k1, per sequence) and response length of each update."""
    return {"score": f"{m['score']:.3f}", "kl": f"{m['kl_k1']:.3f}", "len": f"{m['response_len']:.0f}"}


# ----------------------------------------------------------------------------- the run

def policy_and_reference(policy_dir, device):
    """The policy to train and the frozen reference π_ref, from the same weights (checklist 1)."""
    policy = load_model(policy_dir, dtype=torch.float32, device=device)
    ref = load_model(policy_dir, dtype=torch.float32, device=device).eval().requires_grad_(False)
    return policy, ref


def adamw(model, cfg) -> torch.optim.AdamW:
    """One AdamW over all of `model`'s parameters: β 0.9 / 0.999, eps cfg.adam_eps, no weight decay
    (checklist 31); the learning rate is set before every update from the schedule."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)


def train_policy(name: str, update, cfg, policy_dir, data_path, out_dir, verifier, resume: bool,
                 reward_cfg: RewardConfig, max_updates: int, overwrite: bool = False,
                 save_dtype="float32") -> list[dict]:
    """The run of a variant without a critic (RLOO, GRPO): policy and reference, DDP, AdamW, then
    `update(u, num_updates, cfg, policy, ref, tokenizer, items, verifier, optimizer, d, reward_cfg)`
    for each update, with resume, metrics.jsonl and checkpoints (training/loop.py). checkpoint-U/ and
    final/ hold the policy (HF layout, weights in `save_dtype`) + trainer/ (optimizer,
    trainer_state.json; save_checkpoint: no critic). A directory that already holds a run needs
    `resume` or `overwrite` (training/run_dir.py). Returns the metrics of each update run."""
    d = init_distributed()
    save_dtype = save_dtype_of(save_dtype)
    run = RunDir(name, out_dir, "update", d, resume=resume, overwrite=overwrite)
    tokenizer = Tokenizer.from_dir(policy_dir)
    copies = getattr(cfg, "rloo_k", None) or getattr(cfg, "group_size", 1)  # samples per prompt
    items = read_rl_problems(data_path, cfg.batch_size // copies, cfg.drop_last)
    policy, ref = policy_and_reference(policy_dir, d.device)
    policy = wrap_model(policy, "ddp", d)
    optimizer = adamw(policy, cfg)
    num_updates = math.ceil(cfg.total_episodes / cfg.batch_size)
    return run_updates(
        run, num_updates, max_updates=max_updates, save_every=cfg.save_every,
        update=lambda u: update(u, num_updates, cfg, policy, ref, tokenizer, items, verifier, optimizer, d, reward_cfg),
        save=lambda path, state: save_checkpoint(path, policy, optimizer, state, cfg, policy_dir, d, save_dtype),
        load=lambda path: load_checkpoint(path, policy, optimizer), postfix=update_postfix)
