"""Decontamination (Med-PaLM 2 rule): planted overlaps are found exactly, 63 characters are not
enough, hash collisions never produce a report, and the fast path agrees with the naive search."""
from __future__ import annotations

import random

import pytest

from minihuatuo.services.formats import MCQItem, SFTExample, VerifiableProblem
from minihuatuo.stages import decontam as D


def words_text(rng: random.Random, n_words: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                    for _ in range(n_words))


def test_normalize():
    assert D.normalize("  The\tPatient\n\n has  FEVER\u00a0 ") == "the patient has fever"
    assert D.normalize("ﬁbrosis Straße") == "fibrosis strasse"  # NFKC ligature, case folding
    assert D.normalize("a\x00b") == "a b"  # the separator can never come from the data


def test_planted_overlaps_found_exactly_and_63_chars_are_not_enough():
    rng = random.Random(1)
    evals = [words_text(rng, 90) for _ in range(30)]
    train = [words_text(rng, 90) for _ in range(40)]
    expected = {}
    for t, length in ((3, 64), (7, 100), (11, 63), (12, 63), (20, 64), (33, 200)):
        e = rng.randrange(len(evals))
        s = rng.randrange(0, len(evals[e]) - length)
        span = evals[e][s:s + length]
        # '|' never occurs in the texts, so the common run is exactly the span
        train[t] = train[t][:150] + "|" + span + "|" + train[t][150:]
        if length >= 64:
            expected[t] = (e, span)
    found = D.find_contaminated(train, evals)
    got = {i: (c.eval_index, c.shared) for i, c in enumerate(found) if c is not None}
    assert got == expected
    assert all(c.train_index == i for i, c in enumerate(found) if c is not None)


def test_shared_text_is_reported_after_normalisation():
    ev = "A 45-year-old   man presents with FATIGUE and a haemoglobin of 6 g/dL, reticulocytes 0.4%."
    tr = "Case: a 45-year-old man presents with fatigue and a haemoglobin of 6 g/dL, reticulocytes 0.4%? Next."
    (c,) = D.find_contaminated([tr], [ev])
    assert c.shared == "a 45-year-old man presents with fatigue and a haemoglobin of 6 g/dl, reticulocytes 0.4%"


def test_windows_do_not_span_two_fields():
    a, b = "x" * 10 + " first half of a sentence that", " continues in the option text" + "y" * 10
    ev = MCQItem("e1", a, {"A": b.strip(), "B": "other"}, "A", "MedQA")
    # the training text holds a+b joined: 64+ characters that the evaluation item never has in one field
    assert D.find_contaminated([a + b], [ev]) == [None]
    assert D.find_contaminated([a + b], [a + b])[0] is not None


def test_item_fields_compared():
    q = "which of the following enzymes is deficient in classic phenylketonuria in infants"
    mcq = MCQItem("e1", "Stem. " + q, {"A": "x", "B": "y"}, "A", "MedQA")
    pub = MCQItem("e2", "Short?", {"A": "yes", "B": "no", "C": "maybe"}, "C", "PubMedQA",
                  {"context": ["an abstract sentence that is long enough to be one window on its own, surely"]})
    train = [VerifiableProblem(q, "phenylalanine hydroxylase"),
             SFTExample("Q: " + q, "cot that repeats " + q, "r"),
             SFTExample("unrelated question text", "the cot quotes " + q, "r"),  # only the Question counts
             "prefix an abstract sentence that is long enough to be one window on its own, surely suffix"]
    found = D.find_contaminated(train, [mcq, pub])
    assert [c.eval_index if c else None for c in found] == [0, 0, None, 1]
    with pytest.raises(TypeError):
        D.item_texts(42)


def test_hash_collisions_are_verified_away(monkeypatch):
    # Base 1 makes the window hash the sum of the code points: every anagram of a window collides.
    monkeypatch.setattr(D, "_BASE", 1)
    ev = "the quick brown fox jumps over the lazy dog while the cat sleeps on"  # 67 characters
    window = ev[:64]
    anagram = window[::-1]
    assert sorted(anagram) == sorted(window) and anagram not in ev
    idx = D.EvalIndex([ev])
    h, _ = D._window_hashes(D.normalize(anagram), 64)
    assert (idx.lookup(h) >= 0).all()  # the hash does collide...
    found = D.find_contaminated([anagram, "x " + window + " y"], idx)
    assert found[0] is None  # ...but the string comparison rejects it
    assert found[1] is not None and found[1].shared == ev[:65]  # the run goes on through the space


def test_agrees_with_naive_search_on_random_data():
    rng = random.Random(7)
    evals = [MCQItem(f"e{i}", words_text(rng, 40), {"A": words_text(rng, 4), "B": words_text(rng, 12)}, "A", "s")
             for i in range(25)]
    train = []
    for i in range(50):
        t = words_text(rng, 40)
        if i % 3 == 0:  # copies of 58..70 characters from a random field: about half reach 64
            src = rng.choice(D.item_texts(rng.choice(evals)))
            n = rng.randint(58, 70)
            s = rng.randrange(0, max(1, len(src) - n))
            t = t[:80] + " " + src[s:s + n] + " " + t[80:]
        train.append(t)
    fast = [c.eval_index if c else None for c in D.find_contaminated(train, evals, D.DecontamConfig(batch_chars=900))]
    assert fast == D.naive_contaminated(train, evals)
    assert 3 <= sum(x is not None for x in fast) <= 15  # the test exercises both outcomes


def test_boilerplate_option_and_decontaminate():
    bp = "this patient is at increased risk of developing which of the following conditions?"
    rng = random.Random(3)
    evals = [words_text(rng, 20) + ". " + bp for _ in range(3)] + [words_text(rng, 30)]
    copied = evals[3][10:90]
    train = ["new case. " + bp, "another " + copied + " case", words_text(rng, 30)]
    assert [c is not None for c in D.find_contaminated(train, evals)] == [True, True, False]  # the literal rule
    cfg = D.DecontamConfig(boilerplate_items=3)  # phrasing shared by 3 evaluation items is ignored
    assert [c is not None for c in D.find_contaminated(train, evals, cfg)] == [False, True, False]
    kept, dropped = D.decontaminate(train, evals, cfg)
    assert kept == [train[0], train[2]] and [it for it, _ in dropped] == [train[1]]
    mcq_evals = [MCQItem(f"id{i}", e, {"A": "a"}, "A", "MedQA") for i, e in enumerate(evals)]
    (_, c), = D.decontaminate(train, mcq_evals, cfg)[1]
    assert c.to_dict(mcq_evals) == {"reason": "contaminated", "eval_index": 3, "shared": copied.strip(),
                                    "eval_id": "id3", "eval_source": "MedQA"}


def test_short_and_empty_inputs():
    assert D.find_contaminated([], ["x" * 100]) == []
    assert D.find_contaminated(["x" * 100], []) == [None]
    assert D.find_contaminated(["short text"], ["short text"]) == [None]  # under 64 characters: never
    assert D.find_contaminated(["y" * 64], ["y" * 64])[0].shared == "y" * 64
