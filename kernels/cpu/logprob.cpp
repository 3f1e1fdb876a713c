// Token log-prob and entropy from logits, row by row, on the CPU (the RL hot spot).
//
// For one row of logits x (V entries), z = x / temperature and the target a:
//   m = max z,  s = sum e^(z - m),  lse = m + log s
//   logp = z_a - lse                              (0 when a is outside [0, V), e.g. an ignore label)
//   H = -sum p log p = log s - t / s,  t = sum e^(z - m) (z - m)
// Backward, with p_j = e^(z_j - lse), upstream g = dL/dlogp, h = dL/dH:
//   dL/dx_j = (1/temperature) * ( g [j == a] + p_j (h (-H - log p_j) - g) )
// Only (N) floats per row are stored (logp, H, lse): the (N, V) log-softmax never exists. A row of
// 128K-152K vocabulary entries (0.25-0.6 MB) stays in L2 cache across the two passes over it.
#include "cpu_common.h"

namespace {

constexpr int64_t kBlock = 2048;  // entries per partial sum (8 KB of fp32: stays in L1)

// One row; a function of its own so that the compiler sees plain pointer arguments (inside an
// OpenMP region they would be fields of a shared struct) and vectorises the loops over V.
template <typename T>
void forward_row(const T *__restrict x, int64_t a, int64_t V, float inv_temp, float *logp, float *entropy,
                 float *lse) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; j++) {  // a compare-select, not std::fmax: gcc does not vectorise the latter
        const float z = mh::to_float(x[j]) * inv_temp;
        m = z > m ? z : m;
    }
    // Two-level sums: vector lanes within blocks of kBlock entries, then the block sums in double.
    // One running float per lane over a 152K row would lose ~1e-5 relative; this keeps ~1e-7.
    double s = 0.0, t = 0.0;
    for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t end = b + kBlock < V ? b + kBlock : V;
        float sb = 0.0f, tb = 0.0f;
#pragma omp simd reduction(+ : sb, tb)
        for (int64_t j = b; j < end; j++) {
            const float d = mh::to_float(x[j]) * inv_temp - m;
            const float e = mh::fast_exp(d);
            sb += e;
            tb += e > 0.0f ? e * d : 0.0f;  // a masked -inf logit adds nothing (not 0 * -inf = NaN)
        }
        s += sb;
        t += tb;
    }
    const float log_s = float(std::log(s));
    *lse = m + log_s;
    *entropy = float(std::log(s) - t / s);
    *logp = (a >= 0 && a < V) ? mh::to_float(x[a]) * inv_temp - *lse : 0.0f;
}

// dx may be x itself (in-place backward of the chunked LM head): element j is read, then written.
template <typename T>
void backward_row(const T *x, int64_t a, int64_t V, float inv_temp, float L, float H, float g, float h, T *dx) {
    const bool valid = a >= 0 && a < V;
    const float za = valid ? mh::to_float(x[a]) * inv_temp : 0.0f;  // read before x[a] may be overwritten
#pragma omp simd
    for (int64_t j = 0; j < V; j++) {
        const float lp = mh::to_float(x[j]) * inv_temp - L;  // log p_j
        const float p = mh::fast_exp(lp);
        const float v = p > 0.0f ? p * (h * (-H - lp) - g) : 0.0f;
        dx[j] = mh::from_float<T>(v * inv_temp);
    }
    if (valid) {  // the one-hot term of d logp / d z
        const float pa = mh::fast_exp(za - L);
        const float v = pa > 0.0f ? pa * (h * (-H - (za - L)) - g) : 0.0f;
        dx[a] = mh::from_float<T>((v + g) * inv_temp);
    }
}

template <typename T>
void forward(const T *logits, int64_t ld, const int64_t *targets, int64_t N, int64_t V, float inv_temp,
             float *logp, float *entropy, float *lse, int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < N; i++)
        forward_row(logits + i * ld, targets[i], V, inv_temp, logp + i, entropy + i, lse + i);
}

template <typename T>
void backward(const T *logits, int64_t ld, const int64_t *targets, int64_t N, int64_t V, float inv_temp,
              const float *lse, const float *entropy, const float *dlogp, const float *dentropy, T *dlogits,
              int64_t ld_out, int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < N; i++) {
        const bool valid = targets[i] >= 0 && targets[i] < V;
        const float g = (dlogp && valid) ? dlogp[i] : 0.0f, h = dentropy ? dentropy[i] : 0.0f;
        backward_row(logits + i * ld, targets[i], V, inv_temp, lse[i], entropy[i], g, h, dlogits + i * ld_out);
    }
}

}  // namespace

extern "C" void mh_cpu_logprob_entropy_forward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                               int64_t V, float inv_temp, float *logp, float *entropy, float *lse,
                                               int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        forward((const T *)logits, ld, targets, N, V, inv_temp, logp, entropy, lse, nthreads);
    });
}

extern "C" void mh_cpu_logprob_entropy_backward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                                int64_t V, float inv_temp, const float *lse, const float *entropy,
                                                const float *dlogp, const float *dentropy, void *dlogits,
                                                int64_t ld_out, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        backward((const T *)logits, ld, targets, N, V, inv_temp, lse, entropy, dlogp, dentropy, (T *)dlogits,
                 ld_out, nthreads);
    });
}
