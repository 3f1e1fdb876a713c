"""Fused kernels (kernels/, minihuatuo/kernels.py) against their PyTorch references
(minihuatuo/reference_kernels.py): parity forward and backward in fp32 and bf16, gradcheck of the
references in float64, every .cu file through nvcc, the model and the SFT trainer with kernels on and
off, and the fallbacks (no compiler, no sources, forced reference).

Tolerances, as max |kernel − reference| / max |reference| over the tensor:
  fp32  1e-5   both sides run fp32 arithmetic; they differ only in the order of the sums (vectorised
               reductions over up to 152K terms: ~sqrt(n)·6e-8 ≈ 2e-5 worst case, typically 1e-7..1e-6)
               and in exp (our polynomial and torch's Sleef are both within ~1 ulp);
  bf16  2^-6   both compute in fp32 and store bf16 (8 significant bits: one ulp is 2^-7 of the value);
               the kernel rounds each result once, the reference up to three times (e.g. RMSNorm: the
               normalised value, the product with the gain, and in backward the intermediate products),
               so the two may be 2 ulps apart at the largest element. The bf16 tests also check, against
               a float64 oracle, that the kernel is about as accurate as the reference: its error at most
               3x the reference's + 1/4 ulp (the two round at different points, so their max errors vary
               independently; the SFT loss's gradient, computed before its scale is known, rounds once
               more in bf16 and measured 2.5x on one case).
Log-probs and entropies are fp32 outputs for either input dtype (computed in fp32). Over a 128K-152K
vocabulary torch's own fp32 entropy is off by up to 1.3e-5 against float64 (measured), so parity there is
3e-5, and the kernel is held to float64 directly: log-prob and entropy within 1e-6 (it sums in blocks).
LM-head gradients are sums over V products that largely cancel (each row of d logits sums to 0): in
fp32 both sides are up to ~5e-5 of the largest element away from float64 (measured), so 1e-4.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_plain_tokenizer

from minihuatuo.engine import kernels as K
from minihuatuo.engine import reference_kernels as R
from minihuatuo.engine.model import apply_rope, build_model, preset, rope_cos_sin

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "kernels"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6}
TOL_VOCAB_SUM = 3e-5  # fp32 entropy over V >= 128K (the reference's own error reaches 1.3e-5)
TOL_HEAD = {torch.float32: 1e-4, torch.bfloat16: 2 ** -6}  # LM-head gradients (cancelling sums over V)
DTYPES = [torch.float32, torch.bfloat16]
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None


def nvcc_path():
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if Path(p).exists()), None)


@pytest.fixture(scope="module", params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def dev(request):
    """The device whose compiled kernels are under test: the CPU kernels always, the CUDA kernels too
    where a GPU is at hand (the same parity tests). Skips where no compiler exists; fails where one
    exists but the build fails."""
    if not HAS_COMPILER or K.force_reference:
        pytest.skip("no C++ compiler / ninja (or MINIHUATUO_KERNELS=reference): everything runs on the references")
    assert K.backend(request.param) == request.param, f"the {request.param} kernels did not build (see stderr)"
    return torch.device(request.param)


def rel_err(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def check(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max error {err:.3g} of the largest value > {tol:.3g}"


def check_as_accurate(kernel, reference, oracle, what=""):
    """bf16: the kernel's error against a float64 oracle is at most 3x the reference's (+ 1/4 ulp)."""
    ek, er = rel_err(kernel, oracle), rel_err(reference, oracle)
    assert ek <= 3 * er + 2 ** -9, f"{what}: kernel error {ek:.3g} vs reference error {er:.3g}"


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def grads(outputs, inputs, cotangents):
    return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True)


# ----------------------------------------------------------------------------- compilation

def test_every_cu_file_compiles_with_nvcc(tmp_path):
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cu = sorted(p.relative_to(KDIR).as_posix() for p in KDIR.rglob("*.cu"))
    assert cu == sorted(K.CUDA_SOURCES), "every .cu file must be part of the CUDA build (kernels.CUDA_SOURCES)"

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the defines torch's own build adds

    def compile_one(name):  # only CUDA headers + kernels.h: no torch needed
        cmd = [nvcc, "-arch=sm_90", "-O3", "-std=c++17", "-Werror", "all-warnings", *COMMON_NVCC_FLAGS, "-c",
               str(KDIR / name), "-o", str(tmp_path / (Path(name).stem + ".o"))]
        return name, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, r in pool.map(compile_one, cu):
            assert r.returncode == 0, f"nvcc failed on kernels/{name}:\n{r.stderr[-3000:]}"
            assert (tmp_path / (Path(name).stem + ".o")).stat().st_size > 0


def test_cpu_kernels_are_plain_cpp_without_warnings(tmp_path):
    """The CPU kernels build from kernels.h alone (no torch), so a porter can call them from C."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    cpp = sorted(p.relative_to(KDIR).as_posix() for p in (KDIR / "cpu").glob("*.cpp"))
    assert ["torch_binding.cpp"] + cpp == ["torch_binding.cpp"] + sorted(K.CPU_SOURCES[1:])
    # -O3 -march=native as the real build (kernels.py) compiles them: the AVX-512 block of gemv.cpp too
    native = [["-O3", "-march=native"]] if K._compile_flags().count("-march=native") else []
    for name in cpp:
        for opt in [["-O1"]] + native:
            r = subprocess.run([cxx, "-std=c++17", *opt, "-fopenmp", "-Wall", "-Wextra", "-Werror", "-c",
                                str(KDIR / name), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
            assert r.returncode == 0, f"kernels/{name} ({' '.join(opt)}):\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------- parity: norm, MLP, RoPE

@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_reference(dev, dtype):
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(2, 19, 523, generator=g).to(dev) * 3, dtype)  # 38 rows of 523: no multiple of any block
    w = leaf(1 + 0.1 * torch.randn(523, generator=g).to(dev), dtype)
    dy = torch.randn(2, 19, 523, generator=g).to(dev, dtype)
    y, y_ref = K.rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    check(y, y_ref, TOL[dtype], "rmsnorm forward")
    for name, a, b in zip(("dx", "dw"), grads(y, (x, w), dy), grads(y_ref, (x, w), dy)):
        check(a, b, TOL[dtype], f"rmsnorm {name}")
    if dtype == torch.bfloat16:
        x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
        y64 = R.rms_norm(x64, w64, 1e-5)
        check_as_accurate(y, y_ref, y64, "rmsnorm forward")
        for a, b, c in zip(grads(y, (x, w), dy), grads(y_ref, (x, w), dy), grads(y64, (x64, w64), dy.double())):
            check_as_accurate(a, b, c, "rmsnorm backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dev, dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (leaf(torch.randn(3, 16411, generator=g).to(dev) * 4, dtype) for _ in range(2))  # 49233 elements
    dh = torch.randn(3, 16411, generator=g).to(dev, dtype)
    h, h_ref = K.swiglu(gate, up), R.swiglu(gate, up)
    check(h, h_ref, TOL[dtype], "swiglu forward")
    for a, b in zip(grads(h, (gate, up), dh), grads(h_ref, (gate, up), dh)):
        check(a, b, TOL[dtype], "swiglu backward")
    if dtype == torch.bfloat16:
        g64, u64 = leaf(gate, torch.float64), leaf(up, torch.float64)
        h64 = R.swiglu(g64, u64)
        check_as_accurate(h, h_ref, h64, "swiglu forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_matches_reference_and_the_model(dev, dtype, cos_batch):
    B, T, H, Kv, D = 2, 7, 3, 1, 18  # D/2 = 9: odd half
    cfg = preset("tiny", hidden_size=54, num_attention_heads=3, num_key_value_heads=1, head_dim=D)
    assert cfg.head_dim == D
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])[:cos_batch]  # row 2: left padding
    cos, sin = rope_cos_sin(build_model(cfg).inv_freq(dev), pos.to(dev), dtype)  # (b, 1, T, D)
    g = torch.Generator().manual_seed(2)
    q = leaf(torch.randn(B, T, H, D, generator=g).to(dev), dtype)
    k = leaf(torch.randn(B, T, Kv, D, generator=g).to(dev), dtype)
    qo, ko = K.rope_qk(q, k, cos[:, 0], sin[:, 0])
    qr, kr = R.rope_qk(q, k, cos[:, 0], sin[:, 0])
    check(qo, qr, TOL[dtype], "rope q")
    check(ko, kr, TOL[dtype], "rope k")
    # the reference in the projection layout is the model's apply_rope in the head layout
    torch.testing.assert_close(qr.transpose(1, 2), apply_rope(q.transpose(1, 2), cos, sin), rtol=0, atol=0)
    cot = (torch.randn_like(qo), torch.randn_like(ko))
    for a, b in zip(grads((qo, ko), (q, k), cot), grads((qr, kr), (q, k), cot)):
        check(a, b, TOL[dtype], "rope backward")


# ----------------------------------------------------------------------------- parity: log-prob and entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [128256, 151936])  # Llama-3, Qwen2.5
def test_logprob_entropy_matches_reference_at_real_vocabularies(dev, dtype, V):
    g = torch.Generator().manual_seed(V)
    logits = leaf(torch.randn(3, V, generator=g).to(dev) * 4, dtype)
    targets = torch.tensor([5, V - 1, -100], device=dev)  # the last row's label is ignored: log-prob 0, no gradient
    for temperature in (1.0, 0.7):
        lp, ent = K.logprobs_from_logits(logits, targets, temperature)
        lp_ref, ent_ref = R.token_logprobs_and_entropy(logits, targets, temperature)
        lp64, ent64 = R.token_logprobs_and_entropy(logits.detach().double(), targets, temperature)
        assert lp.dtype == ent.dtype == torch.float32 and lp[2] == 0
        check(lp, lp_ref, 1e-5, "log-prob")
        check(ent, ent_ref, TOL_VOCAB_SUM, "entropy")
        check(lp, lp64, 1e-6, "log-prob vs float64")
        check(ent, ent64, 1e-6, "entropy vs float64")
        cot = (torch.randn(3, generator=g).to(dev), torch.randn(3, generator=g).to(dev))
        d, d_ref = grads((lp, ent), logits, cot)[0], grads((lp_ref, ent_ref), logits, cot)[0]
        assert d.dtype == dtype
        check(d, d_ref, TOL[dtype], "d logits")
        only_logp = grads(lp, logits, cot[0])[0]  # entropy unused: its gradient is None, not zeros
        check(only_logp, grads(lp_ref, logits, cot[0])[0], TOL[dtype], "d logits (log-prob only)")


def test_logprob_handles_masked_logits_and_the_row_algorithm(dev):
    """-inf logits (top-k / top-p filtered) count 0 in the entropy, not NaN; the PyTorch statement of the
    kernel's algorithm (reference_kernels.logprob_entropy_rows_*) agrees with both."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g) * 3
    logits[:, ::3] = float("-inf")
    logits = leaf(logits.to(dev))
    targets = torch.tensor([1, 2, 4, 997], device=dev)
    lp, ent = K.logprobs_from_logits(logits, targets, 0.5)
    lp_ref, ent_ref = R.token_logprobs_and_entropy(logits, targets, 0.5)
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    check(lp, lp_ref, 1e-5, "log-prob")
    check(ent, ent_ref, 1e-5, "entropy")
    cot = (torch.randn(4, generator=g).to(dev), torch.randn(4, generator=g).to(dev))
    d = grads((lp, ent), logits, cot)[0]
    assert torch.isfinite(d).all() and (d[:, ::3] == 0).all()
    check(d, grads((lp_ref, ent_ref), logits, cot)[0], 1e-5, "d logits")
    lp_rows, ent_rows, lse_rows = R.logprob_entropy_rows_forward(logits.detach(), targets, 0.5)
    check(lp_rows, lp_ref, 1e-6, "rows forward")
    check(lse_rows, torch.logsumexp(logits.detach() / 0.5, -1), 1e-6, "lse")
    d_rows = R.logprob_entropy_rows_backward(logits.detach(), targets, 0.5, lse_rows, ent_rows, *cot)
    check(d_rows, d, 1e-5, "rows backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,C,N,chunk", [(1001, 40, 45, 16), (128256, 24, 5, 2), (151936, 16, 4, None)])
def test_chunked_lm_head_matches_materialised_logits(dev, dtype, V, C, N, chunk):
    g = torch.Generator().manual_seed(V)
    h = leaf(torch.randn(N, C, generator=g).to(dev), dtype)
    W = leaf(torch.randn(V, C, generator=g).to(dev) * C ** -0.5 * 3, dtype)
    h64, W64 = leaf(h, torch.float64), leaf(W, torch.float64)
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    targets[1] = -100
    # bf16: the logits themselves are bf16 values; a matmul over other row blocks may round one differently
    tol_out = TOL_VOCAB_SUM if dtype == torch.float32 else 2 ** -6

    def compare(kernel, reference, oracle, tol, what):
        check(kernel, reference, tol, what)
        if dtype == torch.float32:
            check(kernel, oracle, tol, what + " vs float64")
        else:
            check_as_accurate(kernel, reference, oracle, what)

    # per-token log-prob and entropy (PPO): backward recomputes each chunk's logits
    out = K.linear_logprobs_and_entropy(h, W, targets, 0.7, chunk_rows=chunk)
    out_ref = R.linear_logprobs_and_entropy(h, W, targets, 0.7)
    out64 = R.linear_logprobs_and_entropy(h64, W64, targets, 0.7)
    for name, a, b, c in zip(("log-prob", "entropy"), out, out_ref, out64):
        compare(a, b, c, tol_out, name)
    cot = (torch.randn(N, generator=g).to(dev), torch.randn(N, generator=g).to(dev))
    for name, a, b, c in zip(("dh", "dW"), grads(out, (h, W), cot), grads(out_ref, (h, W), cot),
                             grads(out64, (h64, W64), tuple(x.double() for x in cot))):
        compare(a, b, c, TOL_HEAD[dtype], f"{name} (log-prob + entropy)")
    # summed NLL (SFT): gradient computed in forward
    nll = K.linear_cross_entropy(h, W, targets, chunk_rows=chunk)
    nll_ref = F.cross_entropy((h @ W.t()).float(), targets, reduction="sum")
    nll64 = F.cross_entropy(h64 @ W64.t(), targets, reduction="sum")
    compare(nll, nll_ref, nll64, tol_out, "nll")
    for name, a, b, c in zip(("dh", "dW"), grads(2.5 * nll, (h, W), None), grads(2.5 * nll_ref, (h, W), None),
                             grads(2.5 * nll64, (h64, W64), None)):
        compare(a, b, c, TOL_HEAD[dtype], f"{name} (nll)")


def test_linear_cross_entropy_backward_once_and_eval_mode(dev):
    h, W = leaf(torch.randn(6, 8, device=dev)), leaf(torch.randn(50, 8, device=dev))
    t = torch.arange(6, device=dev)
    loss = K.linear_cross_entropy(h, W, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    with torch.no_grad():  # evaluation: forward only, same value
        check(K.linear_cross_entropy(h, W, t), loss, 1e-6, "eval nll")
    with pytest.raises(ValueError, match="temperature"):
        K.linear_logprobs_and_entropy(h, W, t, 0.0)


# ----------------------------------------------------------------------------- references: gradcheck in float64

def test_references_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    gc = torch.autograd.gradcheck
    assert gc(lambda x, w: R.rms_norm(x, w, 1e-5), (r(3, 7), r(7)))
    assert gc(R.swiglu, (r(3, 5), r(3, 5)))
    cos, sin = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) for _ in range(2))
    assert gc(lambda q, k: R.rope_qk(q, k, cos, sin), (r(2, 3, 2, 6), r(2, 3, 1, 6)))
    t = torch.tensor([0, 4, -100])
    assert gc(lambda z: R.token_logprobs_and_entropy(z, t, 0.7), (r(3, 9),))
    assert gc(lambda h, w: R.linear_logprobs_and_entropy(h, w, t, 0.7), (r(3, 4), r(9, 4)))
    # float64 runs the PyTorch statement of the kernels' algorithm, with its hand-written backward:
    # the row-by-row log-prob (entropy gradient included) and the chunked LM head (chunk of 2 rows)
    assert gc(lambda z: K.logprobs_from_logits(z, t, 0.7), (r(3, 9),))
    assert gc(lambda h, w: K.linear_logprobs_and_entropy(h, w, t, 0.7, chunk_rows=2), (r(3, 4), r(9, 4)))


# ----------------------------------------------------------------------------- the model and the SFT trainer

def _graph_names(t) -> set[str]:
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


# ----------------------------------------------------------------------------- decoding GEMV (CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, O, I", [(1, 37, 531), (3, 130, 96), (1, 4, 7), (2, 1024, 768)])
def test_gemv_matches_reference(dev, dtype, B, O, I):
    """x Wᵀ for a few rows: parity with the reference, shapes that are no multiple of the 4-row blocks,
    the 32-element cache lines or the 8-row prefetch distance; bf16 about as accurate as the reference."""
    if dev.type != "cpu":
        pytest.skip("the GEMV is a CPU kernel")
    g = torch.Generator().manual_seed(B * O + I)
    x64, w64 = torch.randn(B, I, generator=g, dtype=torch.float64), torch.randn(O, I, generator=g, dtype=torch.float64)
    x, w = x64.to(dtype), w64.to(dtype)
    y, y_ref = K.gemv(x, w), R.gemv(x, w)
    assert y.dtype == dtype and y.shape == (B, O)
    check(y, y_ref, TOL[dtype], "gemv")
    if dtype == torch.bfloat16:
        check_as_accurate(y, y_ref, x.double() @ w.double().T, "gemv")
    # the kernel, not the reference, ran (the reference is F.linear)
    assert K._kernel_for(x, w) is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, O, I", [(1, 37, 531), (3, 130, 96), (1, 4, 7), (2, 1024, 768)])
def test_gemv_int8_matches_reference(dev, dtype, B, O, I):
    """int8 weights with a scale per row: parity with the reference (fp32 sums of x · q times the
    scale) on the same awkward shapes, in both activation dtypes."""
    if dev.type != "cpu":
        pytest.skip("the GEMV is a CPU kernel")
    g = torch.Generator().manual_seed(B * O + I)
    x = torch.randn(B, I, generator=g).to(dtype)
    q = torch.randint(-127, 128, (O, I), generator=g, dtype=torch.int8)
    scale = torch.rand(O, generator=g) / 100 + 1e-4
    y, y_ref = K.gemv_int8(x, q, scale), R.gemv_int8(x, q, scale)
    assert y.dtype == dtype and y.shape == (B, O)
    check(y, y_ref, TOL[dtype], "gemv_int8")
    # the reference itself is the dequantised product, hand-written here in float64
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    check(y_ref, exact, TOL[dtype], "reference gemv_int8")
    assert K._int8_extension(x, q, scale) is not None  # the kernel ran, not the reference


def test_compiled_code_calls_the_gemvs_registered_in_cpp(dev):
    """Inside torch.compile the GEMVs are the operators the CPU extension registers in C++
    (torch.ops.minihuatuo_cpu, reached through the dispatcher alone), not the Python custom ops, with
    the eager kernel's results bit for bit."""
    if dev.type != "cpu":
        pytest.skip("the GEMV is a CPU kernel")
    assert K.backend("cpu") == "cpu" and K._cpp_ops  # the extension loaded and its operators are registered
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 96, generator=g).bfloat16(), torch.randn(37, 96, generator=g).bfloat16()
    q = torch.randint(-127, 128, (37, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(37, generator=g) / 100
    targets = []

    def capture(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda x, w, q, s: (K.gemv(x, w), K.gemv_int8(x.float(), q, s)), backend=capture,
                       fullgraph=True)
    y, y8 = fn(x, w, q, scale)
    assert any("minihuatuo_cpu.gemv" in t and "int8" not in t for t in targets), targets
    assert any("minihuatuo_cpu.gemv_int8" in t for t in targets), targets
    assert not any(t.startswith("minihuatuo.") for t in targets), targets  # no Python custom op
    assert torch.equal(y, K.gemv(x, w)) and torch.equal(y8, K.gemv_int8(x.float(), q, scale))


def test_bf16_decoding_with_the_gemv_kernel(dev):
    """Batch-1 bf16 decoding routes the model's products through the GEMV kernel (use_kernels), also
    inside the compiled decode step (a custom op), with the logits of the reference path."""
    if dev.type != "cpu":
        pytest.skip("the GEMV is a CPU kernel")
    from minihuatuo.engine.kv_cache import KVCache
    from minihuatuo.engine.sample import SamplingConfig, generate

    model = build_model(preset("tiny"), dtype=torch.bfloat16, seed=3).eval()
    ids = torch.randint(1, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    calls = []
    real = K.gemv
    K_gemv = lambda x, w: (calls.append(x.shape), real(x, w))[1]  # noqa: E731
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, 10)
        model(ids[:, :8], cache=cache, cache_start=0)
        ref = model(ids[:, 8:], cache=cache, cache_start=8)
        model.use_kernels = True
        try:
            K.gemv = K_gemv
            cache = KVCache.for_model(model, 1, 10)
            model(ids[:, :8], cache=cache, cache_start=0)
            out = model(ids[:, 8:], cache=cache, cache_start=8)
        finally:
            K.gemv = real
    assert len(calls) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer and the LM head: the decode step only
    check(out.float(), ref.float(), 2 ** -4, "bf16 decode logits with the GEMV")
    prompts = [ids[0].tolist()]
    eager = generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0), pad_id=0)
    compiled = generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, compile=True), pad_id=0)
    assert compiled.responses() == eager.responses()
    model.use_kernels = False


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_and_backward_with_kernels_equal_the_reference(dev, dtype):
    model = build_model(preset("tiny"), dtype=dtype, device=dev, seed=0)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(5)).to(dev)
    mask = torch.ones(2, 11, dtype=torch.long, device=dev)
    mask[1, :4] = 0  # left padding
    ref = model(ids, attention_mask=mask)
    ref_grads = torch.autograd.grad(ref.float().square().mean(), list(model.parameters()))
    model.use_kernels = True
    out = model(ids, attention_mask=mask)
    assert {"_RMSNormBackward", "_SwiGLUBackward", "_RoPEBackward"} <= _graph_names(out)
    out_grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()))
    # bf16: 1-2 ulp differences in each layer's activations add up over 2 layers and the head
    tol = 1e-5 if dtype == torch.float32 else 2 ** -4
    check(out[mask.bool()], ref[mask.bool()], tol, "logits")
    for a, b in zip(out_grads, ref_grads):
        check(a, b, 1e-4 if dtype == torch.float32 else 2 ** -3, "parameter gradient")
    model.use_kernels = False
    assert "_RMSNormBackward" not in _graph_names(model(ids))


def test_greedy_generation_is_unchanged_by_kernels(dev, tiny_checkpoint):
    from minihuatuo.engine.checkpoint import load_model
    from minihuatuo.engine.sample import SamplingConfig, generate

    model = load_model(tiny_checkpoint, device=dev)
    prompts = [[5, 9, 17, 33], [8, 8, 100]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    ref = generate(model, prompts, cfg, pad_id=0)
    model.use_kernels = True
    out = generate(model, prompts, cfg, pad_id=0)
    assert out.responses() == ref.responses()
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


def test_sft_steps_with_kernels_on_and_off_give_the_same_loss(dev, tmp_path):
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.stages.sft import SFTConfig, train

    if dev.type != "cpu":
        pytest.skip("train() picks its own device: one run covers it")

    tok = write_plain_tokenizer(tmp_path / "tok")
    save_model(build_model(preset("tiny", vocab_size=320), seed=0), tmp_path / "base", copy_files_from=tok)
    rows = [{"Question": f"Fever and cough in patient {i}?", "Complex_CoT": f"Hmm, pneumonia {i % 3}. Wait, allergy.",
             "Response": f"Drug {i % 4}."} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    losses = {}
    for on in (False, True):
        cfg = SFTConfig(epochs=1, lr=3e-3, global_batch_size=4, micro_batch_size=2, max_length=128,
                        warmup_ratio=0.0, weight_decay=0.0, max_steps=2, bf16=False, kernels=on)
        out = tmp_path / f"run-{on}"
        train(cfg, tmp_path / "base", tmp_path / "sft.jsonl", out)
        losses[on] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[True]) == 2
    # fp32: the loss of step 2 also depends on step 1's update, itself within fp32 tolerance
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- dispatch and fallbacks

def test_force_reference_runs_the_reference_code(monkeypatch):
    monkeypatch.setattr(K, "force_reference", True)
    assert K.backend("cpu") == "reference"
    x, w = torch.randn(4, 10), torch.randn(10)
    assert torch.equal(K.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6))
    h, W, t = torch.randn(5, 8), torch.randn(30, 8), torch.tensor([1, 2, -100, 4, 29])
    assert torch.equal(K.linear_cross_entropy(h, W, t), F.cross_entropy((h @ W.t()).float(), t, reduction="sum"))
    assert "_RMSNormBackward" not in _graph_names(K.rms_norm(x.requires_grad_(), w, 1e-6))


def test_missing_sources_fall_back_to_the_reference(monkeypatch, tmp_path, capsys):
    """A non-editable install has no kernels/ directory next to the package."""
    monkeypatch.setattr(K, "SOURCE_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(K, "_built", {})
    monkeypatch.setattr(K, "_said", set())
    assert K.backend("cpu") == "reference"
    x, w = torch.randn(3, 6), torch.randn(6)
    assert torch.equal(K.rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5))
    assert capsys.readouterr().err.count("kernel sources not found") == 1


SCRIPT = """
import torch
from minihuatuo.engine import kernels as K
from minihuatuo.engine import reference_kernels as R
x, w = torch.randn(5, 16), torch.randn(16)
for _ in range(3):
    y = K.rms_norm(x, w, 1e-5)
lp, ent = K.logprobs_from_logits(torch.randn(2, 50), torch.tensor([1, 2]))
assert (y - R.rms_norm(x, w, 1e-5)).abs().max() < 1e-5
print(K.backend("cpu"))
"""


def test_says_once_which_path_and_survives_a_missing_compiler(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MINIHUATUO_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("minihuatuo.kernels: cpu tensors ->") == 1
    if HAS_COMPILER:
        assert r.stdout.strip() == "cpu" and "C++ (OpenMP) kernels" in r.stderr
    # no compiler: a fresh extension cache and a compiler that does not exist
    env.update(CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    assert r.stderr.count("minihuatuo.kernels: cpu tensors -> PyTorch reference (building the kernels failed") == 1
