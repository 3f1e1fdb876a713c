"""LLM backends: one small interface, chat messages in, n completions out.

    backend.complete([ChatRequest(messages, n=1, temperature=0.0, max_tokens=512, stop=())])
        -> [[completion_1, ..., completion_n], ...]      one list per request, in order

Everything that asks an LLM something (the LLM filter and reformatter of problem construction, the
LLM-judge verifier, strategy search, benchmark evaluation) goes through this interface, so a local
checkpoint, a remote OpenAI-compatible endpoint and `minihuatuo serve` are interchangeable.
Requests are passed as a list so that a backend can batch them (the local one runs one batched
sampler call) or run them concurrently (the HTTP one, bounded).

Two implementations:
- `LocalBackend` (here): our own model and sampler, requests batched across the list;
- `OpenAIBackend` (`http_client.py`): any OpenAI-compatible /v1/chat/completions
  endpoint (OpenAI, vLLM, sglang, `minihuatuo serve`), stdlib only, with retries and a disk cache.
`fit_request` shrinks a request's max_tokens to what a local model's context leaves. See
notes/backends.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

ROLES = ("system", "user", "assistant")


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


@dataclass
class Completion:
    """One completion and what an OpenAI-shaped response reports about it (`minihuatuo serve`)."""

    text: str
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int  # sampled tokens, the stop token included


def stop_strings(stop) -> tuple[str, ...]:
    """`ChatRequest.stop` as a tuple; a bare string is one stop string (as in the OpenAI API)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop: every stop string must be a non-empty str, got {s!r}")
    return stops


def check_request(r: ChatRequest, where: str = "request") -> None:
    """Raise ValueError naming the bad field, before anything expensive runs."""
    if not isinstance(r, ChatRequest):
        raise ValueError(f"{where}: expected a ChatRequest, got {type(r).__name__}")
    if not isinstance(r.messages, (list, tuple)) or not r.messages:
        raise ValueError(f"{where}.messages: expected a non-empty list of {{role, content}} dicts")
    for i, m in enumerate(r.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}.messages[{i}].role: expected one of {ROLES}, "
                             f"got {m.get('role') if isinstance(m, dict) else m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}.messages[{i}].content: expected a str")
    if isinstance(r.n, bool) or not isinstance(r.n, int) or r.n < 1:
        raise ValueError(f"{where}.n: expected an int >= 1, got {r.n!r}")
    if isinstance(r.temperature, bool) or not isinstance(r.temperature, (int, float)) or r.temperature < 0:
        raise ValueError(f"{where}.temperature: expected a number >= 0, got {r.temperature!r}")
    if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 1:
        raise ValueError(f"{where}.max_tokens: expected an int >= 1, got {r.max_tokens!r}")
    try:
        stop_strings(r.stop)
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None


def fit_request(backend, r: ChatRequest, min_room: int = 1) -> ChatRequest | None:
    """A local model's context is finite: shrink max_tokens to a power of two that fits (few
    distinct values keep the local backend's batches large, so the few long prompts form a few
    batches, not one each), or None when the prompt leaves fewer than `min_room` tokens. A backend
    without a tokenizer and a context length (an HTTP endpoint) gets the request as is."""
    tok, ctx_len = getattr(backend, "tokenizer", None), getattr(backend, "context_length", None)
    if tok is None or ctx_len is None:
        return r
    room = ctx_len - len(tok.apply_chat_template(list(r.messages)))
    if room < min_room:
        return None
    return r if room >= r.max_tokens else dataclasses.replace(r, max_tokens=1 << (room.bit_length() - 1))


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class LocalBackend:
    """Our own model and sampler behind the Backend interface.

    Requests that share sampling settings (temperature, max_tokens, stop) go into one batched
    `generate` call; a request with n > 1 contributes its prompt n times. Rows are sorted by prompt
    length and cut into chunks of at most `batch_size` rows, which bounds memory (the KV cache is
    batch x (prompt + max_tokens) slots) and keeps left padding small.

    Randomness: with `seed=None` sampling uses torch's global generator. With a seed, the k-th
    `generate` call of this backend is seeded from (seed, k): the same sequence of calls gives the
    same completions, and asking the same question twice still gives two different samples.
    `complete_detailed(..., seed=s)` instead seeds that one call from s alone (the server's
    per-request `seed`). Greedy (temperature 0) results do not depend on seeds or on batching.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, seed: int | None = None,
                 top_k: int = 0, top_p: float = 1.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.seed, self.top_k, self.top_p = batch_size, seed, top_k, top_p
        self._calls = 0  # generate calls made so far (drives the seed stream)

    @classmethod
    def from_dir(cls, path, dtype=None, device: str = "cpu", **kwargs) -> "LocalBackend":
        """Load a checkpoint directory (config.json, *.safetensors, tokenizer.json).
        dtype: a torch dtype, its name ("bfloat16") or None / "auto" to keep the stored one."""
        import torch

        from minihuatuo.engine.checkpoint import load_model
        from minihuatuo.engine.tokenizer import Tokenizer

        if isinstance(dtype, str):
            name, dtype = dtype, None if dtype == "auto" else getattr(torch, dtype, None)
            if name != "auto" and not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype: unknown torch dtype {name!r} (float32, bfloat16, float16, auto)")
        model = load_model(path, dtype=dtype, device=device).eval()
        return cls(model, Tokenizer.from_dir(path), **kwargs)

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    def prompt_ids(self, request: ChatRequest, where: str = "request") -> list[int]:
        """The chat-templated prompt of a request; ValueError if the request is malformed or the
        prompt plus max_tokens does not fit the model's context."""
        check_request(request, where)
        ids = self.tokenizer.apply_chat_template(list(request.messages))
        if len(ids) + request.max_tokens > self.context_length:
            raise ValueError(f"{where}.max_tokens: the prompt has {len(ids)} tokens, and {len(ids)} + "
                             f"max_tokens {request.max_tokens} exceeds the model's context of "
                             f"{self.context_length} tokens")
        return ids

    def complete(self, requests: list[ChatRequest]) -> list[list[str]]:
        return [[c.text for c in cs] for cs in self.complete_detailed(requests)]

    def complete_detailed(self, requests: list[ChatRequest], seed: int | None = None) -> list[list[Completion]]:
        from minihuatuo.engine.sample import SamplingConfig, generate

        prompts = [self.prompt_ids(r, f"requests[{i}]") for i, r in enumerate(requests)]
        out: list[list[Completion | None]] = [[None] * r.n for r in requests]
        # (temperature, max_tokens, stop) -> rows (request index, choice index); dicts keep first-seen order
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, r in enumerate(requests):
            key = (float(r.temperature), r.max_tokens, stop_strings(r.stop))
            groups.setdefault(key, []).extend((i, j) for j in range(r.n))
        chunk = 0
        for (temperature, max_tokens, stops), rows in groups.items():
            rows.sort(key=lambda ij: len(prompts[ij[0]]))  # stable: a request's n rows stay together
            for start in range(0, len(rows), self.batch_size):
                part = rows[start:start + self.batch_size]
                cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=self.top_k,
                                     top_p=self.top_p, stop_token_ids=tuple(self.tokenizer.eos_ids),
                                     stop_strings=stops, seed=self._chunk_seed(seed, chunk))
                gen = generate(self.model, [prompts[i] for i, _ in part], cfg, pad_id=self.tokenizer.pad_id,
                               decode=self.tokenizer.decode)
                for (i, j), ids, reason in zip(part, gen.responses(), gen.finish_reasons):
                    # skip_special_tokens drops the stop token (eos) from the text, as OpenAI servers do
                    text, cut = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops)
                    finish = "length" if reason == "length" and not cut else "stop"
                    out[i][j] = Completion(text, finish, len(prompts[i]), len(ids))
                chunk += 1
        return out  # type: ignore[return-value]

    def _chunk_seed(self, seed: int | None, chunk: int) -> int | None:
        if seed is None:
            if self.seed is None:
                return None
            seed, chunk = self.seed, self._calls
            self._calls += 1
        # chunk 0 uses the seed itself, so a one-chunk request with seed s is reproducible from s alone
        return seed if chunk == 0 else (seed * 1_000_003 + chunk) % 2**63

