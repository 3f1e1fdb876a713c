// SwiGLU on the CPU:  h = silu(g) * u,  silu(g) = g * sigmoid(g).
//
//   backward  dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,  s = sigmoid(g)
//
// Elementwise, so the only fusion is doing both products (and, in backward, both gradients) in one
// pass over memory instead of torch's three (silu, mul, and their backward kernels).
#include "cpu_common.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per OpenMP chunk: large enough to amortise scheduling

// One chunk of n elements; a function of its own so that the compiler sees plain pointer arguments
// (inside an OpenMP region they would be fields of a shared struct, reloaded at every store).
template <typename T> void forward_chunk(const T *__restrict g, const T *__restrict u, T *__restrict h, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float gv = mh::to_float(g[i]);
        const float s = 1.0f / (1.0f + mh::fast_exp(-gv));
        h[i] = mh::from_float<T>(gv * s * mh::to_float(u[i]));
    }
}

template <typename T>
void backward_chunk(const T *__restrict dh, const T *__restrict g, const T *__restrict u, T *__restrict dg,
                    T *__restrict du, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float gv = mh::to_float(g[i]), uv = mh::to_float(u[i]), d = mh::to_float(dh[i]);
        const float s = 1.0f / (1.0f + mh::fast_exp(-gv));
        dg[i] = mh::from_float<T>(d * uv * s * (1.0f + gv * (1.0f - s)));
        du[i] = mh::from_float<T>(d * gv * s);
    }
}

template <typename T> void forward(const T *g, const T *u, T *h, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < n; c += kGrain)
        forward_chunk(g + c, u + c, h + c, c + kGrain < n ? kGrain : n - c);
}

template <typename T> void backward(const T *dh, const T *g, const T *u, T *dg, T *du, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < n; c += kGrain)
        backward_chunk(dh + c, g + c, u + c, dg + c, du + c, c + kGrain < n ? kGrain : n - c);
}

}  // namespace

extern "C" void mh_cpu_swiglu_forward(const void *g, const void *u, void *h, int64_t n, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        forward((const T *)g, (const T *)u, (T *)h, n, nthreads);
    });
}

extern "C" void mh_cpu_swiglu_backward(const void *dh, const void *g, const void *u, void *dg, void *du, int64_t n,
                                       int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        backward((const T *)dh, (const T *)g, (const T *)u, (T *)dg, (T *)du, n, nthreads);
    });
}
