"""Data formats (placeholder: being written). See issue 3."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MCQItem:
    """One closed-set exam question, whatever file format it came from."""

    id: str
    question: str
    options: dict[str, str]  # {"A": "...", "B": "...", ...}
    answer_idx: str  # the correct option's letter
    source: str  # e.g. "MedQA", "MedMCQA", "PubMedQA", "MMLU-Pro", "GPQA"
    extra: dict = field(default_factory=dict)  # fields carried through unchanged (context, ...)

    @property
    def answer(self) -> str:
        return self.options[self.answer_idx]


@dataclass
class VerifiableProblem:
    """Official release format: {"Open-ended Verifiable Question": x, "Ground-True Answer": y_star}."""

    x: str
    y_star: str
    extra: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    """Official release format: {"Question", "Complex_CoT", "Response"}."""

    question: str
    complex_cot: str
    response: str
    extra: dict = field(default_factory=dict)
