"""Decontamination speed: `find_contaminated` on synthetic exam questions (200K training x 10K
evaluation items of ~600 characters by default), against the plain substring-search reference
`naive_contaminated` measured in the same run on a subsample and scaled to the full size.

    python -m minihuatuo.bench decontam [--train 200000] [--eval 10000] [--json]

The items are MCQItems (a ~480-character stem plus five options) drawn from a vocabulary of 30K
random words, with exam boilerplate (shorter than the window) shared by many items. Planted:
1% of training items carry a copied span of 64..200 characters of an evaluation item (must be found,
each with the right evaluation item), 1% a copied span of 63 characters (must not be found). Both
spans are fenced by '|', a character the texts never contain, so that a copy cannot be lengthened
by chance by the characters around it.

The naive reference is O(train x eval) with no early exit on a clean item, so its time on a
subsample of n_t x n_e items scales by (200K / n_t) x (10K / n_e); the ratio is that estimate over
the measured time of the fast path on the full set.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from minihuatuo.services.formats import MCQItem
from minihuatuo.stages.decontam import DecontamConfig, EvalIndex, find_contaminated, naive_contaminated

# Shorter than 40 characters, so that with a uniform vocabulary two stems ending alike still need
# ~4 more equal words before they share 64 characters: chance overlaps are then ~1e-6 in a run.
BOILERPLATE = ["Which is the most likely diagnosis?", "What is the best next step?",
               "Laboratory studies show:", "Examination is unremarkable."]


def synthetic(n: int, rng: np.random.Generator, vocab: list[str], prefix: str) -> list[MCQItem]:
    words = rng.integers(0, len(vocab), size=(n, 70))  # 70 words of ~6.5 chars: a ~480-char stem
    opts = rng.integers(0, len(vocab), size=(n, 5, 3))
    tail = rng.integers(0, len(BOILERPLATE), n)
    items = []
    for i in range(n):
        stem = " ".join(vocab[k] for k in words[i]) + ". " + BOILERPLATE[tail[i]]
        options = {L: " ".join(vocab[k] for k in opts[i, j]) for j, L in enumerate("ABCDE")}
        items.append(MCQItem(f"{prefix}{i}", stem, options, "A", "synthetic"))
    return items


def plant(train: list[MCQItem], evals: list[MCQItem], rng: np.random.Generator, frac: float):
    """Copy spans of evaluation stems into training stems; returns {train index: eval index}."""
    n = int(len(train) * frac)
    chosen = rng.choice(len(train), size=2 * n, replace=False)
    planted, near = {}, set()
    for k, t in enumerate(chosen):
        e = int(rng.integers(len(evals)))
        length = int(rng.integers(64, 201)) if k < n else 63
        src = evals[e].question.lower()
        s = int(rng.integers(0, len(src) - length))
        item = train[t]
        item.question = item.question[:200] + " |" + src[s:s + length] + "| " + item.question[200:]
        if k < n:
            planted[int(t)] = e
        else:
            near.add(int(t))
    return planted, near


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minihuatuo.bench decontam", description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=200_000)
    ap.add_argument("--eval", type=int, default=10_000)
    ap.add_argument("--naive-train", type=int, default=20, help="training items in the naive subsample")
    ap.add_argument("--naive-eval", type=int, default=1000, help="evaluation items in the naive subsample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, size=int(rng.integers(2, 11)))) for _ in range(30_000)})
    t0 = time.perf_counter()
    evals = synthetic(args.eval, rng, vocab, "e")
    train = synthetic(args.train, rng, vocab, "t")
    planted, near = plant(train, evals, rng, 0.01)
    t_gen = time.perf_counter() - t0
    chars = sum(len(it.question) + sum(map(len, it.options.values())) for it in train)
    eval_chars = sum(len(it.question) + sum(map(len, it.options.values())) for it in evals)

    t0 = time.perf_counter()
    index = EvalIndex(evals)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = find_contaminated(train, index, DecontamConfig())
    t_scan = time.perf_counter() - t0
    flagged = {i: c.eval_index for i, c in enumerate(found) if c is not None}
    exact = flagged == planted and not (near & set(flagged))

    sub_t = train[:args.naive_train]
    sub_e = evals[:args.naive_eval]
    t0 = time.perf_counter()
    naive = naive_contaminated(sub_t, sub_e)
    t_naive = time.perf_counter() - t0
    fast_sub = find_contaminated(sub_t, sub_e)
    agree = [c.eval_index if c else None for c in fast_sub] == naive
    naive_full = t_naive * (len(train) / len(sub_t)) * (len(evals) / len(sub_e))
    fast = t_index + t_scan

    report = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "numpy": np.__version__,
                          "python": platform.python_version()},
              "train_items": len(train), "eval_items": len(evals), "train_chars": chars, "eval_chars": eval_chars,
              "generate_s": round(t_gen, 1), "index_s": round(t_index, 2), "scan_s": round(t_scan, 2),
              "total_s": round(fast, 2), "train_chars_per_s": round(chars / t_scan),
              "planted": len(planted), "found": len(flagged), "exact": exact,
              "naive_subsample": [len(sub_t), len(sub_e)], "naive_subsample_s": round(t_naive, 2),
              "naive_agrees": agree, "naive_full_estimate_s": round(naive_full), "speedup": round(naive_full / fast)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print(f"{m['cpu']}, {m['cores']} cores, numpy {m['numpy']}, Python {m['python']}")
        print(f"{len(train)} training x {len(evals)} evaluation items ({chars / 1e6:.0f}M x {eval_chars / 1e6:.1f}M "
              f"characters; generated in {t_gen:.0f} s)")
        print(f"  index the evaluation items: {t_index:6.2f} s")
        print(f"  scan the training items:    {t_scan:6.2f} s  ({chars / t_scan / 1e6:.1f}M characters/s)")
        print(f"  total:                      {fast:6.2f} s")
        print(f"  planted 64..200-char copies: {len(planted)}, flagged: {len(flagged)}, 63-char copies flagged: "
              f"{len(near & set(flagged))} -> {'exact' if exact else 'MISMATCH'}")
        print(f"  naive substring search on {len(sub_t)} x {len(sub_e)} items: {t_naive:.2f} s "
              f"(same answers: {'yes' if agree else 'NO'}); scaled to the full size: {naive_full / 3600:.1f} h "
              f"-> speedup x{naive_full / fast:,.0f}")
    return 0 if exact and agree else 1


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
