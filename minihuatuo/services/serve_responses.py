"""`minihuatuo serve`, the responses: OpenAI-shaped JSON for answers, stream chunks and errors.

    response_body(...)     chat.completion / text_completion
    stream_events(...)     chat.completion.chunk / text_completion chunks, as server-sent-event bytes,
                           ending with `data: [DONE]`
    error_body(error)      {"error": {"message", "type", "param", "code"}}

Pure functions of what the model produced (`serve_model.Choice`): no HTTP here.
"""
from __future__ import annotations

import json
import time

from minihuatuo.services.serve_model import Choice, TokenLogprob
from minihuatuo.services.serve_requests import GenerationRequest, RequestError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error"}
OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "completions": ("text_completion", "text_completion")}


def error_body(e: RequestError) -> dict:
    # `code` holds the HTTP status, as vLLM's error bodies do (OpenAI's own is a string or null)
    return {"error": {"message": str(e), "type": ERROR_TYPES.get(e.status, "server_error"), "param": e.param,
                      "code": e.status}}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """The prompt is counted once however many choices it has (n); the completions all count."""
    used = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}


# ----------------------------------------------------------------------------- logprobs
def _bytes(token: str) -> list[int]:
    # UTF-8 of the token's decoded text (a token that ends inside a character decodes to U+FFFD, so
    # its bytes are those of U+FFFD, not the raw byte OpenAI would give)
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": _bytes(e.token),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in e.top]}
                        for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob], offset: int = 0, pieces: list[str] | None = None) -> dict:
    """OpenAI legacy completions shape: parallel lists tokens / token_logprobs / top_logprobs (one
    {token: logprob} dict per position, the sampled token included as the API does: up to k + 1
    entries) / text_offset (where each token's text starts in the choice's text)."""
    offsets, at = [], offset
    for k in range(len(entries)):
        offsets.append(at)
        at += len(pieces[k]) if pieces is not None else 0
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top_dict(e) for e in entries], "text_offset": offsets}


def _top_dict(e: TokenLogprob) -> dict[str, float]:
    """{token: logprob} of the alternatives, best first, plus the sampled token. Two tokens that spell
    the same (e.g. two halves of characters, both U+FFFD) share a key: the more likely one is kept."""
    top: dict[str, float] = {}
    for token, value in e.top:
        top.setdefault(token, value)
    if e.top:
        top.setdefault(e.token, e.logprob)
    return top


# ----------------------------------------------------------------------------- whole answers
def response_body(r: GenerationRequest, choices: list[Choice], prompt_tokens: int, model: str, rid: str) -> dict:
    if r.endpoint == "chat":
        out = [{"index": k, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None}
               for k, c in enumerate(choices)]
    else:
        out = [{"text": c.text, "index": k, "finish_reason": c.finish_reason,
                "logprobs": text_logprobs(c.logprobs, 0, c.pieces) if c.logprobs is not None else None}
               for k, c in enumerate(choices)]
    return {"id": rid, "object": OBJECTS[r.endpoint][0], "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(prompt_tokens, choices)}


# ----------------------------------------------------------------------------- streams
def sse(payload) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (the framing OpenAI's streams use)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def _steps(c: Choice) -> list[tuple[str, list[int], int]]:
    """A choice cut into stream deltas: (text, indices of the tokens that made it, offset of the text).
    A token whose text waits for the next token (part of a character) rides in the next delta."""
    steps, held, offset = [], [], 0
    for k, piece in enumerate(c.pieces):
        held.append(k)
        if piece:
            steps.append((piece, held, offset))
            held, offset = [], offset + len(piece)
    return steps


def stream_events(r: GenerationRequest, choices: list[Choice], prompt_tokens: int, model: str, rid: str):
    """The whole stream of one request, event by event (bytes). Choices are interleaved delta by
    delta, as a server generating them in one batch sends them. With stream_options.include_usage,
    every chunk carries "usage": null and one last chunk with no choices carries the usage (OpenAI)."""
    created, obj = int(time.time()), OBJECTS[r.endpoint][1]

    def chunk(choice: dict) -> bytes:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if r.include_usage:
            body["usage"] = None
        return sse(body)

    chat = r.endpoint == "chat"
    if chat:  # OpenAI opens each choice with the role and empty content
        for k in range(len(choices)):
            yield chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
    steps = [_steps(c) for c in choices]
    for s in range(max((len(x) for x in steps), default=0)):
        for k, c in enumerate(choices):
            if s >= len(steps[k]):
                continue
            text, tokens, offset = steps[k][s]
            entries = [c.logprobs[i] for i in tokens] if c.logprobs is not None else None
            if chat:
                lp = chat_logprobs(entries) if entries is not None else None
                yield chunk({"index": k, "delta": {"content": text}, "logprobs": lp, "finish_reason": None})
            else:
                lp = text_logprobs(entries, offset, [c.pieces[i] for i in tokens]) if entries is not None else None
                yield chunk({"text": text, "index": k, "logprobs": lp, "finish_reason": None})
    for k, c in enumerate(choices):
        if chat:
            yield chunk({"index": k, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason})
        else:
            yield chunk({"text": "", "index": k, "logprobs": None, "finish_reason": c.finish_reason})
    if r.include_usage:
        yield sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                   "usage": usage(prompt_tokens, choices)})
    yield sse("[DONE]")

