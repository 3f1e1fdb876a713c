"""One decode step — the cached single-token forward and the pick of the next token — eager or compiled.

    step(model, ids (B, 1), ...) -> (next ids (B,), their log-probs (B,))

A decode step of a small model is pure dispatch: ~35 ATen ops per layer at a few µs each, plus the
sampler's ~10, on tensors of a few hundred numbers. Compiling the step (gpt-fast's lever) lets
inductor fuse the elementwise ops (RMSNorm, RoPE, SwiGLU, softmax, sampling) into a handful of C++
loops written for this machine by the system C++ compiler, and leaves the matrix products to the same
BLAS calls as before.

How the compiled step is shaped (notes/benchmarks.md, "The compiled decode step and bf16 weights", has
the measurements):
- `dynamic=True`: batch size and cache length are symbols in the generated code, so one compilation
  serves every batch of two rows or more (rows drop out as they finish) and every step (the cache grows
  by one slot): nothing recompiles per token, and the only buckets are batch 1 and batch >= 2 (dynamic
  shapes specialise the size 1; with the compiled step the sampler never drops a batch below two rows,
  so only a call that starts with one prompt compiles the batch-1 graph). The eager path's cache (kv_cache.py) is used
  unchanged, so attention reads exactly the slots written so far, as the eager path does.
- the attention mask is always passed (all ones without padding) and the temperature is a tensor
  input, so padded and unpadded batches and every temperature share one graph.
- dynamo inlines the model's modules, so the weights are inputs of the compiled code, not constants:
  the same compilation serves every model of the same architecture (base, SFT, policy) and sees PPO's
  in-place weight updates without recompiling. One compilation per process and mode (greedy or
  sampling; top-k / top-p settings are constants of the graph), typically 1-40 s on a CPU;
  inductor keeps the generated code in its on-disk cache, so a later process recompiles faster.
- the uniform draw of inverse-CDF sampling is made outside the compiled code (eager, from the caller's
  torch.Generator), so the random stream is the eager path's and a seed gives the same draws.
Results are the eager step's up to float rounding (fused reductions sum in another order): greedy
tokens were identical to the eager path's in every test and benchmark (tests/test_decode_step.py,
bench generate), and log-probs agree to ~1e-5; a near-tie between two logits could still flip.

Where no compiler is available (or compilation fails for any reason) the step says so in one line on
stderr and runs eagerly from then on.
"""
from __future__ import annotations

import sys
import time

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature, top_k: int, top_p: float, u: torch.Tensor | None):
    """One token per row of logits (B, V) -> (ids (B,), log-probs (B,) float32).

    Greedy when u is None (temperature 0). Otherwise inverse-CDF sampling at `temperature` (a number
    or a 0-d tensor) with one uniform u (B, 1) in [0, 1) per row. (torch.multinomial draws one exponential per vocabulary entry: on a CPU that was
    a fifth of a decode step.) The log-prob is log_softmax(logits / T) before top-k / top-p truncation,
    which is what PPO's old log-probs are (notes/ppo.md checklist 6-7)."""
    logits = logits.float()
    if u is None:
        ids = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        # the temperature as a float32 tensor on both paths: the compiled step takes it as an input
        # (one compilation for every temperature), and both divide by the same float32 number
        scaled = logits / torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
        logp = torch.log_softmax(scaled, -1)
        probs = filter_logits(scaled, top_k, top_p).softmax(-1)
        # u · cdf[-1] < cdf[-1], so the first index whose cdf exceeds it exists and has probability
        # > 0: filtered tokens are never picked
        cdf = probs.cumsum(-1)
        ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def step(model, ids, attention_mask, position_ids, cache, cache_start: int,
         temperature: float, top_k: int, top_p: float, u):
    """The eager decode step: logits of the one new token per row (written to the cache at slot
    cache_start), then the pick. Arguments as in `Transformer.forward` and `pick`."""
    logits = model(ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   cache_start=cache_start, last_only=True)[:, -1]
    return pick(logits, temperature, top_k, top_p, u)


class _Compiled:
    """`step` compiled once per process (lazily), with its compile time counted and a fallback."""

    def __init__(self):
        self.fn = None
        self.failed: str | None = None  # the reason compilation failed; the eager step runs instead
        self.compile_s = 0.0  # seconds spent in calls that compiled a new graph
        self.compiles = 0
        self.calls = 0  # steps run through this object (compiled or fallen back)

    def __call__(self, model, ids, attention_mask, position_ids, cache, cache_start, temperature, top_k, top_p, u):
        self.calls += 1
        if self.failed is None:
            if attention_mask is None:  # one graph whether or not the batch has padding: an all-visible mask
                attention_mask = torch.ones(ids.shape[0], cache_start + ids.shape[1], dtype=torch.long,
                                            device=ids.device)
            if u is not None:  # one graph for every temperature: a tensor input, not a constant
                temperature = torch.tensor(temperature, dtype=torch.float32, device=ids.device)
        args = (model, ids, attention_mask, position_ids, cache, cache_start, temperature, top_k, top_p, u)
        if self.failed is not None:
            return step(*args)
        if self.fn is None:
            if getattr(model, "use_kernels", False):  # the extension before tracing: its C++ operators are
                from minihuatuo.engine import kernels   # what the graph then calls (engine/kernels.py)

                kernels.backend(ids.device)
            # each architecture, dtype and mode is its own graph; dynamo's default of 8 graphs per
            # function would silently fall back to eager in a process that decodes with several models
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.fn = torch.compile(step, dynamic=True)
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as e:  # no C++ compiler, an unsupported platform, an inductor bug: decode eagerly
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.failed = reason
            print(f"minihuatuo: could not compile the decode step ({type(e).__name__}: {reason}); "
                  "decoding eagerly", file=sys.stderr)
            return step(*args)  # (the cache is untouched: compilation fails before the step runs)
        if counters["stats"]["unique_graphs"] > graphs:
            seconds = time.perf_counter() - t
            self.compile_s += seconds
            self.compiles += 1
            print(f"minihuatuo: compiled the decode step in {seconds:.1f} s (once per process and mode: "
                  "greedy or sampling, batch 1 or more)", file=sys.stderr)
        return out


compiled_step = _Compiled()

# What `SamplingConfig(compile=None)` means: off unless a program turns it on for every stage at once
# (`minihuatuo --compile-decode CMD ...`, e.g. `minihuatuo --compile-decode demo`).
compile_by_default = False


def compile_stats() -> dict:
    """Compilations of the decode step so far in this process: {"compiles", "compile_s", "failed"}."""
    return {"compiles": compiled_step.compiles, "compile_s": round(compiled_step.compile_s, 2),
            "failed": compiled_step.failed}
