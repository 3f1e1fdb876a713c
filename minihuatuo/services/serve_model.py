"""`minihuatuo serve`, the model side: one worker thread owns the model and runs queued requests in batches.

Each HTTP request thread submits a `Job` (a validated request and its tokenized prompts) and waits.
The worker takes every job waiting in the queue (up to max_batch) and runs their rows (prompts x n)
through `sample.generate`, grouped by sampling settings (temperature, top_p, max_tokens, stop) and cut
into chunks of `backend.batch_size` rows, exactly as `LocalBackend.complete_detailed` does, so
concurrent clients share a batch and greedy results equal the local backend's. A job that carries a
`seed` runs alone, so that its output depends on its seed only, never on its neighbours.

Each row becomes a `Choice`: the text (stop token dropped, cut before the first stop string), the
finish reason, the sampled token count, and per returned token its piece of the text and, when
asked, its log-prob with the top alternatives.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from minihuatuo.services.backends import ChatRequest, LocalBackend, cut_at_stop
from minihuatuo.services.serve_requests import GenerationRequest


@dataclass
class TokenLogprob:
    token: str  # the token's own text (special tokens spelled out)
    logprob: float  # log_softmax(logits) of the model at this position: no temperature, no top-p
    top: list[tuple[str, float]] = field(default_factory=list)  # the k most likely tokens, best first


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    completion_tokens: int  # every sampled token, the stop token included (usage)
    pieces: list[str]  # per returned token, its part of `text`; "".join(pieces) == text
    logprobs: list[TokenLogprob] | None = None  # per returned token, when the request asked


def text_offsets(decode, ids: list[int], text: str) -> list[int]:
    """ends[k]: how many characters of `text` the tokens ids[:k+1] produce (non-decreasing; the last
    is len(text)). Decoded incrementally over a short window (the previous token and the new ones),
    not from the start each time: a token that ends inside a multi-byte character decodes to U+FFFD
    and its text waits for the token that completes it. `text` may be shorter than the decoded
    tokens (cut at a stop string): what lies beyond it belongs to no token."""
    ends, end, prefix, read = [], 0, 0, 0
    for k in range(len(ids)):
        before, after = decode(ids[prefix:read]), decode(ids[prefix:k + 1])
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            same = 0
            while same < len(new) and end + same < len(text) and new[same] == text[end + same]:
                same += 1
            end += same
            prefix, read = read, k + 1
        ends.append(end)
    if ends:  # whatever a tokenizer's decoder did that the window could not see goes to the last token
        ends[-1] = len(text)
    return ends


def returned_pieces(decode, ids: list[int], text: str) -> list[str]:
    """The text of each token that contributes to `text`: up to the first token at which the whole
    text is out. The stop token (decoded to nothing) and tokens past a stop string are not returned,
    as OpenAI returns neither in the text nor in the logprobs."""
    if not text:
        return []
    ends = text_offsets(decode, ids, text)
    count = next(k for k, e in enumerate(ends) if e == len(text)) + 1
    return [text[(ends[k - 1] if k else 0):ends[k]] for k in range(count)]


@torch.no_grad()
def token_logprobs(model, tokenizer, prompt: list[int], ids: list[int], k: int) -> list[TokenLogprob]:
    """log_softmax of the model's logits at each position of `ids` after `prompt`, teacher-forced in
    one forward pass (the sampler returns only the sampled token's temperature-scaled log-prob, and
    no alternatives). Like vLLM's default, these are the model's raw log-probs: temperature and top-p
    do not enter."""
    if not ids:
        return []
    device = model.model.embed_tokens.weight.device
    x = torch.tensor([prompt + ids[:-1]], dtype=torch.long, device=device)
    logp = torch.log_softmax(model(x)[0, len(prompt) - 1:].float(), dim=-1)  # (len(ids), V)
    chosen = logp.gather(-1, torch.tensor(ids, device=device)[:, None]).squeeze(-1).tolist()
    top_v, top_i = torch.topk(logp, k, dim=-1) if k else (None, None)

    def spell(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    return [TokenLogprob(spell(t), lp, [(spell(i), v) for i, v in zip(top_i[j].tolist(), top_v[j].tolist())]
                         if k else []) for j, (t, lp) in enumerate(zip(ids, chosen))]


class Job:
    def __init__(self, request: GenerationRequest, prompts: list[list[int]]):
        self.request, self.prompts = request, prompts
        self.done = threading.Event()
        self.result: list[Choice] | None = None
        self.error: BaseException | None = None


def has_model(backend) -> bool:
    """A backend with our model and tokenizer (LocalBackend): every feature of the server. Any other
    object with `prompt_ids` and `complete_detailed` (a scripted teacher in tests) serves chat only:
    no plain-text prompts, no per-request top_p, no logprobs, and a stream of one delta."""
    return hasattr(backend, "model") and hasattr(backend, "tokenizer")


def run_jobs(backend: LocalBackend, jobs: list[Job], seed: int | None) -> None:
    """Generate every choice of `jobs` in batched sampler calls; fill each job's result."""
    from minihuatuo.engine.sample import SamplingConfig, generate

    if not has_model(backend):
        results = backend.complete_detailed([ChatRequest(j.request.messages, n=j.request.n,
                                                         temperature=j.request.temperature,
                                                         max_tokens=j.request.max_tokens, stop=j.request.stop)
                                             for j in jobs], seed=seed)
        for j, completions in zip(jobs, results):
            j.result = [Choice(c.text, c.finish_reason, c.completion_tokens, [c.text] if c.text else [])
                        for c in completions]
        return

    tok = backend.tokenizer
    # (temperature, top_p, max_tokens, stop) -> rows (job, prompt index, sample index); first-seen order
    groups: dict[tuple, list[tuple[Job, int, int]]] = {}
    for job in jobs:
        r = job.request
        key = (r.temperature, backend.top_p if r.top_p is None else r.top_p, r.max_tokens, r.stop)
        groups.setdefault(key, []).extend((job, p, j) for p in range(len(job.prompts)) for j in range(r.n))
        job.result = [None] * (len(job.prompts) * r.n)
    chunk = 0
    for (temperature, top_p, max_tokens, stops), rows in groups.items():
        rows.sort(key=lambda row: len(row[0].prompts[row[1]]))  # stable: a prompt's n rows stay together
        for start in range(0, len(rows), backend.batch_size):
            part = rows[start:start + backend.batch_size]
            cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=backend.top_k,
                                 top_p=top_p, stop_token_ids=tuple(tok.eos_ids), stop_strings=stops,
                                 seed=backend._chunk_seed(seed, chunk))  # LocalBackend's seed stream, shared
            gen = generate(backend.model, [job.prompts[p] for job, p, _ in part], cfg, pad_id=tok.pad_id,
                           decode=tok.decode)
            for (job, p, j), ids, reason in zip(part, gen.responses(), gen.finish_reasons):
                # skip_special_tokens drops the stop token (eos) from the text, as OpenAI servers do
                text, cut = cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops)
                # the stop token is sampled and counted in usage, but it is not part of the text
                pieces = returned_pieces(tok.decode, ids[:-1] if reason == "stop_token" else ids, text)
                logprobs = None
                if job.request.logprobs:
                    logprobs = token_logprobs(backend.model, tok, job.prompts[p], ids[:len(pieces)],
                                              job.request.top_logprobs)
                finish = "length" if reason == "length" and not cut else "stop"
                job.result[p * job.request.n + j] = Choice(text, finish, len(ids), pieces, logprobs)
            chunk += 1


class Batcher:
    """The worker thread that owns the model (see the module docstring). `on_call(batch_size)` is
    called before each batched model call (the server's statistics)."""

    def __init__(self, backend: LocalBackend, max_batch: int, on_call=None):
        self.backend, self.max_batch, self.on_call = backend, max_batch, on_call
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="minihuatuo-serve-model", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest, prompts: list[list[int]]) -> list[Choice]:
        job = Job(request, prompts)
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
            self._run([j for j in batch if j.request.seed is None], None)
            for j in batch:
                if j.request.seed is not None:
                    self._run([j], j.request.seed)

    def _run(self, jobs: list[Job], seed: int | None):
        if not jobs:
            return
        if self.on_call is not None:
            self.on_call(len(jobs))
        try:
            run_jobs(self.backend, jobs, seed)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request thread
            if len(jobs) > 1:  # find the culprit: the other requests of the batch still get answers
                for j in jobs:
                    self._run([j], seed)
                return
            jobs[0].error = e
        for j in jobs:
            j.done.set()
