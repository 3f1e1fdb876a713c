/* The plain C interface of minihuatuo's fused kernels: raw pointers, sizes and a dtype code.
 *
 * Nothing here knows about torch. The CPU kernels (the files in cpu/) and the CUDA kernels (the files in cuda/) both
 * implement it, and the thin torch binding (torch_binding.cpp) turns tensors into these arguments.
 * That split is what lets CI compile every .cu file with a bare `nvcc` on a machine whose torch has
 * no CUDA build, and lets a porter call the kernels from C.
 *
 * Conventions (dimension letters as in minihuatuo/model.py):
 *   - `x`, `y`, ... of element type `dtype` (MH_F32, MH_BF16, MH_F16), row-major, contiguous;
 *   - statistics (rstd, lse, entropy, log-probs) and weight-gradient accumulators are always float;
 *   - all arithmetic is fp32, each stored result is rounded once (round-to-nearest-even) to `dtype`;
 *   - CPU functions take `nthreads` (torch's thread count), CUDA functions take a cudaStream_t as
 *     `void *stream` and return a cudaError_t as int (0 = success).
 * The math of each kernel, and its PyTorch reference, is in notes/kernels.md and
 * minihuatuo/reference_kernels.py.
 */
#ifndef MINIHUATUO_KERNELS_H
#define MINIHUATUO_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MH_F32 = 0, MH_BF16 = 1, MH_F16 = 2 };  /* MH_F16: CUDA only */

/* ---- CPU (files in cpu/, OpenMP over rows) ------------------------------------------------------ */

/* RMSNorm  y = w * round(x * rstd),  rstd = 1/sqrt(mean(x^2) + eps)  over rows of C; x, y: (N, C). */
void mh_cpu_rmsnorm_forward(const void *x, const void *w, void *y, float *rstd,
                            int64_t N, int64_t C, float eps, int dtype, int nthreads);
/* dx (N, C) in dtype; dw (C) float, overwritten with sum over rows. */
void mh_cpu_rmsnorm_backward(const void *dy, const void *x, const void *w, const float *rstd,
                             void *dx, float *dw, int64_t N, int64_t C, int dtype, int nthreads);

/* SwiGLU  h = silu(g) * u  over n elements. */
void mh_cpu_swiglu_forward(const void *g, const void *u, void *h, int64_t n, int dtype, int nthreads);
void mh_cpu_swiglu_backward(const void *dh, const void *g, const void *u, void *dg, void *du,
                            int64_t n, int dtype, int nthreads);

/* Rotary embedding, rotate-half layout: out_j = x_j cos_j + x_{j+-D/2} sin_j  (sin signed as in
 * model.rope_cos_sin). x, out: (B, T, nh, D); cos, sin: float (B or 1, T, D), `cs_batch_stride` =
 * T*D or 0. backward != 0 applies the transpose: out_j = x_j cos_j + x_p sin_p, p = j +- D/2. */
void mh_cpu_rope(const void *x, const float *cos, const float *sin, void *out, int64_t B, int64_t T,
                 int64_t nh, int64_t D, int64_t cs_batch_stride, int backward, int dtype, int nthreads);

/* Per-row log-prob of the target and entropy of softmax(logits / temperature), never materialising
 * the (N, V) log-softmax. logits: (N, V) with row stride `ld`; targets outside [0, V) get logp = 0.
 * Writes logp, entropy and lse (logsumexp of logits/temperature), each (N) float. */
void mh_cpu_logprob_entropy_forward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                    int64_t V, float inv_temp, float *logp, float *entropy, float *lse,
                                    int dtype, int nthreads);
/* dlogits (row stride ld_out; may alias logits) from upstream dlogp and dentropy (either may be NULL
 * for zero), recomputing softmax from lse. */
void mh_cpu_logprob_entropy_backward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                     int64_t V, float inv_temp, const float *lse, const float *entropy,
                                     const float *dlogp, const float *dentropy, void *dlogits,
                                     int64_t ld_out, int dtype, int nthreads);

/* y = x W^T for a few rows (decoding): x (B, I), W (O, I) row-major, y (B, O); fp32 sums. */
void mh_cpu_gemv(const void *x, const void *w, void *y, int64_t B, int64_t O, int64_t I, int dtype, int nthreads);

/* The same with int8 weights, one scale per output row: y[b, o] = scale[o] * sum_i x[b, i] q[o, i];
 * x and y of `dtype` (float32 or bf16), fp32 sums. */
void mh_cpu_gemv_int8(const void *x, const int8_t *q, const float *scale, void *y, int64_t B, int64_t O, int64_t I,
                      int dtype, int nthreads);

/* ---- CUDA (the files in cuda/): the same functions on device pointers ------------------------------- */

int mh_cuda_rmsnorm_forward(const void *x, const void *w, void *y, float *rstd, int64_t N, int64_t C,
                            float eps, int dtype, void *stream);
/* dw must be zero-filled by the caller: blocks add their partial sums into it atomically. */
int mh_cuda_rmsnorm_backward(const void *dy, const void *x, const void *w, const float *rstd, void *dx,
                             float *dw, int64_t N, int64_t C, int dtype, void *stream);
int mh_cuda_swiglu_forward(const void *g, const void *u, void *h, int64_t n, int dtype, void *stream);
int mh_cuda_swiglu_backward(const void *dh, const void *g, const void *u, void *dg, void *du, int64_t n,
                            int dtype, void *stream);
int mh_cuda_rope(const void *x, const float *cos, const float *sin, void *out, int64_t B, int64_t T,
                 int64_t nh, int64_t D, int64_t cs_batch_stride, int backward, int dtype, void *stream);
int mh_cuda_logprob_entropy_forward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                    int64_t V, float inv_temp, float *logp, float *entropy, float *lse,
                                    int dtype, void *stream);
int mh_cuda_logprob_entropy_backward(const void *logits, int64_t ld, const int64_t *targets, int64_t N,
                                     int64_t V, float inv_temp, const float *lse, const float *entropy,
                                     const float *dlogp, const float *dentropy, void *dlogits,
                                     int64_t ld_out, int dtype, void *stream);

#ifdef __cplusplus
}
#endif

#endif
