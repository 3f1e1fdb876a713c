"""LLM backends: one small interface, chat messages in, n completions out.

    backend.complete([ChatRequest(messages, n=1, temperature=0.0, max_tokens=512, stop=())])
        -> [[completion_1, ..., completion_n], ...]      one list per request, in order

Everything that asks an LLM something (the LLM filter and reformatter of problem construction, the
LLM-judge verifier, strategy search, benchmark evaluation) goes through this interface, so a local
checkpoint, a remote OpenAI-compatible endpoint and `minihuatuo serve` are interchangeable.
Requests are passed as a list so that a backend can batch them (the local one runs one batched
sampler call) or run them concurrently (the HTTP one, bounded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ChatRequest:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    n: int = 1  # completions wanted for this request
    temperature: float = 0.0  # 0 = greedy
    max_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings; not included in the output


class Backend(Protocol):
    def complete(self, requests: list[ChatRequest]) -> list[list[str]]:
        """n completions (assistant text only) per request, in request order."""
        ...
