/* xent.cu: fused lm_head + cross-entropy (forward loss, optional backward).
 *
 * fp32 logits for all N rows would be N*V*4 bytes (8 GiB at N=8192, V=256k),
 * so rows go in chunks of R rows, R chosen so the [R, V] fp32 logits buffer
 * stays within XENT_LOGITS_BYTES. Per chunk:
 *   logits[R,V] = scale * h_chunk @ W^T                  (cuBLASLt, fp32 out)
 *   per row: lse (fp32 max / sum-exp), loss_n = lse - logits[target]
 *            dlogits = grad_scale * (softmax - onehot) in bf16 (when dh)
 *   dh_chunk = scale * dlogits @ W                        (written)
 *   dW      += scale * dlogits^T @ h_chunk
 * Masked rows (target == mask_id) get loss 0 and zero dlogits.
 *
 * With several chunks dW is accumulated in an fp32 [V, D] scratch and added to
 * the bf16 dW once at the end, so it is rounded to bf16 once instead of once
 * per chunk. Per-row losses land in an fp32 [N] buffer that one block sums in
 * double in a fixed order; the only host wait is the final 8-byte download. */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

/* 2 GiB of fp32 logits per chunk: fewer chunks mean fewer passes over the fp32
 * [V, D] dW accumulator (1.6 GB at V=201088, D=2048), which dominated at 512 MiB. */
#define XENT_LOGITS_BYTES ((size_t)2 << 30)
#define ROW_THREADS 1024

/* Combine two partial (max, sum of exp(x - max)) pairs. */
static __device__ __forceinline__ void lse_merge(float *m, float *s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (*m == -INFINITY) {
    *m = m2;
    *s = s2;
    return;
  }
  float mx = fmaxf(*m, m2);
  *s = *s * __expf(*m - mx) + s2 * __expf(m2 - mx);
  *m = mx;
}

/* One block per row of the chunk: loss[row] and, when dlog != NULL, the bf16
 * gradient of the logits. Reductions are a fixed tree, so results repeat. */
static __global__ void xent_row_kernel(float *loss, bf16 *dlog, const float *logits,
                                       const int32_t *targets, int V, int mask_id,
                                       float grad_scale) {
  __shared__ float sm[ROW_THREADS], ss[ROW_THREADS];
  int r = blockIdx.x;
  const float *x = logits + (size_t)r * V;
  bf16 *d = dlog ? dlog + (size_t)r * V : NULL;
  int t = targets[r];
  if (mask_id >= 0 && t == mask_id) {
    if (threadIdx.x == 0) loss[r] = 0;
    if (d)
      for (int j = threadIdx.x; j < V; j += blockDim.x) d[j] = __float2bfloat16(0.f);
    return;
  }
  float m = -INFINITY, s = 0;
  for (int j = threadIdx.x; j < V; j += blockDim.x) lse_merge(&m, &s, x[j], 1.f);
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if ((int)threadIdx.x < w) {
      float m1 = sm[threadIdx.x], s1 = ss[threadIdx.x];
      lse_merge(&m1, &s1, sm[threadIdx.x + w], ss[threadIdx.x + w]);
      sm[threadIdx.x] = m1;
      ss[threadIdx.x] = s1;
    }
    __syncthreads();
  }
  float lse = sm[0] + __logf(ss[0]);
  if (threadIdx.x == 0) loss[r] = lse - x[t];
  if (d)
    for (int j = threadIdx.x; j < V; j += blockDim.x)
      d[j] = __float2bfloat16(grad_scale * (__expf(x[j] - lse) - (j == t ? 1.f : 0.f)));
}

/* Sum of the N per-row losses in double, one block, fixed order. */
static __global__ void loss_sum_kernel(double *out, const float *loss, int N) {
  __shared__ double s[ROW_THREADS];
  double acc = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) acc += loss[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = s[0];
}

/* dW (bf16) += acc (fp32), elementwise. */
static __global__ void add_f32_to_bf16_kernel(bf16 *dW, const float *acc, size_t n) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    dW[i] = __float2bfloat16(__bfloat162float(dW[i]) + acc[i]);
}

static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

double cu_xent(Backend *be, void *dh, void *dW, const void *h, const void *W,
               const int32_t *targets, int N, int D, int V, float scale, int mask_id,
               float grad_scale) {
  if (N == 0) return 0;
  cudaStream_t st = cuda_stream(be);
  size_t rows_fit = XENT_LOGITS_BYTES / ((size_t)V * sizeof(float));
  int R = (int)(rows_fit < 1 ? 1 : rows_fit > (size_t)N ? N : rows_fit);
  int nchunks = ceil_div(N, R);
  int bwd = dh != NULL;
  int acc_f32 = bwd && nchunks > 1;

  /* Scratch: logits f32 [R,V] | dlogits bf16 [R,V] | loss f32 [N] | sum double | dW acc f32 [V,D] */
  size_t o_dlog = align256((size_t)R * V * sizeof(float));
  size_t o_loss = o_dlog + (bwd ? align256((size_t)R * V * sizeof(bf16)) : 0);
  size_t o_sum = o_loss + align256((size_t)N * sizeof(float));
  size_t o_acc = o_sum + 256;
  size_t total = o_acc + (acc_f32 ? (size_t)V * D * sizeof(float) : 0);
  char *s = (char *)cuda_scratch(be, SCRATCH_XENT, total);
  float *logits = (float *)s;
  bf16 *dlog = bwd ? (bf16 *)(s + o_dlog) : NULL;
  float *loss = (float *)(s + o_loss);
  double *sum = (double *)(s + o_sum);
  float *acc = (float *)(s + o_acc);

  const bf16 *hb = (const bf16 *)h;
  for (int c = 0; c < nchunks; c++) {
    int r0 = c * R, rows = N - r0 < R ? N - r0 : R;
    const bf16 *hc = hb + (size_t)r0 * D;
    cu_gemm(be, logits, hc, W, rows, V, D, 0, 1, scale, 0.f, 1);
    xent_row_kernel<<<rows, ROW_THREADS, 0, st>>>(loss + r0, dlog, logits, targets + r0, V,
                                                  mask_id, grad_scale);
    CUDA_LAUNCH_CHECK();
    if (!bwd) continue;
    cu_gemm(be, (bf16 *)dh + (size_t)r0 * D, dlog, W, rows, D, V, 0, 0, scale, 0.f, 0);
    if (acc_f32) cu_gemm(be, acc, dlog, hc, V, D, rows, 1, 0, scale, c == 0 ? 0.f : 1.f, 1);
    else cu_gemm(be, dW, dlog, hc, V, D, rows, 1, 0, scale, 1.f, 0);
  }
  if (acc_f32) {
    size_t n = (size_t)V * D;
    int grid = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    add_f32_to_bf16_kernel<<<grid, 256, 0, st>>>((bf16 *)dW, acc, n);
    CUDA_LAUNCH_CHECK();
  }
  loss_sum_kernel<<<1, ROW_THREADS, 0, st>>>(sum, loss, N);
  CUDA_LAUNCH_CHECK();
  double r = 0;
  CUDA_CHECK(cudaMemcpyAsync(&r, sum, sizeof(double), cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  return r;
}
