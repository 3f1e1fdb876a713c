"""`minihuatuo serve`, the requests: an OpenAI request body -> a validated `GenerationRequest`.

    parse_chat_body(body, default_max_tokens)        POST /v1/chat/completions
    parse_completion_body(body, default_max_tokens)  POST /v1/completions (plain prompt, no chat template)

Every refusal is a `RequestError` whose `param` names the offending field and whose message starts
with it, as OpenAI's error bodies do. Fields that change what is generated and that we do not
implement (penalties, logit_bias, echo, suffix, best_of > n) are refused rather than silently
ignored; fields that change nothing we produce (`model`, `user`, ...) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

from minihuatuo.services.backends import ROLES

MAX_N = 128  # completions per prompt (OpenAI's limit); one request must not allocate an unbounded batch
MAX_CHOICES = 1024  # prompts x n of one /v1/completions request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs; we apply it to completions' logprobs too


class RequestError(Exception):
    """A client error: HTTP status, message and the offending field (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _bad(param: str, message: str) -> RequestError:
    return RequestError(400, f"{param}: {message}", param)


@dataclass
class GenerationRequest:
    """What the model is asked, whichever endpoint it came through.

    Exactly one of `messages` (chat: rendered with the tokenizer's chat template) and `prompts`
    (completions: each a string, encoded as is, or a list of token ids) is set. Choice k*n + j of
    the response is sample j of prompt k (OpenAI's order for a list prompt)."""

    endpoint: str  # "chat" or "completions"
    messages: list[dict] | None = None
    prompts: list | None = None
    n: int = 1
    temperature: float = 1.0  # OpenAI's default
    top_p: float | None = None  # None: the server's --top-p
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position (chat top_logprobs; completions `logprobs`)


def _number(body, name, default, lo, hi, *, lo_open=False):
    value = body.get(name)
    value = default if value is None else value
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (lo < value if lo_open else lo <= value) \
        and value <= hi
    if not ok:
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(name, f"expected a number in {interval}, got {value!r}")
    return float(value)


def _integer(body, name, default, lo, hi=None):
    value = body.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _bad(name, f"expected an integer from {lo}{'' if hi is None else f' to {hi}'}, got {value!r}")
    return value


def _common(body, default_max_tokens: int, endpoint: str) -> GenerationRequest:
    """The sampling fields both endpoints share."""
    n = _integer(body, "n", 1, 1, MAX_N)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = None if body.get("top_p") is None else _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    # top_p = 0 would drop every token (filter_logits keeps the first token only while the mass
    # ranked above it is < top_p): refused above rather than turned into NaNs in the sampler.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, default_max_tokens, 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "expected a non-empty string or a list of non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        # torch.Generator.manual_seed takes 64-bit values only; a larger one would be a 500 later
        raise _bad("seed", f"expected an integer in [0, 2**63 - 1], got {seed!r}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"expected true or false, got {stream!r}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        # OpenAI refuses stream_options on a request that does not stream
        if not stream:
            raise _bad("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "expected {\"include_usage\": true|false}")
        include_usage = options.get("include_usage", False)
    for penalty in ("presence_penalty", "frequency_penalty"):
        if body.get(penalty) not in (None, 0, 0.0) or isinstance(body.get(penalty), bool):
            raise _bad(penalty, "not supported by minihuatuo serve (only 0)")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported by minihuatuo serve")
    return GenerationRequest(endpoint, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             stop=tuple(stop), seed=seed, stream=bool(stream), include_usage=include_usage)


def parse_chat_body(body, default_max_tokens: int) -> GenerationRequest:
    """The body of POST /v1/chat/completions -> GenerationRequest; RequestError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body: expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _bad(f"messages[{i}].content", "expected a string")
    r = _common(body, default_max_tokens, "chat")
    r.messages = [dict(role=m["role"], content=m["content"]) for m in messages]
    # chat: `logprobs` is a boolean and `top_logprobs` (0-20) asks for alternatives; OpenAI refuses
    # top_logprobs without logprobs: true
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs", f"expected true or false, got {logprobs!r}")
    r.logprobs = bool(logprobs)
    if body.get("top_logprobs") is not None:
        if not r.logprobs:
            raise _bad("top_logprobs", "requires logprobs: true")
        r.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    return r


def parse_completion_body(body, default_max_tokens: int) -> GenerationRequest:
    """The body of POST /v1/completions -> GenerationRequest. `prompt` is a string, a list of
    strings, a list of token ids or a list of lists of token ids (as in the OpenAI API)."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body: expected a JSON object")
    prompt = body.get("prompt")

    def is_ids(p) -> bool:
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in p)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("prompt", "expected a string, a non-empty list of strings, or (lists of) token ids")
    r = _common(body, default_max_tokens, "completions")
    if len(prompts) * r.n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n {r.n} is more than {MAX_CHOICES} choices")
    r.prompts = prompts
    # completions: `logprobs` is an integer k, the number of alternatives per position (0 = the
    # sampled token's log-prob only)
    if body.get("logprobs") is not None:
        r.logprobs, r.top_logprobs = True, _integer(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if body.get("echo"):
        raise _bad("echo", "not supported by minihuatuo serve")
    if body.get("suffix") is not None:
        raise _bad("suffix", "not supported by minihuatuo serve")
    best_of = body.get("best_of")
    if best_of is not None and best_of != r.n:  # best_of > n ranks candidates by log-prob: not implemented
        raise _bad("best_of", "only best_of = n is supported")
    return r
