// Token log-prob and entropy from logits on the GPU (math: cpu/logprob.cpp, notes/kernels.md).
// One block per row: pass 1 reduces the max of z = logits / temperature, pass 2 the sums
// s = sum e^(z - m) and t = sum e^(z - m)(z - m); the second read of the row mostly hits L2
// (a 152K-entry bf16 row is 300 KB). Backward: one block per row recomputes p_j from the stored lse
// and writes d logits in a single pass; the target's one-hot term is added by the thread owning it.
#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 512;

template <typename T>
__global__ void forward_kernel(const T *__restrict__ logits, int64_t ld, const int64_t *__restrict__ targets,
                               int64_t N, int64_t V, float inv_temp, float *__restrict__ logp,
                               float *__restrict__ entropy, float *__restrict__ lse) {
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const T *x = logits + row * ld;
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, mh::to_float(x[j]) * inv_temp);
        m = mh::block_max(m);
        float s = 0.0f, t = 0.0f;
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
            const float d = mh::to_float(x[j]) * inv_temp - m;
            const float e = expf(d);
            s += e;
            t += e > 0.0f ? e * d : 0.0f;  // a masked -inf logit adds nothing (not 0 * -inf = NaN)
        }
        s = mh::block_sum(s);
        t = mh::block_sum(t);
        if (threadIdx.x == 0) {
            const float log_s = logf(s), L = m + log_s;
            const int64_t a = targets[row];
            lse[row] = L;
            entropy[row] = log_s - t / s;
            logp[row] = (a >= 0 && a < V) ? mh::to_float(x[a]) * inv_temp - L : 0.0f;
        }
    }
}

// dlogits may alias logits: each element is read and then written by the same thread.
template <typename T>
__global__ void backward_kernel(const T *logits, int64_t ld, const int64_t *__restrict__ targets, int64_t N,
                                int64_t V, float inv_temp, const float *__restrict__ lse,
                                const float *__restrict__ entropy, const float *__restrict__ dlogp,
                                const float *__restrict__ dentropy, T *dlogits, int64_t ld_out) {
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const T *x = logits + row * ld;
        T *dx = dlogits + row * ld_out;
        const int64_t a = targets[row];
        const bool valid = a >= 0 && a < V;
        const float L = lse[row], H = entropy[row];
        const float g = (dlogp != nullptr && valid) ? dlogp[row] : 0.0f;
        const float h = dentropy != nullptr ? dentropy[row] : 0.0f;
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
            const float lp = mh::to_float(x[j]) * inv_temp - L;  // log p_j
            const float p = expf(lp);
            float v = p > 0.0f ? p * (h * (-H - lp) - g) : 0.0f;
            if (j == a) v += g;
            dx[j] = mh::from_float<T>(v * inv_temp);
        }
    }
}

template <typename T>
void launch(const void *logits, int64_t ld, const int64_t *targets, int64_t N, int64_t V, float inv_temp,
            float *logp, float *entropy, float *lse, cudaStream_t stream) {
    forward_kernel<T><<<mh::rows_grid(N), kThreads, 0, stream>>>((const T *)logits, ld, targets, N, V, inv_temp,
                                                                  logp, entropy, lse);
}

template <typename T>
void launch(const void *logits, int64_t ld, const int64_t *targets, int64_t N, int64_t V, float inv_temp,
            const float *lse, const float *entropy, const float *dlogp, const float *dentropy, void *dlogits,
            int64_t ld_out, cudaStream_t stream) {
    backward_kernel<T><<<mh::rows_grid(N), kThreads, 0, stream>>>((const T *)logits, ld, targets, N, V, inv_temp,
                                                                   lse, entropy, dlogp, dentropy, (T *)dlogits,
                                                                   ld_out);
}

}  // namespace

extern "C" int mh_cuda_logprob_entropy_forward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                               int64_t V, float inv_temp, float *logp, float *entropy, float *lse,
                                               int dtype, void *stream) {
    if (N == 0) return 0;
    MH_DISPATCH_LAUNCH(dtype, logits, ld, targets, N, V, inv_temp, logp, entropy, lse, (cudaStream_t)stream);
}

extern "C" int mh_cuda_logprob_entropy_backward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                                int64_t V, float inv_temp, const float *lse, const float *entropy,
                                                const float *dlogp, const float *dentropy, void *dlogits,
                                                int64_t ld_out, int dtype, void *stream) {
    if (N == 0) return 0;
    MH_DISPATCH_LAUNCH(dtype, logits, ld, targets, N, V, inv_temp, lse, entropy, dlogp, dentropy, dlogits, ld_out,
                       (cudaStream_t)stream);
}
