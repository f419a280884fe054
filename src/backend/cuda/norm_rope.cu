/* norm_rope.cu: RMSNorm (forward/backward), RoPE (rotate-half, in place) and
 * the MLA key/value split on the GPU. Contracts in backend.h; the CPU backend
 * is the reference. bf16 storage, fp32 math.
 *
 * RMSNorm runs one warp per row (row sums by a fixed butterfly); the weight
 * gradient, a sum over all rows, goes through per-chunk fp32 partials in
 * scratch and a second pass that adds the chunks in order, so it is
 * deterministic without float atomics. */
#include "backend/cuda/bf16_vec.cuh" /* includes cuda_common.h */
#include "backend/cuda/cuda_ops.h"

enum { ROW_WARPS = 4 }; /* rows (warps) per block of the warp-per-row kernels */

/* y[n,:] = x[n,:] * rstd[n] * w; one warp per row. */
template <int V>
__global__ void rmsnorm_fwd_kernel(bf16 *y, float *rstd, const bf16 *x, const bf16 *w, int N,
                                   int D, int ldx, int ldy, float eps) {
  int row = blockIdx.x * ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const bf16 *xr = x + (size_t)row * ldx;
  float ss = 0.f;
  for (int i = lane * V; i < D; i += 32 * V) {
    float v[V];
    vload<V>(xr + i, v);
#pragma unroll
    for (int j = 0; j < V; j++) ss += v[j] * v[j];
  }
  float r = 1.f / sqrtf(warp_sum(ss) / (float)D + eps);
  if (lane == 0) rstd[row] = r;
  bf16 *yr = y + (size_t)row * ldy;
  for (int i = lane * V; i < D; i += 32 * V) {
    float v[V], wv[V];
    vload<V>(xr + i, v);
    vload<V>(w + i, wv);
#pragma unroll
    for (int j = 0; j < V; j++) v[j] = v[j] * r * wv[j];
    vstore<V>(yr + i, v);
  }
}

/* dx = r*(dy*w) - x * r^3 * <dy*w, x> / D  (written or accumulated). */
template <int V>
__global__ void rmsnorm_dx_kernel(bf16 *dx, const bf16 *dy, const bf16 *x, const bf16 *w,
                                  const float *rstd, int N, int D, int ldx, int ldy,
                                  int accumulate) {
  int row = blockIdx.x * ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const bf16 *xr = x + (size_t)row * ldx, *dyr = dy + (size_t)row * ldy;
  bf16 *dxr = dx + (size_t)row * ldx;
  float dot = 0.f;
  for (int i = lane * V; i < D; i += 32 * V) {
    float xv[V], gv[V], wv[V];
    vload<V>(xr + i, xv);
    vload<V>(dyr + i, gv);
    vload<V>(w + i, wv);
#pragma unroll
    for (int j = 0; j < V; j++) dot += gv[j] * wv[j] * xv[j];
  }
  float r = rstd[row];
  float c = warp_sum(dot) * r * r * r / (float)D;
  for (int i = lane * V; i < D; i += 32 * V) {
    float xv[V], gv[V], wv[V], o[V];
    vload<V>(xr + i, xv);
    vload<V>(dyr + i, gv);
    vload<V>(w + i, wv);
    if (accumulate) vload<V>(dxr + i, o);
#pragma unroll
    for (int j = 0; j < V; j++) {
      float d = r * gv[j] * wv[j] - xv[j] * c;
      o[j] = accumulate ? o[j] + d : d;
    }
    vstore<V>(dxr + i, o);
  }
}

/* part[c, i] = sum over rows n of chunk c (in order) of dy[n,i] * x[n,i] * rstd[n]. */
__global__ void rmsnorm_dw_partial_kernel(float *part, const bf16 *dy, const bf16 *x,
                                          const float *rstd, int N, int D, int ldx, int ldy,
                                          int rows) {
  int i = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
  if (i >= D) return;
  int n0 = c * rows, n1 = min(N, n0 + rows);
  float acc = 0.f;
  for (int n = n0; n < n1; n++)
    acc += __bfloat162float(dy[(size_t)n * ldy + i]) * __bfloat162float(x[(size_t)n * ldx + i]) *
           rstd[n];
  part[(size_t)c * D + i] = acc;
}

/* dw[i] += sum over chunks c, in order, of part[c, i]. */
__global__ void rmsnorm_dw_reduce_kernel(bf16 *dw, const float *part, int nchunks, int D) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= D) return;
  float s = 0.f;
  for (int c = 0; c < nchunks; c++) s += part[(size_t)c * D + i];
  dw[i] = __float2bfloat16(__bfloat162float(dw[i]) + s);
}

extern "C" void cu_rmsnorm_fwd(Backend *be, void *y, void *rstd, const void *x, const void *w,
                               int N, int D, int ldx, int ldy, float eps) {
  if (N <= 0) return;
  const void *p[] = {y, x, w};
  int l[] = {D, ldx, ldy};
  int grid = ceil_div(N, ROW_WARPS);
  cudaStream_t st = cuda_stream(be);
  if (vec_width(p, 3, l, 3) == 8)
    rmsnorm_fwd_kernel<8><<<grid, 32 * ROW_WARPS, 0, st>>>((bf16 *)y, (float *)rstd,
                                                           (const bf16 *)x, (const bf16 *)w, N,
                                                           D, ldx, ldy, eps);
  else
    rmsnorm_fwd_kernel<1><<<grid, 32 * ROW_WARPS, 0, st>>>((bf16 *)y, (float *)rstd,
                                                           (const bf16 *)x, (const bf16 *)w, N,
                                                           D, ldx, ldy, eps);
  CUDA_LAUNCH_CHECK();
}

extern "C" void cu_rmsnorm_bwd(Backend *be, void *dx, void *dw, const void *dy, const void *x,
                               const void *w, const void *rstd, int N, int D, int ldx, int ldy,
                               int accumulate) {
  if (N <= 0) return;
  cudaStream_t st = cuda_stream(be);
  const void *p[] = {dx, dy, x, w};
  int l[] = {D, ldx, ldy};
  int grid = ceil_div(N, ROW_WARPS);
  if (vec_width(p, 4, l, 3) == 8)
    rmsnorm_dx_kernel<8><<<grid, 32 * ROW_WARPS, 0, st>>>(
        (bf16 *)dx, (const bf16 *)dy, (const bf16 *)x, (const bf16 *)w, (const float *)rstd, N,
        D, ldx, ldy, accumulate);
  else
    rmsnorm_dx_kernel<1><<<grid, 32 * ROW_WARPS, 0, st>>>(
        (bf16 *)dx, (const bf16 *)dy, (const bf16 *)x, (const bf16 *)w, (const float *)rstd, N,
        D, ldx, ldy, accumulate);
  CUDA_LAUNCH_CHECK();

  int rows = colsum_chunk_rows(N), nchunks = ceil_div(N, rows);
  float *part = (float *)cuda_scratch(be, SCRATCH_NORM, (size_t)nchunks * D * sizeof(float));
  dim3 pgrid(ceil_div(D, 256), nchunks);
  rmsnorm_dw_partial_kernel<<<pgrid, 256, 0, st>>>(part, (const bf16 *)dy, (const bf16 *)x,
                                                   (const float *)rstd, N, D, ldx, ldy, rows);
  CUDA_LAUNCH_CHECK();
  rmsnorm_dw_reduce_kernel<<<ceil_div(D, 256), 256, 0, st>>>((bf16 *)dw, part, nchunks, D);
  CUDA_LAUNCH_CHECK();
}

/* One thread per rotated pair (row n, head h, i < rd/2); sn = -1 for the inverse. */
__global__ void rope_kernel(bf16 *x, const float *cos_t, const float *sin_t, int N, int T, int H,
                            int ldx, int hs, int off, int half, float sn) {
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)N * H * half) return;
  int i = (int)(u % half);
  size_t nh = u / half;
  int h = (int)(nh % H), n = (int)(nh / H);
  bf16 *p = x + (size_t)n * ldx + (size_t)h * hs + off;
  size_t ti = (size_t)(n % T) * half + i;
  float c = cos_t[ti], s = sn * sin_t[ti];
  float a = __bfloat162float(p[i]), b = __bfloat162float(p[i + half]);
  p[i] = __float2bfloat16(a * c - b * s);
  p[i + half] = __float2bfloat16(b * c + a * s);
}

extern "C" void cu_rope(Backend *be, void *x, const void *cos, const void *sin, int N, int T,
                        int H, int ldx, int hs, int off, int rd, int inverse) {
  int half = rd / 2;
  size_t n = (size_t)N * H * half;
  if (n == 0) return;
  rope_kernel<<<ceil_div((long)n, 256), 256, 0, cuda_stream(be)>>>(
      (bf16 *)x, (const float *)cos, (const float *)sin, N, T, H, ldx, hs, off, half,
      inverse ? -1.f : 1.f);
  CUDA_LAUNCH_CHECK();
}

/* One thread per V-wide unit of the (n, h) output rows: columns [0, dn) of k
 * from kv's nope part, [dn, dn+dr) from kr, then the dv columns of v. */
template <int V>
__global__ void mla_kv_split_kernel(bf16 *k, bf16 *v, const bf16 *kv, const bf16 *kr, int ldkr,
                                    int N, int H, int dn, int dr, int dv) {
  int per = (dn + dr + dv) / V;
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)N * H * per) return;
  int c = (int)(u % per) * V;
  size_t nh = u / per;
  size_t n = nh / H;
  const bf16 *kvh = kv + nh * (dn + dv); /* kv rows are H*(dn+dv) wide */
  if (c < dn)
    vcopy<V>(k + nh * (dn + dr) + c, kvh + c);
  else if (c < dn + dr)
    vcopy<V>(k + nh * (dn + dr) + c, kr + n * ldkr + (c - dn));
  else
    vcopy<V>(v + nh * dv + (c - dn - dr), kvh + dn + (c - dn - dr));
}

/* dkv[n,h,:] = [dk[n,h,:dn] | dv[n,h,:]]. */
template <int V>
__global__ void mla_dkv_kernel(bf16 *dkv, const bf16 *dk, const bf16 *dv, int N, int H, int dn,
                               int dr, int dvd) {
  int per = (dn + dvd) / V;
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)N * H * per) return;
  int c = (int)(u % per) * V;
  size_t nh = u / per;
  if (c < dn)
    vcopy<V>(dkv + nh * (dn + dvd) + c, dk + nh * (dn + dr) + c);
  else
    vcopy<V>(dkv + nh * (dn + dvd) + c, dv + nh * dvd + (c - dn));
}

/* dkr[n, c] = sum over heads h (in order) of dk[n, h, dn + c]. */
__global__ void mla_dkr_kernel(bf16 *dkr, int ldkr, const bf16 *dk, int N, int H, int dn,
                               int dr) {
  size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= (size_t)N * dr) return;
  int c = (int)(u % dr);
  size_t n = u / dr;
  const bf16 *p = dk + n * H * (dn + dr) + dn + c;
  float s = 0.f;
  for (int h = 0; h < H; h++) s += __bfloat162float(p[(size_t)h * (dn + dr)]);
  dkr[n * ldkr + c] = __float2bfloat16(s);
}

extern "C" void cu_mla_kv_split(Backend *be, void *k, void *v, const void *kv, const void *kr,
                                int ldkr, int N, int H, int dn, int dr, int dv) {
  const void *p[] = {k, v, kv, kr};
  int l[] = {dn, dr, dv, ldkr};
  int V = vec_width(p, 4, l, 4);
  size_t n = (size_t)N * H * (dn + dr + dv) / V;
  if (n == 0) return;
  cudaStream_t st = cuda_stream(be);
  if (V == 8)
    mla_kv_split_kernel<8><<<ceil_div((long)n, 256), 256, 0, st>>>(
        (bf16 *)k, (bf16 *)v, (const bf16 *)kv, (const bf16 *)kr, ldkr, N, H, dn, dr, dv);
  else
    mla_kv_split_kernel<1><<<ceil_div((long)n, 256), 256, 0, st>>>(
        (bf16 *)k, (bf16 *)v, (const bf16 *)kv, (const bf16 *)kr, ldkr, N, H, dn, dr, dv);
  CUDA_LAUNCH_CHECK();
}

extern "C" void cu_mla_kv_split_bwd(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                                    const void *dv, int N, int H, int dn, int dr, int dv_dim) {
  if (N <= 0) return;
  cudaStream_t st = cuda_stream(be);
  const void *p[] = {dkv, dk, dv};
  int l[] = {dn, dr, dv_dim};
  int V = vec_width(p, 3, l, 3);
  size_t n = (size_t)N * H * (dn + dv_dim) / V;
  if (n > 0) {
    if (V == 8)
      mla_dkv_kernel<8><<<ceil_div((long)n, 256), 256, 0, st>>>(
          (bf16 *)dkv, (const bf16 *)dk, (const bf16 *)dv, N, H, dn, dr, dv_dim);
    else
      mla_dkv_kernel<1><<<ceil_div((long)n, 256), 256, 0, st>>>(
          (bf16 *)dkv, (const bf16 *)dk, (const bf16 *)dv, N, H, dn, dr, dv_dim);
    CUDA_LAUNCH_CHECK();
  }
  size_t m = (size_t)N * dr;
  if (m == 0) return;
  mla_dkr_kernel<<<ceil_div((long)m, 256), 256, 0, st>>>((bf16 *)dkr, ldkr, (const bf16 *)dk, N,
                                                         H, dn, dr);
  CUDA_LAUNCH_CHECK();
}
