/* bias.cu: the Linear-layer bias ops: bias_add (y[N,C] += b[C]) and bias_grad
 * (db[C] += column sums of dy[N,C]). bf16 storage, fp32 math.
 *
 * Determinism: bias_grad sums fixed row chunks per column in row order (the
 * chunk size is a function of N only, colsum_chunk_rows), then the chunks in
 * order, and rounds into db once; no atomics. */
#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

#define BIAS_THREADS 256

/* One thread per element (grid-stride): y[n,c] += b[c]. */
__global__ void bias_add_kernel(bf16 *y, const bf16 *b, size_t total, int C) {
  for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < total;
       u += (size_t)gridDim.x * blockDim.x)
    y[u] = __float2bfloat16(__bfloat162float(y[u]) + __bfloat162float(b[u % C]));
}

/* part[k, c] = sum over rows n of chunk k (in order) of dy[n, c]. */
__global__ void bias_grad_partial_kernel(float *part, const bf16 *dy, int N, int C, int rows) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
  if (c >= C) return;
  const int n0 = k * rows, n1 = min(N, n0 + rows);
  float acc = 0.f;
  for (int n = n0; n < n1; n++) acc += __bfloat162float(dy[(size_t)n * C + c]);
  part[(size_t)k * C + c] = acc;
}

/* db[c] += sum over chunks k, in order, of part[k, c]. */
__global__ void bias_grad_reduce_kernel(bf16 *db, const float *part, int nchunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.f;
  for (int k = 0; k < nchunks; k++) s += part[(size_t)k * C + c];
  db[c] = __float2bfloat16(__bfloat162float(db[c]) + s);
}

extern "C" void cu_bias_add(Backend *be, void *y, const void *b, int N, int C) {
  const size_t total = (size_t)N * C;
  if (total == 0) return;
  long blocks = (long)((total + BIAS_THREADS - 1) / BIAS_THREADS);
  const long cap = (long)cuda_ctx(be)->num_sms * 32;
  bias_add_kernel<<<(int)(blocks < cap ? blocks : cap), BIAS_THREADS, 0, cuda_stream(be)>>>(
      (bf16 *)y, (const bf16 *)b, total, C);
  CUDA_LAUNCH_CHECK();
}

extern "C" void cu_bias_grad(Backend *be, void *db, const void *dy, int N, int C) {
  if (N <= 0 || C <= 0) return;
  cudaStream_t st = cuda_stream(be);
  const int rows = colsum_chunk_rows(N), nchunks = ceil_div(N, rows);
  float *part = (float *)cuda_scratch(be, SCRATCH_REDUCE, (size_t)nchunks * C * sizeof(float));
  dim3 pgrid(ceil_div(C, BIAS_THREADS), nchunks);
  bias_grad_partial_kernel<<<pgrid, BIAS_THREADS, 0, st>>>(part, (const bf16 *)dy, N, C, rows);
  CUDA_LAUNCH_CHECK();
  bias_grad_reduce_kernel<<<ceil_div(C, BIAS_THREADS), BIAS_THREADS, 0, st>>>((bf16 *)db, part,
                                                                              nchunks, C);
  CUDA_LAUNCH_CHECK();
}
