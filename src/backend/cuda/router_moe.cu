/* router_moe.cu: the sigmoid top-k router (forward/backward) and the
 * single-GPU MoE permutation ops (sort by expert, gather, combine and their
 * backwards). Contracts in backend.h; the CPU backend is the reference.
 *
 * Determinism: the only atomics are integer ones (expert counts, per-block
 * histograms), whose sums do not depend on order. Float sums over tokens
 * (router importance) use per-chunk partials added in chunk order; sums over
 * a row use the fixed warp butterfly; sums over k run in increasing k. */
#include "backend/cuda/bf16_vec.cuh" /* includes cuda_common.h */
#include "backend/cuda/cuda_ops.h"

enum {
  TOK_WARPS = 4,      /* tokens (warps) per block of the warp-per-token kernels */
  SORT_CHUNK = 1024,  /* pairs per block in moe_sort: one warp places them in order */
  MAX_TOPK = 32       /* chosen experts live one per lane */
};

/* ---- router forward ---- */

/* Per token (one warp): scores = sigmoid(logits) in place, top-k of
 * score + bias (descending, ties to the lower id), w = chosen scores / their
 * sum, counts += 1 per choice, rowsum[t] = sum of all scores (when non-NULL). */
__global__ void router_topk_kernel(float *scores, int32_t *idx, float *w, int32_t *counts,
                                   float *rowsum, const float *bias, int N, int E, int K) {
  extern __shared__ float sm[]; /* per warp: biased [E], then sigmoid [E] */
  int wib = threadIdx.x / 32, lane = threadIdx.x % 32, t = blockIdx.x * TOK_WARPS + wib;
  if (t >= N) return;
  float *b = sm + (size_t)wib * 2 * E, *sg = b + E;
  float *s = scores + (size_t)t * E;
  float rs = 0.f;
  for (int e = lane; e < E; e += 32) {
    float v = 1.f / (1.f + expf(-s[e]));
    s[e] = v;
    sg[e] = v;
    rs += v;
    float bv = v + bias[e];
    b[e] = isnan(bv) ? -INFINITY : bv; /* every candidate comparable */
  }
  __syncwarp();
  int my_e = 0;
  float my_s = 0.f;
  for (int k = 0; k < K; k++) {
    float bv = -INFINITY;
    int bi = E;
    for (int e = lane; e < E; e += 32) { /* chosen entries are NaN: never win */
      float v = b[e];
      if (v > bv || (v == bv && e < bi)) bv = v, bi = e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { /* total order (value desc, id asc): all lanes agree */
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if (lane == k) my_e = bi, my_s = sg[bi];
    __syncwarp();
    if (lane == 0) b[bi] = NAN;
    __syncwarp();
  }
  float sum = 0.f;
  for (int k = 0; k < K; k++) sum += __shfl_sync(0xffffffffu, my_s, k);
  if (lane < K) {
    idx[(size_t)t * K + lane] = my_e;
    w[(size_t)t * K + lane] = my_s / sum;
    atomicAdd(&counts[my_e], 1);
  }
  rs = warp_sum(rs);
  if (rowsum && lane == 0) rowsum[t] = rs;
}

/* part[c, e] = sum over tokens t of chunk c (in order) of s[t,e] / rowsum[t]. */
__global__ void router_imp_partial_kernel(float *part, const float *s, const float *rowsum, int N,
                                          int E, int rows) {
  int e = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
  if (e >= E) return;
  int t0 = c * rows, t1 = min(N, t0 + rows);
  float acc = 0.f;
  for (int t = t0; t < t1; t++) acc += s[(size_t)t * E + e] / rowsum[t];
  part[(size_t)c * E + e] = acc;
}

/* out[e] = sum over chunks c, in order, of part[c, e]. */
__global__ void colsum_reduce_kernel(float *out, const float *part, int nchunks, int E) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float s = 0.f;
  for (int c = 0; c < nchunks; c++) s += part[(size_t)c * E + e];
  out[e] = s;
}

extern "C" void cu_router_fwd(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts,
                              void *imp, const void *x, const void *wg, const void *bias, int N,
                              int D, int E, int K, float route_scale) {
  if (K > MAX_TOPK || K > E)
    nmoe_fatal("router: top-k %d must be <= %d and <= the number of experts %d", K, MAX_TOPK, E);
  cudaStream_t st = cuda_stream(be);
  CUDA_CHECK(cudaMemsetAsync(counts, 0, (size_t)E * sizeof(int32_t), st));
  if (N <= 0) {
    if (imp) CUDA_CHECK(cudaMemsetAsync(imp, 0, (size_t)E * sizeof(float), st));
    return;
  }
  /* logits = route_scale * x @ wg^T (fp32), written straight into scores */
  cu_gemm(be, scores, x, wg, N, E, D, 0, 1, route_scale, 0.f, 1);

  int rows = colsum_chunk_rows(N), nchunks = ceil_div(N, rows);
  float *rowsum = NULL, *part = NULL;
  if (imp) {
    rowsum = (float *)cuda_scratch(be, SCRATCH_ROUTER,
                                   ((size_t)N + (size_t)nchunks * E) * sizeof(float));
    part = rowsum + N;
  }
  size_t smem = (size_t)TOK_WARPS * 2 * E * sizeof(float);
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(router_topk_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  router_topk_kernel<<<ceil_div(N, TOK_WARPS), 32 * TOK_WARPS, smem, st>>>(
      (float *)scores, idx, (float *)w, counts, rowsum, (const float *)bias, N, E, K);
  CUDA_LAUNCH_CHECK();
  if (!imp) return;
  router_imp_partial_kernel<<<dim3(ceil_div(E, 128), nchunks), 128, 0, st>>>(
      part, (const float *)scores, rowsum, N, E, rows);
  CUDA_LAUNCH_CHECK();
  colsum_reduce_kernel<<<ceil_div(E, 128), 128, 0, st>>>((float *)imp, part, nchunks, E);
  CUDA_LAUNCH_CHECK();
}

/* ---- router backward ---- */

/* Per token (one warp): dlogits[t,:] = s(1-s) * dL/ds as bf16, where for the
 * chosen set C with S = sum_C s, w_i = s_i/S, g = dw[t]:
 *   dL/ds_j = (g_j - sum_C g_i w_i) / S                       (j in C)
 * plus, with aux_coef, d/ds_j of aux_coef * sum_i f_i s_i / R (R = sum_E s):
 *   aux_coef * (f_j - sum_i f_i s_i / R) / R                  (all j). */
__global__ void router_dlogits_kernel(bf16 *dlog, const float *dw, const float *scores,
                                      const int32_t *idx, int N, int E, int K, float aux_coef,
                                      const float *f) {
  extern __shared__ float sm[]; /* per warp: dL/ds [E] */
  int wib = threadIdx.x / 32, lane = threadIdx.x % 32, t = blockIdx.x * TOK_WARPS + wib;
  if (t >= N) return;
  float *ds = sm + (size_t)wib * E;
  const float *s = scores + (size_t)t * E;
  float fsum = 0.f, R = 1.f;
  if (aux_coef != 0.f) {
    float rs = 0.f, fs = 0.f;
    for (int e = lane; e < E; e += 32) rs += s[e], fs += f[e] * s[e];
    R = warp_sum(rs);
    fsum = warp_sum(fs) / R;
  }
  for (int e = lane; e < E; e += 32) ds[e] = aux_coef != 0.f ? aux_coef * (f[e] - fsum) / R : 0.f;
  int j = 0;
  float sj = 0.f, g = 0.f;
  if (lane < K) {
    j = idx[(size_t)t * K + lane];
    sj = s[j];
    g = dw[(size_t)t * K + lane];
  }
  float S = 0.f;
  for (int k = 0; k < K; k++) S += __shfl_sync(0xffffffffu, sj, k);
  float gw = 0.f;
  for (int k = 0; k < K; k++)
    gw += __shfl_sync(0xffffffffu, g, k) * (__shfl_sync(0xffffffffu, sj, k) / S);
  __syncwarp();
  if (lane < K) ds[j] += (g - gw) / S; /* chosen ids are distinct */
  __syncwarp();
  bf16 *o = dlog + (size_t)t * E;
  for (int e = lane; e < E; e += 32) o[e] = __float2bfloat16(s[e] * (1.f - s[e]) * ds[e]);
}

extern "C" void cu_router_bwd(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                              const int32_t *idx, const void *x, const void *wg, int N, int D,
                              int E, int K, float route_scale, float aux_coef,
                              const void *load_frac) {
  if (N <= 0) return;
  if (K > MAX_TOPK || K > E)
    nmoe_fatal("router: top-k %d must be <= %d and <= the number of experts %d", K, MAX_TOPK, E);
  cudaStream_t st = cuda_stream(be);
  bf16 *dlog = (bf16 *)cuda_scratch(be, SCRATCH_ROUTER, (size_t)N * E * sizeof(bf16)); /* [N,E] */
  size_t smem = (size_t)TOK_WARPS * E * sizeof(float);
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(router_dlogits_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  router_dlogits_kernel<<<ceil_div(N, TOK_WARPS), 32 * TOK_WARPS, smem, st>>>(
      dlog, (const float *)dw, (const float *)scores, idx, N, E, K, aux_coef,
      (const float *)load_frac);
  CUDA_LAUNCH_CHECK();
  /* logits = route_scale * x wg^T: dx += route_scale dlog @ wg, dwg += route_scale dlog^T @ x */
  cu_gemm(be, dx, dlog, wg, N, D, E, 0, 0, route_scale, 1.f, 0);
  cu_gemm(be, dwg, dlog, x, E, D, N, 1, 0, route_scale, 1.f, 0);
}

/* ---- moe_sort: stable counting sort of the N*K pairs by expert ---- */

/* hist[b, e] = pairs of chunk b routed to expert e. */
__global__ void moe_hist_kernel(int32_t *hist, const int32_t *idx, int P, int E) {
  extern __shared__ int32_t cnt[]; /* [E] */
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  int p0 = blockIdx.x * SORT_CHUNK, p1 = min(P, p0 + SORT_CHUNK);
  for (int p = p0 + threadIdx.x; p < p1; p += blockDim.x) atomicAdd(&cnt[idx[p]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[(size_t)blockIdx.x * E + e] = cnt[e];
}

/* One block: off = exclusive scan of the expert totals; hist[b, e] becomes the
 * first sorted row of chunk b's pairs for expert e (chunks in order). */
__global__ void moe_scan_kernel(int32_t *off, int32_t *hist, int nb, int E) {
  extern __shared__ int32_t tot[]; /* [E] */
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int s = 0;
    for (int b = 0; b < nb; b++) s += hist[(size_t)b * E + e];
    tot[e] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) { /* E is at most a few thousand: a serial scan is cheap */
    int run = 0;
    for (int e = 0; e < E; e++) {
      int c = tot[e];
      tot[e] = run;
      off[e] = run;
      run += c;
    }
    off[E] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = tot[e];
    for (int b = 0; b < nb; b++) {
      int c = hist[(size_t)b * E + e];
      hist[(size_t)b * E + e] = run;
      run += c;
    }
  }
}

/* One warp per chunk, 32 pairs at a time in pair order: a pair's row is its
 * expert's running position plus the number of earlier lanes with the same
 * expert, so rows within an expert follow pair order (stable). */
__global__ void moe_place_kernel(int32_t *row_of, int32_t *pair_of, const int32_t *idx,
                                 const int32_t *base, int P, int E) {
  extern __shared__ int32_t pos[]; /* [E] */
  int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32) pos[e] = base[(size_t)blockIdx.x * E + e];
  __syncwarp();
  int p0 = blockIdx.x * SORT_CHUNK, p1 = min(P, p0 + SORT_CHUNK);
  unsigned lt = (1u << lane) - 1;
  for (int q = p0; q < p1; q += 32) {
    int p = q + lane;
    int e = p < p1 ? idx[p] : -1;
    unsigned same = __match_any_sync(0xffffffffu, e);
    int row = 0;
    if (e >= 0) row = pos[e] + __popc(same & lt);
    __syncwarp();
    if (e >= 0) {
      row_of[p] = row;
      pair_of[row] = p;
      if ((same & lt) == 0) pos[e] += __popc(same); /* group leader advances */
    }
    __syncwarp();
  }
}

extern "C" void cu_moe_sort(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of,
                            const int32_t *idx, int N, int K, int E) {
  cudaStream_t st = cuda_stream(be);
  int P = N * K;
  if (P <= 0) {
    CUDA_CHECK(cudaMemsetAsync(off, 0, (size_t)(E + 1) * sizeof(int32_t), st));
    return;
  }
  int nb = ceil_div(P, SORT_CHUNK);
  int32_t *hist = (int32_t *)cuda_scratch(be, SCRATCH_MOE, (size_t)nb * E * sizeof(int32_t));
  size_t smem = (size_t)E * sizeof(int32_t);
  if (smem > 48 * 1024)
    nmoe_fatal("moe_sort: %d experts on one device is more than supported (12288)", E);
  moe_hist_kernel<<<nb, 256, smem, st>>>(hist, idx, P, E);
  CUDA_LAUNCH_CHECK();
  moe_scan_kernel<<<1, 1024, smem, st>>>(off, hist, nb, E);
  CUDA_LAUNCH_CHECK();
  moe_place_kernel<<<nb, 32, smem, st>>>(row_of, pair_of, idx, hist, P, E);
  CUDA_LAUNCH_CHECK();
}

/* ---- gather / combine ---- */

/* xe[m, :] = x[pair_of[m] / K, :]; one thread per V-wide unit. */
template <int V>
__global__ void moe_gather_kernel(bf16 *xe, const bf16 *x, const int32_t *pair_of, int M, int K,
                                  int D) {
  int per = D / V;
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)M * per) return;
  size_t m = u / per;
  int c = (int)(u % per) * V;
  vcopy<V>(xe + m * D + c, x + (size_t)(pair_of[m] / K) * D + c);
}

/* y[t, :] (= or +=) sum_k wk * ye[row_of[t*K+k], :], k increasing, fp32; wk = w[t,k],
 * or 1 when w is NULL (the gather backward). */
template <int V>
__global__ void moe_combine_kernel(bf16 *y, const bf16 *ye, const float *w, const int32_t *row_of,
                                   int N, int K, int D, int accumulate) {
  int per = D / V;
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)N * per) return;
  size_t t = u / per;
  int c = (int)(u % per) * V;
  float acc[V], v[V];
#pragma unroll
  for (int j = 0; j < V; j++) acc[j] = 0.f;
  for (int k = 0; k < K; k++) {
    float wk = w ? w[t * K + k] : 1.f;
    vload<V>(ye + (size_t)row_of[t * K + k] * D + c, v);
#pragma unroll
    for (int j = 0; j < V; j++) acc[j] += wk * v[j];
  }
  bf16 *yr = y + t * D + c;
  if (accumulate) {
    vload<V>(yr, v);
#pragma unroll
    for (int j = 0; j < V; j++) acc[j] += v[j];
  }
  vstore<V>(yr, acc);
}

/* One warp per pair (t, k): dye[row] = w * dy[t]; dw[t,k] = <dy[t], ye[row]>. */
template <int V>
__global__ void moe_combine_bwd_kernel(bf16 *dye, float *dw, const bf16 *dy, const bf16 *ye,
                                       const float *w, const int32_t *row_of, int NK, int K,
                                       int D) {
  int p = blockIdx.x * TOK_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (p >= NK) return;
  size_t row = row_of[p];
  const bf16 *g = dy + (size_t)(p / K) * D, *yr = ye + row * D;
  bf16 *o = dye + row * D;
  float wk = w[p], dot = 0.f;
  for (int c = lane * V; c < D; c += 32 * V) {
    float gv[V], yv[V];
    vload<V>(g + c, gv);
    vload<V>(yr + c, yv);
#pragma unroll
    for (int j = 0; j < V; j++) dot += gv[j] * yv[j], gv[j] *= wk;
    vstore<V>(o + c, gv);
  }
  dot = warp_sum(dot);
  if (lane == 0) dw[p] = dot;
}

static int moe_vec(const void *a, const void *b, int D) {
  const void *p[] = {a, b};
  int l[] = {D};
  return vec_width(p, 2, l, 1);
}

extern "C" void cu_moe_gather(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N,
                              int K, int D) {
  int V = moe_vec(xe, x, D), M = N * K;
  size_t n = (size_t)M * (D / V);
  if (n == 0) return;
  cudaStream_t st = cuda_stream(be);
  if (V == 8)
    moe_gather_kernel<8><<<ceil_div((long)n, 256), 256, 0, st>>>((bf16 *)xe, (const bf16 *)x,
                                                                 pair_of, M, K, D);
  else
    moe_gather_kernel<1><<<ceil_div((long)n, 256), 256, 0, st>>>((bf16 *)xe, (const bf16 *)x,
                                                                 pair_of, M, K, D);
  CUDA_LAUNCH_CHECK();
}

/* y (= or +=) the weighted (w) or plain (w NULL) sum over k of rows of ye. */
static void moe_combine_launch(Backend *be, void *y, const void *ye, const float *w,
                               const int32_t *row_of, int N, int K, int D, int accumulate) {
  int V = moe_vec(y, ye, D);
  size_t n = (size_t)N * (D / V);
  if (n == 0) return;
  cudaStream_t st = cuda_stream(be);
  if (V == 8)
    moe_combine_kernel<8><<<ceil_div((long)n, 256), 256, 0, st>>>(
        (bf16 *)y, (const bf16 *)ye, w, row_of, N, K, D, accumulate);
  else
    moe_combine_kernel<1><<<ceil_div((long)n, 256), 256, 0, st>>>(
        (bf16 *)y, (const bf16 *)ye, w, row_of, N, K, D, accumulate);
  CUDA_LAUNCH_CHECK();
}

extern "C" void cu_moe_combine(Backend *be, void *y, const void *ye, const void *w,
                               const int32_t *row_of, int N, int K, int D, int accumulate) {
  moe_combine_launch(be, y, ye, (const float *)w, row_of, N, K, D, accumulate);
}

extern "C" void cu_moe_gather_bwd(Backend *be, void *dx, const void *dxe, const int32_t *row_of,
                                  int N, int K, int D, int accumulate) {
  moe_combine_launch(be, dx, dxe, NULL, row_of, N, K, D, accumulate);
}

extern "C" void cu_moe_combine_bwd(Backend *be, void *dye, void *dw, const void *dy,
                                   const void *ye, const void *w, const int32_t *row_of, int N,
                                   int K, int D) {
  int NK = N * K;
  if (NK <= 0) return;
  const void *p[] = {dye, dy, ye};
  int l[] = {D};
  int V = vec_width(p, 3, l, 1);
  cudaStream_t st = cuda_stream(be);
  int grid = ceil_div(NK, TOK_WARPS);
  if (V == 8)
    moe_combine_bwd_kernel<8><<<grid, 32 * TOK_WARPS, 0, st>>>(
        (bf16 *)dye, (float *)dw, (const bf16 *)dy, (const bf16 *)ye, (const float *)w, row_of,
        NK, K, D);
  else
    moe_combine_bwd_kernel<1><<<grid, 32 * TOK_WARPS, 0, st>>>(
        (bf16 *)dye, (float *)dw, (const bf16 *)dy, (const bf16 *)ye, (const float *)w, row_of,
        NK, K, D);
  CUDA_LAUNCH_CHECK();
}
