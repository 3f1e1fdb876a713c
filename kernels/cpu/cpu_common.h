// Shared by the CPU kernels: bf16 <-> float conversion, an exp the compiler can vectorise, and
// the dtype dispatch. Plain C++17; no torch, no intrinsics (the loops are written so that gcc/clang
// auto-vectorise them at -O3, with `#pragma omp simd` where a reduction needs reordering).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../kernels.h"

namespace mh {

using bf16 = uint16_t;  // raw bits of a bfloat16: the upper half of an IEEE float

static inline float to_float(float v) { return v; }
static inline float to_float(int8_t v) { return float(v); }  // int8 weights (gemv_int8): exact
static inline float to_float(bf16 v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename T> static inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
// Round to nearest, ties to even (what torch's .to(torch.bfloat16) does); NaN stays a quiet NaN.
template <> inline bf16 from_float<bf16>(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return bf16((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// exp(x) to ~1 ulp, branch-free so that loops calling it vectorise (libm's expf does not without
// -ffast-math, which we avoid because it breaks the -inf logits of masked vocabularies).
// x = k ln2 + r with |r| <= ln2/2, exp(x) = 2^k e^r, e^r by its Taylor series to r^7
// (truncation error < 1e-8). Results below FLT_MIN flush to 0; -inf gives 0, NaN stays NaN.
static inline float fast_exp(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    // k = round(x / ln2): adding and subtracting 1.5 * 2^23 rounds to an integer in one vector op
    // (std::floor would not vectorise without -ffast-math; strict IEEE keeps the two adds apart)
    const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  // ln2 split hi + lo
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (int32_t(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    const float e = p * scale;
    return x < -87.0f ? 0.0f : (x > 88.0f ? INFINITY : e);  // x NaN: both tests false, e is NaN
}

// Call f.template operator()<T>() with T the C++ element type of `dtype` (float or bf16).
template <typename F> static inline void dispatch(int dtype, F &&f) {
    if (dtype == MH_BF16) f((const bf16 *)nullptr);
    else f((const float *)nullptr);
}

}  // namespace mh
