// Shared by the CUDA kernels: dtype conversions, block reductions, launch sizes. Only CUDA headers
// and kernels.h: nvcc compiles these files without torch (CI does, with -arch=sm_90).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../kernels.h"

namespace mh {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round to nearest, ties to even, like torch's casts.
template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float f) {
    return __float2bfloat16_rn(f);
}
template <> __device__ __forceinline__ __half from_float<__half>(float f) { return __float2half_rn(f); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum / max over the whole block, returned to every thread. blockDim.x: a multiple of 32, <= 1024.
// The first __syncthreads keeps a previous call's readers of `part` from seeing this call's writes.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? part[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? part[lane] : -INFINITY);
}

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than the items.
inline unsigned grid_for(int64_t n, int threads) {
    const int64_t want = (n + threads - 1) / threads;
    const int64_t cap = 65535LL * 16;  // grid-stride loops cover the rest
    return (unsigned)(want < 1 ? 1 : (want > cap ? cap : want));
}

inline unsigned rows_grid(int64_t rows) {
    const int64_t cap = 65535LL * 16;
    return (unsigned)(rows < 1 ? 1 : (rows > cap ? cap : rows));
}

}  // namespace mh

// Instantiate `launch<T>(...)` for the dtype code; returns the launch error (0 = cudaSuccess).
#define MH_DISPATCH_LAUNCH(dtype, ...)                                            \
    do {                                                                          \
        switch (dtype) {                                                          \
            case MH_F32: launch<float>(__VA_ARGS__); break;                       \
            case MH_BF16: launch<__nv_bfloat16>(__VA_ARGS__); break;              \
            case MH_F16: launch<__half>(__VA_ARGS__); break;                      \
            default: return (int)cudaErrorInvalidValue;                           \
        }                                                                         \
        return (int)cudaGetLastError();                                           \
    } while (0)
