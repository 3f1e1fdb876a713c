// The thin torch binding: tensors in, the plain C kernels of kernels.h called on their pointers,
// tensors out. Checks shapes, dtypes and contiguity here so the kernels can trust their arguments.
// Built by minihuatuo/kernels.py with torch.utils.cpp_extension.load: CPU kernels always, and the
// CUDA kernels too when MH_WITH_CUDA is defined (only where torch has a CUDA build).
// Only the ATen pieces used below, not <torch/extension.h>: it halves the first-use build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "kernels.h"

#ifdef MH_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // the current stream, without the cuBLAS/cuSPARSE headers
#endif

namespace {

int dtype_code(const at::Tensor &t) {
    switch (t.scalar_type()) {
        case at::kFloat: return MH_F32;
        case at::kBFloat16: return MH_BF16;
        case at::kHalf:
            TORCH_CHECK(t.is_cuda(), "minihuatuo kernels: float16 is supported on CUDA only");
            return MH_F16;
        default: TORCH_CHECK(false, "minihuatuo kernels: unsupported dtype ", t.scalar_type());
    }
    return -1;
}

void check_same(const at::Tensor &a, const at::Tensor &b, const char *what) {
    TORCH_CHECK(a.device() == b.device(), "minihuatuo kernels: ", what, " on different devices");
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), "minihuatuo kernels: ", what, " have different dtypes");
}

#ifdef MH_WITH_CUDA
void *stream_of(const at::Tensor &t) { return (void *)c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void cuda_check(int err, const char *name) {
    TORCH_CHECK(err == 0, "minihuatuo kernels: CUDA error ", err, " in ", name);
}
#define ON_CUDA(t) ((t).is_cuda())
#else
#define ON_CUDA(t) false
#endif

#define NOT_BUILT_FOR_CUDA(t) TORCH_CHECK(!(t).is_cuda(), "minihuatuo kernels: built without CUDA")

int threads() { return at::get_num_threads(); }

// ------------------------------------------------------------------------------------------ RMSNorm

std::vector<at::Tensor> rmsnorm_forward(at::Tensor x, at::Tensor w, double eps) {
    check_same(x, w, "x and weight");
    const int64_t C = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, "rmsnorm: weight must be (C,)");
    x = x.contiguous();
    w = w.contiguous();
    const int64_t N = x.numel() / C;
    auto y = at::empty_like(x);
    auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
    if (ON_CUDA(x)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_rmsnorm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), N, C,
                                           (float)eps, dtype_code(x), stream_of(x)), "rmsnorm_forward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(x);
        mh_cpu_rmsnorm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), N, C, (float)eps,
                               dtype_code(x), threads());
    }
    return {y, rstd};
}

std::vector<at::Tensor> rmsnorm_backward(at::Tensor dy, at::Tensor x, at::Tensor w, at::Tensor rstd) {
    check_same(x, dy, "x and dy");
    x = x.contiguous();
    dy = dy.contiguous();
    w = w.contiguous();
    const int64_t C = x.size(-1), N = x.numel() / C;
    auto dx = at::empty_like(x);
    auto dw = at::zeros({C}, x.options().dtype(at::kFloat));
    if (ON_CUDA(x)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(),
                                            dx.data_ptr(), dw.data_ptr<float>(), N, C, dtype_code(x), stream_of(x)),
                   "rmsnorm_backward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(x);
        mh_cpu_rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                dw.data_ptr<float>(), N, C, dtype_code(x), threads());
    }
    return {dx, dw.to(w.scalar_type())};
}

// ------------------------------------------------------------------------------------------ SwiGLU

at::Tensor swiglu_forward(at::Tensor g, at::Tensor u) {
    check_same(g, u, "gate and up");
    TORCH_CHECK(g.sizes() == u.sizes(), "swiglu: gate and up must have the same shape");
    g = g.contiguous();
    u = u.contiguous();
    auto h = at::empty_like(g);
    if (ON_CUDA(g)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), dtype_code(g),
                                          stream_of(g)), "swiglu_forward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(g);
        mh_cpu_swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), dtype_code(g), threads());
    }
    return h;
}

std::vector<at::Tensor> swiglu_backward(at::Tensor dh, at::Tensor g, at::Tensor u) {
    check_same(g, dh, "gate and dh");
    dh = dh.contiguous();
    g = g.contiguous();
    u = u.contiguous();
    auto dg = at::empty_like(g), du = at::empty_like(u);
    if (ON_CUDA(g)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_swiglu_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                           g.numel(), dtype_code(g), stream_of(g)), "swiglu_backward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(g);
        mh_cpu_swiglu_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(),
                               dtype_code(g), threads());
    }
    return {dg, du};
}

// ------------------------------------------------------------------------------------------ RoPE

// x: (B, T, nh, D); cos, sin: float (B or 1, T, D).
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor sin, bool backward) {
    TORCH_CHECK(x.dim() == 4, "rope: x must be (B, T, nh, D)");
    const int64_t B = x.size(0), T = x.size(1), nh = x.size(2), D = x.size(3);
    TORCH_CHECK(D % 2 == 0, "rope: head dim must be even");
    TORCH_CHECK(cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == T && cos.size(2) == D &&
                    cos.sizes() == sin.sizes(), "rope: cos and sin must be (B or 1, T, D)");
    TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), "rope: cos/sin on another device");
    x = x.contiguous();
    cos = cos.to(at::kFloat).contiguous();
    sin = sin.to(at::kFloat).contiguous();
    const int64_t cs_stride = cos.size(0) == 1 ? 0 : T * D;
    auto out = at::empty_like(x);
    if (ON_CUDA(x)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_rope(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr(), B, T, nh,
                                D, cs_stride, backward, dtype_code(x), stream_of(x)), "rope");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(x);
        mh_cpu_rope(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr(), B, T, nh, D,
                    cs_stride, backward, dtype_code(x), threads());
    }
    return out;
}

// ------------------------------------------------------------------------------------------ log-prob + entropy

void check_logits(const at::Tensor &logits, const at::Tensor &targets) {
    TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logprob: logits must be (N, V) with unit stride in V");
    TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
                    targets.is_contiguous() && targets.device() == logits.device(),
                "logprob: targets must be a contiguous int64 (N,) tensor on the logits' device");
}

// Returns (logp, entropy, lse), each float (N,).
std::vector<at::Tensor> logprob_entropy_forward(at::Tensor logits, at::Tensor targets, double temperature) {
    if (logits.stride(1) != 1) logits = logits.contiguous();
    check_logits(logits, targets);
    const int64_t N = logits.size(0), V = logits.size(1);
    auto opts = logits.options().dtype(at::kFloat);
    auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
    if (N == 0) return {logp, ent, lse};
    if (ON_CUDA(logits)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_logprob_entropy_forward(logits.data_ptr(), logits.stride(0), targets.data_ptr<int64_t>(), N,
                                                   V, float(1.0 / temperature), logp.data_ptr<float>(),
                                                   ent.data_ptr<float>(), lse.data_ptr<float>(), dtype_code(logits),
                                                   stream_of(logits)), "logprob_entropy_forward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(logits);
        mh_cpu_logprob_entropy_forward(logits.data_ptr(), logits.stride(0), targets.data_ptr<int64_t>(), N, V,
                                       float(1.0 / temperature), logp.data_ptr<float>(), ent.data_ptr<float>(),
                                       lse.data_ptr<float>(), dtype_code(logits), threads());
    }
    return {logp, ent, lse};
}

// d logits from upstream dlogp and/or dentropy (float (N,), or None for zero). `out`, when given, receives
// the gradient and may be `logits` itself (the chunked LM head reuses its logits buffer).
at::Tensor logprob_entropy_backward(at::Tensor logits, at::Tensor targets, double temperature, at::Tensor lse,
                                    at::Tensor entropy, c10::optional<at::Tensor> dlogp,
                                    c10::optional<at::Tensor> dentropy, c10::optional<at::Tensor> out) {
    if (logits.stride(1) != 1) logits = logits.contiguous();
    check_logits(logits, targets);
    const int64_t N = logits.size(0), V = logits.size(1);
    at::Tensor dl = out.has_value() ? *out : at::empty_like(logits, at::MemoryFormat::Contiguous);
    TORCH_CHECK(dl.sizes() == logits.sizes() && dl.stride(1) == 1 && dl.scalar_type() == logits.scalar_type(),
                "logprob: out must be like logits");
    at::Tensor g = dlogp.has_value() ? dlogp->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor h = dentropy.has_value() ? dentropy->to(at::kFloat).contiguous() : at::Tensor();
    const float *gp = g.defined() ? g.data_ptr<float>() : nullptr;
    const float *hp = h.defined() ? h.data_ptr<float>() : nullptr;
    if (N == 0) return dl;
    if (ON_CUDA(logits)) {
#ifdef MH_WITH_CUDA
        cuda_check(mh_cuda_logprob_entropy_backward(logits.data_ptr(), logits.stride(0), targets.data_ptr<int64_t>(),
                                                    N, V, float(1.0 / temperature), lse.data_ptr<float>(),
                                                    entropy.data_ptr<float>(), gp, hp, dl.data_ptr(), dl.stride(0),
                                                    dtype_code(logits), stream_of(logits)),
                   "logprob_entropy_backward");
#endif
    } else {
        NOT_BUILT_FOR_CUDA(logits);
        mh_cpu_logprob_entropy_backward(logits.data_ptr(), logits.stride(0), targets.data_ptr<int64_t>(), N, V,
                                        float(1.0 / temperature), lse.data_ptr<float>(), entropy.data_ptr<float>(), gp,
                                        hp, dl.data_ptr(), dl.stride(0), dtype_code(logits), threads());
    }
    return dl;
}

// ------------------------------------------------------------------------------------------ GEMV (CPU)

at::Tensor gemv(at::Tensor x, at::Tensor w) {
    check_same(x, w, "x and weight");
    TORCH_CHECK(!x.is_cuda(), "gemv: CPU only");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x must be (B, I) and weight (O, I)");
    x = x.contiguous();
    w = w.contiguous();
    auto y = at::empty({x.size(0), w.size(0)}, x.options());
    mh_cpu_gemv(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.size(0), w.size(0), w.size(1), dtype_code(x), threads());
    return y;
}

at::Tensor gemv_int8(at::Tensor x, at::Tensor q, at::Tensor scale) {
    TORCH_CHECK(!x.is_cuda() && !q.is_cuda() && !scale.is_cuda(), "gemv_int8: CPU only");
    TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
                "gemv_int8: q must be int8 and scale float32");
    TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && scale.dim() == 1 &&
                    scale.size(0) == q.size(0),
                "gemv_int8: x must be (B, I), q (O, I) and scale (O,)");
    x = x.contiguous();
    q = q.contiguous();
    scale = scale.contiguous();
    auto y = at::empty({x.size(0), q.size(0)}, x.options());
    mh_cpu_gemv_int8(x.data_ptr(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), y.data_ptr(), x.size(0), q.size(0),
                     q.size(1), dtype_code(x), threads());
    return y;
}

}  // namespace

#ifndef MH_WITH_CUDA
// The two GEMVs are also torch operators registered here, in C++, so that the compiled decode step
// (engine/decode_step.py), which calls them ~85 times a token, reaches them through the dispatcher
// alone: a Python custom op costs ~15-30 µs a call on its way through Python (notes/kernels.md §6).
// Their shapes for tracing (the fake kernels) are registered by engine/kernels.py. Only the CPU build
// registers them: the CUDA build also compiles these sources, and a namespace is defined once per process.
TORCH_LIBRARY(minihuatuo_cpu, m) {
    m.def("gemv(Tensor x, Tensor weight) -> Tensor");
    m.def("gemv_int8(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(minihuatuo_cpu, CPU, m) {
    m.impl("gemv", &gemv);
    m.impl("gemv_int8", &gemv_int8);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "minihuatuo fused kernels (see kernels/README.md and notes/kernels.md)";
    m.def("rmsnorm_forward", &rmsnorm_forward);
    m.def("rmsnorm_backward", &rmsnorm_backward);
    m.def("swiglu_forward", &swiglu_forward);
    m.def("swiglu_backward", &swiglu_backward);
    m.def("rope", &rope);
    m.def("logprob_entropy_forward", &logprob_entropy_forward);
    m.def("logprob_entropy_backward", &logprob_entropy_backward);
    m.def("gemv", &gemv);
    m.def("gemv_int8", &gemv_int8);
#ifdef MH_WITH_CUDA
    m.attr("with_cuda") = true;
#else
    m.attr("with_cuda") = false;
#endif
}
