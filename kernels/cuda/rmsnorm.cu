// RMSNorm on the GPU, forward and backward (math: cpu/rmsnorm.cpp and notes/kernels.md).
//
// forward:  one block per row of C; the block reduces sum(x^2), then writes y in a second pass over
//           the row (re-read from L1/L2: a row of C <= 16K values is <= 64 KB).
// backward: a fixed grid of blocks walks the rows; each thread owns the same columns of every row,
//           so it accumulates dw for them in shared memory without atomics, and the block adds its
//           partial dw to global memory once at the end (C atomics per block instead of N*C).
#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_kernel(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y,
                               float *__restrict__ rstd, int64_t N, int64_t C, float eps) {
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const T *xr = x + row * C;
        T *yr = y + row * C;
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            const float v = mh::to_float(xr[j]);
            ss += v * v;
        }
        const float r = rsqrtf(mh::block_sum(ss) / float(C) + eps);
        if (threadIdx.x == 0) rstd[row] = r;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            const float n = mh::to_float(mh::from_float<T>(mh::to_float(xr[j]) * r));  // rounded, as the model
            yr[j] = mh::from_float<T>(mh::to_float(w[j]) * n);
        }
    }
}

template <typename T>
__global__ void backward_kernel(const T *__restrict__ dy, const T *__restrict__ x, const T *__restrict__ w,
                                const float *__restrict__ rstd, T *__restrict__ dx, float *__restrict__ dw,
                                int64_t N, int64_t C) {
    extern __shared__ float dw_part[];  // C floats
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) dw_part[j] = 0.0f;
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const T *xr = x + row * C, *dyr = dy + row * C;
        T *dxr = dx + row * C;
        const float r = rstd[row];
        float dot = 0.0f;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            const float g = mh::to_float(dyr[j]), n = mh::to_float(xr[j]) * r;
            dot += g * mh::to_float(w[j]) * n;
            dw_part[j] += g * mh::to_float(mh::from_float<T>(n));
        }
        const float mean = mh::block_sum(dot) / float(C);
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            const float n = mh::to_float(xr[j]) * r, dn = mh::to_float(dyr[j]) * mh::to_float(w[j]);
            dxr[j] = mh::from_float<T>(r * (dn - n * mean));
        }
    }
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) atomicAdd(dw + j, dw_part[j]);
}

template <typename T>
void launch(const void *x, const void *w, void *y, float *rstd, int64_t N, int64_t C, float eps,
            cudaStream_t stream) {
    forward_kernel<T><<<mh::rows_grid(N), kThreads, 0, stream>>>((const T *)x, (const T *)w, (T *)y, rstd, N, C,
                                                                  eps);
}

}  // namespace

extern "C" int mh_cuda_rmsnorm_forward(const void *x, const void *w, void *y, float *rstd, int64_t N, int64_t C,
                                       float eps, int dtype, void *stream) {
    MH_DISPATCH_LAUNCH(dtype, x, w, y, rstd, N, C, eps, (cudaStream_t)stream);
}

namespace {

template <typename T>
void launch(const void *dy, const void *x, const void *w, const float *rstd, void *dx, float *dw, int64_t N,
            int64_t C, cudaStream_t stream) {
    const size_t shared = size_t(C) * sizeof(float);
    if (shared > 48 * 1024)  // above the default limit a kernel must opt in to more shared memory
        cudaFuncSetAttribute(backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t blocks = N < 4LL * sms ? N : 4LL * sms;  // enough to fill the GPU, few dw atomics
    backward_kernel<T><<<(unsigned)(blocks < 1 ? 1 : blocks), kThreads, shared, stream>>>(
        (const T *)dy, (const T *)x, (const T *)w, rstd, (T *)dx, dw, N, C);
}

}  // namespace

extern "C" int mh_cuda_rmsnorm_backward(const void *dy, const void *x, const void *w, const float *rstd, void *dx,
                                        float *dw, int64_t N, int64_t C, int dtype, void *stream) {
    MH_DISPATCH_LAUNCH(dtype, dy, x, w, rstd, dx, dw, N, C, (cudaStream_t)stream);
}
