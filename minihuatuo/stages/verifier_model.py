"""The verifier's model: a causal LM turned into the released verifier's 2-label sequence classifier
(the HF *ForSequenceClassification layout), its left-padded inputs, its weighted loss and its held-out
P(True). Training itself is stages/verifier_train.py."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.model import Transformer
from minihuatuo.training.distributed import Dist, all_sum

LABELS = {"0": "False", "1": "True"}  # the released verifier's id2label: label 1 = correct (official RL code)

class SequenceClassifier(Transformer):
    """The engine's Transformer with a 2-label `score` head and no LM head, whose forward is
    `classify` (logits at the last real token): DDP and FSDP2 hook forward, so training calls it.
    Parameter names are the Transformer's, so checkpoints are the HF *ForSequenceClassification layout."""

    def forward(self, input_ids, attention_mask=None):
        return self.classify(input_ids, attention_mask)  # (B, 2)


def classifier_pad_id(tokenizer, eos_text: str, base_pad: int | None) -> int:
    """config.json's pad_token_id for the classifier. We left-pad and pool at the last real token;
    transformers pools at the last token that is not pad_token_id (notes/verifier.md, difference 6), so
    the two agree on every input ending in the appended eos as long as pad_token_id is not the eos id.
    Prefer the tokenizer's pad, then the base's, then any other id."""
    eos_ids = tokenizer.encode(eos_text, add_special_tokens=False) if eos_text else []
    eos = eos_ids[-1] if eos_ids else None
    for cand in (tokenizer.pad_id, base_pad, tokenizer.token_to_id("<|finetune_right_pad_id|>"),
                 tokenizer.token_to_id("<|pad|>"), 0, 1):
        if cand is not None and cand != eos:
            return int(cand)
    raise AssertionError("unreachable: 0 and 1 cannot both be the eos id")


def classifier_from_causal_lm(model_dir, tokenizer, eos_text: str, seed: int, device) -> SequenceClassifier:
    """The base checkpoint's decoder with a new bias-free score head C -> 2, N(0, initializer_range)
    as transformers initialises it (seeded); a checkpoint that already has a 2-label head keeps it."""
    base = load_model(model_dir, dtype=torch.float32, device=device)
    if base.cfg.num_labels not in (0, 2):
        raise ValueError(f"{model_dir}: has a {base.cfg.num_labels}-label head; the verifier has 2 labels")
    cfg = replace(base.cfg, lm_head=False, num_labels=2, tie_word_embeddings=False,
                  pad_token_id=classifier_pad_id(tokenizer, eos_text, base.cfg.pad_token_id),
                  extra={**base.cfg.extra, "id2label": dict(LABELS),
                         "label2id": {v: int(k) for k, v in LABELS.items()}})
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("lm_head.")}
    if "score.weight" not in state:
        g = torch.Generator().manual_seed(seed)
        state["score.weight"] = (torch.randn(2, cfg.hidden_size, generator=g) * cfg.initializer_range).to(device)
    with torch.device("meta"):
        model = SequenceClassifier(cfg)
    model.load_state_dict(state, assign=True)
    return model


def collate_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding and its mask, as ClassifierVerifier.p_true builds them at inference."""
    T = max(len(x) for x in rows)
    ids = torch.tensor([[pad_id] * (T - len(x)) + x for x in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in rows], device=device)  # (B, T)
    return ids, mask


def weighted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · −log softmax(z_i)[label_i]; logits (B, 2), labels (B,), weights (B,)."""
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights).sum()


@torch.no_grad()
def eval_p_true(model, ids: list[list[int]], pad_id: int, micro_batch_size: int, d: Dist) -> list[float]:
    """P(True) of every held-out pair. Each rank scores a strided share of the same length (the last
    ones wrap around, so that every rank runs the same number of forwards: FSDP2 gathers weights in
    each), and the shares are summed over ranks."""
    was_training = model.training
    model.eval()
    n = len(ids)
    per_rank = math.ceil(n / d.world)
    mine = [d.rank + d.world * k for k in range(per_rank)]
    out = torch.zeros(n, dtype=torch.float64, device=d.device)
    for s in range(0, per_rank, micro_batch_size):
        chunk = mine[s:s + micro_batch_size]
        logits = model(*collate_left([ids[i % n] for i in chunk], pad_id, d.device))  # (B, 2)
        p = torch.softmax(logits.float(), dim=-1)[:, 1].double()
        for i, v in zip(chunk, p):
            if i < n:
                out[i] = v
    model.train(was_training)
    return all_sum(out, d).tolist()
