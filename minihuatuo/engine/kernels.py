"""The one door to the fused kernels: CUDA kernel → CPU kernel → PyTorch reference.

    rms_norm(x, weight, eps)                      RMSNorm, forward + backward
    swiglu(gate, up)                              silu(gate) · up, forward + backward
    rope_qk(q, k, cos, sin)                       rotary embedding of q (B, T, H, D) and k (B, T, K, D)
    logprobs_from_logits(logits, targets, T)      log π(a) and entropy per row, no (N, V) log-softmax
    linear_logprobs_and_entropy(hidden, W, a, T)  LM head fused with the above, chunked over tokens:
                                                  never holds the (N, V) logits (the PPO training forward)
    linear_cross_entropy(hidden, W, labels)       Σ −log π(label): the SFT loss through the same path
    gemv(x, W)                                    x Wᵀ for a few rows on a CPU (decoding; inference only),
                                                  a torch custom op, so a compiled decode step calls it
    gemv_int8(x, q, scale)                        the same with int8 weights and a scale per row
                                                  (engine/quantize.py), also a custom op

Every function computes what its namesake in `reference_kernels` computes (the readable PyTorch
version, which is also the fallback) within the tolerances that tests/test_kernels.py states; the
namesake of `logprobs_from_logits` is `reference_kernels.token_logprobs_and_entropy`.

Which path runs: for CUDA tensors the CUDA kernels, for CPU tensors the C++ kernels (OpenMP), built
from the sources in kernels/ (or share/minihuatuo/kernels of an install: paths.py) on first use with
torch.utils.cpp_extension and cached (under $TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions). Anything else — no compiler, no ninja, a torch without CUDA for CUDA
tensors, no kernel sources, a dtype the kernels do not take (float64; float16 on CPU) — runs the
reference. The path taken is said once per device type on stderr. `force_reference = True` (or
MINIHUATUO_KERNELS=reference in the environment) forces the reference everywhere.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

from minihuatuo.engine import reference_kernels as ref
from minihuatuo.engine.paths import bundled

force_reference: bool = os.environ.get("MINIHUATUO_KERNELS", "").lower() in ("reference", "off", "0")

SOURCE_DIR = bundled("kernels")
CPU_SOURCES = ["torch_binding.cpp", "cpu/rmsnorm.cpp", "cpu/swiglu.cpp", "cpu/rope.cpp", "cpu/logprob.cpp", "cpu/gemv.cpp"]
CUDA_SOURCES = ["cuda/rmsnorm.cu", "cuda/swiglu.cu", "cuda/rope.cu", "cuda/logprob.cu"]
CHUNK_BYTES = 128 * 2**20  # logits of one chunk of the fused LM head (fp32): 128 MiB = 261 rows at V = 128K

_lock = threading.Lock()
_built: dict[str, object] = {}  # "cpu" / "cuda" -> extension module, or None when it could not be built
_said: set[str] = set()


def _say_once(device_type: str, text: str) -> None:
    if device_type not in _said:
        _said.add(device_type)
        print(f"minihuatuo.kernels: {device_type} tensors -> {text}", file=sys.stderr)


def _compile_flags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/openmp"]
    flags = ["-O3"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")  # AVX2/AVX-512 for the auto-vectorised loops; see _machine_tag
    if sys.platform != "darwin":  # Apple clang has no OpenMP: the kernels then run on one thread
        flags.append("-fopenmp")
    return flags


def _machine_tag() -> str:
    """-march=native code is only valid on this CPU: the cache entry's name carries the CPU model, so a
    home directory shared by different machines never loads another machine's build."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n")[0].splitlines()  # the first processor's block
        cpu = "".join(line for line in lines if line.startswith(("model name", "flags")))  # flags: the ISA
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {cpu}".encode()).hexdigest()[:8]


def _build(with_cuda: bool):
    """The compiled extension (CPU kernels, plus CUDA kernels if with_cuda), or None with the reason said."""
    device_type = "cuda" if with_cuda else "cpu"
    if not all((SOURCE_DIR / s).is_file() for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])):
        _say_once(device_type, f"PyTorch reference (kernel sources not found in {SOURCE_DIR})")
        return None
    try:
        from torch.utils import cpp_extension

        flags = _compile_flags() + (["-DMH_WITH_CUDA"] if with_cuda else [])
        name = f"minihuatuo_kernels_{device_type}_{_machine_tag()}"
        sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
        build_dir = Path(cpp_extension._get_build_directory(name, False))
        built = build_dir / f"{name}.so"
        newest = max((SOURCE_DIR / s).stat().st_mtime for s in sources + ["kernels.h"])
        if not built.exists() or built.stat().st_mtime < newest:
            print(f"minihuatuo.kernels: building the {device_type} kernels (once; cached in {build_dir})",
                  file=sys.stderr)
        ext = cpp_extension.load(
            name, [str(SOURCE_DIR / s) for s in sources], extra_cflags=flags,
            extra_ldflags=[f for f in flags if f == "-fopenmp"],
            extra_cuda_cflags=["-O3", "-DMH_WITH_CUDA"], extra_include_paths=[str(SOURCE_DIR)], verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: the reference still works
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _say_once(device_type, f"PyTorch reference (building the kernels failed: {reason})")
        return None
    _say_once(device_type, f"{'CUDA' if with_cuda else 'C++ (OpenMP)'} kernels from {SOURCE_DIR}")
    if not with_cuda:
        _register_cpp_ops()
    return ext


def _extension(device_type: str):
    with _lock:
        if device_type not in _built:
            if device_type == "cuda":
                ok = torch.version.cuda is not None and torch.cuda.is_available()
                if not ok:
                    _say_once("cuda", "PyTorch reference (this torch has no CUDA)")
                _built["cuda"] = _build(with_cuda=True) if ok else None
            else:
                _built["cpu"] = _build(with_cuda=False)
        return _built[device_type]


def backend(device) -> str:
    """"cuda", "cpu" or "reference": the path that tensors on `device` take (builds on first call)."""
    device_type = torch.device(device).type
    if force_reference or device_type not in ("cpu", "cuda"):
        return "reference"
    return device_type if _extension(device_type) is not None else "reference"


def _kernel_for(*tensors):
    """The extension to run these tensors on, or None for the reference."""
    t = tensors[0]
    if force_reference or t.device.type not in ("cpu", "cuda"):
        return None
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if t.device.type == "cuda" else ())
    if any(x.dtype != t.dtype or x.device != t.device for x in tensors) or t.dtype not in dtypes:
        return None
    return _extension(t.device.type)


# ----------------------------------------------------------------------------- elementwise and norm kernels

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x, weight, eps):
        y, rstd = ext.rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.ext = ext
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = ctx.ext.rmsnorm_backward(dy, x, weight, rstd)
        return None, dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · round(x / rms(x)) over the last dim (reference_kernels.rms_norm). x: (..., C)."""
    ext = _kernel_for(x, weight)
    return ref.rms_norm(x, weight, eps) if ext is None else _RMSNorm.apply(ext, x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, gate, up):
        ctx.save_for_backward(gate, up)
        ctx.ext = ext
        return ext.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = ctx.ext.swiglu_backward(dh, gate, up)
        return None, dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up (reference_kernels.swiglu), in one pass over memory each way."""
    ext = _kernel_for(gate, up) if gate.shape == up.shape else None
    return ref.swiglu(gate, up) if ext is None else _SwiGLU.apply(ext, gate, up)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.ext = ext
        return ext.rope(q, cos, sin, False), ext.rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        ext = ctx.ext
        # the rotation is linear in q and k; its transpose is the same kernel with sin's halves swapped
        return (None, None if dq is None else ext.rope(dq.contiguous(), cos, sin, True),
                None if dk is None else ext.rope(dk.contiguous(), cos, sin, True), None, None)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    """Rotary embedding of q (B, T, H, D) and k (B, T, K, D) — the projections' layout, before the
    head transpose — with cos, sin_signed (B or 1, T, D) from model.rope_cos_sin. No gradient flows
    to cos and sin (positions are not learned)."""
    ext = _kernel_for(q, k)
    if ext is None:
        return ref.rope_qk(q, k, cos, sin_signed)
    cos32, sin32 = cos.detach().float().contiguous(), sin_signed.detach().float().contiguous()
    return _RoPE.apply(ext, q, k, cos32, sin32)


# ----------------------------------------------------------------------------- log-prob and entropy

class _Rows:
    """The row kernel (forward: logp, entropy, lse; backward: d logits, optionally in place) of one
    backend: the compiled one, or its PyTorch statement in reference_kernels."""

    def __init__(self, ext):
        self.ext = ext

    def forward(self, logits, targets, temperature):
        if self.ext is None:
            return ref.logprob_entropy_rows_forward(logits, targets, temperature)
        return self.ext.logprob_entropy_forward(logits, targets, temperature)

    def backward(self, logits, targets, temperature, lse, entropy, dlogp, dentropy, out=None):
        if self.ext is None:
            grad = ref.logprob_entropy_rows_backward(logits, targets, temperature, lse, entropy, dlogp, dentropy)
            return grad if out is None else out.copy_(grad)
        return self.ext.logprob_entropy_backward(logits, targets, temperature, lse, entropy, dlogp, dentropy, out)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, logits, targets, temperature):
        logp, entropy, lse = rows.forward(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.rows, ctx.temperature = rows, temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        return None, ctx.rows.backward(logits, targets, ctx.temperature, lse, entropy, dlogp, dentropy), None, None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature} (greedy decoding scores "
                         "with temperature 1)")


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """(log π(a), entropy), each float32 (...), of π = softmax(logits / temperature); logits (..., V),
    targets (...); a target outside [0, V) gets log-prob 0. Row by row: only three floats per row are
    kept for backward, never the (..., V) log-softmax (reference_kernels.token_logprobs_and_entropy)."""
    _check_temperature(temperature)
    ext = _kernel_for(logits)
    if ext is None and force_reference:
        return ref.token_logprobs_and_entropy(logits, targets, temperature)
    shape, V = targets.shape, logits.shape[-1]
    logp, entropy = _LogprobEntropy.apply(_Rows(ext), logits.reshape(-1, V), targets.reshape(-1).long().contiguous(),
                                          float(temperature))
    return logp.view(shape), entropy.view(shape)


class _LinearLogprobEntropy(torch.autograd.Function):
    """hidden (N, C) @ weightᵀ (V, C) → row kernel, `chunk` rows at a time. Forward keeps (N) floats;
    backward recomputes each chunk's logits (one extra matmul) and turns them, in place, into
    d logits, then d hidden = d logits @ weight and d weight += d logitsᵀ @ hidden."""

    @staticmethod
    def forward(ctx, rows, chunk, hidden, weight, targets, temperature):
        N, V = hidden.shape[0], weight.shape[0]
        stats = torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 under gradcheck)
        logp, entropy, lse = (hidden.new_empty(N, dtype=stats) for _ in range(3))
        buf = hidden.new_empty(min(chunk, N), V)  # one chunk of logits, reused
        for i in range(0, N, chunk):
            n = min(chunk, N - i)
            z = torch.mm(hidden[i:i + n], weight.t(), out=buf[:n])  # (n, V)
            logp[i:i + n], entropy[i:i + n], lse[i:i + n] = rows.forward(z, targets[i:i + n], temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.rows, ctx.chunk, ctx.temperature = rows, chunk, temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[2:4]
        N, V, chunk = hidden.shape[0], weight.shape[0], ctx.chunk
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        buf = hidden.new_empty(min(chunk, N), V)
        for i in range(0, N, chunk):
            n = min(chunk, N - i)
            h = hidden[i:i + n]
            z = torch.mm(h, weight.t(), out=buf[:n])  # recomputed logits (n, V)
            dz = ctx.rows.backward(z, targets[i:i + n], ctx.temperature, lse[i:i + n], entropy[i:i + n],
                                   None if dlogp is None else dlogp[i:i + n],
                                   None if dentropy is None else dentropy[i:i + n], out=z)
            if need_h:
                torch.mm(dz, weight, out=dh[i:i + n])  # (n, C)
            if need_w:
                dw.addmm_(dz.t(), h)  # (V, C); bf16 weights: rounded once per chunk
        return None, None, dh, dw, None, None


class _LinearNLLSum(torch.autograd.Function):
    """Σ −log softmax(hidden @ Wᵀ)[a] with its gradient computed during forward, chunk by chunk: a
    summed loss has one scalar upstream gradient, so d hidden and d W are known up to that factor
    and backward only scales them. One matmul fewer than recomputing the logits in backward. The
    graph can be backpropagated once (the gradients are handed over, not kept)."""

    @staticmethod
    def forward(ctx, rows, chunk, hidden, weight, targets):
        N, V = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[2:4]
        # d hidden is kept in fp32 until backward scales it, so that bf16 rounds it once, not twice
        dh = hidden.new_empty(hidden.shape, dtype=torch.promote_types(hidden.dtype, torch.float32)) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        minus_one = hidden.new_full((min(chunk, N),), -1.0, dtype=torch.float32)  # d loss / d logp
        buf = hidden.new_empty(min(chunk, N), V)
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for i in range(0, N, chunk):
            n, h, a = min(chunk, N - i), hidden[i:i + chunk], targets[i:i + chunk]
            z = torch.mm(h, weight.t(), out=buf[:n])  # (n, V)
            logp, entropy, lse = rows.forward(z, a, 1.0)
            total -= logp.sum()
            dz = rows.backward(z, a, 1.0, lse, entropy, minus_one[:n].to(lse.dtype), None, out=z)
            if need_h:
                dh[i:i + n] = torch.mm(dz, weight)  # (n, C)
            if need_w:
                dw.addmm_(dz.t(), h)  # (V, C)
        ctx.grads, ctx.hidden_dtype = [dh, dw], hidden.dtype
        return total

    @staticmethod
    def backward(ctx, dloss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's graph can be backpropagated only once (its gradients were "
                               "computed in forward and handed over); use linear_logprobs_and_entropy to retain it")
        dh, dw = ctx.grads
        ctx.grads = None  # hand the buffers over: autograd can then adopt dw as weight.grad without a copy
        return (None, None, None if dh is None else dh.mul_(dloss).to(ctx.hidden_dtype),
                None if dw is None else dw.mul_(dloss), None)


def _autocast_inputs(hidden, weight):
    """Cast like the LM head's matmul would be under autocast (bf16 SFT on GPU)."""
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()


def _chunk(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_BYTES // (4 * V))


def linear_logprobs_and_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                                temperature: float = 1.0, chunk_rows: int | None = None):
    """(log π(a_t), entropy_t), each float32 (...), of π = softmax(hidden @ Wᵀ / temperature) — the
    LM head fused with the log-prob, chunk_rows tokens at a time, so the (..., V) logits never exist.

    hidden: (..., C) final-norm hidden states; lm_head_weight: (V, C); targets: (...) ids, outside
    [0, V) → log-prob 0 (reference_kernels.linear_logprobs_and_entropy). For PPO's new log-probs and
    entropy (notes/ppo.md checklist 7: log_softmax(z / T)[a]), inside a forward that DDP / FSDP see
    whole (stages/rl/ppo.py ActorCritic, or `model(..., logits_at=mask, head=lambda h, w:
    linear_logprobs_and_entropy(h, w, actions, T))`). Backward recomputes each chunk's logits.
    """
    _check_temperature(temperature)
    if force_reference:
        return ref.linear_logprobs_and_entropy(hidden, lm_head_weight, targets, temperature)
    hidden, lm_head_weight = _autocast_inputs(hidden, lm_head_weight)
    shape, (V, C) = targets.shape, lm_head_weight.shape
    with _no_autocast(hidden.device.type):
        logp, entropy = _LinearLogprobEntropy.apply(
            _Rows(_kernel_for(hidden, lm_head_weight)), _chunk(V, chunk_rows), hidden.reshape(-1, C),
            lm_head_weight, targets.reshape(-1).long().contiguous(), float(temperature))
    return logp.view(shape), entropy.view(shape)


def linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Σ over labelled positions of −log softmax(hidden @ Wᵀ)[label] — F.cross_entropy(reduction="sum")
    on the logits (reference_kernels.linear_cross_entropy), without ever holding them: the SFT loss
    (sft.token_nll_sum with SFTConfig.kernels). hidden: (..., C); labels: (...), ignore_index → 0."""
    if force_reference:
        return ref.linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index)
    hidden, lm_head_weight = _autocast_inputs(hidden, lm_head_weight)
    V, C = lm_head_weight.shape
    labels = labels.reshape(-1).long().masked_fill(labels.reshape(-1) == ignore_index, -1).contiguous()
    rows, chunk, hidden = _Rows(_kernel_for(hidden, lm_head_weight)), _chunk(V, chunk_rows), hidden.reshape(-1, C)
    with _no_autocast(hidden.device.type):
        if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
            return _LinearNLLSum.apply(rows, chunk, hidden, lm_head_weight, labels)
        with torch.no_grad():  # evaluation: the forward half only
            logp, _ = _LinearLogprobEntropy.apply(rows, chunk, hidden, lm_head_weight, labels, 1.0)
        return -logp.sum()


# ----------------------------------------------------------------------------- decoding GEMV (CPU)
#
# Three ways in: eagerly, the extension's Python binding (no dispatcher at all); inside torch.compile,
# the operators the CPU extension registers in C++ (torch.ops.minihuatuo_cpu, kernels/torch_binding.cpp),
# which the compiled step reaches through the dispatcher alone; and, where the extension is not built
# (or for another device), the Python custom ops minihuatuo::gemv / gemv_int8 with the reference inside.

_cpp_ops = False  # torch.ops.minihuatuo_cpu.gemv / gemv_int8 exist and have their fake kernels


def _register_cpp_ops() -> None:
    """The shapes of the C++-registered GEMVs for tracing (once per process, after the CPU extension
    has loaded and registered the operators themselves)."""
    global _cpp_ops
    if _cpp_ops:
        return
    torch.library.register_fake("minihuatuo_cpu::gemv")(lambda x, weight: x.new_empty((x.shape[0], weight.shape[0])))
    torch.library.register_fake("minihuatuo_cpu::gemv_int8")(
        lambda x, qweight, scale: x.new_empty((x.shape[0], qweight.shape[0])))
    _cpp_ops = True


@torch.library.custom_op("minihuatuo::gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ext = _kernel_for(x, weight)
    return ref.gemv(x, weight) if ext is None or x.device.type != "cpu" else ext.gemv(x, weight)


@_gemv.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, I) @ weight (O, I)ᵀ for a few rows, no gradient (reference_kernels.gemv): the products of
    batch-1 decoding, which stream the weights once per token (kernels/cpu/gemv.cpp says why a kernel
    of our own beats torch's for bf16). Inside torch.compile it is a torch custom op (one opaque op of the
    graph: the C++-registered operator where the CPU extension is built); eagerly the extension is called
    directly (a Python custom op's dispatch costs ~15-30 µs a call)."""
    if torch.compiler.is_compiling():
        if (_cpp_ops and not force_reference and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype):
            return torch.ops.minihuatuo_cpu.gemv(x, weight)
        return _gemv(x, weight)
    ext = _kernel_for(x, weight)
    return ref.gemv(x, weight) if ext is None or x.device.type != "cpu" else ext.gemv(x, weight)


def _int8_extension(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor):
    """The CPU extension for gemv_int8, or None for the reference (as _kernel_for, with int8 weights)."""
    if (force_reference or x.device.type != "cpu" or qweight.device != x.device or scale.device != x.device
            or x.dtype not in (torch.float32, torch.bfloat16) or qweight.dtype != torch.int8
            or scale.dtype != torch.float32):
        return None
    return _extension("cpu")


@torch.library.custom_op("minihuatuo::gemv_int8", mutates_args=())
def _gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    ext = _int8_extension(x, qweight, scale)
    return ref.gemv_int8(x, qweight, scale) if ext is None else ext.gemv_int8(x, qweight, scale)


@_gemv_int8.register_fake
def _(x, qweight, scale):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, I) @ (scale · qweight)ᵀ for int8 weights (O, I) and fp32 scales (O,), no gradient
    (reference_kernels.gemv_int8): batch-1 decoding streaming one byte per weight. A custom op inside
    torch.compile, the extension directly otherwise (as gemv)."""
    if torch.compiler.is_compiling():
        if (_cpp_ops and not force_reference and x.device.type == "cpu" and qweight.device.type == "cpu"
                and scale.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and qweight.dtype == torch.int8 and scale.dtype == torch.float32):
            return torch.ops.minihuatuo_cpu.gemv_int8(x, qweight, scale)
        return _gemv_int8(x, qweight, scale)
    ext = _int8_extension(x, qweight, scale)
    return ref.gemv_int8(x, qweight, scale) if ext is None else ext.gemv_int8(x, qweight, scale)
