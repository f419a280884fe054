/* bf16_vec.cuh: device helpers shared by the row-oriented kernels of
 * norm_rope.cu and router_moe.cu: V-wide bf16 <-> fp32 loads/stores (V = 8 is
 * one 16-byte access, V = 1 the fallback for odd sizes or unaligned rows) and a
 * fixed-order warp sum. */
#ifndef NMOE_BF16_VEC_CUH
#define NMOE_BF16_VEC_CUH

#include "backend/cuda/cuda_common.h"

/* Widest vector a row kernel may use: 8 when every pointer is 16-byte aligned
 * and every length/stride (in elements) is a multiple of 8, else 1. */
static inline int vec_width(const void *const *ptrs, int nptr, const int *lens, int nlen) {
  for (int i = 0; i < nptr; i++)
    if (ptrs[i] && ((uintptr_t)ptrs[i] & 15)) return 1;
  for (int i = 0; i < nlen; i++)
    if (lens[i] % 8) return 1;
  return 8;
}

template <int V>
__device__ __forceinline__ void vload(const bf16 *p, float *v) {
  if constexpr (V == 8) {
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      float2 f = __bfloat1622float2(h[j]);
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; j++) v[j] = __bfloat162float(p[j]);
  }
}

template <int V>
__device__ __forceinline__ void vstore(bf16 *p, const float *v) {
  if constexpr (V == 8) {
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    *(uint4 *)p = u;
  } else {
#pragma unroll
    for (int j = 0; j < V; j++) p[j] = __float2bfloat16(v[j]);
  }
}

/* Raw V-element copy (no conversion). */
template <int V>
__device__ __forceinline__ void vcopy(bf16 *dst, const bf16 *src) {
  if constexpr (V == 8)
    *(uint4 *)dst = *(const uint4 *)src;
  else
#pragma unroll
    for (int j = 0; j < V; j++) dst[j] = src[j];
}

/* Butterfly sum: every lane gets the same, order-fixed result. */
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* Rows per partial-sum chunk for column reductions over n rows: a function of
 * n only, so the reduction order (and result) is fixed for a given shape. */
static inline int colsum_chunk_rows(int n) {
  int r = ceil_div(n, 512);
  return r < 64 ? 64 : r;
}

#endif
