"""`minihuatuo serve`: an OpenAI-compatible server over a local checkpoint: the HTTP side and the command.

    minihuatuo serve --model runs/sft --port 8000 --served-model-name teacher
    POST /v1/chat/completions   {messages, n, temperature, top_p, max_tokens, stop, seed, stream, logprobs, ...}
    POST /v1/completions        {prompt, ...}: the prompt as is, no chat template (the official eval.py's call)
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok"}

So a local checkpoint can act as the teacher or the verifier of another process (problem
construction, strategy search, the LLM judge) exactly as GPT-4o or a vLLM server would: point
`OpenAIBackend` at http://HOST:PORT/v1. Standard library only (http.server). The concepts live in
their own modules: serve_requests (request bodies -> a validated GenerationRequest), serve_model (the
worker thread that owns the model, batching), serve_responses (response, chunk and error JSON).

Each HTTP request is handled in its own thread, which validates and tokenizes the request, queues it
for the model's worker thread and waits for the whole completion; then it answers with one JSON body,
or, with "stream": true, with server-sent events (`data: {chunk}`, ..., `data: [DONE]`) sent with
chunked transfer encoding so the connection stays reusable.

Streaming is not incremental: the completion is generated whole, then sent as one event per token.
`sample.generate` has no per-step hook (and lives in engine/, outside this module), and the worker
runs many requests in one batched call, so a per-token stream would need the sampler changed; the
events, their order and their text are what an incremental server sends, only the first one comes
later. A client that leaves mid-stream costs one log line; the server keeps serving.

Test-only hooks (constructor arguments of ChatServer, hidden flags of the CLI): `fail_plan` makes the
next POST requests fail on purpose ("500*2,429" = two 500s then one 429; "drop" closes the
connection without answering), `retry_after` is sent with those failures, `delay_s` holds every POST
request that long before it is served (so clients' concurrency can be observed), `chunk_delay_s`
waits that long between stream events (so a client can leave mid-stream). `stats` records what the
server saw, including how many requests carried an Authorization header (never its value).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minihuatuo.services.backends import ChatRequest, LocalBackend
from minihuatuo.services.serve_model import Batcher, has_model
from minihuatuo.services.serve_requests import (
    GenerationRequest,
    RequestError,
    parse_chat_body,
    parse_completion_body,
)
from minihuatuo.services.serve_responses import error_body, response_body, stream_events

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
ROUTES = {"/v1/chat/completions": ("chat", parse_chat_body), "/v1/completions": ("completions", parse_completion_body)}
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def parse_fail_plan(text: str | None) -> list[str]:
    """"500*2,429,drop" -> ["500", "500", "429", "drop"] (test-only failure injection)."""
    plan = []
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        what, _, times = item.partition("*")
        if not (what == "drop" or (what.isdigit() and 400 <= int(what) <= 599)) or (times and not times.isdigit()):
            raise ValueError(f"fail_plan: bad item {item!r}; expected STATUS[*COUNT] or drop[*COUNT], "
                             f"e.g. '500*2,429'")
        plan += [what] * int(times or 1)
    return plan


@dataclass
class ServerStats:
    chat_requests: int = 0  # POST /v1/chat/completions received (injected failures included)
    completion_requests: int = 0  # POST /v1/completions received
    in_flight: int = 0  # POST requests being handled right now
    max_in_flight: int = 0  # the most POST requests ever handled at the same time
    authorization_headers: int = 0  # POST requests that carried an Authorization header (value never kept)
    failures_injected: int = 0
    model_calls: int = 0  # batched model calls made by the worker
    largest_batch: int = 0  # the most requests served by one model call
    streams: int = 0  # streamed answers started
    disconnects: int = 0  # clients that left before their answer was written in full


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: LocalBackend, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "minihuatuo", *, api_key_env: str | None = None, max_batch: int | None = None,
                 default_max_tokens: int = 512, fail_plan: str | list[str] | None = None,
                 retry_after: float | None = None, delay_s: float = 0.0, chunk_delay_s: float = 0.0):
        """port 0 picks a free port (see .url). api_key_env: require `Authorization: Bearer <key>` with the
        key read from that environment variable at each request. default_max_tokens: when a request gives
        none. fail_plan / retry_after / delay_s / chunk_delay_s: test-only, see the module docstring."""
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(f"api_key_env: environment variable {api_key_env} is not set")
        super().__init__((host, port), _Handler)
        self.backend, self.model_name, self.api_key_env = backend, model_name, api_key_env
        self.default_max_tokens = default_max_tokens
        self.fail_plan = parse_fail_plan(fail_plan) if isinstance(fail_plan, (str, type(None))) else list(fail_plan)
        self.retry_after, self.delay_s, self.chunk_delay_s = retry_after, delay_s, chunk_delay_s
        self.stats, self.lock = ServerStats(), threading.Lock()
        self.created = int(time.time())
        self.batcher = Batcher(backend, max_batch or backend.batch_size, self._count_call)

    def _count_call(self, jobs: int):
        with self.lock:
            self.stats.model_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, jobs)

    def handle_error(self, request, client_address):
        """A connection a client dropped is one log line; anything else keeps socketserver's report."""
        if isinstance(sys.exc_info()[1], DISCONNECTED):
            log.info("%s:%s disconnected", *client_address[:2])
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self):
        self.batcher.stop()
        super().server_close()

    def prompt_ids(self, r: GenerationRequest) -> tuple[list[list[int]], int]:
        """The token ids of each prompt and the usage's prompt_tokens (each prompt once, whatever n);
        RequestError(400) for a prompt that leaves no room for max_tokens in the model's context."""
        backend = self.backend
        if not has_model(backend):  # a chat-only backend (serve_model.has_model)
            for param, used in (("prompt", r.endpoint != "chat"), ("top_p", r.top_p not in (None, 1)),
                                ("logprobs", r.logprobs)):
                if used:
                    raise RequestError(400, f"{param}: not supported by this server's backend (chat only)", param)
        if r.endpoint == "chat":
            try:
                ids = backend.prompt_ids(ChatRequest(r.messages, n=r.n, temperature=r.temperature,
                                                     max_tokens=r.max_tokens, stop=r.stop))
            except ValueError as e:  # e.g. prompt + max_tokens longer than the context
                raise RequestError(400, str(e).removeprefix("request."),
                                   "max_tokens" if "max_tokens" in str(e) else "messages") from None
            return [ids], len(ids)
        prompts, tok = [], backend.tokenizer
        for k, p in enumerate(r.prompts):
            # a string is encoded with the tokenizer's special tokens (BOS for Llama), as vLLM does for
            # /v1/completions; a list of ids is taken as is
            ids = tok.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            where = "prompt" if len(r.prompts) == 1 else f"prompt[{k}]"
            if not ids:
                raise RequestError(400, f"{where}: encodes to no tokens", where)
            if max(ids) >= backend.model.cfg.vocab_size:
                raise RequestError(400, f"{where}: token id {max(ids)} is outside the vocabulary", where)
            if len(ids) + r.max_tokens > backend.context_length:
                raise RequestError(400, f"max_tokens: {where} has {len(ids)} tokens, and {len(ids)} + max_tokens "
                                        f"{r.max_tokens} exceeds the model's context of {backend.context_length} "
                                        f"tokens", "max_tokens")
            prompts.append(ids)
        return prompts, sum(len(p) for p in prompts)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients with connection pools; every reply is framed
    # Headers and body leave in two writes; with Nagle's algorithm on, the second waits for the
    # client's delayed ACK (~40 ms per request on Linux). TCP_NODELAY sends both at once.
    disable_nagle_algorithm = True
    timeout = 300  # seconds a socket read may wait: idle keep-alive connections do not hold threads forever

    def log_message(self, fmt, *args):  # the request line and status only: never headers
        log.info("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            return self._send(200, {"status": "ok"})
        if path == "/v1/models":
            try:
                self._check_auth()
            except RequestError as e:
                return self._send_error(e)
            return self._send(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "minihuatuo", "max_model_len": self.server.backend.context_length}]})
        self._send_error(RequestError(404, f"no route GET {path}"))

    def do_POST(self):
        route = ROUTES.get(self.path.split("?")[0].rstrip("/"))
        if route is None:
            self.close_connection = True  # the body is left unread
            return self._send_error(RequestError(404, f"no route POST {self.path}"))
        srv = self.server
        with srv.lock:
            if route[0] == "chat":
                srv.stats.chat_requests += 1
            else:
                srv.stats.completion_requests += 1
            srv.stats.in_flight += 1
            srv.stats.max_in_flight = max(srv.stats.max_in_flight, srv.stats.in_flight)
            srv.stats.authorization_headers += "Authorization" in self.headers
            failure = srv.fail_plan.pop(0) if srv.fail_plan else None
            srv.stats.failures_injected += failure is not None
        answer = None
        try:
            answer = self._generate(route[1], failure)
        except RequestError as e:
            answer = e
        except Exception as e:  # noqa: BLE001 - a server answers, it does not die
            log.exception("completion failed")
            answer = RequestError(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            # Leave the in-flight count before the reply goes out: once a client has its answer it may
            # send the next request, which must not find this one still counted.
            with srv.lock:
                srv.stats.in_flight -= 1
        if answer is None:  # injected "drop": close without a word
            self.close_connection = True
        elif isinstance(answer, RequestError):
            headers = {}
            if failure is not None and srv.retry_after is not None:
                headers["Retry-After"] = f"{srv.retry_after:g}"
            self._send_error(answer, headers)
        else:
            request, choices, prompt_tokens = answer
            prefix = "chatcmpl-" if request.endpoint == "chat" else "cmpl-"
            rid, name = prefix + uuid.uuid4().hex, srv.model_name
            if request.stream:
                self._stream(stream_events(request, choices, prompt_tokens, name, rid))
            else:
                self._send(200, response_body(request, choices, prompt_tokens, name, rid))

    def _generate(self, parse, failure: str | None):
        body = self._read_json()
        self._check_auth()
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        if failure == "drop":
            return None
        if failure is not None:
            raise RequestError(int(failure), f"injected failure {failure} (test fail_plan)")
        request = parse(body, self.server.default_max_tokens)
        prompts, prompt_tokens = self.server.prompt_ids(request)
        return request, self.server.batcher.submit(request, prompts), prompt_tokens

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413 if length > 0 else 400, f"request body: bad Content-Length (limit {MAX_BODY_BYTES})")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestError(400, f"request body: invalid JSON ({e})") from None

    def _check_auth(self):
        env = self.server.api_key_env
        if not env:
            return
        expected = ("Bearer " + os.environ.get(env, "")).encode()
        given = (self.headers.get("Authorization") or "").encode()
        if not hmac.compare_digest(given, expected):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer ...)")

    def _send_error(self, e: RequestError, headers: dict | None = None):
        self._send(e.status, error_body(e), headers)

    def _left(self, what: str):
        """A client that closed its connection: one log line, no traceback, the connection dropped."""
        log.info("%s disconnected before %s was sent", self.address_string(), what)
        with self.server.lock:
            self.server.stats.disconnects += 1
        self.close_connection = True

    def _send(self, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except DISCONNECTED:  # the client left before its answer
            self._left(f"the reply (status {status})")

    def _stream(self, events):
        """Server-sent events (text/event-stream), each event one HTTP/1.1 chunk: the length of a
        stream is not known up front, and chunked framing keeps the connection reusable."""
        with self.server.lock:
            self.server.stats.streams += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for k, event in enumerate(events):
                if k and self.server.chunk_delay_s:
                    time.sleep(self.server.chunk_delay_s)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except DISCONNECTED:
            self._left("the end of its stream")


# ----------------------------------------------------------------------------- CLI
def cmd_serve(args) -> int:
    from minihuatuo.engine.checkpoint import DTYPES

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    backend = LocalBackend.from_dir(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                    batch_size=args.batch_size, seed=args.seed, top_k=args.top_k, top_p=args.top_p)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = ChatServer(backend, args.host, args.port, name, api_key_env=args.api_key_env,
                        default_max_tokens=args.default_max_tokens, fail_plan=args.fail_plan,
                        retry_after=args.retry_after, delay_s=args.delay_s, chunk_delay_s=args.chunk_delay_s)
    # Ctrl-C and SIGTERM both raise KeyboardInterrupt below, whatever the shell set: a background job
    # of a non-interactive shell inherits SIGINT *ignored*, and Ctrl-C then did nothing.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key_env:
        print(f"warning: serving on {args.host} without --api-key-env: anyone who can reach it can use it",
              file=sys.stderr)
    try:  # a Ctrl-C right after the line below must still close the server
        print(f"minihuatuo serve: model {name!r} at {server.url}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.thread.join(timeout=30)  # a generation in progress finishes; then the thread ends
    # Leave without interpreter finalization: with the model's thread and the native thread pools
    # (torch's OpenMP, the tokenizers library) still alive, it intermittently aborted (SIGABRT) or
    # hung after Ctrl-C (measured: 1 run in 3-5). Nothing is left to write; streams are flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def add_cli(sub) -> None:
    import argparse

    import torch

    from minihuatuo.services.config import (
        nonnegative_float,
        nonnegative_int,
        port_int,
        positive_int,
        seed_int,
        top_p_float,
    )

    p = sub.add_parser("serve", help="serve a checkpoint as an OpenAI-compatible endpoint "
                                       "(/v1/chat/completions, /v1/completions)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_int, default=8000, help="0 picks a free port (printed on stderr)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients use (default: directory name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows (prompts x n) per batched sampler call")
    p.add_argument("--default-max-tokens", type=positive_int, default=512, help="when a request sets no max_tokens")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="applied to every request (0 = off)")
    p.add_argument("--top-p", type=top_p_float, default=1.0, help="for requests that set no top_p (1 = off)")
    p.add_argument("--seed", type=seed_int, default=None, help="seeds the sampler stream of requests without a seed")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer KEY', KEY read from this environment variable")
    # test-only failure injection (see the module docstring); hidden from --help
    p.add_argument("--fail-plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--retry-after", type=nonnegative_float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--delay-s", type=nonnegative_float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--chunk-delay-s", type=nonnegative_float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
