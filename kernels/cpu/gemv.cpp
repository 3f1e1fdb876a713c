// Matrix-vector products for decoding on the CPU:  y = x W^T  for a few rows x (B, I) and a weight
// W (O, I) stored row-major, as nn.Linear keeps it.
//
// Batch-1 decoding is nothing but such products, and they are bound by streaming W from memory once
// per token: the time of a token is the bytes of the weights over the memory bandwidth, so bf16
// weights should halve it. torch's CPU matrix product for one bf16 row does not: it streams bf16
// weights no faster than fp32 ones (notes/benchmarks.md, "bf16 weights"). Here each thread walks
// its share of W's rows once, four rows at a time (four independent sums, so the FMA latency is
// hidden), converts bf16 to float by a shift (bf16 is the upper half of a float), and prefetches the
// rows it will need kAhead rows later, which is what keeps enough cache-line requests in flight to
// reach the bandwidth on a machine with few cores. Plain loops, vectorised by the compiler, and
// one AVX-512 block for bf16 where the compiler's version was measurably slower (see below).
//
// x is converted to float once per call; sums are fp32; each y is rounded once to the dtype.
//
// int8 weights (weight-only quantisation, engine/quantize.py) stream half the bytes of bf16 ones: the
// same walk with one byte per weight, widened to float exactly, and the row's scale applied once to
// the finished sum (scale · Σ x q = Σ x (scale · q): the dequantised product, rounded differently).
#include <algorithm>
#include <vector>

#include "cpu_common.h"

#if defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__)
// gcc 12's own AVX-512 headers trip -Wmaybe-uninitialized (their "undefined" registers) when inlined
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;   // weight rows per block
constexpr int64_t kAhead = 8;  // prefetch distance, in weight rows (measured: 8 beat 16 and 32)

#if defined(__AVX512F__)
// The one place with intrinsics, because gcc's vectorisation of the plain loop below streams bf16
// weights ~1.4x slower (measured: 17 ms against 12 ms for one pass over a 125M model's matrices; the
// plain loop is what other machines run). 16 bf16 weights -> 16 floats: widen to 32 bits, shift left
// by 16. Same sums in the same order per lane as the plain loop.
void block_bf16_avx512(const mh::bf16 *__restrict w, const float *__restrict x, float *__restrict out, int64_t I,
                       const mh::bf16 *ahead) {
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        if (ahead != nullptr && (i & 31) == 0)  // one cache line (32 bf16) of each later row
            for (int64_t r = 0; r < kRows; ++r) _mm_prefetch((const char *)(ahead + r * I + i), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int64_t r = 0; r < kRows; ++r) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(w + r * I + i));
            const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            acc[r] = _mm512_fmadd_ps(wf, xv, acc[r]);
        }
    }
    for (int64_t r = 0; r < kRows; ++r) {
        float a = _mm512_reduce_add_ps(acc[r]);
        for (int64_t j = i; j < I; ++j) a += mh::to_float(w[r * I + j]) * x[j];
        out[r] = a;
    }
}

// int8: 16 weights -> 16 floats by sign extension to 32 bits and an exact int -> float conversion.
// Prefetch one cache line (64 int8) of each later row every 64 weights.
void block_int8_avx512(const int8_t *__restrict w, const float *__restrict x, float *__restrict out, int64_t I,
                       const int8_t *ahead) {
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        if (ahead != nullptr && (i & 63) == 0)
            for (int64_t r = 0; r < kRows; ++r) _mm_prefetch((const char *)(ahead + r * I + i), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int64_t r = 0; r < kRows; ++r) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(w + r * I + i));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)), xv, acc[r]);
        }
    }
    for (int64_t r = 0; r < kRows; ++r) {
        float a = _mm512_reduce_add_ps(acc[r]);
        for (int64_t j = i; j < I; ++j) a += float(w[r * I + j]) * x[j];
        out[r] = a;
    }
}
#endif

template <typename T>
void block(const T *__restrict w, const float *__restrict x, float *__restrict out, int64_t I, int64_t nr,
           const T *ahead) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, mh::bf16>) {
        if (nr == kRows) return block_bf16_avx512(w, x, out, I, ahead);
    }
    if constexpr (std::is_same_v<T, int8_t>) {
        if (nr == kRows) return block_int8_avx512(w, x, out, I, ahead);
    }
#endif
    if (nr < kRows) {  // the last, partial block
        for (int64_t r = 0; r < nr; ++r) {
            float a = 0.0f;
#pragma omp simd reduction(+ : a)
            for (int64_t j = 0; j < I; ++j) a += mh::to_float(w[r * I + j]) * x[j];
            out[r] = a;
        }
        return;
    }
    // 16 partial sums per row, one vector register each: the horizontal sum waits until the end
    constexpr int64_t L = 16, line = 64 / int64_t(sizeof(T));  // lanes; elements per cache line
    float acc[kRows][L] = {};
    const T *w0 = w, *w1 = w + I, *w2 = w + 2 * I, *w3 = w + 3 * I;
    int64_t i = 0;
    for (; i + line <= I; i += line) {
        if (ahead != nullptr)  // the same cache line of a later block: in flight while this one is summed
            for (int64_t r = 0; r < kRows; ++r) __builtin_prefetch(ahead + r * I + i);
        for (int64_t h = i; h < i + line; h += L) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
                const float xv = x[h + l];
                acc[0][l] += mh::to_float(w0[h + l]) * xv;
                acc[1][l] += mh::to_float(w1[h + l]) * xv;
                acc[2][l] += mh::to_float(w2[h + l]) * xv;
                acc[3][l] += mh::to_float(w3[h + l]) * xv;
            }
        }
    }
    for (int64_t r = 0; r < kRows; ++r) {
        float a = 0.0f;
        for (int64_t l = 0; l < L; ++l) a += acc[r][l];
        for (int64_t j = i; j < I; ++j) a += mh::to_float(w[r * I + j]) * x[j];
        out[r] = a;
    }
}

// x and y of type T; weights of type W (T itself, or int8 with one `scale` per row, else scale is null)
template <typename T, typename W>
void gemv(const T *x, const W *w, const float *scale, T *y, int64_t B, int64_t O, int64_t I, int nthreads) {
    std::vector<float> xf(size_t(B * I));
    for (int64_t k = 0; k < B * I; ++k) xf[size_t(k)] = mh::to_float(x[k]);
    const int64_t blocks = (O + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t o = blk * kRows, nr = std::min(kRows, O - o);
        float out[kRows];
        for (int64_t b = 0; b < B; ++b) {
            // prefetch once per weight block (for the first x row); the later rows find it in cache
            const W *ahead = (b == 0 && o + kAhead + kRows <= O) ? w + (o + kAhead) * I : nullptr;
            block(w + o * I, xf.data() + b * I, out, I, nr, ahead);
            for (int64_t r = 0; r < nr; ++r)
                y[b * O + o + r] = mh::from_float<T>(scale != nullptr ? out[r] * scale[o + r] : out[r]);
        }
    }
}

}  // namespace

extern "C" void mh_cpu_gemv(const void *x, const void *w, void *y, int64_t B, int64_t O, int64_t I, int dtype,
                            int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        gemv((const T *)x, (const T *)w, (const float *)nullptr, (T *)y, B, O, I, nthreads);
    });
}

extern "C" void mh_cpu_gemv_int8(const void *x, const int8_t *q, const float *scale, void *y, int64_t B, int64_t O,
                                 int64_t I, int dtype, int nthreads) {
    mh::dispatch(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        gemv((const T *)x, q, scale, (T *)y, B, O, I, nthreads);
    });
}
