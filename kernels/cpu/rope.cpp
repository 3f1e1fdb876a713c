// Rotary position embedding on the CPU, rotate-half layout (HF checkpoints; model.apply_rope):
//
//   out_j = x_j cos_j + x_p sin_j,   p = j + D/2 (first half) or j - D/2 (second half)
//
// with sin already signed (negative on the first half, model.rope_cos_sin). The map is linear in x
// and its transpose swaps the role of sin: dx_j = dout_j cos_j + dout_p sin_p (backward != 0).
// x is in the projection layout (B, T, nh, D): every head of a token shares one row of cos/sin.
#include "cpu_common.h"

namespace {

// One head of one token: D values, rotated as D/2 pairs (j, j + D/2). s_lo / s_hi are the sin
// rows multiplying the partner in the low / high half: sin itself forward, its halves swapped backward.
template <typename T>
void rope_row(const T *__restrict x, const float *__restrict c, const float *__restrict s_lo,
              const float *__restrict s_hi, T *__restrict o, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        const float a = mh::to_float(x[j]), z = mh::to_float(x[j + half]);
        o[j] = mh::from_float<T>(a * c[j] + z * s_lo[j]);
        o[j + half] = mh::from_float<T>(z * c[j + half] + a * s_hi[j]);
    }
}

template <typename T>
void rope(const T *x, const float *cos, const float *sin, T *out, int64_t B, int64_t T_, int64_t nh, int64_t D,
          int64_t cs_batch_stride, int backward, int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T_; t++) {
            const float *c = cos + b * cs_batch_stride + t * D;
            const float *s = sin + b * cs_batch_stride + t * D;
            const float *s_lo = backward ? s + half : s, *s_hi = backward ? s : s + half;
            for (int64_t h = 0; h < nh; h++) {
                const int64_t row = ((b * T_ + t) * nh + h) * D;
                rope_row(x + row, c, s_lo, s_hi, out + row, half);
            }
        }
    }
}

}  // namespace

extern "C" void mh_cpu_rope(const void *x, const float *cos, const float *sin, void *out, int64_t B, int64_t T,
                            int64_t nh, int64_t D, int64_t cs_batch_stride, int backward, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using E = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        rope((const E *)x, cos, sin, (E *)out, B, T, nh, D, cs_batch_stride, backward, nthreads);
    });
}
