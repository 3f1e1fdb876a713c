// Rotary embedding on the GPU, rotate-half layout (math: cpu/rope.cpp). One thread per pair
// (j, j + D/2) of one head of one token: it reads both values once and writes both results.
// x, out: (B, T, nh, D); cos, sin: float (B or 1, T, D); backward swaps the halves of sin.
#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rope_kernel(const T *__restrict__ x, const float *__restrict__ cos, const float *__restrict__ sin,
                            T *__restrict__ out, int64_t B, int64_t T_, int64_t nh, int64_t D, int64_t cs_stride,
                            int backward) {
    const int64_t half = D / 2, pairs = B * T_ * nh * half;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pairs; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = i % half, row = i / half;  // row indexes (b, t, head)
        const int64_t bt = row / nh, b = bt / T_, t = bt % T_;
        const float *c = cos + b * cs_stride + t * D, *s = sin + b * cs_stride + t * D;
        const float s_lo = backward ? s[j + half] : s[j];  // multiplies the partner in out_j
        const float s_hi = backward ? s[j] : s[j + half];  // multiplies the partner in out_{j+D/2}
        const T *xr = x + row * D;
        T *o = out + row * D;
        const float a = mh::to_float(xr[j]), z = mh::to_float(xr[j + half]);
        o[j] = mh::from_float<T>(a * c[j] + z * s_lo);
        o[j + half] = mh::from_float<T>(z * c[j + half] + a * s_hi);
    }
}

template <typename T>
void launch(const void *x, const float *cos, const float *sin, void *out, int64_t B, int64_t T_, int64_t nh,
            int64_t D, int64_t cs_stride, int backward, cudaStream_t stream) {
    const int64_t pairs = B * T_ * nh * (D / 2);
    rope_kernel<T><<<mh::grid_for(pairs, kThreads), kThreads, 0, stream>>>((const T *)x, cos, sin, (T *)out, B, T_,
                                                                           nh, D, cs_stride, backward);
}

}  // namespace

extern "C" int mh_cuda_rope(const void *x, const float *cos, const float *sin, void *out, int64_t B, int64_t T,
                            int64_t nh, int64_t D, int64_t cs_batch_stride, int backward, int dtype, void *stream) {
    if (B * T * nh * D == 0) return 0;
    MH_DISPATCH_LAUNCH(dtype, x, cos, sin, out, B, T, nh, D, cs_batch_stride, backward, (cudaStream_t)stream);
}
