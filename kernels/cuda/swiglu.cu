// SwiGLU on the GPU: h = silu(g) * u and its backward, one grid-stride elementwise pass each
// (math: cpu/swiglu.cpp). Memory-bound: forward reads 2 and writes 1 value per element, backward
// reads 3 and writes 2, against torch's separate silu / mul kernels and their intermediates.
#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_kernel(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ h, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float gv = mh::to_float(g[i]);
        const float s = 1.0f / (1.0f + expf(-gv));
        h[i] = mh::from_float<T>(gv * s * mh::to_float(u[i]));
    }
}

template <typename T>
__global__ void backward_kernel(const T *__restrict__ dh, const T *__restrict__ g, const T *__restrict__ u,
                                T *__restrict__ dg, T *__restrict__ du, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float gv = mh::to_float(g[i]), uv = mh::to_float(u[i]), d = mh::to_float(dh[i]);
        const float s = 1.0f / (1.0f + expf(-gv));
        dg[i] = mh::from_float<T>(d * uv * s * (1.0f + gv * (1.0f - s)));
        du[i] = mh::from_float<T>(d * gv * s);
    }
}

template <typename T> void launch(const void *g, const void *u, void *h, int64_t n, cudaStream_t stream) {
    forward_kernel<T><<<mh::grid_for(n, kThreads), kThreads, 0, stream>>>((const T *)g, (const T *)u, (T *)h, n);
}

template <typename T>
void launch(const void *dh, const void *g, const void *u, void *dg, void *du, int64_t n, cudaStream_t stream) {
    backward_kernel<T><<<mh::grid_for(n, kThreads), kThreads, 0, stream>>>((const T *)dh, (const T *)g,
                                                                            (const T *)u, (T *)dg, (T *)du, n);
}

}  // namespace

extern "C" int mh_cuda_swiglu_forward(const void *g, const void *u, void *h, int64_t n, int dtype, void *stream) {
    if (n == 0) return 0;
    MH_DISPATCH_LAUNCH(dtype, g, u, h, n, (cudaStream_t)stream);
}

extern "C" int mh_cuda_swiglu_backward(const void *dh, const void *g, const void *u, void *dg, void *du, int64_t n,
                                       int dtype, void *stream) {
    if (n == 0) return 0;
    MH_DISPATCH_LAUNCH(dtype, dh, g, u, dg, du, n, (cudaStream_t)stream);
}
