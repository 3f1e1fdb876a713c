"""Decontamination against evaluation sets: the Med-PaLM 2 rule (paper §4.1: "filtering overlaps of
64 consecutive characters").

A training item is contaminated when one of its texts shares a substring of at least `window` = 64
characters with a text of some evaluation item. Texts are compared after `normalize` (Unicode NFKC,
case folding, every run of whitespace to one space), so that a copy that only differs in line breaks,
double spaces or capitalisation is still caught; punctuation and digits are kept, because in exam
questions they carry meaning (lab values, doses) and dropping them would only add spurious matches.
Each field is compared on its own (`item_texts`): a window never spans two fields, so the result does
not depend on how a file happens to join a question and its options.

How it scales to 200K training x 10K evaluation items (~120M x 6M characters) on a CPU: every
window of every text is hashed with a polynomial rolling hash computed by numpy in a few array
passes; the evaluation hashes are sorted and summarised in a bit filter; each training window costs
one filter probe, and the few that pass are looked up by binary search and then *verified by string
comparison*. The hash is a filter only: a collision costs a comparison, never a wrong answer.
`naive_contaminated` is the obviously correct reference (substring search) the tests compare against.
"""
from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np

from minihuatuo.services.config import require_nonnegative, require_positive
from minihuatuo.services.formats import MCQItem, SFTExample, VerifiableProblem

SEP = "\x00"  # joins the texts of a batch; `normalize` guarantees it occurs nowhere else
_WS = re.compile(r"[\s\x00]+")
_BASE = 0x9E3779B97F4A7C15  # odd, hence invertible modulo 2**64 (see `_window_hashes`)


@dataclass
class DecontamConfig:
    window: int = 64  # Med-PaLM 2's 64 consecutive characters (paper §4.1)
    # 0 = the literal rule. N > 0: ignore a 64-character window found in N or more *different*
    # evaluation items: exam boilerplate ("...is at increased risk of developing which of the
    # following?") then no longer drops every training question that uses the same phrasing.
    boilerplate_items: int = 0
    batch_chars: int = 4_000_000  # training characters hashed per numpy pass (~80 bytes of arrays per char)

    def __post_init__(self):  # the rules of the values (services/config.py)
        require_positive(self, "window", "batch_chars")
        require_nonnegative(self, "boilerplate_items")


@dataclass
class Contamination:
    train_index: int
    eval_index: int
    shared: str  # the whole common run (>= window characters, normalised text) around the first match

    def to_dict(self, eval_items=None) -> dict:
        """A line for the dropped-items file."""
        d = {"reason": "contaminated", "eval_index": self.eval_index, "shared": self.shared}
        if eval_items is not None and isinstance(eval_items[self.eval_index], MCQItem):
            d["eval_id"], d["eval_source"] = eval_items[self.eval_index].id, eval_items[self.eval_index].source
        return d


def normalize(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def item_texts(item) -> list[str]:
    """The fields compared: an MCQ's question, context and option texts; a verifiable problem's
    question and answer; an SFT example's question (its CoT and response are model-written);
    a plain string or list of strings as given."""
    if isinstance(item, str):
        return [item]
    if isinstance(item, MCQItem):
        return [item.question, item.context, *item.options.values()]
    if isinstance(item, VerifiableProblem):
        return [item.x, item.y_star]
    if isinstance(item, SFTExample):
        return [item.question]
    if isinstance(item, (list, tuple)) and all(isinstance(s, str) for s in item):
        return list(item)
    raise TypeError(f"cannot take texts from {type(item).__name__}")


def _join(items) -> tuple[str, np.ndarray]:
    """Normalised texts of `items`, each field followed by SEP; and where each item starts (len n+1)."""
    parts, starts, n = [], [0], 0
    for it in items:
        for t in item_texts(it):
            t = normalize(t)
            parts.append(t + SEP)
            n += len(t) + 1
        starts.append(n)
    return "".join(parts), np.asarray(starts, dtype=np.int64)


def _window_hashes(text: str, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start) of every window of `w` characters of `text` that contains no SEP.

    With code points c and P[k] = sum_{m<k} c[m] B^m (mod 2^64, a cumulative sum), a window's
    hash is H(i) = (P[i+w] - P[i]) * B^-i = sum_{m<w} c[i+m] B^m: the inverse of B exists because B
    is odd, so H depends on the window's characters only, not on where the window sits. Equal
    windows therefore always have equal hashes (no false negatives); unequal ones rarely do, and
    those are weeded out by the string comparison in `find_contaminated`.
    uint64 arithmetic in numpy wraps around, which is exactly the mod 2^64."""
    c = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64)  # (N,)
    n = len(c) - w + 1
    if n <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    powers = np.full(len(c), _BASE, dtype=np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers, dtype=np.uint64)  # B^m
    inverse = np.full(n, pow(_BASE, -1, 1 << 64), dtype=np.uint64)
    inverse[0] = 1
    inverse = np.cumprod(inverse, dtype=np.uint64)  # B^-i
    P = np.zeros(len(c) + 1, dtype=np.uint64)
    np.cumsum(c * powers, out=P[1:])
    h = (P[w:] - P[:-w]) * inverse  # (n,)
    seps = np.concatenate([[0], np.cumsum(c == 0)])
    ok = seps[w:] == seps[:-w]  # no SEP inside the window
    return h[ok], np.flatnonzero(ok)


class EvalIndex:
    """Every window of every evaluation text: sorted hashes, their positions, and a bit filter."""

    def __init__(self, eval_items, cfg: DecontamConfig = DecontamConfig()):
        self.cfg, self.window = cfg, cfg.window
        self.text, self.starts = _join(eval_items)
        h, pos = _window_hashes(self.text, self.window)
        order = np.argsort(h, kind="stable")
        self.hashes, self.positions = h[order], pos[order]  # (M,), (M,)
        self.ignored = 0
        if cfg.boilerplate_items > 0:
            self._drop_boilerplate(cfg.boilerplate_items)
        # Bit filter: ~64 bits per window, indexed by the top `bits` bits of the hash (modulo 2^64
        # carries mix every character into the high bits; the low bits see few). A probe that finds
        # a 0 proves the hash is absent; a 1 is a false alarm about 1 time in 64.
        self.bits = int(min(30, max(16, np.ceil(np.log2(max(1, len(self.hashes)) * 64)))))  # <= 128 MB
        self.filter = np.zeros(1 << (self.bits - 3), dtype=np.uint8)
        b = self._buckets(self.hashes)
        np.bitwise_or.at(self.filter, b >> 3, (np.uint8(1) << (b & 7).astype(np.uint8)))

    def _buckets(self, h: np.ndarray) -> np.ndarray:
        return (h >> np.uint64(64 - self.bits)).astype(np.int64)

    def _drop_boilerplate(self, min_items: int):
        items = np.searchsorted(self.starts, self.positions, side="right") - 1
        pairs = np.unique(np.stack([self.hashes, items.astype(np.uint64)]), axis=1)  # (2, distinct)
        hs, counts = np.unique(pairs[0], return_counts=True)
        common = hs[counts >= min_items]
        keep = ~np.isin(self.hashes, common)
        self.ignored = int((~keep).sum())
        self.hashes, self.positions = self.hashes[keep], self.positions[keep]

    def item_of(self, pos: int) -> int:
        return int(np.searchsorted(self.starts, pos, side="right")) - 1

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """For each query hash: the first index into `hashes` holding it, or -1."""
        b = self._buckets(h)
        maybe = ((self.filter[b >> 3] >> (b & 7).astype(np.uint8)) & 1).astype(bool)
        idx = np.full(len(h), -1, dtype=np.int64)
        if len(self.hashes):
            cand = np.flatnonzero(maybe)
            k = np.searchsorted(self.hashes, h[cand])
            k[k == len(self.hashes)] = 0
            found = self.hashes[k] == h[cand]
            idx[cand[found]] = k[found]
        return idx


def _common_run(a: str, p: int, b: str, q: int, w: int) -> str:
    """Extend the equal windows a[p:p+w] == b[q:q+w] to the whole equal run (within one field)."""
    i = 0
    while p - i > 0 and q - i > 0 and a[p - i - 1] == b[q - i - 1] != SEP:
        i += 1
    j = w
    while p + j < len(a) and q + j < len(b) and a[p + j] == b[q + j] != SEP:
        j += 1
    return a[p - i:p + j]


def _check_batch(items, offset: int, index: EvalIndex, out: list):
    w = index.window
    text, starts = _join(items)
    h, pos = _window_hashes(text, w)
    k = index.lookup(h)
    hit = np.flatnonzero(k >= 0)  # windows whose hash some evaluation window has, in text order
    owner = np.searchsorted(starts, pos[hit], side="right") - 1
    bounds = np.searchsorted(owner, np.arange(len(items) + 1))  # hits of item i: hit[bounds[i]:bounds[i+1]]
    for i in np.flatnonzero(bounds[1:] > bounds[:-1]):
        found = None
        for j in hit[bounds[i]:bounds[i + 1]]:
            p = int(pos[j])
            window = text[p:p + w]
            e = int(k[j])
            while e < len(index.hashes) and index.hashes[e] == h[j]:  # every eval window with this hash
                q = int(index.positions[e])
                if index.text[q:q + w] == window:  # the verification: hashes only propose
                    found = Contamination(offset + int(i), index.item_of(q), _common_run(text, p, index.text, q, w))
                    break
                e += 1
            if found:
                break
        out[offset + int(i)] = found


def find_contaminated(train_items, eval_items_or_index, cfg: DecontamConfig = DecontamConfig(),
                      progress: bool = False) -> list[Contamination | None]:
    """For each training item, its first verified overlap with an evaluation item, or None.

    Correctness: item i is reported if and only if one of its normalised fields shares a substring
    of >= window characters with a normalised field of some evaluation item (minus windows dropped
    as boilerplate when cfg.boilerplate_items > 0).
      - "only if": a report is made only after `==` on two window-long slices, each inside one
        field (windows containing SEP are never hashed).
      - "if": let t[p:p+w] == e[q:q+w]. Both windows are hashed, with equal hashes (`_window_hashes`);
        the bit filter has no false negatives, the binary search finds the hash, and every evaluation
        position with that hash is compared until one matches, q among them; item i's hits are tried
        in order until one verifies, and the hit at p does. A hash collision only costs a comparison.
    """
    index = eval_items_or_index if isinstance(eval_items_or_index, EvalIndex) else EvalIndex(eval_items_or_index, cfg)
    train_items = list(train_items)
    out: list[Contamination | None] = [None] * len(train_items)
    batches, batch, chars = [], [], 0
    for i, it in enumerate(train_items):
        batch.append(i)
        chars += sum(len(t) + 1 for t in item_texts(it))
        if chars >= cfg.batch_chars:
            batches.append(batch)
            batch, chars = [], 0
    if batch:
        batches.append(batch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(train_items), desc="decontaminate", unit="item", file=sys.stderr)
    for b in batches:
        _check_batch([train_items[i] for i in b], b[0], index, out)
        if bar:
            bar.update(len(b))
    if bar:
        bar.close()
    return out


def decontaminate(train_items, eval_items, cfg: DecontamConfig = DecontamConfig(), progress: bool = False):
    """(kept items, [(dropped item, Contamination)]) in input order."""
    train_items = list(train_items)
    found = find_contaminated(train_items, eval_items, cfg, progress)
    kept = [it for it, c in zip(train_items, found) if c is None]
    return kept, [(it, c) for it, c in zip(train_items, found) if c is not None]


def naive_contaminated(train_items, eval_items, window: int = 64) -> list[int | None]:
    """Reference: for each training item, the first evaluation item (index) sharing a window, by
    plain substring search of every training window in every evaluation field. O(train x eval)."""
    evals = [[normalize(t) for t in item_texts(e)] for e in eval_items]
    out = []
    for it in train_items:
        hit = None
        for t in (normalize(t) for t in item_texts(it)):
            for p in range(len(t) - window + 1):
                win = t[p:p + window]
                hit = next((j for j, fields in enumerate(evals) if any(win in f for f in fields)), None)
                if hit is not None:
                    break
            if hit is not None:
                break
        out.append(hit)
    return out
