"""The pure decisions of verifier training (stages/verifier_train.py): how the two classes are balanced,
which pairs are held out, when to stop, and which P(True) threshold the released checkpoint carries.
Each is a function of its inputs alone (seeded where it draws), so a resume recomputes it exactly."""
from __future__ import annotations

import math

import torch

from minihuatuo.services.reward import LabeledPair, binary_metrics


def class_weights(labels: list[bool]) -> dict[bool, float]:
    """w_c = n / (2 n_c): each class carries half of the loss whatever its share (sklearn's "balanced")."""
    n, pos = len(labels), sum(labels)
    return {True: n / (2 * pos) if pos else 0.0, False: n / (2 * (n - pos)) if n - pos else 0.0}


def pair_weights(labels: list[bool], balance: str) -> list[float]:
    """The loss weight of each pair: class weights under balance="weights", 1 otherwise."""
    if balance != "weights":
        return [1.0] * len(labels)
    w = class_weights(labels)
    return [w[y] for y in labels]


def balanced_order(labels: list[bool], seed: int, epoch: int) -> list[int]:
    """balance="sampler": n draws with replacement, each class with probability 1/2 (each pair of class c
    with 1 / (2 n_c)). A pure function of (seed, epoch), like sft.epoch_order, so a resume redraws it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    w = class_weights(labels)
    probs = torch.tensor([w[y] for y in labels], dtype=torch.float64)
    return torch.multinomial(probs, len(labels), replacement=True, generator=g).tolist()


def split_pairs(pairs: list[LabeledPair], fraction: float, seed: int) -> tuple[list[LabeledPair], list[LabeledPair]]:
    """(train, held-out): a seeded `fraction` of each label held out (at least one of each when the class
    has two or more), so the held-out balanced accuracy is defined. Order within each part is the file's."""
    g = torch.Generator().manual_seed(seed)
    held = set()
    for label in (True, False):
        idx = [i for i, p in enumerate(pairs) if p.label == label]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held |= {idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()}
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def early_stopping(history: list[float], patience: int) -> tuple[int, bool]:
    """(index of the best evaluation, stop now?) for the held-out metrics so far (higher is better).
    Only a strictly better value is an improvement; stop when the last `patience` evaluations brought
    none (patience 0: never stop)."""
    best = max(range(len(history)), key=lambda i: (history[i], -i)) if history else -1
    return best, bool(patience and history and len(history) - 1 - best >= patience)


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95


def threshold_study(p_true: list[float], labels: list[bool], thresholds=THRESHOLDS) -> dict:
    """Accuracy, TPR, FPR and balanced accuracy of "True iff P(True) > t" (strictly, as the official
    code) for each t; the chosen t has the highest balanced accuracy, ties going to the t closest to
    0.5 (then the lower one)."""
    rows = []
    for t in thresholds:
        m = binary_metrics([p > t for p in p_true], labels)
        fpr = m["fp"] / (m["fp"] + m["tn"]) if m["fp"] + m["tn"] else math.nan
        rows.append({"threshold": t, "accuracy": m["accuracy"], "tpr": m["recall"], "fpr": fpr,
                     "balanced_accuracy": m["balanced_accuracy"], "tp": m["tp"], "fp": m["fp"], "tn": m["tn"],
                     "fn": m["fn"]})
    scored = [r for r in rows if not math.isnan(r["balanced_accuracy"])]
    if not scored:
        raise ValueError("threshold study: the held-out pairs need both labels")
    # rounded: the same counts reached by different sums must tie
    best = max(scored, key=lambda r: (round(r["balanced_accuracy"], 12), -abs(r["threshold"] - 0.5), -r["threshold"]))
    return {"n": len(labels), "positives": sum(labels), "rows": rows, "chosen": best["threshold"],
            "chosen_balanced_accuracy": best["balanced_accuracy"]}


def format_study(study: dict) -> str:
    head = f"{'threshold':>9}{'accuracy':>10}{'TPR':>8}{'FPR':>8}{'bal. acc':>10}"
    lines = [head, "-" * len(head)]
    for r in study["rows"]:
        mark = "  <- chosen" if r["threshold"] == study["chosen"] else ""
        lines.append(f"{r['threshold']:>9.2f}" + "".join(f"{100 * r[k]:>{w - 1}.1f}%" for k, w in
                     (("accuracy", 10), ("tpr", 8), ("fpr", 8), ("balanced_accuracy", 10))) + mark)
    return "\n".join(lines)
