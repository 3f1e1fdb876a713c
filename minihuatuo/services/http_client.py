"""An OpenAI-compatible /v1/chat/completions client behind the Backend interface, standard library only.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", "my-model", cache_dir="runs/llm-cache")
    backend.complete([ChatRequest([{"role": "user", "content": "..."}], n=4, temperature=0.7)])

It talks to OpenAI itself, vLLM, sglang or `minihuatuo serve`. What it adds to a bare POST:

- the API key is read from an environment variable at each request (never stored on the object,
  so it cannot leak through repr, pickling, logs, the cache or exceptions); no key, no header;
- timeouts; retries with exponential backoff and jitter on 408, 429, 5xx and connection errors,
  honouring Retry-After; other 4xx fail at once (a retry cannot fix a bad request);
- at most `concurrency` requests in flight per backend object, across all threads using it;
- an on-disk cache keyed by a hash of (base_url, model, messages, n, temperature, max_tokens, stop),
  written atomically (temp file + rename), so an interrupted run resumes and a rerun costs nothing;
- redirects are refused, so the Authorization header never travels to another host.

Hazard: with the cache on, sampled completions (temperature > 0) are cached too. A rerun reproduces
the same samples, and asking the identical request twice returns the same samples; to draw fresh
ones, change the request (e.g. n) or use another cache directory.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from minihuatuo.services.backends import ChatRequest, check_request, stop_strings

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # and any other 5xx
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class BackendError(RuntimeError):
    """A request that failed for good: the URL, the HTTP status and the server's own message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class HTTPStats:
    """Counters of one backend object (reported by callers in their run summaries)."""

    sent: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a 301/302/303 of a POST as a GET to wherever the Location points, and
    # would carry our headers along. An API endpoint has no business redirecting: fail instead.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused (check base_url)",
                                     headers, fp)


def cache_key(base_url: str, model: str, r: ChatRequest) -> str:
    """sha256 of the canonical JSON of everything that decides the completions, and nothing else
    (no API key, no timeout). Numbers are normalised so that temperature 0 and 0.0 share a key."""
    payload = {"base_url": base_url, "model": model, "messages": [dict(m) for m in r.messages], "n": int(r.n),
               "temperature": float(r.temperature), "max_tokens": int(r.max_tokens),
               "stop": list(stop_strings(r.stop))}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _server_message(raw: bytes) -> str:
    """The error message of an OpenAI-shaped error body ({"error": {"message": ...}}), else the text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else body
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except ValueError:
        pass
    return text[:500] or "(empty body)"


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, concurrency: int = 8,
                 cache_dir: str | os.PathLike | None = None, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        """
        base_url: up to and including /v1, as for the OpenAI SDK ("https://api.openai.com/v1",
            "http://127.0.0.1:8000/v1"); requests go to {base_url}/chat/completions.
        api_key_env: name of the environment variable holding the key (None or unset: send no key).
        timeout: seconds for one HTTP attempt (connect + response).
        max_retries: retries after the first attempt; delays backoff_s * 2^k (+-50% jitter, at most
            max_backoff_s), or the server's Retry-After when it sends one (also capped).
        concurrency: requests in flight at once, at most, across all threads using this object.
        cache_dir: directory of the response cache; None = no cache.
        """
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url: expected http(s)://host[:port]/v1, got {base_url!r}")
        if parts.username or parts.password:
            raise ValueError("base_url: must not hold credentials; put the key in the environment variable "
                             "named by api_key_env")
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0 (got {concurrency}, {max_retries})")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = self.base_url + "/chat/completions"
        self.api_key_env, self.timeout, self.max_retries = api_key_env, timeout, max_retries
        self.concurrency, self.backoff_s, self.max_backoff_s = concurrency, backoff_s, max_backoff_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats = HTTPStats()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        handlers = [_NoRedirect()]
        if parts.hostname in LOOPBACK:  # a proxy from the environment must never see a local server's traffic
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------ Backend interface
    def complete(self, requests: list[ChatRequest]) -> list[list[str]]:
        for i, r in enumerate(requests):
            check_request(r, f"requests[{i}]")
        if not requests:
            return []
        results: list[list[str] | None] = [None] * len(requests)
        # The pool may be larger than the semaphore allows when several threads share this object:
        # the semaphore, not the pool, is the bound.
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="http")
        try:
            futures = [pool.submit(self._complete_one, r) for r in requests]
            for i, f in enumerate(futures):
                results[i] = f.result()  # the first failure raises; finished requests are cached already
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ one request
    def _complete_one(self, r: ChatRequest) -> list[str]:
        key = cache_key(self.base_url, self.model, r)
        if self.cache_dir is not None:
            hit = self._cache_read(key, r.n)
            if hit is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                return hit
        body = {"model": self.model, "messages": [dict(m) for m in r.messages], "n": r.n,
                "temperature": float(r.temperature), "max_tokens": r.max_tokens}
        if stop_strings(r.stop):
            body["stop"] = list(stop_strings(r.stop))
        completions = self._post_with_retries(json.dumps(body).encode("utf-8"), r.n)
        if self.cache_dir is not None:
            self._cache_write(key, r, completions)
        return completions

    def _post_with_retries(self, data: bytes, n: int) -> list[str]:
        for attempt in range(self.max_retries + 1):
            try:
                with self._slots:  # the concurrency bound; backoff sleeps happen outside it
                    raw = self._post(data)
                return self._parse(raw, n)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise BackendError(f"POST {self.url}: {e} (gave up after {attempt + 1} attempts)",
                                       e.status) from None
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.5))
                if e.retry_after is not None:
                    delay = min(self.max_backoff_s, e.retry_after)
                log.warning("POST %s: %s; retry %d/%d in %.2f s", self.url, e, attempt + 1, self.max_retries, delay)
                with self._lock:
                    self.stats.retries += 1
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, data: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              "User-Agent": "minihuatuo"})
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            req.add_unredirected_header("Authorization", f"Bearer {key}")
        with self._lock:
            self.stats.sent += 1
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            status, retry_after = e.code, _retry_after(e.headers)
            try:
                message = _server_message(e.read() if e.fp is not None else b"")
            except (OSError, http.client.HTTPException):
                message = str(e.reason)
            finally:
                e.close()
            if key:  # a server that echoes the request must not make us print the key
                message = message.replace(key, "<redacted>")
            if status in RETRY_STATUSES or status >= 500:
                raise _Retryable(f"HTTP {status}: {message}", status, retry_after) from None
            hint = ""
            if status in (401, 403) and not key:
                hint = f" (no API key sent: environment variable {self.api_key_env} is not set)"
            raise BackendError(f"POST {self.url}: HTTP {status}: {message}{hint}", status) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # refused / reset / closed connections and timeouts: transient as far as we can tell
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise _Retryable(f"connection error: {type(reason).__name__}: {reason}") from None

    def _parse(self, raw: bytes, n: int) -> list[str]:
        try:
            body = json.loads(raw)
            choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # a truncated or garbled 200 is treated like a dropped connection
            raise _Retryable(f"malformed response ({type(e).__name__}: {e}): {raw[:200]!r}") from None
        if len(texts) != n:
            raise BackendError(f"POST {self.url}: asked for n={n} completions, the server returned {len(texts)} "
                               f"(does it support n > 1?)")
        if any(t is None for t in texts):
            log.warning("POST %s: a choice had no text content (refusal or tool call); using ''", self.url)
        return ["" if t is None else str(t) for t in texts]

    # ------------------------------------------------------------------ cache
    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"  # 256 subdirectories keep directories small

    def _cache_read(self, key: str, n: int) -> list[str] | None:
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            completions = entry["completions"]
            if len(completions) == n and all(isinstance(c, str) for c in completions):
                return completions
            raise ValueError(f"expected {n} completions")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable cache entry %s (%s); asking the server again", path, e)
            return None

    def _cache_write(self, key: str, r: ChatRequest, completions: list[str]) -> None:
        # The request is stored for auditing (which prompt produced this?); it holds no key or header.
        entry = {"request": {"base_url": self.base_url, "model": self.model, "messages": [dict(m) for m in r.messages],
                             "n": r.n, "temperature": float(r.temperature), "max_tokens": r.max_tokens,
                             "stop": list(stop_strings(r.stop))},
                 "completions": completions, "created": int(time.time())}
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # temp file in the same directory + rename: readers see the whole entry or none of it
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
