// RMSNorm on the CPU, forward and backward; one row of C per iteration, rows split over threads.
//
//   forward   rstd = 1/sqrt(mean(x^2) + eps),  n = x * rstd,  y = w * round(n)
//   backward  dn = dy * w,  dx = rstd * (dn - n * mean(dn * n)),  dw = sum over rows of dy * round(n)
//
// round() is the cast to the activation dtype that model.RMSNorm applies before the gain (HF's
// order); for fp32 it is the identity. Statistics stay fp32 for bf16 rows.
#include <vector>

#include "cpu_common.h"

namespace {

// Row functions take plain pointer arguments so that the compiler vectorises their loops over C
// (inside an OpenMP region the pointers would be fields of a shared struct, reloaded at each store).
template <typename T>
void forward_row(const T *__restrict x, const T *__restrict w, T *__restrict y, float *rstd, int64_t C, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; j++) {
        const float v = mh::to_float(x[j]);
        ss += v * v;
    }
    const float r = 1.0f / std::sqrt(ss / float(C) + eps);
    *rstd = r;
    for (int64_t j = 0; j < C; j++) {
        const float n = mh::to_float(mh::from_float<T>(mh::to_float(x[j]) * r));  // round(n), as the model
        y[j] = mh::from_float<T>(mh::to_float(w[j]) * n);
    }
}

template <typename T>
void backward_row(const T *__restrict dy, const T *__restrict x, const T *__restrict w, float r, T *__restrict dx,
                  float *__restrict dw, int64_t C) {
    float dot = 0.0f;  // sum_j dn_j * n_j
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < C; j++) {
        const float g = mh::to_float(dy[j]);
        const float n = mh::to_float(x[j]) * r;
        dot += g * mh::to_float(w[j]) * n;
        dw[j] += g * mh::to_float(mh::from_float<T>(n));
    }
    const float mean = dot / float(C);
    for (int64_t j = 0; j < C; j++) {
        const float n = mh::to_float(x[j]) * r;
        const float dn = mh::to_float(dy[j]) * mh::to_float(w[j]);
        dx[j] = mh::from_float<T>(r * (dn - n * mean));
    }
}

template <typename T>
void forward(const T *x, const T *w, T *y, float *rstd, int64_t N, int64_t C, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < N; i++) forward_row(x + i * C, w, y + i * C, rstd + i, C, eps);
}

template <typename T>
void backward(const T *dy, const T *x, const T *w, const float *rstd, T *dx, float *dw, int64_t N, int64_t C,
              int nthreads) {
    // dw is a sum over all rows: each thread accumulates its own partial row, summed at the end
    // (a fixed order for a fixed thread count, so results are reproducible run to run).
    std::vector<float> partial(size_t(nthreads) * C, 0.0f);
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *dwp = partial.data() + size_t(omp_get_thread_num()) * C;
#else
        float *dwp = partial.data();
#endif
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) backward_row(dy + i * C, x + i * C, w, rstd[i], dx + i * C, dwp, C);
    }
    for (int64_t j = 0; j < C; j++) {
        float s = 0.0f;
        for (int t = 0; t < nthreads; t++) s += partial[size_t(t) * C + j];
        dw[j] = s;
    }
}

}  // namespace

extern "C" void mh_cpu_rmsnorm_forward(const void *x, const void *w, void *y, float *rstd, int64_t N, int64_t C,
                                       float eps, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        forward((const T *)x, (const T *)w, (T *)y, rstd, N, C, eps, nthreads);
    });
}

extern "C" void mh_cpu_rmsnorm_backward(const void *dy, const void *x, const void *w, const float *rstd, void *dx,
                                        float *dw, int64_t N, int64_t C, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        backward((const T *)dy, (const T *)x, (const T *)w, rstd, (T *)dx, dw, N, C, nthreads);
    });
}
