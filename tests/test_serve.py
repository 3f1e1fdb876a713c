"""`minihuatuo serve` as an OpenAI-compatible server: /v1/completions, streaming, top_p, stop, n,
logprobs, usage, error bodies, a client that leaves mid-stream.

No mocks: a real ChatServer on 127.0.0.1 (ephemeral port) over a tiny checkpoint, spoken to with
http.client and raw sockets; expected values come from the model and the sampler called directly."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from conftest import write_plain_tokenizer

from minihuatuo.engine import sample
from minihuatuo.services.backends import LocalBackend
from minihuatuo.services.serve import ChatServer
from minihuatuo.services.serve_model import returned_pieces

PROMPT = "The patient presents with fever and cough."
MESSAGES = [{"role": "user", "content": "Chest pain, raised troponin. What next?"}]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model, preset

    tmp = tmp_path_factory.mktemp("serve")
    tok_dir = write_plain_tokenizer(tmp / "tok")
    model = build_model(preset("tiny", vocab_size=320), seed=0)
    with torch.no_grad():  # larger weights: the greedy text depends on the prompt (as in conftest)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return LocalBackend.from_dir(save_model(model, tmp / "ckpt", copy_files_from=tok_dir), batch_size=4)


def start(local, **kwargs) -> ChatServer:
    srv = ChatServer(local, "127.0.0.1", 0, "tiny", **kwargs)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def srv(local):
    s = start(local)
    yield s
    s.shutdown()
    s.server_close()


def request(srv, path, body, method="POST", headers=None):
    """(status, headers, raw body) of one request over a fresh http.client connection."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(srv, path, body, **kw):
    status, _, raw = request(srv, path, body, **kw)
    return status, json.loads(raw)


def events(raw: bytes) -> list:
    """The server-sent events of a whole stream: each `data: ...` and a blank line; [DONE] last."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        out.append(block[6:] if block == "data: [DONE]" else json.loads(block[6:]))
    return out


def greedy(local, prompt_ids, max_new_tokens, stops=()):
    """The sampler called directly: (text, sampled ids)."""
    tok = local.tokenizer
    cfg = sample.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=tuple(tok.eos_ids),
                                stop_strings=tuple(stops))
    ids = sample.generate(local.model, [prompt_ids], cfg, pad_id=tok.pad_id, decode=tok.decode).responses()[0]
    return tok.decode(ids, skip_special_tokens=True), ids


# ----------------------------------------------------------------------------- /v1/completions
def test_completions_plain_prompt_usage_and_list_prompts(srv, local):
    tok = local.tokenizer
    ids = tok.encode(PROMPT)  # the prompt as is: no chat template
    text, out = greedy(local, ids, 10)
    status, body = post(srv, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 10,
                                                 "temperature": 0})
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {"text": text, "index": 0, "logprobs": None,
                      "finish_reason": "stop" if out[-1] in tok.eos_ids else "length"}
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out),
                             "total_tokens": len(ids) + len(out)}
    # a list of prompts x n: choice k*n + j is sample j of prompt k; each prompt counted once
    other = "Which drug in pregnancy?"
    status, body = post(srv, "/v1/completions", {"prompt": [PROMPT, other], "n": 2, "max_tokens": 6,
                                                 "temperature": 0})
    t2, o2 = greedy(local, tok.encode(other), 6)
    t1, o1 = greedy(local, ids, 6)
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [t1, t1, t2, t2]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(tok.encode(other))
    assert body["usage"]["completion_tokens"] == 2 * len(o1) + 2 * len(o2)
    # token ids are a prompt too (OpenAI accepts them)
    assert post(srv, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0})[1]["choices"][0]["text"] == t1


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_stream_equals_the_whole_answer(srv, endpoint, temperature):
    """The deltas of a stream, concatenated, are the non-streamed text (greedy; and sampled with the
    same seed); the stream ends with a finish_reason chunk, the usage chunk when asked, then [DONE]."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    base = {"messages": MESSAGES} if endpoint == "chat" else {"prompt": PROMPT}
    base.update(max_tokens=12, temperature=temperature, seed=7, n=2)
    _, whole = post(srv, path, base)
    status, headers, raw = request(srv, path, {**base, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    ev = events(raw)
    assert ev[-1] == "[DONE]" and ev[-2]["choices"] == [] and ev[-2]["usage"] == whole["usage"]
    chunks = ev[:-2]
    kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    assert {c["object"] for c in chunks} == {kind} and len({c["id"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks)  # include_usage: null on every other chunk (OpenAI)
    for k, expected in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        if endpoint == "chat":
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            text = "".join(m["delta"].get("content", "") for m in mine)
            assert text == expected["message"]["content"]
        else:
            text = "".join(m["text"] for m in mine)
            assert text == expected["text"]
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + [expected["finish_reason"]]
        assert len(mine) >= 3  # several pieces, not one blob
    # without stream_options there is no usage chunk and no usage key
    ev = events(request(srv, path, {**base, "stream": True})[2])
    assert ev[-1] == "[DONE]" and all("usage" not in c for c in ev[:-1]) and ev[-2]["choices"]


# ----------------------------------------------------------------------------- sampling fields
def test_top_p_per_request(srv, local):
    """A nucleus smaller than the top token's mass keeps that token only: sampling at any temperature
    and seed gives the greedy text. With top_p = 1 the seeds differ."""
    text, _ = greedy(local, local.tokenizer.encode(PROMPT), 10)
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.5}
    for seed in (1, 2, 3):
        assert post(srv, "/v1/completions", {**body, "top_p": 1e-6, "seed": seed})[1]["choices"][0]["text"] == text
    sampled = {post(srv, "/v1/completions", {**body, "top_p": 1, "seed": s})[1]["choices"][0]["text"] for s in (1, 2, 3)}
    assert len(sampled) > 1


def test_stop_strings_cut_the_text_and_the_stream(srv, local):
    full, _ = greedy(local, local.tokenizer.encode(PROMPT), 30)
    k = next(i for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    stop = full[k:k + 2]
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": ["\x00never", stop]}
    status, whole = post(srv, "/v1/completions", body)
    assert status == 200 and whole["choices"][0]["text"] == full[:k]
    assert whole["choices"][0]["finish_reason"] == "stop"
    ev = events(request(srv, "/v1/completions", {**body, "stream": True})[2])
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == full[:k]
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"
    assert post(srv, "/v1/completions", {**body, "stop": stop})[1]["choices"][0]["text"] == full[:k]  # a bare string


def test_n_choices_are_seeded_reproducibly(srv):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "n": 2}
    texts = lambda seed: [c["text"] for c in post(srv, "/v1/completions", {**body, "seed": seed})[1]["choices"]]  # noqa: E731
    a, b, c = texts(11), texts(11), texts(12)
    assert len(a) == 2 and a == b and a != c and a[0] != a[1]


def test_logprobs_are_the_models_log_softmax(srv, local):
    """Each returned token's logprob and its top alternatives equal log_softmax of the model's logits
    at that position (computed here with the model), on both endpoints."""
    tok, k = local.tokenizer, 3
    for path, body, prompt_ids in [
            ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": k},
             tok.apply_chat_template(MESSAGES)),
            ("/v1/completions", {"prompt": PROMPT, "logprobs": k}, tok.encode(PROMPT))]:
        status, resp = post(srv, path, {**body, "max_tokens": 10, "temperature": 0})
        assert status == 200
        choice = resp["choices"][0]
        text, ids = greedy(local, prompt_ids, 10)
        with torch.no_grad():
            logp = torch.log_softmax(local.model(torch.tensor([prompt_ids + ids]))[0].float(), -1)
        spell = lambda i: tok.decode([i], skip_special_tokens=False)  # noqa: E731
        # the returned tokens: those that make up the text (not the stop token)
        pieces = returned_pieces(tok.decode, ids[:-1] if ids[-1] in tok.eos_ids else ids, text)
        if path == "/v1/chat/completions":
            got = [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                   for e in choice["logprobs"]["content"]]
        else:
            lp = choice["logprobs"]
            got = [(t, v, top) for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]
            assert lp["text_offset"] == [sum(len(p) for p in pieces[:j]) for j in range(len(pieces))]
        assert len(got) == len(pieces) >= 5
        for j, (token, value, top) in enumerate(got):
            row = logp[len(prompt_ids) - 1 + j]
            assert token == spell(ids[j]) and abs(value - row[ids[j]].item()) < 1e-4
            best = torch.topk(row, k)
            expected = [(spell(i), v) for i, v in zip(best.indices.tolist(), best.values.tolist())]
            if isinstance(top, dict):  # completions: {token: logprob}, the more likely of equal spellings, + sampled
                want = {}
                for t, v in expected + [(token, value)]:
                    want.setdefault(t, v)
                expected, top = sorted(want.items()), sorted(top.items())
            assert [t for t, _ in top] == [t for t, _ in expected]
            assert max(abs(v - w) for (_, v), (_, w) in zip(top, expected)) < 1e-4
    # streamed, the logprobs ride with their deltas and add up to the same list
    _, whole = post(srv, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "max_tokens": 10,
                                                  "temperature": 0})
    ev = events(request(srv, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "max_tokens": 10,
                                                      "temperature": 0, "stream": True})[2])
    streamed = [e for c in ev[:-1] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]


# ----------------------------------------------------------------------------- errors
def test_bad_requests_get_openai_error_bodies(local, monkeypatch):
    monkeypatch.setenv("MINIHUATUO_SERVE_TEST_KEY", "k-123")
    srv = start(local, api_key_env="MINIHUATUO_SERVE_TEST_KEY")
    auth = {"Authorization": "Bearer k-123"}
    try:
        chat = {"messages": MESSAGES, "max_tokens": 2}
        text = {"prompt": PROMPT, "max_tokens": 2}
        cases = [("/v1/chat/completions", chat, {"top_p": 0}, "top_p"),
                 ("/v1/chat/completions", chat, {"top_p": 1.5}, "top_p"),
                 ("/v1/chat/completions", chat, {"stream": "yes"}, "stream"),
                 ("/v1/chat/completions", chat, {"stream_options": {"include_usage": True}}, "stream_options"),
                 ("/v1/chat/completions", chat, {"logprobs": 3}, "logprobs"),
                 ("/v1/chat/completions", chat, {"top_logprobs": 2}, "top_logprobs"),
                 ("/v1/chat/completions", chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                 ("/v1/chat/completions", chat, {"frequency_penalty": 0.5}, "frequency_penalty"),
                 ("/v1/chat/completions", chat, {"n": 0}, "n"),
                 ("/v1/completions", text, {"prompt": None}, "prompt"),
                 ("/v1/completions", text, {"prompt": [1, "a"]}, "prompt"),
                 ("/v1/completions", text, {"prompt": [PROMPT, 3]}, "prompt"),
                 ("/v1/completions", text, {"logprobs": True}, "logprobs"),
                 ("/v1/completions", text, {"logprobs": -1}, "logprobs"),
                 ("/v1/completions", text, {"echo": True}, "echo"),
                 ("/v1/completions", text, {"best_of": 3}, "best_of"),
                 ("/v1/completions", text, {"stop": ""}, "stop"),
                 ("/v1/completions", text, {"max_tokens": 10**6}, "max_tokens"),
                 ("/v1/completions", text, {"prompt": [10**6]}, "prompt"),
                 ("/v1/completions", text, {"temperature": 3}, "temperature")]
        for path, ok, change, param in cases:
            status, body = post(srv, path, {**ok, **change}, headers=auth)
            assert status == 400, (change, body)
            err = body["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["param"] == param and err["message"].startswith(param) and err["code"] == 400, (change, err)
        status, body = post(srv, "/v1/embeddings", text, headers=auth)
        assert status == 404 and body["error"]["type"] == "not_found_error"
        status, body = post(srv, "/v1/completions", text)  # no key
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert srv.stats.model_calls == 0  # nothing bad reached the model
        assert post(srv, "/v1/completions", text, headers=auth)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- a client that leaves
def test_a_client_leaving_mid_stream_costs_one_log_line(local, caplog, capfd):
    srv = start(local, chunk_delay_s=0.1)  # so the client is gone while events are still to be written
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}).encode()
        with caplog.at_level("INFO", logger="minihuatuo.services.serve"):
            with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                got = b""
                while b"data: " not in got:
                    got += sock.recv(4096)
                # close with a reset (linger 0): the server's next write fails at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            deadline = time.time() + 10
            while srv.stats.disconnects == 0 and time.time() < deadline:
                time.sleep(0.05)
            status, after = post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200 and after["choices"][0]["text"] is not None  # still serving
        assert srv.stats.disconnects == 1 and srv.stats.streams == 1
        lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
        assert len(lines) == 1 and "stream" in lines[0]
        err = capfd.readouterr().err
        assert "Traceback" not in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err
    finally:
        srv.shutdown()
        srv.server_close()
