"""Decode speed: minihuatuo's KV-cache sampler vs transformers' `generate` on the same random-weight
checkpoint, greedy, fp32 (and bf16, int8 weights), plus the weight-streaming bound measured in the same run.

    python -m minihuatuo.bench generate [--presets tiny,llama-125m] [--batch 1,16]
                                        [--dtypes float32,bfloat16,int8] [--json]

`ours_tok_s` is the fastest decoding path minihuatuo ships: the compiled decode step
(engine/decode_step.py; `SamplingConfig(compile=True)`, `minihuatuo --compile-decode`); `eager_tok_s`
is the eager step, and `compile_s` the one-off compilation the first call paid (not in the rates).
`same_tokens` holds when both of our paths wrote transformers' tokens. bf16 rows cast the same weights
to bfloat16 on both sides (transformers' baseline too), run our model with `use_kernels` (the GEMV
kernel for batch-1 products, kernels/cpu/gemv.cpp) and add `vs_float32`: our rate over our fp32 rate at
the same batch. int8 rows quantise every projection's weights (engine/quantize.py: int8 with a scale per
row; activations fp32) and run them through the int8 GEMV kernel; their transformers baseline runs in
fp32 on the dequantised weights — the function our int8 model computes, summed in another order — so
`same_tokens` is parity there too.

Decode tokens/s excludes the prefill: each configuration is timed with max_new_tokens = N and = 1
(prefill + first token), and rate = B·(N−1) / (t_N − t_1). Each timing is the best of --repeats runs.

The bound: at batch 1 every decoded token must stream every weight matrix from memory once, so the
time of one pass of single-row products over all of the model's matrices (each through the model's
own Linear: BLAS for fp32, the GEMV kernel for bf16 and int8) is the fastest a token can be produced;
`of_bound` is the fraction of it our batch-1 decode reaches.

transformers is the baseline here (and in bench/sft.py) and nowhere else in the package; it is
imported only inside the benchmarks' baseline functions (the `dev` extra installs it). It is
configured at its best: attention mask and pad id given, EOS disabled so both sides decode exactly
N tokens, static inputs, no sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from minihuatuo.engine import decode_step
from minihuatuo.engine.checkpoint import save_model
from minihuatuo.engine.model import Linear, build_model, preset
from minihuatuo.engine.quantize import Int8Linear, dequantize_int8, quantize_int8, quantize_model_int8
from minihuatuo.engine.sample import SamplingConfig, generate


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def weight_streaming_bound(model, repeats: int) -> float:
    """Tokens/s if a token cost exactly one pass of single-row products over every weight matrix (no
    attention, no overhead), each through the model's own `Linear` (so bf16 rows measure the path the
    model takes for them: torch.mv or the GEMV kernel; int8 rows the int8 kernel)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    dtype = model.model.embed_tokens.weight.dtype  # the activations' dtype
    xs = {n: torch.randn(1, n, dtype=dtype) for n in {m.in_features for m in layers}}

    def one_pass():
        for m in layers:
            m(xs[m.in_features])

    with torch.no_grad():
        one_pass()
        return 1.0 / best_time(one_pass, repeats * 5)


class NoisyTiming(RuntimeError):
    """decode_rate could not measure: N tokens timed no slower than 1 (a machine busy with other work)."""


def decode_rate(run, B: int, N: int, repeats: int) -> float:
    run(1)  # warm-up (allocations, thread pools)
    for _ in range(3):  # a machine busy with other work can make the N-token run look no slower: retime
        t_n = best_time(lambda: run(N), repeats)
        t_1 = best_time(lambda: run(1), repeats)
        if t_n > t_1:
            return B * (N - 1) / (t_n - t_1)
    raise NoisyTiming(f"decoding {N} tokens timed no slower than 1 token ({t_n:.4f} s vs {t_1:.4f} s): "
                       "the machine is too busy to measure; run the benchmark alone")


def bench_preset(name: str, batches, N: int, prompt_len: int, repeats: int, with_hf: bool,
                 dtype="float32") -> dict:
    """dtype: "float32", "bfloat16" or "int8" (int8 weights, fp32 activations)."""
    torch.manual_seed(0)
    model = build_model(preset(name), seed=0).eval()
    n_params = model.num_parameters()
    int8 = dtype == "int8"
    if int8:  # round the weights to their int8 values first, so that transformers gets the same function
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Linear):
                    m.weight.copy_(dequantize_int8(*quantize_int8(m.weight)))
    dtype = torch.float32 if int8 else getattr(torch, dtype)
    hf = None
    if with_hf:
        import transformers  # the baseline only; see the module docstring

        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)  # fp32 on disk; both sides cast the same numbers
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
    model = model.to(dtype)
    if int8:  # re-quantising the rounded weights gives back the same int8 values
        model = quantize_model_int8(model)
    # bf16 batch-1 products go through our GEMV kernel (model.Linear), int8 ones through the int8 GEMV
    # (Int8Linear); fp32 ones through torch's BLAS
    model.use_kernels = dtype == torch.bfloat16 or int8
    if model.use_kernels:
        from minihuatuo.engine import kernels

        kernels.backend("cpu")  # build (or load) the extension before anything is timed
    result = {"preset": name, "dtype": "int8" if int8 else str(dtype).removeprefix("torch."),
              "kernels": model.use_kernels,
              "params_M": round(n_params / 1e6, 1),
              "bound_tok_s": round(weight_streaming_bound(model, repeats), 1), "batches": []}
    g = torch.Generator().manual_seed(1)
    for B in batches:
        prompts = torch.randint(1, model.cfg.vocab_size, (B, prompt_len), generator=g)
        prompt_lists = prompts.tolist()
        mask = torch.ones_like(prompts)

        def ours(n, compiled=True):
            cfg = SamplingConfig(max_new_tokens=n, temperature=0, compile=compiled)
            return generate(model, prompt_lists, cfg, pad_id=0)

        before = decode_step.compile_stats()["compile_s"]
        ours(2)  # compiles the decode step of this shape and dtype (batch 1 and batch > 1 are two graphs)
        row = {"batch": B, "ours_tok_s": round(decode_rate(ours, B, N, repeats), 1),
               "compile_s": round(decode_step.compile_stats()["compile_s"] - before, 1),
               "eager_tok_s": round(decode_rate(lambda n: ours(n, compiled=False), B, N, repeats), 1)}
        if hf is not None:
            def theirs(n):
                with torch.no_grad():
                    return hf.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)

            row["hf_tok_s"] = round(decode_rate(theirs, B, N, repeats), 1)
            row["speedup_vs_hf"] = round(row["ours_tok_s"] / row["hf_tok_s"], 2)
            row["eager_speedup_vs_hf"] = round(row["eager_tok_s"] / row["hf_tok_s"], 2)
            reference = theirs(N)[:, prompt_len:]
            row["same_tokens"] = bool(torch.equal(ours(N).tokens, reference)
                                      and torch.equal(ours(N, compiled=False).tokens, reference))
        if B == 1:
            row["of_bound"] = round(row["ours_tok_s"] / result["bound_tok_s"], 3)
            if hf is not None:
                row["hf_of_bound"] = round(row["hf_tok_s"] / result["bound_tok_s"], 3)
        result["batches"].append(row)
    return result


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minihuatuo.bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,llama-125m")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16,int8",
                   help="weight dtypes (float32, bfloat16, int8); float32 rows first (the others compare "
                        "against them)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    with_hf = not args.no_hf
    if with_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed (pip install -e '.[dev]'); running without the baseline",
                  file=sys.stderr)
            with_hf = False
    batches = [int(b) for b in args.batch.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16", "int8"):
            p.error(f"--dtypes: {d!r} is not float32, bfloat16 or int8")
    report = {"machine": machine(), "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
              "ours": "compiled decode step (engine/decode_step.py)", "results": []}
    for dtype in dtypes:
        for name in args.presets.split(","):
            try:
                r = bench_preset(name, batches, args.new_tokens, args.prompt_len, args.repeats, with_hf, dtype)
            except NoisyTiming as e:  # a busy machine: say so in one line (any other error is a bug: traceback)
                print(f"bench generate: {name} {dtype}: {e}", file=sys.stderr)
                return 1
            fp32 = next((x for x in report["results"] if x["preset"] == name and x["dtype"] == "float32"), None)
            if dtype != "float32" and fp32 is not None:
                for row, base in zip(r["batches"], fp32["batches"]):
                    row["vs_float32"] = round(row["ours_tok_s"] / base["ours_tok_s"], 2)
                    row["vs_float32_eager"] = round(row["ours_tok_s"] / base["eager_tok_s"], 2)
            report["results"].append(r)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); greedy, "
          f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens; decode tokens/s (best of {args.repeats}); "
          "minihuatuo = the compiled decode step (eager step in brackets)")
    for r in report["results"]:
        print(f"\n{r['preset']} ({r['params_M']}M params), {r['dtype']}, weight-streaming bound {r['bound_tok_s']} tok/s")
        for row in r["batches"]:
            line = (f"  batch {row['batch']:>3}: minihuatuo {row['ours_tok_s']:>8} tok/s ({row['eager_tok_s']})"
                    f" [compile {row['compile_s']} s]")
            if "hf_tok_s" in row:
                line += (f" | transformers {row['hf_tok_s']:>8} tok/s | x{row['speedup_vs_hf']}"
                         f" (x{row['eager_speedup_vs_hf']}) | same tokens: {'yes' if row['same_tokens'] else 'NO'}")
            if "of_bound" in row:
                line += f" | {row['of_bound']:.0%} of bound"
                if "hf_of_bound" in row:
                    line += f" (transformers {row['hf_of_bound']:.0%})"
            if "vs_float32" in row:
                line += f" | x{row['vs_float32']} our float32 (x{row['vs_float32_eager']} its eager step)"
            print(line)
    return 0
