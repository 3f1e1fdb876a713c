"""LLM backends against a real `minihuatuo serve` on 127.0.0.1 (ephemeral port) over a tiny checkpoint.

No mocks on the product path: the HTTP client talks to the real server, which runs the real model.
The server's test-only hooks (fail_plan, retry_after, delay_s, stats) inject failures and observe
what the client did."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

import pytest
import torch
from conftest import write_plain_tokenizer

from minihuatuo.engine import sample
from minihuatuo.services.backends import ChatRequest, LocalBackend, cut_at_stop
from minihuatuo.services.http_client import BackendError, OpenAIBackend, cache_key
from minihuatuo.services.serve import ChatServer, parse_fail_plan

SECRET = "sk-minihuatuo-TEST-7f3a9c1e5d2b8a4f60"  # distinctive: grep for it everywhere
QUESTIONS = ["The patient presents with fever and cough.", "Chest pain, raised troponin.",
             "Which drug in pregnancy?", "Hmm, wait: lobar consolidation on the radiograph, so what next?",
             "Final answer?"]


def chat(q: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    tmp = tmp_path_factory.mktemp("backends")
    tok_dir = write_plain_tokenizer(tmp / "tok")
    model = build_model(preset("tiny", vocab_size=320), seed=0)
    with torch.no_grad():  # larger weights: the greedy text depends on the prompt (as in conftest)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return save_model(model, tmp / "ckpt", copy_files_from=tok_dir)


@pytest.fixture(scope="module")
def local(ckpt):
    return LocalBackend.from_dir(ckpt, batch_size=4)


@pytest.fixture
def start_server(local):
    servers = []

    def start(**kwargs) -> ChatServer:
        srv = ChatServer(local, "127.0.0.1", 0, "tiny", **kwargs)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def client(srv: ChatServer, **kwargs) -> OpenAIBackend:
    kwargs = {"backoff_s": 0.01, "max_retries": 3, "timeout": 30, "api_key_env": None, **kwargs}
    return OpenAIBackend(srv.url + "/v1", "tiny", **kwargs)


def post(url: str, body, raw: bytes | None = None):
    """(status, JSON body) of one POST, errors included."""
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def direct(local: LocalBackend, messages, max_new_tokens: int) -> tuple[str, list[int]]:
    tok = local.tokenizer
    cfg = sample.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=tuple(tok.eos_ids))
    ids = sample.generate(local.model, [tok.apply_chat_template(messages)], cfg, pad_id=tok.pad_id).responses()[0]
    return tok.decode(ids, skip_special_tokens=True), ids


# ----------------------------------------------------------------------------- pure functions
def test_fail_plan_and_stop_cutting():
    assert parse_fail_plan("500*2, 429,drop") == ["500", "500", "429", "drop"]
    assert parse_fail_plan(None) == []
    for bad in ("200", "5xx", "500*x", "abc"):
        with pytest.raises(ValueError, match="fail_plan"):
            parse_fail_plan(bad)
    assert cut_at_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)  # earliest occurrence wins
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_cache_key_covers_the_request_and_nothing_else(monkeypatch):
    r = ChatRequest(chat("q"), n=2, temperature=0, max_tokens=8, stop=("a",))
    k = cache_key("http://h/v1", "m", r)
    assert k == cache_key("http://h/v1", "m", ChatRequest(chat("q"), n=2, temperature=0.0, max_tokens=8, stop=["a"]))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the key is not an input
    assert k == cache_key("http://h/v1", "m", r)
    changed = [("http://other/v1", "m", r), ("http://h/v1", "m2", r),
               ("http://h/v1", "m", ChatRequest(chat("q2"), n=2, temperature=0, max_tokens=8, stop=("a",))),
               ("http://h/v1", "m", ChatRequest(chat("q"), n=3, temperature=0, max_tokens=8, stop=("a",))),
               ("http://h/v1", "m", ChatRequest(chat("q"), n=2, temperature=0.5, max_tokens=8, stop=("a",))),
               ("http://h/v1", "m", ChatRequest(chat("q"), n=2, temperature=0, max_tokens=9, stop=("a",))),
               ("http://h/v1", "m", ChatRequest(chat("q"), n=2, temperature=0, max_tokens=8, stop=("b",)))]
    assert len({k, *(cache_key(*c) for c in changed)}) == 1 + len(changed)


# ----------------------------------------------------------------------------- local backend
def test_local_batching_equals_one_by_one_and_batches(local, monkeypatch):
    """Greedy: one batched call per sampling setting gives what each request gives alone; and the
    batching really happens (rows = prompts x n, chunks of batch_size)."""
    reqs = [ChatRequest(chat(q), max_tokens=12) for q in QUESTIONS]
    reqs += [ChatRequest(chat(QUESTIONS[0], "Be brief."), n=2, max_tokens=7),
             ChatRequest(chat(QUESTIONS[3]), max_tokens=7), ChatRequest(chat(QUESTIONS[1]), max_tokens=12, stop=("e",))]
    calls = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, prompts, *a, **k: calls.append(len(prompts)) or real(m, prompts, *a, **k))
    batched = local.complete(reqs)
    # groups: max_tokens 12 (5 rows -> chunks 4 + 1), max_tokens 7 (3 rows), stop "e" (1 row)
    assert sorted(calls) == [1, 1, 3, 4]
    one_by_one = LocalBackend(local.model, local.tokenizer, batch_size=1)
    assert batched == [one_by_one.complete([r])[0] for r in reqs]
    assert batched[5][0] == batched[5][1]  # greedy n = 2: the same text twice
    assert len({b[0] for b in batched[:5]}) > 1  # the texts depend on the prompt


def test_local_seeded_sampling_is_a_reproducible_stream(local):
    r = [ChatRequest(chat(QUESTIONS[0]), n=6, temperature=1.0, max_tokens=10)]
    a, b = LocalBackend(local.model, local.tokenizer, batch_size=4, seed=3), LocalBackend(local.model, local.tokenizer,
                                                                                          batch_size=4, seed=3)
    first, second = a.complete(r), a.complete(r)
    assert first == b.complete(r) and second == b.complete(r)  # same seed, same sequence of calls
    assert first != second  # asking again draws new samples
    assert len(set(first[0])) > 1  # n samples differ, also across chunks (6 rows, batch_size 4)
    assert len(set(first[0][:4]) & set(first[0][4:])) < 2


# ----------------------------------------------------------------------------- server + client
def test_greedy_http_equals_local_equals_generate(local, start_server):
    srv = start_server()
    messages = chat(QUESTIONS[0], "You are a careful clinician.")
    text, ids = direct(local, messages, 24)
    assert text.strip()
    r = ChatRequest(messages, max_tokens=24)
    assert local.complete([r]) == [[text]]
    assert client(srv).complete([r]) == [[text]]
    status, body = post(srv.url + "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 24,
                                                          "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": text}
    stopped = ids[-1] in local.tokenizer.eos_ids
    assert choice["finish_reason"] == ("stop" if stopped else "length") and (stopped or len(ids) == 24)
    prompt_len = len(local.tokenizer.apply_chat_template(messages))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(ids),
                             "total_tokens": prompt_len + len(ids)}


def test_stop_strings_cut_the_text_like_openai(local, start_server):
    srv = start_server()
    messages = chat(QUESTIONS[1])
    full = local.complete([ChatRequest(messages, max_tokens=30)])[0][0]
    k = next(i for i in range(4, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    stop = full[k:k + 2]
    expected = full[:k]
    r = ChatRequest(messages, max_tokens=30, stop=(stop, "\x00never"))
    assert local.complete([r]) == [[expected]]
    assert client(srv).complete([r]) == [[expected]]
    status, body = post(srv.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 30, "temperature": 0,
                                                          "stop": stop})
    assert status == 200 and body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"


def test_n_completions_and_per_request_seed(start_server):
    srv = start_server()
    url = srv.url + "/v1/chat/completions"
    base = {"messages": chat(QUESTIONS[2]), "max_tokens": 10, "temperature": 1.0, "n": 5}
    s1, a = post(url, {**base, "seed": 11})
    _, b = post(url, {**base, "seed": 11})
    _, c = post(url, {**base, "seed": 12})
    texts = lambda body: [ch["message"]["content"] for ch in body["choices"]]  # noqa: E731
    assert s1 == 200 and [ch["index"] for ch in a["choices"]] == [0, 1, 2, 3, 4]
    assert texts(a) == texts(b) and texts(a) != texts(c) and len(set(texts(a))) > 1
    # usage counts the prompt once and every choice's tokens (5 choices of 1..10 tokens)
    assert 5 <= a["usage"]["completion_tokens"] <= 50
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    out = client(srv).complete([ChatRequest(chat(QUESTIONS[2]), n=3, temperature=0, max_tokens=8),
                                ChatRequest(chat(QUESTIONS[2]), n=4, temperature=1.0, max_tokens=8)])
    assert len(out[0]) == 3 and len(set(out[0])) == 1 and len(out[1]) == 4


def test_concurrent_http_requests_are_batched_and_correct(local, start_server):
    srv = start_server()
    reqs = [ChatRequest(chat(q), max_tokens=16) for q in QUESTIONS * 2]
    assert client(srv, concurrency=8).complete(reqs) == local.complete(reqs)
    assert srv.stats.chat_requests == len(reqs) and srv.stats.model_calls <= len(reqs)


def test_retries_on_500_and_429_then_success(local, start_server, caplog):
    srv = start_server(fail_plan="500*2,429")
    r = ChatRequest(chat(QUESTIONS[0]), max_tokens=12)
    backend = client(srv, max_retries=3)
    with caplog.at_level("WARNING", logger="minihuatuo.http_client"):
        assert backend.complete([r]) == local.complete([r])
    assert srv.stats.chat_requests == 4 and srv.stats.failures_injected == 3
    assert backend.stats.retries == 3 and backend.stats.sent == 4
    assert "HTTP 500" in caplog.text and "HTTP 429" in caplog.text and "injected failure" in caplog.text


def test_retry_after_is_honoured_and_dropped_connections_are_retried(start_server):
    srv = start_server(fail_plan="429", retry_after=0.6)
    r = ChatRequest(chat(QUESTIONS[0]), max_tokens=4)
    t0 = time.perf_counter()
    client(srv, backoff_s=0.001).complete([r])
    assert time.perf_counter() - t0 >= 0.6  # our own backoff would have waited ~1 ms
    srv2 = start_server(fail_plan="drop")
    backend = client(srv2)
    assert len(backend.complete([r])[0]) == 1 and backend.stats.retries == 1 and srv2.stats.chat_requests == 2


def test_exhausted_retries_and_client_errors_are_clear(start_server, local):
    srv = start_server(fail_plan="503*3")
    with pytest.raises(BackendError) as e:
        client(srv, max_retries=2).complete([ChatRequest(chat("q"), max_tokens=4)])
    assert e.value.status == 503 and srv.stats.chat_requests == 3
    assert "HTTP 503" in str(e.value) and "injected failure 503" in str(e.value) and "after 3 attempts" in str(e.value)
    assert srv.url in str(e.value)
    # a 4xx is not retried: the server's message, naming the field, comes back at once
    too_long = ChatRequest(chat("q"), max_tokens=local.context_length)
    with pytest.raises(BackendError, match=r"HTTP 400: max_tokens: .*exceeds the model's context") as e:
        client(srv).complete([too_long])
    assert e.value.status == 400 and srv.stats.chat_requests == 4
    # nothing listening: connection errors are retried, then reported
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "tiny", api_key_env=None, max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendError, match="connection error.*after 2 attempts"):
        dead.complete([ChatRequest(chat("q"), max_tokens=4)])


def test_cache_hit_on_rerun_costs_no_request(start_server, tmp_path):
    srv = start_server()
    reqs = [ChatRequest(chat(q), n=2, temperature=1.0, max_tokens=8) for q in QUESTIONS[:3]]
    first = client(srv, cache_dir=tmp_path / "cache").complete(reqs)
    assert srv.stats.chat_requests == 3
    rerun = client(srv, cache_dir=tmp_path / "cache")
    assert rerun.complete(reqs) == first  # sampled completions come back identical: from the cache
    assert srv.stats.chat_requests == 3 and rerun.stats.cache_hits == 3 and rerun.stats.sent == 0
    rerun.complete([ChatRequest(chat(QUESTIONS[0]), n=2, temperature=1.0, max_tokens=9)])  # another request
    assert srv.stats.chat_requests == 4
    files = sorted((tmp_path / "cache").rglob("*"))
    entries = [f for f in files if f.is_file()]
    assert len(entries) == 4 and not [f for f in entries if f.name.startswith(".tmp-")]
    entry = json.loads(entries[0].read_text())
    assert set(entry) == {"request", "completions", "created"} and len(entry["completions"]) == 2
    # a corrupt entry is ignored and rewritten, not trusted
    path = tmp_path / "cache" / (k := cache_key(rerun.base_url, "tiny", reqs[0]))[:2] / f"{k}.json"
    path.write_text("{truncated")
    assert len(rerun.complete(reqs[:1])[0]) == 2 and srv.stats.chat_requests == 5
    assert json.loads(path.read_text())["completions"]


def test_concurrency_bound_is_respected_across_threads(start_server):
    srv = start_server(delay_s=0.25)
    backend = client(srv, concurrency=2)
    reqs = [ChatRequest(chat(q), max_tokens=2) for q in QUESTIONS[:3]]
    threads = [threading.Thread(target=backend.complete, args=(reqs,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert srv.stats.chat_requests == 6
    assert srv.stats.max_in_flight == 2  # never more than the bound, and the bound was used


def test_api_key_is_sent_but_never_stored_logged_or_raised(start_server, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("MINIHUATUO_TEST_KEY", SECRET)
    srv = start_server(api_key_env="MINIHUATUO_TEST_KEY", fail_plan="500")
    backend = client(srv, api_key_env="MINIHUATUO_TEST_KEY", cache_dir=tmp_path / "cache")
    caplog.set_level("DEBUG")
    r = ChatRequest(chat(QUESTIONS[0]), max_tokens=6)
    out = backend.complete([r])  # the server requires the key: success proves it was sent
    assert out and srv.stats.authorization_headers == 2  # the failed attempt and the retry
    texts = [repr(backend), repr(vars(backend).keys()), str(vars(srv.stats)), pickle.dumps(backend.stats).hex()]
    with pytest.raises(BackendError) as e:  # a client error carries the server's message, not the key
        backend.complete([ChatRequest(chat("q"), max_tokens=10_000)])
    texts += [str(e.value), repr(e.value), "".join(traceback.format_exception(e.value))]
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-" + SECRET[::-1])
    with pytest.raises(BackendError, match="HTTP 401") as e:
        client(srv, api_key_env="WRONG_KEY").complete([r])
    texts += [str(e.value), "".join(traceback.format_exception(e.value))]
    with pytest.raises(BackendError, match="environment variable UNSET_KEY_VAR is not set") as e:
        client(srv, api_key_env="UNSET_KEY_VAR").complete([r])
    texts += [str(e.value)]
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    texts += [f.read_text() for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert texts[-1]  # the cache entry exists and was read
    for text in texts:
        assert SECRET not in text and SECRET[::-1] not in text
    assert not any("Bearer sk" in t for t in texts)  # no header value anywhere


def test_server_rejects_bad_requests_naming_the_field(start_server):
    srv = start_server()
    url = srv.url + "/v1/chat/completions"
    ok = {"messages": chat("q"), "max_tokens": 2}
    for change, param in [({"messages": []}, "messages"), ({"messages": [{"role": "doctor", "content": "x"}]},
                                                             "messages[0].role"),
                          ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                          ({"n": 0}, "n"), ({"n": True}, "n"), ({"temperature": "hot"}, "temperature"),
                          ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
                          ({"seed": 10**30}, "seed"), ({"seed": -1}, "seed"),
                          ({"stream": "yes"}, "stream"), ({"top_p": 0}, "top_p")]:
        status, body = post(url, {**ok, **change})
        assert status == 400 and body["error"]["param"] == param, (change, body)
        assert body["error"]["message"].startswith(param)
    assert post(url, None, raw=b"{not json")[0] == 400
    assert post(url, None, raw=b"[1, 2]")[0] == 400
    assert post(srv.url + "/v1/embeddings", ok)[0] == 404
    assert srv.stats.model_calls == 0  # nothing bad reached the model
    with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
    assert post(url, {**ok, "extra_field": 1, "user": "u"})[0] == 200  # unknown fields are ignored


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_answers_over_http(ckpt, local, stop):
    """`minihuatuo serve --port 0` as a user runs it: prints its URL, answers, stops on Ctrl-C (SIGINT)
    or SIGTERM. It is started with SIGINT ignored, as a background job of a non-interactive shell
    inherits it: Ctrl-C must stop it all the same."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minihuatuo", "serve", "--model", str(ckpt), "--port", "0",
                             "--served-model-name", "tiny-cli", "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline, url = time.time() + 60, None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line, f"serve exited early: rc={proc.poll()}"
            if " at http://" in line:
                url = line.split(" at ")[1].split()[0]
        assert url and url.endswith("/v1")
        r = ChatRequest(chat(QUESTIONS[3]), max_tokens=12)
        assert OpenAIBackend(url, "tiny-cli", api_key_env=None).complete([r]) == local.complete([r])
    finally:
        proc.send_signal(stop)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out = proc.stdout.read()
        proc.stderr.close()
        proc.stdout.close()
    assert rc == 0 and out == ""  # only results go to stdout, and a server has none


def test_bad_configuration_is_refused():
    for url in ("ftp://h/v1", "127.0.0.1:8000", "http://user:pw@h/v1"):
        with pytest.raises(ValueError, match="base_url"):
            OpenAIBackend(url, "m")
    with pytest.raises(ValueError, match=r"requests\[0\]\.n"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m").complete([ChatRequest(chat("q"), n=0)])


def test_a_client_that_leaves_mid_generation_costs_one_log_line(start_server, capfd, caplog):
    """A client that disconnects while its completion is generated: the server logs one line (no
    BrokenPipeError traceback) and keeps serving."""
    import socket

    srv = start_server(delay_s=0.3)
    host, port = srv.server_address[:2]
    body = json.dumps({"messages": chat("q"), "max_tokens": 4}).encode()
    with caplog.at_level("INFO", logger="minihuatuo.services.serve"):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(1.0)  # the server finishes the completion and writes to a reset socket
        status, _ = post(srv.url + "/v1/chat/completions", {"messages": chat("q"), "max_tokens": 2})
    assert status == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err
