/* elementwise.cu: the CUDA ops that touch each element once or twice: add,
 * sumsq (grad norm), embedding forward/backward, SwiGLU forward/backward and
 * the AdamW update. bf16 storage, fp32 math; 16-byte (8 x bf16) accesses when
 * sizes and pointers allow, a scalar path otherwise.
 *
 * Determinism: sumsq reduces in a fixed tree (a grid that depends only on n,
 * then one block); embed_bwd sorts token positions by id (stable radix sort),
 * then one thread per (id, column) sums that id's rows in token order. */
#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

#define THREADS 256

/* ---- 8-wide bf16 access ---- */

static __device__ __forceinline__ void load8(float f[8], const bf16 *p) {
  uint4 u = *(const uint4 *)p;
  const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
  for (int i = 0; i < 4; i++) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

static __device__ __forceinline__ void store8(bf16 *p, const float f[8]) {
  uint4 u;
  __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
  for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *(uint4 *)p = u;
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Grid for n items of work, capped: kernels loop grid-stride beyond it. */
static int grid_for(Backend *be, size_t n) {
  long g = (long)((n + THREADS - 1) / THREADS);
  long cap = (long)cuda_ctx(be)->num_sms * 32;
  return (int)(g < 1 ? 1 : g > cap ? cap : g);
}

/* ---- add ---- */

/* Each thread owns 8 consecutive elements; vec: all pointers 16-byte aligned. */
static __global__ void add_kernel(bf16 *y, const bf16 *a, const bf16 *b, size_t n, int vec) {
  size_t stride = (size_t)gridDim.x * blockDim.x * 8;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
    if (vec && i + 8 <= n) {
      float x[8], z[8];
      load8(x, a + i);
      load8(z, b + i);
      for (int j = 0; j < 8; j++) x[j] += z[j];
      store8(y + i, x);
    } else {
      for (size_t j = i; j < i + 8 && j < n; j++)
        y[j] = __float2bfloat16(__bfloat162float(a[j]) + __bfloat162float(b[j]));
    }
  }
}

void cu_add(Backend *be, void *y, const void *a, const void *b, size_t n) {
  if (n == 0) return;
  int vec = aligned16(y) && aligned16(a) && aligned16(b);
  add_kernel<<<grid_for(be, (n + 7) / 8), THREADS, 0, cuda_stream(be)>>>(
      (bf16 *)y, (const bf16 *)a, (const bf16 *)b, n, vec);
  CUDA_LAUNCH_CHECK();
}

/* ---- convert ---- */

static __device__ float load_kind(const void *p, size_t i, int f32) {
  return f32 ? ((const float *)p)[i] : __bfloat162float(((const bf16 *)p)[i]);
}

/* dst = src (or dst += src) across bf16 (ACT) and fp32 (F32); the sum in fp32,
 * one rounding into dst. */
static __global__ void convert_kernel(void *dst, int dst_f32, const void *src, int src_f32,
                                      size_t n, int accumulate) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float v = load_kind(src, i, src_f32);
    if (accumulate) v += load_kind(dst, i, dst_f32);
    if (dst_f32) ((float *)dst)[i] = v;
    else ((bf16 *)dst)[i] = __float2bfloat16(v);
  }
}

void cu_convert(Backend *be, void *dst, BufKind dk, const void *src, BufKind sk, size_t n,
                int accumulate) {
  if (n == 0) return;
  if (dk == BUF_I32 || sk == BUF_I32) nmoe_fatal("convert: ACT and F32 buffers only");
  convert_kernel<<<grid_for(be, n), THREADS, 0, cuda_stream(be)>>>(dst, dk == BUF_F32, src,
                                                                   sk == BUF_F32, n, accumulate);
  CUDA_LAUNCH_CHECK();
}

/* ---- sumsq ---- */

#define SUMSQ_BLOCKS_MAX 1024

/* Fixed-shape tree sum of one double per thread; result in thread 0. */
static __device__ double block_sum_double(double v) {
  __shared__ double s[THREADS];
  s[threadIdx.x] = v;
  __syncthreads();
  for (int w = THREADS / 2; w > 0; w /= 2) {
    if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  return s[0];
}

/* Pass 1: block b sums squares of its grid-stride share into part[b]. */
static __global__ void sumsq_part_kernel(double *part, const bf16 *x, size_t n, int vec) {
  float acc = 0;
  size_t stride = (size_t)gridDim.x * blockDim.x * 8;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
    if (vec && i + 8 <= n) {
      float f[8];
      load8(f, x + i);
      for (int j = 0; j < 8; j++) acc += f[j] * f[j];
    } else {
      for (size_t j = i; j < i + 8 && j < n; j++) {
        float f = __bfloat162float(x[j]);
        acc += f * f;
      }
    }
  }
  double s = block_sum_double(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

/* Pass 2: one block sums the partials in a fixed order. */
static __global__ void sumsq_final_kernel(double *out, const double *part, int nparts) {
  double acc = 0;
  for (int i = threadIdx.x; i < nparts; i += THREADS) acc += part[i];
  double s = block_sum_double(acc);
  if (threadIdx.x == 0) *out = s;
}

double cu_sumsq(Backend *be, const void *x, size_t n) {
  if (n == 0) return 0;
  cudaStream_t st = cuda_stream(be);
  /* Depends on n only, so the reduction order is the same on every run. */
  size_t want = (n + THREADS * 8 * 4 - 1) / (THREADS * 8 * 4);
  int blocks = (int)(want > SUMSQ_BLOCKS_MAX ? SUMSQ_BLOCKS_MAX : want);
  double *part = (double *)cuda_scratch(be, SCRATCH_REDUCE, (SUMSQ_BLOCKS_MAX + 1) * sizeof(double));
  sumsq_part_kernel<<<blocks, THREADS, 0, st>>>(part + 1, (const bf16 *)x, n, aligned16(x));
  CUDA_LAUNCH_CHECK();
  sumsq_final_kernel<<<1, THREADS, 0, st>>>(part, part + 1, blocks);
  CUDA_LAUNCH_CHECK();
  double r = 0;
  CUDA_CHECK(cudaMemcpyAsync(&r, part, sizeof(double), cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  return r;
}

/* ---- embedding ---- */

/* y[n, c..c+8) = scale * table[tok[n], c..c+8); vec when D % 8 == 0 and aligned. */
static __global__ void embed_fwd_kernel(bf16 *y, const int32_t *tok, const bf16 *table, int N,
                                        int D, float scale, int vec) {
  int n = blockIdx.x;
  const bf16 *src = table + (size_t)tok[n] * D;
  bf16 *dst = y + (size_t)n * D;
  for (int c = threadIdx.x * 8; c < D; c += blockDim.x * 8) {
    if (vec) {
      float f[8];
      load8(f, src + c);
      for (int j = 0; j < 8; j++) f[j] *= scale;
      store8(dst + c, f);
    } else {
      for (int j = c; j < c + 8 && j < D; j++)
        dst[j] = __float2bfloat16(scale * __bfloat162float(src[j]));
    }
  }
}

void cu_embed_fwd(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                  float scale) {
  if (N == 0) return;
  int vec = D % 8 == 0 && aligned16(y) && aligned16(table);
  embed_fwd_kernel<<<N, THREADS, 0, cuda_stream(be)>>>((bf16 *)y, tok, (const bf16 *)table, N, D,
                                                      scale, vec);
  CUDA_LAUNCH_CHECK();
}

static __global__ void iota_kernel(uint32_t *v, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) v[i] = (uint32_t)i;
}

/* Block (i, column block): if sorted position i starts a run of one id, sum
 * that id's dy rows in token order and add scale * sum into its table row. */
static __global__ void embed_bwd_kernel(bf16 *dtable, const uint32_t *ids, const uint32_t *pos,
                                        const bf16 *dy, int N, int D, float scale) {
  int i = blockIdx.x;
  int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= D || (i > 0 && ids[i] == ids[i - 1])) return;
  uint32_t id = ids[i];
  float acc = 0;
  for (int j = i; j < N && ids[j] == id; j++) acc += __bfloat162float(dy[(size_t)pos[j] * D + c]);
  bf16 *row = dtable + (size_t)id * D;
  row[c] = __float2bfloat16(__bfloat162float(row[c]) + scale * acc);
}

void cu_embed_bwd(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                  int V, float scale) {
  if (N == 0) return;
  cudaStream_t st = cuda_stream(be);
  int end_bit = 1;
  while (end_bit < 32 && (1u << end_bit) < (uint32_t)V) end_bit++;
  /* Ids are non-negative, so sort them as unsigned keys. */
  size_t tmp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, tmp_bytes, (const uint32_t *)NULL,
                                             (uint32_t *)NULL, (const uint32_t *)NULL,
                                             (uint32_t *)NULL, N, 0, end_bit, st));
  size_t arr = ((size_t)N * sizeof(uint32_t) + 255) & ~(size_t)255;
  char *s = (char *)cuda_scratch(be, SCRATCH_EMBED, 3 * arr + tmp_bytes);
  uint32_t *ids = (uint32_t *)s, *pos_in = (uint32_t *)(s + arr), *pos = (uint32_t *)(s + 2 * arr);
  iota_kernel<<<ceil_div(N, THREADS), THREADS, 0, st>>>(pos_in, N);
  CUDA_LAUNCH_CHECK();
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s + 3 * arr, tmp_bytes, (const uint32_t *)tok, ids,
                                             pos_in, pos, N, 0, end_bit, st));
  dim3 grid(N, ceil_div(D, THREADS));
  embed_bwd_kernel<<<grid, THREADS, 0, st>>>((bf16 *)dtable, ids, pos, (const bf16 *)dy, N, D,
                                             scale);
  CUDA_LAUNCH_CHECK();
}

/* ---- SwiGLU ---- */

static __device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

/* gu [M, 2F] = [gate | up]; thread owns 8 consecutive columns of one row
 * (vec: F % 8 == 0 and aligned) or, scalar, elements [8t, 8t+8) of h in order. */
static __global__ void swiglu_fwd_kernel(bf16 *h, const bf16 *gu, int M, int F, int vec) {
  size_t total = (size_t)M * F, stride = (size_t)gridDim.x * blockDim.x * 8;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < total; i += stride) {
    if (vec) {
      size_t m = i / F, f = i % F;
      float g[8], u[8];
      load8(g, gu + m * 2 * F + f);
      load8(u, gu + m * 2 * F + F + f);
      for (int j = 0; j < 8; j++) g[j] = g[j] * sigmoidf(g[j]) * u[j];
      store8(h + i, g);
    } else {
      for (size_t j = i; j < i + 8 && j < total; j++) {
        size_t m = j / F, f = j % F;
        float g = __bfloat162float(gu[m * 2 * F + f]), u = __bfloat162float(gu[m * 2 * F + F + f]);
        h[j] = __float2bfloat16(g * sigmoidf(g) * u);
      }
    }
  }
}

/* dgate = dh * up * s * (1 + g * (1 - s)), dup = dh * g * s, s = sigmoid(g). */
static __device__ __forceinline__ void swiglu_grad(float dh, float g, float u, float *dg, float *du) {
  float s = sigmoidf(g);
  *dg = dh * u * s * (1.f + g * (1.f - s));
  *du = dh * g * s;
}

static __global__ void swiglu_bwd_kernel(bf16 *dgu, const bf16 *dh, const bf16 *gu, int M, int F,
                                         int vec) {
  size_t total = (size_t)M * F, stride = (size_t)gridDim.x * blockDim.x * 8;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < total; i += stride) {
    if (vec) {
      size_t m = i / F, f = i % F;
      float d[8], g[8], u[8], dg[8], du[8];
      load8(d, dh + i);
      load8(g, gu + m * 2 * F + f);
      load8(u, gu + m * 2 * F + F + f);
      for (int j = 0; j < 8; j++) swiglu_grad(d[j], g[j], u[j], &dg[j], &du[j]);
      store8(dgu + m * 2 * F + f, dg);
      store8(dgu + m * 2 * F + F + f, du);
    } else {
      for (size_t j = i; j < i + 8 && j < total; j++) {
        size_t m = j / F, f = j % F;
        float dg, du;
        swiglu_grad(__bfloat162float(dh[j]), __bfloat162float(gu[m * 2 * F + f]),
                    __bfloat162float(gu[m * 2 * F + F + f]), &dg, &du);
        dgu[m * 2 * F + f] = __float2bfloat16(dg);
        dgu[m * 2 * F + F + f] = __float2bfloat16(du);
      }
    }
  }
}

void cu_swiglu_fwd(Backend *be, void *h, const void *gu, int M, int F) {
  size_t total = (size_t)M * F;
  if (total == 0) return;
  int vec = F % 8 == 0 && aligned16(h) && aligned16(gu);
  swiglu_fwd_kernel<<<grid_for(be, (total + 7) / 8), THREADS, 0, cuda_stream(be)>>>(
      (bf16 *)h, (const bf16 *)gu, M, F, vec);
  CUDA_LAUNCH_CHECK();
}

void cu_swiglu_bwd(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F) {
  size_t total = (size_t)M * F;
  if (total == 0) return;
  int vec = F % 8 == 0 && aligned16(dgu) && aligned16(dh) && aligned16(gu);
  swiglu_bwd_kernel<<<grid_for(be, (total + 7) / 8), THREADS, 0, cuda_stream(be)>>>(
      (bf16 *)dgu, (const bf16 *)dh, (const bf16 *)gu, M, F, vec);
  CUDA_LAUNCH_CHECK();
}

/* ---- AdamW ---- */

/* Counter-based hash (splitmix64 finaliser) of (seed, index): the rounding
 * noise of element i at a step depends on nothing else. */
static __device__ __forceinline__ uint32_t hash_u32(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (uint32_t)(z ^ (z >> 31));
}

/* Round w to bf16 up or down with probability proportional to closeness:
 * add 16 random low bits, then truncate. Non-finite values round normally. */
static __device__ __forceinline__ bf16 bf16_stochastic(float w, uint32_t r) {
  if (!isfinite(w)) return __float2bfloat16(w);
  uint32_t bits = __float_as_uint(w);
  bits = (bits + (r & 0xFFFFu)) & 0xFFFF0000u;
  return __float2bfloat16(__uint_as_float(bits)); /* exact: low bits are zero */
}

/* One element of the AdamW update (contract in backend.h). */
static __device__ __forceinline__ void adamw_one(float gi, float *w_io, float *m_io, float *v_io,
                                                 const AdamParams &ap) {
  float w = *w_io;
  w -= ap.lr * ap.wd * w;
  float mi = ap.b1 * *m_io + (1.f - ap.b1) * gi;
  float vi = ap.b2 * *v_io + (1.f - ap.b2) * gi * gi;
  *m_io = mi;
  *v_io = vi;
  *w_io = w - ap.lr * (mi / ap.bc1) / (sqrtf(vi / ap.bc2) + ap.eps);
}

static __device__ __forceinline__ bf16 adamw_round(float w, size_t i, const AdamParams &ap) {
  return ap.stochastic_seed ? bf16_stochastic(w, hash_u32(ap.stochastic_seed, i))
                            : __float2bfloat16(w);
}

/* Memory-bound (22-30 bytes per parameter): each thread updates 8 consecutive
 * elements with 16-byte loads and stores; the tail (n % 8) goes element-wise. */
static __global__ void adamw_kernel(bf16 *p, float *master, const bf16 *g, float *m, float *v,
                                    size_t n, AdamParams ap) {
  const size_t n8 = n / 8, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x; c < n8; c += stride) {
    const size_t i0 = c * 8;
    uint4 graw = *(const uint4 *)(g + i0);
    uint4 praw = *(const uint4 *)(p + i0);
    float4 m4[2] = {((const float4 *)(m + i0))[0], ((const float4 *)(m + i0))[1]};
    float4 v4[2] = {((const float4 *)(v + i0))[0], ((const float4 *)(v + i0))[1]};
    float4 w4[2];
    const bf16 *gb = (const bf16 *)&graw, *pb = (const bf16 *)&praw;
    if (master) {
      w4[0] = ((const float4 *)(master + i0))[0];
      w4[1] = ((const float4 *)(master + i0))[1];
    } else {
      w4[0] = make_float4(__bfloat162float(pb[0]), __bfloat162float(pb[1]), __bfloat162float(pb[2]),
                          __bfloat162float(pb[3]));
      w4[1] = make_float4(__bfloat162float(pb[4]), __bfloat162float(pb[5]), __bfloat162float(pb[6]),
                          __bfloat162float(pb[7]));
    }
    float *w = (float *)w4, *mm = (float *)m4, *vv = (float *)v4;
    uint4 out;
    bf16 *ob = (bf16 *)&out;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      adamw_one(__bfloat162float(gb[j]) * ap.grad_scale, &w[j], &mm[j], &vv[j], ap);
      ob[j] = master ? __float2bfloat16(w[j]) : adamw_round(w[j], i0 + j, ap);
    }
    ((float4 *)(m + i0))[0] = m4[0];
    ((float4 *)(m + i0))[1] = m4[1];
    ((float4 *)(v + i0))[0] = v4[0];
    ((float4 *)(v + i0))[1] = v4[1];
    if (master) {
      ((float4 *)(master + i0))[0] = w4[0];
      ((float4 *)(master + i0))[1] = w4[1];
    }
    *(uint4 *)(p + i0) = out;
  }
  for (size_t i = n8 * 8 + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float w = master ? master[i] : __bfloat162float(p[i]);
    adamw_one(__bfloat162float(g[i]) * ap.grad_scale, &w, &m[i], &v[i], ap);
    if (master) master[i] = w;
    p[i] = master ? __float2bfloat16(w) : adamw_round(w, i, ap);
  }
}

void cu_adamw(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
              const AdamParams *ap) {
  if (n == 0) return;
  /* 16-byte accesses need 16-element-aligned ranges (the parameter table aligns
   * every group so; a caller passing another range is a bug). */
  NMOE_ASSERT(((uintptr_t)p | (uintptr_t)g) % 16 == 0 && ((uintptr_t)m | (uintptr_t)v) % 32 == 0 &&
              (uintptr_t)master % 32 == 0);
  adamw_kernel<<<grid_for(be, (n + 7) / 8), THREADS, 0, cuda_stream(be)>>>(
      (bf16 *)p, (float *)master, (const bf16 *)g, (float *)m, (float *)v, n, *ap);
  CUDA_LAUNCH_CHECK();
}
