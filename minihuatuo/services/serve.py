"""`minihuatuo serve`: an OpenAI-compatible chat-completions server over a local checkpoint.

    minihuatuo serve --model runs/sft --port 8000 --served-model-name teacher
    POST /v1/chat/completions   {messages, n, temperature, max_tokens, stop, seed} -> chat.completion JSON
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok"}

So a local checkpoint can act as the teacher or the verifier of another process (problem
construction, strategy search, the LLM judge) exactly as GPT-4o or a vLLM server would: point
`OpenAIBackend` at http://HOST:PORT/v1. Standard library only (http.server).

One worker thread owns the model. Each HTTP request is handled in its own thread, which queues the
parsed request and waits; the worker takes every request waiting in the queue (up to --batch-size)
and runs them as one batched `LocalBackend` call, so concurrent clients share a batch. A request that
carries a `seed` runs alone, so that its output depends on its seed only, never on its neighbours.

Test-only hooks (constructor arguments of ChatServer, hidden flags of the CLI): `fail_plan` makes the
next chat requests fail on purpose ("500*2,429" = two 500s then one 429; "drop" closes the
connection without answering), `retry_after` is sent with those failures, `delay_s` holds every chat
request that long before it is served (so clients' concurrency can be observed). `stats` records
what the server saw, including how many requests carried an Authorization header (never its value).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minihuatuo.services.backends import ROLES, ChatRequest, LocalBackend

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
MAX_N = 128  # completions per request; one request must not be able to allocate an unbounded batch
STATUS_TEXT = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


class RequestError(Exception):
    """A client error: HTTP status, message and the offending field (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


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


def parse_chat_body(body, default_max_tokens: int) -> tuple[ChatRequest, int | None]:
    """The OpenAI request body -> (ChatRequest, seed); RequestError(400) naming the bad field.
    Fields we do not implement and cannot ignore safely are refused; other extra fields are ignored."""
    def bad(param, message):
        return RequestError(400, f"{param}: {message}", param)

    if not isinstance(body, dict):
        raise RequestError(400, "request body: expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}].content", "expected a string")
    n = body.get("n", 1)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise bad("n", f"expected an integer from 1 to {MAX_N}, got {n!r}")
    temperature = body.get("temperature", 1.0)  # the OpenAI API's default
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise bad("temperature", f"expected a number from 0 to 2, got {temperature!r}")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(name, f"expected an integer >= 1, got {max_tokens!r}")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "expected a non-empty string or a list of non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        # torch.Generator.manual_seed takes 64-bit values only; a larger one would be a 500 later
        raise bad("seed", f"expected an integer in [0, 2**63 - 1], got {seed!r}")
    if body.get("stream"):
        raise bad("stream", "streaming is not supported by minihuatuo serve")
    if body.get("top_p") not in (None, 1):
        raise bad("top_p", "only top_p = 1 is supported (set top-p on the server)")
    return ChatRequest([dict(role=m["role"], content=m["content"]) for m in messages], n=n,
                       temperature=float(temperature), max_tokens=max_tokens, stop=tuple(stop)), seed


@dataclass
class ServerStats:
    chat_requests: int = 0  # POST /v1/chat/completions received (injected failures included)
    in_flight: int = 0  # chat requests being handled right now
    max_in_flight: int = 0  # the most chat requests ever handled at the same time
    authorization_headers: int = 0  # chat requests that carried an Authorization header (value never kept)
    failures_injected: int = 0
    model_calls: int = 0  # batched LocalBackend calls made by the worker
    largest_batch: int = 0  # the most requests served by one model call


class _Job:
    def __init__(self, request: ChatRequest, seed: int | None):
        self.request, self.seed = request, seed
        self.done = threading.Event()
        self.result = self.error = None


class _Batcher:
    """The worker thread that owns the model (see the module docstring)."""

    def __init__(self, backend: LocalBackend, max_batch: int, stats: ServerStats, lock: threading.Lock):
        self.backend, self.max_batch, self.stats, self.lock = backend, max_batch, stats, lock
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="minihuatuo-serve-model", daemon=True)
        self.thread.start()

    def submit(self, request: ChatRequest, seed: int | None):
        job = _Job(request, seed)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self):
        self.jobs.put(None)

    def _loop(self):
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            self._run([j for j in batch if j.seed is None], None)
            for j in batch:
                if j.seed is not None:
                    self._run([j], j.seed)

    def _run(self, jobs: list[_Job], seed: int | None):
        if not jobs:
            return
        with self.lock:
            self.stats.model_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        try:
            results = self.backend.complete_detailed([j.request for j in jobs], seed=seed)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request thread
            if len(jobs) > 1:  # find the culprit: the other requests of the batch still get answers
                for j in jobs:
                    self._run([j], seed)
                return
            jobs[0].error = e
            jobs[0].done.set()
            return
        for j, r in zip(jobs, results):
            j.result = r
            j.done.set()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: LocalBackend, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "minihuatuo", *, api_key_env: str | None = None, max_batch: int | None = None,
                 default_max_tokens: int = 512, fail_plan: str | list[str] | None = None,
                 retry_after: float | None = None, delay_s: float = 0.0):
        """port 0 picks a free port (see .url). api_key_env: require `Authorization: Bearer <key>` with the
        key read from that environment variable at each request. default_max_tokens: when a request gives
        none. fail_plan / retry_after / delay_s: test-only, see the module docstring."""
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(f"api_key_env: environment variable {api_key_env} is not set")
        super().__init__((host, port), _Handler)
        self.backend, self.model_name, self.api_key_env = backend, model_name, api_key_env
        self.default_max_tokens = default_max_tokens
        self.fail_plan = parse_fail_plan(fail_plan) if isinstance(fail_plan, (str, type(None))) else list(fail_plan)
        self.retry_after, self.delay_s = retry_after, delay_s
        self.stats, self.lock = ServerStats(), threading.Lock()
        self.created = int(time.time())
        self.batcher = _Batcher(backend, max_batch or backend.batch_size, self.stats, self.lock)

    def handle_error(self, request, client_address):
        """A connection a client dropped is one log line; anything else keeps socketserver's report."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
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


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients with connection pools; every reply has a length
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
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            self.close_connection = True  # the body is left unread
            return self._send_error(RequestError(404, f"no route POST {self.path}"))
        srv = self.server
        with srv.lock:
            srv.stats.chat_requests += 1
            srv.stats.in_flight += 1
            srv.stats.max_in_flight = max(srv.stats.max_in_flight, srv.stats.in_flight)
            srv.stats.authorization_headers += "Authorization" in self.headers
            failure = srv.fail_plan.pop(0) if srv.fail_plan else None
            srv.stats.failures_injected += failure is not None
        try:
            status, payload = self._chat(failure)
        except RequestError as e:
            status, payload = e.status, e
        except Exception as e:  # noqa: BLE001 - a server answers, it does not die
            log.exception("chat completion failed")
            status, payload = 500, RequestError(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            # Leave the in-flight count before the reply goes out: once a client has its answer it may
            # send the next request, which must not find this one still counted.
            with srv.lock:
                srv.stats.in_flight -= 1
        if payload is None:  # injected "drop": close without a word
            self.close_connection = True
        elif isinstance(payload, RequestError):
            headers = {}
            if failure is not None and srv.retry_after is not None:
                headers["Retry-After"] = f"{srv.retry_after:g}"
            self._send_error(payload, headers)
        else:
            self._send(status, payload)

    def _chat(self, failure: str | None):
        body = self._read_json()
        self._check_auth()
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        if failure == "drop":
            return 0, None
        if failure is not None:
            raise RequestError(int(failure), f"injected failure {failure} (test fail_plan)")
        request, seed = parse_chat_body(body, self.server.default_max_tokens)
        try:
            prompt_tokens = len(self.server.backend.prompt_ids(request))
        except ValueError as e:  # e.g. prompt + max_tokens longer than the context
            raise RequestError(400, str(e).removeprefix("request."),
                               "max_tokens" if "max_tokens" in str(e) else "messages") from None
        completions = self.server.batcher.submit(request, seed)
        choices = [{"index": k, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None} for k, c in enumerate(completions)]
        used = sum(c.completion_tokens for c in completions)
        return 200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.server.model_name, "choices": choices,
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                               "total_tokens": prompt_tokens + used}}

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
        self._send(e.status, {"error": {"message": str(e), "type": STATUS_TEXT.get(e.status, "server_error"),
                                        "param": e.param, "code": e.status}}, headers)

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
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer: one line, no traceback
            log.info("%s disconnected before the reply (status %d) was sent", self.address_string(), status)
            self.close_connection = True


# ----------------------------------------------------------------------------- CLI
def cmd_serve(args) -> int:
    from minihuatuo.engine.checkpoint import DTYPES

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    backend = LocalBackend.from_dir(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                    batch_size=args.batch_size, seed=args.seed, top_k=args.top_k, top_p=args.top_p)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = ChatServer(backend, args.host, args.port, name, api_key_env=args.api_key_env,
                        default_max_tokens=args.default_max_tokens, fail_plan=args.fail_plan,
                        retry_after=args.retry_after, delay_s=args.delay_s)
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

    p = sub.add_parser("serve", help="serve a checkpoint as an OpenAI-compatible chat-completions endpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_int, default=8000, help="0 picks a free port (printed on stderr)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients use (default: directory name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows (prompts x n) per batched sampler call")
    p.add_argument("--default-max-tokens", type=positive_int, default=512, help="when a request sets no max_tokens")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="applied to every request (0 = off)")
    p.add_argument("--top-p", type=top_p_float, default=1.0, help="applied to every request (1 = off)")
    p.add_argument("--seed", type=seed_int, default=None, help="seeds the sampler stream of requests without a seed")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer KEY', KEY read from this environment variable")
    # test-only failure injection (see the module docstring); hidden from --help
    p.add_argument("--fail-plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--retry-after", type=nonnegative_float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--delay-s", type=nonnegative_float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
