"""Shared test fixtures: tiny random checkpoints and a tiny trained tokenizer, written to real files."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

TEXT = [
    "The patient presents with fever, cough and pleuritic chest pain.",
    "A chest radiograph shows lobar consolidation; the first-line treatment is amoxicillin.",
    "In pregnancy, avoid the drug and choose the alternative.",
    "Hmm, wait: the troponin is raised, so consider myocardial infarction.",
    "Final answer: community-acquired pneumonia. Verification: the findings agree.",
] * 20

PLAIN_SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def write_plain_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer with the project's plain chat template tokens, saved as
    tokenizer.json + tokenizer_config.json + generation_config.json in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=PLAIN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|end|>")}))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny Llama-shaped checkpoint with a real tokenizer, saved by minihuatuo."""
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    tok_dir = write_plain_tokenizer(tmp_path / "tok")
    model = build_model(preset("tiny", vocab_size=320), seed=0)
    # Larger weights than the 0.02 init make the greedy path depend on the prompt (not one token forever).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return save_model(model, tmp_path / "ckpt", copy_files_from=tok_dir)


COLORS = ["red", "green", "blue", "black"]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny model SFT-ed on the think-then-answer format with a uniformly random color as answer;
    the verifiable problems want "red". Starting accuracy is ~1/4 of well-formed answers."""
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset
    from minihuatuo.stages.sft import SFTConfig, train

    root = tmp_path_factory.mktemp("toy")
    tok = write_plain_tokenizer(root / "tok")
    save_model(build_model(preset("tiny", vocab_size=320), seed=0), root / "base", copy_files_from=tok)
    rng = random.Random(0)
    rows = [{"Question": f"Say {c}.", "Complex_CoT": "ok", "Response": rng.choice(COLORS)}
            for c in COLORS for _ in range(16)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train(SFTConfig(epochs=40, lr=3e-3, global_batch_size=16, micro_batch_size=16, max_length=128,
                    warmup_ratio=0.0, weight_decay=0.0), root / "base", root / "sft.jsonl", root / "sft")
    probs = [{"Open-ended Verifiable Question": f"Say {c}.", "Ground-True Answer": "red"} for c in COLORS]
    (root / "problems.json").write_text(json.dumps(probs))
    return root


@pytest.fixture
def cpu_kernels():
    """The compiled CPU kernels, asserted to have built: skips where no compiler exists (or the
    reference is forced), FAILS where one exists and the build did not give the CPU kernels — so a
    test that compares the kernels with the reference never compares the reference with itself."""
    import os
    import shutil

    from minihuatuo.engine import kernels as K

    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None or K.force_reference:
        pytest.skip("no C++ compiler / ninja (or MINIHUATUO_KERNELS=reference): no compiled kernels to compare")
    assert K.backend("cpu") == "cpu", "the CPU kernels did not build (see stderr)"
    return K
