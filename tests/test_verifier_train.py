"""`minihuatuo verifier train` (issue 20, points 1 and 3): the classifier verifier's training loop,
its class balancing, early stopping, resume, the Hugging Face layout it saves, the threshold study,
and the verifier commands using what it saved."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minihuatuo.services.reward import LabeledPair, write_labeled
from minihuatuo.services.verifier import ClassifierVerifier
from minihuatuo.stages import verifier_model as vm
from minihuatuo.stages import verifier_selection as vs
from minihuatuo.stages import verifier_train as vt
from minihuatuo.stages.verifier_train import VerifierTrainConfig, train

WORLD_BASE = Path(__file__).resolve().parents[1] / "data" / "world" / "base"

# A toy labelling: the reference's keyword is in the response (True) or another one is (False). (A
# random tiny model does not learn this comparison from 48 pairs in a few steps; the learning test uses
# a labelling separable from the response's word alone, below.)
WORDS = ["pneumonia", "amoxicillin", "troponin", "pregnancy", "radiograph", "consolidation"]


def toy_pairs(n: int, positive_share: float = 0.5) -> list[LabeledPair]:
    out = []
    for i in range(n):
        ref = WORDS[i % len(WORDS)]
        label = (3 * i) % 10 < 10 * positive_share  # exactly the share in every 10 (and 4 of the first 8)
        said = ref if label else WORDS[(i + 1 + i // len(WORDS)) % len(WORDS)]
        out.append(LabeledPair(f"The answer is {said}.", ref, label))
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minihuatuo", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama-shaped causal LM with the plain test tokenizer (pad <|pad|>, eos <|end|>)."""
    from conftest import write_plain_tokenizer

    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    root = tmp_path_factory.mktemp("vt")
    tok = write_plain_tokenizer(root / "tok")
    save_model(build_model(preset("tiny", vocab_size=320), seed=0), root / "base", copy_files_from=tok)
    write_labeled(root / "toy.jsonl", toy_pairs(48))
    return root


TINY = VerifierTrainConfig(epochs=1, lr=3e-3, global_batch_size=8, micro_batch_size=4, max_length=256,
                           eval_fraction=0.25, eval_every=2, patience=0, warmup_ratio=0.0, seed=0)


@pytest.fixture(scope="module")
def trained(tiny):
    """One short run on the toy pairs (the saved-layout, transformers and CLI tests read it)."""
    train(TINY, tiny / "base", tiny / "toy.jsonl", tiny / "run")
    return tiny / "run"


# ----------------------------------------------------------------------------- pure pieces

def test_early_stopping_stops_at_the_right_evaluation():
    seq = [0.5, 0.6, 0.6, 0.55, 0.7, 0.69, 0.7, 0.68]  # equal is no improvement
    decisions = [vs.early_stopping(seq[:k], 3) for k in range(1, len(seq) + 1)]
    assert [s for _, s in decisions] == [False] * 7 + [True]  # 3 evaluations after the best (index 4)
    assert decisions[-1][0] == 4 and decisions[3] == (1, False)
    assert vs.early_stopping(seq, 0) == (4, False)  # patience 0: never stops
    assert vs.early_stopping([], 2) == (-1, False)


def test_threshold_study_on_hand_made_scores():
    p = [0.9, 0.8, 0.45, 0.3, 0.6, 0.2, 0.1, 0.05]
    y = [True] * 4 + [False] * 4
    study = vs.threshold_study(p, y)
    rows = {r["threshold"]: r for r in study["rows"]}
    assert list(rows) == [round(0.05 * k, 2) for k in range(1, 20)]
    # t = 0.5: True for 0.9, 0.8 (right) and 0.6 (wrong): TP 2, FN 2, FP 1, TN 3
    assert (rows[0.5]["tp"], rows[0.5]["fp"], rows[0.5]["tn"], rows[0.5]["fn"]) == (2, 1, 3, 2)
    assert rows[0.5]["accuracy"] == 5 / 8 and rows[0.5]["tpr"] == 0.5 and rows[0.5]["fpr"] == 0.25
    assert rows[0.5]["balanced_accuracy"] == 0.625
    # strictly greater, as the official code: P = 0.3 is not above t = 0.3, it is above 0.25
    assert rows[0.3]["tp"] == 3 and rows[0.25]["tp"] == 4
    assert rows[0.25]["balanced_accuracy"] == rows[0.2]["balanced_accuracy"] == 0.875
    assert rows[0.15]["fpr"] == 0.5 and rows[0.05]["fpr"] == 0.75 and rows[0.95]["tpr"] == 0.0
    assert study["chosen"] == 0.25  # 0.2 and 0.25 tie at 87.5%: the one closer to 0.5
    assert vs.threshold_study([0.6, 0.4], [True, False])["chosen"] == 0.5  # 0.40 .. 0.55 all perfect
    assert "<- chosen" in vs.format_study(study).splitlines()[2 + 4]  # the row of 0.25
    with pytest.raises(ValueError, match="both labels"):
        vs.threshold_study([0.3], [True])


def test_class_balancing_on_an_imbalanced_file(tmp_path, monkeypatch):
    pairs = toy_pairs(60, positive_share=0.8)
    write_labeled(tmp_path / "imb.jsonl", pairs)
    cfg = replace(TINY, eval_fraction=0.2)
    train_pairs, held = vt.read_split(cfg, tmp_path / "imb.jsonl")
    labels = [p.label for p in train_pairs]
    n_true = sum(labels)
    assert n_true > 2 * (len(labels) - n_true)  # imbalanced, and the split kept both labels on both sides
    assert sum(p.label for p in held) / len(held) == pytest.approx(n_true / len(labels), abs=0.1)
    w = vs.pair_weights(labels, "weights")
    # each class carries half of the total weight: w_c = n / (2 n_c)
    assert sum(x for x, y in zip(w, labels) if y) == pytest.approx(len(labels) / 2)
    assert sum(x for x, y in zip(w, labels) if not y) == pytest.approx(len(labels) / 2)
    assert vs.pair_weights(labels, "sampler") == [1.0] * len(labels)
    draws = [i for e in range(40) for i in vs.balanced_order(labels, 0, e)]
    assert sum(labels[i] for i in draws) / len(draws) == pytest.approx(0.5, abs=0.03)
    assert vs.balanced_order(labels, 0, 3) == vs.balanced_order(labels, 0, 3)  # a pure function (resume)
    # the loop hands those weights to the loss: every weighted sum it computes, by class
    seen = {True: 0.0, False: 0.0}
    real = vm.weighted_ce_sum

    def spy(logits, y, weights):
        for label, wt in zip(y.tolist(), weights.tolist()):
            seen[bool(label)] += wt
        return real(logits, y, weights)

    monkeypatch.setattr(vt, "weighted_ce_sum", spy)
    train(replace(cfg, epochs=1, eval_every=0), _base(tmp_path), tmp_path / "imb.jsonl", tmp_path / "run")
    assert seen[True] == pytest.approx(len(labels) / 2) and seen[False] == pytest.approx(len(labels) / 2)


def _base(tmp_path) -> Path:
    from conftest import write_plain_tokenizer

    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    tok = write_plain_tokenizer(tmp_path / "tok")
    return save_model(build_model(preset("tiny", vocab_size=320), seed=0), tmp_path / "base", copy_files_from=tok)


def test_classifier_pad_id_is_never_the_appended_eos():
    class Tok:
        def __init__(self, pad):
            self.pad_id = pad

        def encode(self, text, add_special_tokens=False):
            return [7]

        def token_to_id(self, token):
            return None

    assert vm.classifier_pad_id(Tok(0), "<eos>", None) == 0
    assert vm.classifier_pad_id(Tok(7), "<eos>", None) == 0  # pad = eos (Llama-3 style): another id
    assert vm.classifier_pad_id(Tok(7), "<eos>", 5) == 5


# ----------------------------------------------------------------------------- the loop

def test_early_stopping_in_the_loop_keeps_the_best_weights(tiny, monkeypatch):
    """A scripted held-out sequence: balanced accuracy 0.5, 0.75, 0.625, 0.75, 0.625 with patience 3
    stops at the 5th evaluation (step 10) and final/ holds the weights of the 2nd (step 4)."""
    script = iter([0.5, 0.75, 0.625, 0.75, 0.625, 0.5, 0.5])
    snapshots = {}

    def scripted(model, ids, pad_id, micro_batch_size, d):
        labels = held_labels  # 4 true, 4 false: balanced accuracy in steps of 1/8
        target = next(script, 0.5)
        right = round(target * 8)  # right answers, split over the two classes
        flags = [True] * right + [False] * (8 - right)
        order = [i for i, y in enumerate(labels) if y] + [i for i, y in enumerate(labels) if not y]
        order = [order[k] for k in (0, 4, 1, 5, 2, 6, 3, 7)]  # alternate classes
        p = [0.0] * len(labels)
        for k, i in enumerate(order):
            p[i] = (0.9 if labels[i] else 0.1) if flags[k] else (0.1 if labels[i] else 0.9)
        snapshots[len(snapshots)] = {k: v.clone() for k, v in model.state_dict().items()}
        return p

    held = toy_pairs(8, 0.5)
    held_labels = [p.label for p in held]
    assert sum(held_labels) == 4
    write_labeled(tiny / "held8.jsonl", held)
    monkeypatch.setattr(vt, "eval_p_true", scripted)
    cfg = replace(TINY, epochs=3, patience=3)
    out = train(cfg, tiny / "base", tiny / "toy.jsonl", tiny / "early", eval_path=tiny / "held8.jsonl")
    assert out["evals"] == [0.5, 0.75, 0.625, 0.75, 0.625] and out["stopped_early"]
    assert out["eval_steps"] == [2, 4, 6, 8, 10] and out["steps"] == 10 and out["best_step"] == 4
    final = load_file(tiny / "early" / "final" / "model.safetensors")
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)  # the weights evaluated at step 4
    state = json.loads((tiny / "early" / "final" / "trainer" / "trainer_state.json").read_text())
    assert state["done"] and state["step"] == 10
    # resuming a finished (early-stopped) run has nothing to do
    assert train(cfg, tiny / "base", tiny / "toy.jsonl", tiny / "early", eval_path=tiny / "held8.jsonl",
                 resume=True) == {}


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny, monkeypatch):
    cfg = replace(TINY, epochs=2, save_every=2, eval_every=3, patience=0)  # 10 steps; best kept across the crash
    straight = train(cfg, tiny / "base", tiny / "toy.jsonl", tiny / "straight")
    real = vt.save_checkpoint

    def save_then_crash(path, *a, **k):
        real(path, *a, **k)
        if Path(path).name == "checkpoint-4":
            raise KeyboardInterrupt("simulated crash after checkpoint-4")

    monkeypatch.setattr(vt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny / "base", tiny / "toy.jsonl", tiny / "crashed")
    monkeypatch.undo()
    assert (tiny / "crashed" / "checkpoint-4" / "trainer" / vt.BEST).exists()  # the step-3 best, saved
    resumed = train(cfg, tiny / "base", tiny / "toy.jsonl", tiny / "crashed", resume=True)
    assert resumed["evals"] == straight["evals"] and resumed["best_step"] == straight["best_step"]
    a, b = (load_file(tiny / d / "final" / "model.safetensors") for d in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [[json.loads(x) for x in (tiny / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("straight", "crashed")]
    assert [r["loss"] for r in lines[0] if "loss" in r] == [r["loss"] for r in lines[1] if "loss" in r]
    assert (json.loads((tiny / "straight" / "final" / "config.json").read_text())[vt.THRESHOLD_KEY] ==
            json.loads((tiny / "crashed" / "final" / "config.json").read_text())[vt.THRESHOLD_KEY])


def test_learns_a_separable_toy_labelling_from_a_random_tiny_model(tiny, tmp_path):
    """The loop learns from scratch: a random tiny model, pairs labelled by which word the response names
    (True for the first three words, whatever the reference), every (word, reference) combination three
    times. Held-out balanced accuracy reaches 1.0 (measured: from the 6th of 20 epochs, seed 0), and the
    saved verifier then judges all 36 combinations right. (The 48 toy pairs of `trained` are too few for
    a random model: that run only feeds the layout, parity and CLI tests.)"""
    def separable(copies):
        return [LabeledPair(f"The answer is {WORDS[a]}.", WORDS[b], a < 3)
                for _ in range(copies) for a in range(6) for b in range(6)]

    write_labeled(tmp_path / "sep.jsonl", separable(3))
    cfg = replace(TINY, epochs=20, eval_every=0, eval_fraction=0.25)
    out = train(cfg, tiny / "base", tmp_path / "sep.jsonl", tmp_path / "run")
    assert out["evals"][0] < 1.0 and out["held_out_balanced_accuracy"] == 1.0, out["evals"]
    v = ClassifierVerifier.from_dir(tmp_path / "run")
    pairs = separable(1)
    assert v.verify_batch([(p.response, p.reference) for p in pairs]) == [p.label for p in pairs]


def test_learns_world_pairs_from_the_world_base_model(tmp_path):
    """The shipped world base model, on world pairs (`world pairs`' own draw, whose phrasing carries no label:
    tests/test_hacks.py): the loss falls and the held-out balanced accuracy rises well above chance. The
    world's short template (~31 tokens a pair) keeps the test fast."""
    from minihuatuo.world.kb import WORLD_DIR
    from minihuatuo.world.pairs import draw_pairs

    rows = draw_pairs(1000, 11)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = (WORLD_DIR / "classifier_template.txt").read_text()
    cfg = VerifierTrainConfig(epochs=2, lr=1e-3, global_batch_size=32, micro_batch_size=32, max_length=128,
                              eval_fraction=0.2, eval_every=10, patience=0, warmup_ratio=0.05, seed=0)
    out = train(cfg, WORLD_BASE, tmp_path / "pairs.jsonl", tmp_path / "run", template=template)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert out["held_out_balanced_accuracy"] > 0.6, out["evals"]


# ----------------------------------------------------------------------------- what it saves

def test_saved_layout_is_the_released_verifiers(trained):
    final = trained / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 2
    assert cfg["id2label"] == {"0": "False", "1": "True"} and cfg["label2id"] == {"False": 0, "True": 1}
    v = ClassifierVerifier.from_dir(final)
    eos = v.tokenizer.token_to_id("<|end|>")
    assert cfg["pad_token_id"] == v.tokenizer.pad_id != eos  # transformers pools before pad_token_id
    assert 0.05 <= cfg[vt.THRESHOLD_KEY] <= 0.95 and v.threshold == cfg[vt.THRESHOLD_KEY]
    w = load_file(final / "model.safetensors")
    assert w["score.weight"].shape == (2, 64) and "score.bias" not in w and "lm_head.weight" not in w
    assert {p.name for p in final.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json", "trainer"}
    study = json.loads((trained / "threshold_study.json").read_text())
    assert study["chosen"] == cfg[vt.THRESHOLD_KEY] and len(study["rows"]) == 19
    # the training inputs are the inference verifier's, token for token
    enc = vt.pair_encoder(trained.parent / "base", None, TINY.max_length)
    for p in toy_pairs(5):
        assert enc.text(p.response, p.reference) == v.text(p.response, p.reference)
        assert enc.encode(p.response, p.reference) == v.encode(p.response, p.reference)
        assert v.encode(p.response, p.reference)[-1] == eos


def test_lowercase_is_saved_and_applied(trained, tmp_path):
    """`lowercase` (the tiny-world preset's): the trainer records it in config.json, from_dir reads it back,
    and both the training encoder and the inference verifier then case-fold response and reference."""
    import shutil

    final = trained / "final"
    assert json.loads((final / "config.json").read_text())[vt.LOWERCASE_KEY] is False  # TINY trains as written
    folded = tmp_path / "folded"
    shutil.copytree(final, folded)
    cfg = json.loads((folded / "config.json").read_text())
    (folded / "config.json").write_text(json.dumps({**cfg, vt.LOWERCASE_KEY: True}))
    plain, v = ClassifierVerifier.from_dir(final), ClassifierVerifier.from_dir(folded)
    assert not plain.lowercase and v.lowercase
    assert v.text("Meropenem IS the answer.", "MEROPENEM") == plain.text("meropenem is the answer.", "meropenem")
    assert plain.text("Meropenem.", "meropenem") != plain.text("meropenem.", "meropenem")
    assert v.p_true([("Meropenem IS the answer.", "MEROPENEM")]) == plain.p_true([("meropenem is the answer.",
                                                                                 "meropenem")])
    enc = vt.pair_encoder(trained.parent / "base", None, TINY.max_length, lowercase=True)
    assert enc.encode("Pneumonia, then X.", "Y") == v.encode("Pneumonia, then X.", "Y")
    (folded / "config.json").write_text(json.dumps({**cfg, vt.LOWERCASE_KEY: "yes"}))
    with pytest.raises(ValueError, match="minihuatuo_classifier_lowercase"):
        ClassifierVerifier.from_dir(folded)


def test_transformers_loads_it_with_equal_probabilities(trained):
    transformers = pytest.importorskip("transformers")
    final = trained / "final"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.id2label == {0: "False", 1: "True"}
    v = ClassifierVerifier.from_dir(final, batch_size=4)
    pairs = [(p.response, p.reference) for p in toy_pairs(6)] + [("A much longer reply: pneumonia, then "
                                                                  "amoxicillin, and the troponin.", "troponin")]
    ours = torch.tensor(v.p_true(pairs), dtype=torch.float64)
    ids = [v.encode(r, y) for r, y in pairs]
    for side in ("left", "right"):  # ours left-pads; a transformers user often right-pads
        T = max(map(len, ids))
        pad = [[v.tokenizer.pad_id] * (T - len(x)) for x in ids]
        rows = [p + x for p, x in zip(pad, ids)] if side == "left" else [x + p for p, x in zip(pad, ids)]
        mask = [[0] * len(p) + [1] * len(x) for p, x in zip(pad, ids)] if side == "left" else \
            [[1] * len(x) + [0] * len(p) for p, x in zip(pad, ids)]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask)).logits
        theirs = torch.softmax(logits.double(), -1)[:, 1]
        assert torch.allclose(ours, theirs, atol=1e-5), (side, ours, theirs)


def test_verify_uses_the_trained_checkpoint_and_its_threshold(trained, tmp_path, capsys):
    """`verify --verifier classifier` on final/ (--verifier-model) and on the run directory itself
    (--model OUT: the issue's contract) prints one verdict per pair, at the saved threshold. (In
    process, through cli.main; the contract test below runs the commands as subprocesses.)"""
    import shutil

    from minihuatuo.cli import main

    run = shutil.copytree(trained, tmp_path / "run")  # a copy: its config.json is edited below
    final = run / "final"
    pairs = [(p.response, p.reference) for p in toy_pairs(8)]
    p = ClassifierVerifier.from_dir(final).p_true(pairs)
    at_04 = [x > 0.4 for x in p]
    # a saved threshold whose verdicts differ from the official 0.4's, so the output shows which is used
    cuts = sorted(set(p))
    candidates = [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [max(0.0, cuts[0] - 1e-3), min(1.0, cuts[-1] + 1e-3)]
    t = next(c for c in candidates if [x > c for x in p] != at_04)
    cfg = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps({**cfg, vt.THRESHOLD_KEY: t}))
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"response": r, "reference": y}) + "\n" for r, y in pairs))
    capsys.readouterr()
    assert main(["verify", "--verifier", "classifier", "--verifier-model", str(final), "--pairs",
                 str(tmp_path / "g.jsonl")]) == 0
    assert capsys.readouterr().out == "".join(f"{x > t}\n" for x in p)
    assert main(["verify", "--verifier", "classifier", "--model", str(run), "--pairs", str(tmp_path / "g.jsonl"),
                 "--threshold", "0.4"]) == 0
    assert capsys.readouterr().out == "".join(f"{x}\n" for x in at_04)  # an explicit --threshold wins
    (final / "config.json").write_text(json.dumps({**cfg, vt.THRESHOLD_KEY: "high"}))
    assert main(["verify", "--verifier", "classifier", "--model", str(final), "--pairs",
                 str(tmp_path / "g.jsonl")]) == 2
    assert "field 'minihuatuo_threshold': expected a number in [0, 1], got 'high'" in capsys.readouterr().err
    del cfg[vt.THRESHOLD_KEY]  # a checkpoint without one (the released verifier's): the official 0.4
    (final / "config.json").write_text(json.dumps(cfg))
    assert ClassifierVerifier.from_dir(final).threshold == 0.4


def test_contract_train_then_verify_on_a_small_world_run(tiny, tmp_path):
    from minihuatuo.world.pairs import write_pairs

    write_pairs(tmp_path / "f.jsonl", 24, 1)
    write_pairs(tmp_path / "g.jsonl", 5, 2)
    r = run_cli("verifier", "train", "--model", str(tiny / "base"), "--pairs", str(tmp_path / "f.jsonl"),
                "--out", str(tmp_path / "out"), "--max-length", "512", "--micro-batch-size", "8", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "threshold" in r.stdout and json.loads(r.stdout.splitlines()[-1])["out"] == str(tmp_path / "out" / "final")
    assert json.loads((tmp_path / "out" / "threshold_study.json").read_text())["chosen"] > 0
    r = run_cli("verify", "--verifier", "classifier", "--model", str(tmp_path / "out"), "--pairs",
                str(tmp_path / "g.jsonl"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() and set(r.stdout.splitlines()) <= {"True", "False"} and len(r.stdout.splitlines()) == 5


def test_bad_pairs_lines_are_one_line_errors(tiny, tmp_path, capsys):
    from minihuatuo.cli import main

    good = json.dumps({"response": "The answer is pneumonia.", "reference": "pneumonia", "label": True})
    bad = json.dumps({"response": "x", "reference": "y", "label": "yes"})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + bad + "\n")
    r = run_cli("verifier", "train", "--model", str(tiny / "base"), "--pairs", str(tmp_path / "bad.jsonl"),
                "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"minihuatuo verifier: error: {tmp_path / 'bad.jsonl'}: line 2: "
                                                 "field 'label': expected bool, got str")
    (tmp_path / "missing.jsonl").write_text(good + "\n" + good + "\n" + json.dumps({"response": "x", "label": False}))
    assert main(["verifier", "train", "--model", str(tiny / "base"), "--pairs", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"minihuatuo verifier: error: {tmp_path / 'missing.jsonl'}: line 3: "
                                       "field 'reference': missing\n")
    (tmp_path / "one_label.jsonl").write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match="need both labels"):
        train(TINY, tiny / "base", tmp_path / "one_label.jsonl", tmp_path / "out")


def test_two_processes_equal_one_process(trained, tiny):
    """torchrun with 2 CPU processes (DDP, gloo) = the single-process run of the `trained` fixture: the
    same losses, held-out evaluations and final weights (each rank takes a strided share of the global
    batch, the loss is scaled by world / the global batch's weight, the held-out scores are summed)."""
    import os

    out = tiny / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minihuatuo",
           "verifier", "train", "--model", str(tiny / "base"), "--pairs", str(tiny / "toy.jsonl"), "--out", str(out),
           "--epochs", "1", "--lr", "3e-3", "--global-batch-size", "8", "--micro-batch-size", "4", "--max-length",
           "256", "--eval-fraction", "0.25", "--eval-every", "2", "--patience", "0", "--warmup-ratio", "0",
           "--seed", "0", "--distributed", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (trained, out))
    assert len(one) == len(two) and [a.get("step") for a in one] == [b.get("step") for b in two]
    for a, b in zip(one, two):
        for k in ("loss", "grad_norm", "eval_balanced_accuracy", "final_balanced_accuracy"):
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-4), (k, a, b)
    wa, wb = (load_file(d / "final" / "model.safetensors") for d in (trained, out))
    for k in wa:  # Adam divides by sqrt(v): an element whose gradient is ~0 can move by a sizeable share of lr
        # on a float-rounding difference of the all-reduced sum, hence atol 1e-4 (lr 3e-3)
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_search_pairs_train_alone_or_with_labelled_pairs(tiny, tmp_path):
    """--search-pairs: a search's verdicts as training labels (reward.pairs_from_search), alone or added to
    --pairs; without either the command is a one-line error."""
    rows = [{"Ground-True Answer": p.reference, "search": {"verifier_calls": [
        {"attempt": 1, "depth": 0, "conclusion": p.response, "verdict": p.label}]}} for p in toy_pairs(40)]
    (tmp_path / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_pairs, held = vt.read_split(TINY, None, None, [tmp_path / "search.jsonl"])
    assert len(train_pairs) + len(held) == len({(p.response, p.reference, p.label) for p in toy_pairs(40)}) < 40
    both, held2 = vt.read_split(TINY, tiny / "toy.jsonl", None, [tmp_path / "search.jsonl"])
    assert len(both) + len(held2) == 48 + len(train_pairs) + len(held)
    r = run_cli("verifier", "train", "--model", str(tiny / "base"), "--search-pairs", str(tmp_path / "search.jsonl"),
                "--out", str(tmp_path / "out"), "--max-length", "256", "--micro-batch-size", "8", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "final" / "config.json").exists()
    r = run_cli("verifier", "train", "--model", str(tiny / "base"), "--out", str(tmp_path / "out2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("minihuatuo verifier: error: verifier train: give --pairs FILE, "
                                                 "--search-pairs FILE, or both")
