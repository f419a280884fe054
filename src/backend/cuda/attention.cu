/* attention.cu: fused causal attention (flash-attention style) on tensor cores.
 *
 * bf16 operands, fp32 accumulation, warp-level mma.sync m16n8k16 fed by
 * ldmatrix from XOR-swizzled shared memory, tiles staged with cp.async
 * (double buffered). Head dims are template parameters: the tuned pairs
 * (64,64), (128,128) and MLA (192,128) run exactly; any other dqk, dv that are
 * multiples of 8 up to 256 run on the next tile sizes of 16/32/64/128/192/256
 * (PAD instances: the columns past the real width are zero-filled when q, k, v
 * and dO are staged, so they add nothing to Q K^T or dO V^T, and they are
 * never stored). Other widths, strides or pointers that are not 16-byte
 * aligned take a scalar fp32 fallback (attn_*_ref kernels at the end): slow
 * but exact to fp32, and deterministic.
 *
 * Forward (one CTA per ATT_BM = 64 queries of one (sequence, head)): S = Q K^T per key
 * block, online softmax in fp32 (base-2 exponent with the scale folded in),
 * O += P V; writes o (bf16) and lse (natural log, F32 [B, Hq, T]). With sinks,
 * each row's online softmax starts at m = s_h (in the same base-2 units),
 * l = 1, O = 0: the sink is one more logit with a zero value, so lse includes
 * it and the backward's P = exp(z - lse) needs no change. Without sinks the
 * start is m = -inf, l = 0, O = 0 as always (the same code, same bits).
 *
 * Backward, deterministic without atomics, three kernels:
 *   attn_bwd_dot   D[b,h,i] = sum_c dO*O (fp32, scratch)
 *   attn_bwd_dkdv  one CTA per ATT_BM keys of one kv head: loops over the query
 *                  heads of its GQA group and over query blocks in a fixed
 *                  order, recomputing P^T, accumulating dV += P^T dO and
 *                  dK += dS^T Q in registers, then writes them once.
 *   attn_bwd_dq    one CTA per ATT_BM queries of one head: recomputes P and dP
 *                  and accumulates dQ += dS K in registers.
 * The separate dQ pass costs one extra QK^T and dO V^T product per tile
 * (7 products instead of 5) but needs no fp32 dQ buffer and no ordering
 * between CTAs: it is the simplest deterministic scheme.
 *   attn_sinks_grad (with sinks) dsinks[h] -= sum over (b, i) of
 *                  exp(s_h - lse) * D: one CTA per head, a fixed split over
 *                  threads and a fixed tree (no atomics).
 *
 * Fragment layout of mma.m16n8k16 (g = lane/4, t = lane%4): accumulator
 * c0,c1 = (row g, cols 2t,2t+1), c2,c3 = (row g+8, same cols). Each thread
 * therefore owns two rows of every 16-row tile; row reductions use shuffles
 * among the 4 lanes of a quad. */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

#include <initializer_list>
#include <math.h>

/* Tile configuration (overridable at build time for tuning runs). */
#ifndef ATT_WARPS
#define ATT_WARPS 4
#endif
#ifndef ATT_BQ
#define ATT_BQ 32 /* queries per tile in dkdv (fewer live registers than 64) */
#endif
#define ATT_THREADS (ATT_WARPS * 32)
#define ATT_BM (16 * ATT_WARPS) /* queries per CTA (fwd, dq), keys per CTA (dkdv) */
#define ATT_BN 64               /* keys per tile (fwd, dq) */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* ---------------------------------------------------------------- helpers */

/* Element offset of (r, c) in a [rows, D] bf16 tile whose 16-byte chunks are
 * XOR-swizzled by row, so that ldmatrix's 8 row addresses (8 consecutive rows,
 * one chunk) hit 8 distinct 16-byte bank groups. D >= 64: the chunk is XORed
 * with r & 7. D = 32 (4 chunks, 2 rows per 128 bytes) XORs with (r >> 1) & 3,
 * D = 16 (2 chunks, 4 rows per 128 bytes) with (r >> 2) & 1: the XOR stays
 * inside the row and the 8 rows still cover all 8 groups. */
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  constexpr int CH = D / 8, SH = CH >= 8 ? 0 : CH == 4 ? 1 : 2, MK = CH >= 8 ? 7 : CH - 1;
  static_assert(CH >= 2 && (CH >= 8 ? CH % 8 == 0 : (CH & (CH - 1)) == 0), "tile width");
  return r * D + ((((c >> 3) ^ ((r >> SH) & MK))) << 3) + (c & 7);
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16-byte async copy; rows past the end are zero-filled (src_bytes = 0). */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

/* Stage rows [row0, row0+R) of a [T, ld] bf16 matrix (columns [0, D) from
 * base) into a swizzled [R, D] tile; rows >= T become zeros, and with PAD so
 * do the columns >= w (the real head width, a multiple of 8). */
template <int R, int D, bool PAD>
__device__ __forceinline__ void tile_load(bf16 *tile, const bf16 *base, int ld, int row0, int T,
                                          int w) {
  constexpr int CH = D / 8;
  for (int idx = threadIdx.x; idx < R * CH; idx += ATT_THREADS) {
    int r = idx / CH, c = (idx % CH) * 8;
    bool ok = row0 + r < T && (!PAD || c < w);
    const bf16 *src = base + (size_t)(ok ? row0 + r : 0) * ld + (PAD && !ok ? 0 : c);
    cp_async16(tile + swz<D>(r, c), src, ok);
  }
}

__device__ __forceinline__ void ldsm_x4(uint32_t a, uint32_t *r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t a, uint32_t *r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

/* A fragment (16 x 16) of a row-major [m][k] tile at (row0, k0). */
template <int D>
__device__ __forceinline__ void frag_a(const bf16 *tile, int row0, int k0, uint32_t *a) {
  int l = threadIdx.x & 31;
  ldsm_x4(smem_addr(tile + swz<D>(row0 + (l & 15), k0 + ((l >> 4) << 3))), a);
}
/* B fragments of two n-tiles (n0, n0+8) x 16 k from a tile stored [n][k]:
 * b[0..1] for n0, b[2..3] for n0+8. */
template <int D>
__device__ __forceinline__ void frag_b_nk(const bf16 *tile, int n0, int k0, uint32_t *b) {
  int l = threadIdx.x & 31;
  ldsm_x4(smem_addr(tile + swz<D>(n0 + (l & 7) + ((l >> 4) << 3), k0 + (((l >> 3) & 1) << 3))),
          b);
}
/* Same from a tile stored [k][n] (transposing load). */
template <int D>
__device__ __forceinline__ void frag_b_kn(const bf16 *tile, int k0, int n0, uint32_t *b) {
  int l = threadIdx.x & 31;
  ldsm_x4_t(smem_addr(tile + swz<D>(k0 + (l & 7) + (((l >> 3) & 1) << 3), n0 + ((l >> 4) << 3))),
            b);
}

__device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *(uint32_t *)&v;
}

/* acc[16 x 8*NT] += A(16 x 16*KT, smem [m][k] at row0) * B where B's rows
 * are n (tile stored [n][k], n from 0). */
template <int KT, int NT, int DA, int DB>
__device__ __forceinline__ void mma_smem_nk(float (*acc)[4], const bf16 *ta, int row0,
                                            const bf16 *tb) {
#pragma unroll
  for (int kk = 0; kk < KT; kk++) {
    uint32_t a[4];
    frag_a<DA>(ta, row0, kk * 16, a);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      frag_b_nk<DB>(tb, nt * 8, kk * 16, b);
      mma16816(acc[nt], a, b[0], b[1]);
      mma16816(acc[nt + 1], a, b[2], b[3]);
    }
  }
}

/* acc[16 x 8*NT] += P(16 x 16*KT, register accumulator layout, converted to
 * bf16) * B where B is stored [k][n] (k from 0). */
template <int KT, int NT, int DB>
__device__ __forceinline__ void mma_regs_kn(float (*acc)[4], const float (*p)[4], const bf16 *tb) {
#pragma unroll
  for (int kk = 0; kk < KT; kk++) {
    uint32_t a[4];
    a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      frag_b_kn<DB>(tb, kk * 16, nt * 8, b);
      mma16816(acc[nt], a, b[0], b[1]);
      mma16816(acc[nt + 1], a, b[2], b[3]);
    }
  }
}

/* Key j visible to query i (both < T checked by the caller's ranges). */
__device__ __forceinline__ bool att_visible(int i, int j, int T, int window) {
  return j <= i && j < T && i < T && (window <= 0 || j > i - window);
}

/* 2^x on the special-function unit (ex2.approx: 2 ulp; -inf gives 0). */
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

/* First key tile a query block [m0, m0+BM) can see. */
__device__ __forceinline__ int first_key_tile(int m0, int window) {
  return window > 0 ? max(0, m0 - window + 1) / ATT_BN : 0;
}

/* Whether any pair of queries [m0, m0+BMq) x keys [n0, n0+BNk) is hidden
 * (diagonal, window edge or the ragged end of T): interior tiles skip the
 * per-element mask. */
__device__ __forceinline__ bool tile_needs_mask(int m0, int bmq, int n0, int bnk, int T,
                                                int window) {
  return n0 + bnk - 1 > m0 || m0 + bmq > T || n0 + bnk > T ||
         (window > 0 && n0 <= m0 + bmq - 1 - window);
}

/* ---------------------------------------------------------------- forward */

/* Tile widths DQK, DV; PAD: the real widths s.dqk, s.dv may be smaller. */
template <int DQK, int DV, bool PAD>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_fwd_kernel(bf16 *__restrict__ o, float *__restrict__ lse, const bf16 *__restrict__ q,
                    const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                    const float *__restrict__ sinks, AttnShape s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16 *sq = (bf16 *)smem_raw;             /* [BM, DQK] */
  bf16 *sk = sq + ATT_BM * DQK;            /* 2 x [BN, DQK] */
  bf16 *sv = sk + 2 * ATT_BN * DQK;        /* 2 x [BN, DV] */
  const int T = s.T, b = blockIdx.z, h = blockIdx.y, hk = h / (s.Hq / s.Hkv);
  const int mb = gridDim.x - 1 - blockIdx.x; /* longest rows first */
  const int m0 = mb * ATT_BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wqk = PAD ? s.dqk : DQK, wv = PAD ? s.dv : DV; /* real head widths */
  const bf16 *qb = q + (size_t)b * T * s.ldq + (size_t)h * wqk;
  const bf16 *kb = k + (size_t)b * T * s.ldk + (size_t)hk * wqk;
  const bf16 *vb = v + (size_t)b * T * s.ldv + (size_t)hk * wv;
  const float sl2 = s.scale * LOG2E;

  const int n_first = first_key_tile(m0, s.window);
  const int n_end = cdiv(min(T, m0 + ATT_BM), ATT_BN);

  tile_load<ATT_BM, DQK, PAD>(sq, qb, s.ldq, m0, T, wqk);
  tile_load<ATT_BN, DQK, PAD>(sk, kb, s.ldk, n_first * ATT_BN, T, wqk);
  tile_load<ATT_BN, DV, PAD>(sv, vb, s.ldv, n_first * ATT_BN, T, wv);
  cp_async_commit();

  float acc[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  if (sinks) { /* the sink's exp(s - m) = 1, counted once per row (lane t = 0 of the quad) */
    mrow[0] = mrow[1] = sinks[h] * LOG2E;
    lrow[0] = lrow[1] = t == 0 ? 1.f : 0.f;
  }
  const int qi0 = m0 + warp * 16 + g; /* this thread's rows: qi0, qi0 + 8 */

  for (int nb = n_first; nb < n_end; nb++) {
    const int buf = (nb - n_first) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (nb + 1 < n_end) { /* prefetch the next tile into the other buffer */
      tile_load<ATT_BN, DQK, PAD>(sk + (buf ^ 1) * ATT_BN * DQK, kb, s.ldk, (nb + 1) * ATT_BN, T,
                                  wqk);
      tile_load<ATT_BN, DV, PAD>(sv + (buf ^ 1) * ATT_BN * DV, vb, s.ldv, (nb + 1) * ATT_BN, T,
                                 wv);
    }
    cp_async_commit();
    const bf16 *tk = sk + buf * ATT_BN * DQK, *tv = sv + buf * ATT_BN * DV;

    float sc[ATT_BN / 8][4];
#pragma unroll
    for (int i = 0; i < ATT_BN / 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
    mma_smem_nk<DQK / 16, ATT_BN / 8, DQK, DQK>(sc, sq, warp * 16, tk);

    const int n0 = nb * ATT_BN;
    const bool need_mask = tile_needs_mask(m0, ATT_BM, n0, ATT_BN, T, s.window);
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int nt = 0; nt < ATT_BN / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float x = sc[nt][e] * sl2;
        if (need_mask && !att_visible(qi0 + (e >> 1) * 8, n0 + nt * 8 + 2 * t + (e & 1), T,
                                      s.window))
          x = -INFINITY;
        sc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r]; /* a row with nothing visible yet */
      alpha[r] = ex2(mrow[r] - base[r]);
      mrow[r] = mx[r];
      lrow[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < ATT_BN / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float p = ex2(sc[nt][e] - base[e >> 1]);
        sc[nt][e] = p;
        lrow[e >> 1] += p;
      }
    }
#pragma unroll
    for (int i = 0; i < DV / 8; i++) {
      acc[i][0] *= alpha[0]; acc[i][1] *= alpha[0];
      acc[i][2] *= alpha[1]; acc[i][3] *= alpha[1];
    }
    mma_regs_kn<ATT_BN / 16, DV / 8, DV>(acc, sc, tv);
  }

  /* Epilogue: normalise, write o and lse (rows past T are not written). */
#pragma unroll
  for (int r = 0; r < 2; r++) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
  }
  const int ldo = s.Hq * wv;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int i = qi0 + r * 8;
    if (i >= T) continue;
    const float inv = 1.f / lrow[r];
    bf16 *orow = o + ((size_t)b * T + i) * ldo + (size_t)h * wv;
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++)
      if (!PAD || nt * 8 < wv)
        *(__nv_bfloat162 *)(orow + nt * 8 + 2 * t) =
          __floats2bfloat162_rn(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
    if (t == 0) lse[((size_t)b * s.Hq + h) * T + i] = (mrow[r] + log2f(lrow[r])) * LN2;
  }
}

/* --------------------------------------------------------------- backward */

/* D[b,h,i] = sum_c dO[b,i,h,c] * O[b,i,h,c]; one warp per (token, head).
 * DV = 0: width dvr at run time, scalar loads (any width or alignment). */
template <int DV>
__global__ void attn_bwd_dot_kernel(float *__restrict__ dd, const bf16 *__restrict__ dout,
                                    const bf16 *__restrict__ o, int N, int T, int Hq, int dvr) {
  const int w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (w >= N * Hq) return;
  const int n = w / Hq, h = w % Hq, dv = DV ? DV : dvr;
  const size_t off = (size_t)n * Hq * dv + (size_t)h * dv;
  float acc = 0.f;
  if (DV) {
    for (int c = lane * 2; c < DV; c += 64) {
      float2 a = __bfloat1622float2(*(const __nv_bfloat162 *)(dout + off + c));
      float2 bb = __bfloat1622float2(*(const __nv_bfloat162 *)(o + off + c));
      acc += a.x * bb.x + a.y * bb.y;
    }
  } else {
    for (int c = lane; c < dv; c += 32)
      acc += __bfloat162float(dout[off + c]) * __bfloat162float(o[off + c]);
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) {
    const int b = n / T, i = n % T;
    dd[((size_t)b * Hq + h) * T + i] = acc;
  }
}

/* dK, dV for ATT_BM keys of one kv head (16 keys per warp, as the rows of
 * transposed products S^T = K Q^T and dP^T = V dO^T). */
template <int DQK, int DV, bool PAD>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_bwd_dkdv_kernel(bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                         const bf16 *__restrict__ dout, const bf16 *__restrict__ q,
                         const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                         const float *__restrict__ lse, const float *__restrict__ dd,
                         AttnShape s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16 *sk = (bf16 *)smem_raw;            /* [BN, DQK] */
  bf16 *sv = sk + ATT_BM * DQK;           /* [BN, DV] */
  bf16 *sq = sv + ATT_BM * DV;            /* 2 x [BQ, DQK] */
  bf16 *sdo = sq + 2 * ATT_BQ * DQK;      /* 2 x [BQ, DV] */
  float *slse = (float *)(sdo + 2 * ATT_BQ * DV); /* 2 x [BQ] (base-2 lse) */
  float *sdd = slse + 2 * ATT_BQ;                 /* 2 x [BQ] */
  const int T = s.T, b = blockIdx.z, hk = blockIdx.y, G = s.Hq / s.Hkv;
  const int n0 = (gridDim.x - 1 - blockIdx.x) * ATT_BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wqk = PAD ? s.dqk : DQK, wv = PAD ? s.dv : DV; /* real head widths */
  const int ldo = s.Hq * wv;
  const float sl2 = s.scale * LOG2E;

  /* Query tiles that see any key of this block: [n0, n0 + BN - 1 + window). */
  const int m_first = n0 / ATT_BQ;
  const int m_stop = s.window > 0 ? min(T, n0 + ATT_BM - 1 + s.window) : T;
  const int n_mt = cdiv(m_stop, ATT_BQ) - m_first;
  const int n_it = G * n_mt;

  const bf16 *kb = k + (size_t)b * T * s.ldk + (size_t)hk * wqk;
  const bf16 *vb = v + (size_t)b * T * s.ldv + (size_t)hk * wv;
  tile_load<ATT_BM, DQK, PAD>(sk, kb, s.ldk, n0, T, wqk);
  tile_load<ATT_BM, DV, PAD>(sv, vb, s.ldv, n0, T, wv);

  /* Stage query tile `it` (head-major, then query tiles) into buffer buf. */
  auto stage = [&](int it, int buf) {
    const int h = hk * G + it / n_mt, m0 = (m_first + it % n_mt) * ATT_BQ;
    tile_load<ATT_BQ, DQK, PAD>(sq + buf * ATT_BQ * DQK,
                                q + (size_t)b * T * s.ldq + (size_t)h * wqk, s.ldq, m0, T, wqk);
    tile_load<ATT_BQ, DV, PAD>(sdo + buf * ATT_BQ * DV,
                               dout + (size_t)b * T * ldo + (size_t)h * wv, ldo, m0, T, wv);
    for (int r = threadIdx.x; r < ATT_BQ; r += ATT_THREADS) {
      const size_t row = ((size_t)b * s.Hq + h) * T + m0 + r;
      const bool ok = m0 + r < T;
      slse[buf * ATT_BQ + r] = ok ? lse[row] * LOG2E : 0.f;
      sdd[buf * ATT_BQ + r] = ok ? dd[row] : 0.f;
    }
  };
  stage(0, 0);
  cp_async_commit();

  float adk[DQK / 8][4], adv[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DQK / 8; i++) adk[i][0] = adk[i][1] = adk[i][2] = adk[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < DV / 8; i++) adv[i][0] = adv[i][1] = adv[i][2] = adv[i][3] = 0.f;
  const int kj0 = n0 + warp * 16 + g; /* this thread's keys: kj0, kj0 + 8 */

  for (int it = 0; it < n_it; it++) {
    const int buf = it & 1;
    const int m0 = (m_first + it % n_mt) * ATT_BQ;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < n_it) stage(it + 1, buf ^ 1);
    cp_async_commit();
    const bf16 *tq = sq + buf * ATT_BQ * DQK, *tdo = sdo + buf * ATT_BQ * DV;
    const float *tl = slse + buf * ATT_BQ, *tdd = sdd + buf * ATT_BQ;

    float pt[ATT_BQ / 8][4], dpt[ATT_BQ / 8][4];
#pragma unroll
    for (int i = 0; i < ATT_BQ / 8; i++)
      pt[i][0] = pt[i][1] = pt[i][2] = pt[i][3] = dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] =
          0.f;
    mma_smem_nk<DQK / 16, ATT_BQ / 8, DQK, DQK>(pt, sk, warp * 16, tq);   /* S^T */
    mma_smem_nk<DV / 16, ATT_BQ / 8, DV, DV>(dpt, sv, warp * 16, tdo);    /* dP^T */
    const bool need_mask = tile_needs_mask(m0, ATT_BQ, n0, ATT_BM, T, s.window);
#pragma unroll
    for (int nt = 0; nt < ATT_BQ / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int c = nt * 8 + 2 * t + (e & 1); /* query column within the tile */
        float p = ex2(pt[nt][e] * sl2 - tl[c]);
        if (need_mask && !att_visible(m0 + c, kj0 + (e >> 1) * 8, T, s.window)) p = 0.f;
        pt[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - tdd[c]); /* dS^T (unscaled) */
      }
    }
    mma_regs_kn<ATT_BQ / 16, DV / 8, DV>(adv, pt, tdo);  /* dV += P^T dO */
    mma_regs_kn<ATT_BQ / 16, DQK / 8, DQK>(adk, dpt, tq); /* dK += dS^T Q */
  }

  /* Write dK (scaled) and dV rows < T. */
  const int gbase = b * T;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int j = kj0 + r * 8;
    if (j >= T) continue;
    bf16 *krow = dk + (size_t)(gbase + j) * s.ldk + (size_t)hk * wqk;
    bf16 *vrow = dv + (size_t)(gbase + j) * s.ldv + (size_t)hk * wv;
#pragma unroll
    for (int nt = 0; nt < DQK / 8; nt++)
      if (!PAD || nt * 8 < wqk)
        *(__nv_bfloat162 *)(krow + nt * 8 + 2 * t) =
            __floats2bfloat162_rn(adk[nt][2 * r] * s.scale, adk[nt][2 * r + 1] * s.scale);
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++)
      if (!PAD || nt * 8 < wv)
        *(__nv_bfloat162 *)(vrow + nt * 8 + 2 * t) =
            __floats2bfloat162_rn(adv[nt][2 * r], adv[nt][2 * r + 1]);
  }
}

/* dQ for ATT_BM queries of one head: dQ = scale * sum over key tiles of dS K. */
template <int DQK, int DV, bool PAD>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_bwd_dq_kernel(bf16 *__restrict__ dq, const bf16 *__restrict__ dout,
                       const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                       const bf16 *__restrict__ v, const float *__restrict__ lse,
                       const float *__restrict__ dd, AttnShape s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16 *sq = (bf16 *)smem_raw;        /* [BM, DQK] */
  bf16 *sdo = sq + ATT_BM * DQK;      /* [BM, DV] */
  bf16 *sk = sdo + ATT_BM * DV;       /* 2 x [BN, DQK] */
  bf16 *sv = sk + 2 * ATT_BN * DQK;   /* 2 x [BN, DV] */
  const int T = s.T, b = blockIdx.z, h = blockIdx.y, hk = h / (s.Hq / s.Hkv);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * ATT_BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wqk = PAD ? s.dqk : DQK, wv = PAD ? s.dv : DV; /* real head widths */
  const int ldo = s.Hq * wv;
  const float sl2 = s.scale * LOG2E;
  const bf16 *kb = k + (size_t)b * T * s.ldk + (size_t)hk * wqk;
  const bf16 *vb = v + (size_t)b * T * s.ldv + (size_t)hk * wv;

  const int n_first = first_key_tile(m0, s.window);
  const int n_end = cdiv(min(T, m0 + ATT_BM), ATT_BN);
  tile_load<ATT_BM, DQK, PAD>(sq, q + (size_t)b * T * s.ldq + (size_t)h * wqk, s.ldq, m0, T, wqk);
  tile_load<ATT_BM, DV, PAD>(sdo, dout + (size_t)b * T * ldo + (size_t)h * wv, ldo, m0, T, wv);
  tile_load<ATT_BN, DQK, PAD>(sk, kb, s.ldk, n_first * ATT_BN, T, wqk);
  tile_load<ATT_BN, DV, PAD>(sv, vb, s.ldv, n_first * ATT_BN, T, wv);
  cp_async_commit();

  const int qi0 = m0 + warp * 16 + g;
  float l2[2], dr[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int i = qi0 + r * 8;
    const size_t row = ((size_t)b * s.Hq + h) * T + i;
    l2[r] = i < T ? lse[row] * LOG2E : 0.f;
    dr[r] = i < T ? dd[row] : 0.f;
  }
  float adq[DQK / 8][4];
#pragma unroll
  for (int i = 0; i < DQK / 8; i++) adq[i][0] = adq[i][1] = adq[i][2] = adq[i][3] = 0.f;

  for (int nb = n_first; nb < n_end; nb++) {
    const int buf = (nb - n_first) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (nb + 1 < n_end) {
      tile_load<ATT_BN, DQK, PAD>(sk + (buf ^ 1) * ATT_BN * DQK, kb, s.ldk, (nb + 1) * ATT_BN, T,
                                  wqk);
      tile_load<ATT_BN, DV, PAD>(sv + (buf ^ 1) * ATT_BN * DV, vb, s.ldv, (nb + 1) * ATT_BN, T,
                                 wv);
    }
    cp_async_commit();
    const bf16 *tk = sk + buf * ATT_BN * DQK, *tv = sv + buf * ATT_BN * DV;

    float ps[ATT_BN / 8][4], dps[ATT_BN / 8][4];
#pragma unroll
    for (int i = 0; i < ATT_BN / 8; i++)
      ps[i][0] = ps[i][1] = ps[i][2] = ps[i][3] = dps[i][0] = dps[i][1] = dps[i][2] = dps[i][3] =
          0.f;
    mma_smem_nk<DQK / 16, ATT_BN / 8, DQK, DQK>(ps, sq, warp * 16, tk); /* S */
    mma_smem_nk<DV / 16, ATT_BN / 8, DV, DV>(dps, sdo, warp * 16, tv);  /* dP */
    const int n0 = nb * ATT_BN;
    const bool need_mask = tile_needs_mask(m0, ATT_BM, n0, ATT_BN, T, s.window);
#pragma unroll
    for (int nt = 0; nt < ATT_BN / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = e >> 1;
        float p = ex2(ps[nt][e] * sl2 - l2[r]);
        if (need_mask && !att_visible(qi0 + r * 8, n0 + nt * 8 + 2 * t + (e & 1), T, s.window))
          p = 0.f;
        dps[nt][e] = p * (dps[nt][e] - dr[r]);
      }
    }
    mma_regs_kn<ATT_BN / 16, DQK / 8, DQK>(adq, dps, tk); /* dQ += dS K */
  }

#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int i = qi0 + r * 8;
    if (i >= T) continue;
    bf16 *qrow = dq + ((size_t)b * T + i) * s.ldq + (size_t)h * wqk;
#pragma unroll
    for (int nt = 0; nt < DQK / 8; nt++)
      if (!PAD || nt * 8 < wqk)
        *(__nv_bfloat162 *)(qrow + nt * 8 + 2 * t) =
            __floats2bfloat162_rn(adq[nt][2 * r] * s.scale, adq[nt][2 * r + 1] * s.scale);
  }
}

/* ------------------------------------------------------- scalar fallback */

/* Widths the tensor-core tiles do not take (not a multiple of 8, over 256) or
 * rows that are not 16-byte aligned. One warp per output row; scores for 32
 * keys (or queries) at a time, one per lane, then the row's columns, one per
 * lane, accumulate over those 32 in order: plain fp32, deterministic, no
 * block barriers (a warp past the last row may return at once). */
#define ATT_FB_WARPS 4
#define ATT_FB_MAX_D 1024 /* widest head the fallback's shared memory takes */

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x; /* pairwise sums commute: every lane holds the same bits */
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

/* sum_c a[c] * b[c]: a bf16 row in global memory, b a float row in smem. */
__device__ __forceinline__ float dot_row(const bf16 *a, const float *b, int n) {
  float acc = 0.f;
  for (int c = 0; c < n; c++) acc += __bfloat162float(a[c]) * b[c];
  return acc;
}

__device__ __forceinline__ void row_to_smem(float *dst, const bf16 *src, int n, int lane) {
  for (int c = lane; c < n; c += 32) dst[c] = __bfloat162float(src[c]);
}

/* Forward, one warp per query row (b, h, i): online softmax over key chunks,
 * o accumulated per column. Per-warp smem floats: q [dqk], o [dv], p [32]. */
__global__ void __launch_bounds__(ATT_FB_WARPS * 32)
    attn_fwd_ref_kernel(bf16 *__restrict__ o, float *__restrict__ lse, const bf16 *__restrict__ q,
                        const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                        const float *__restrict__ sinks, AttnShape s) {
  extern __shared__ float fsm[];
  const int lane = threadIdx.x & 31, T = s.T, dqk = s.dqk, dv = s.dv;
  const long row = (long)blockIdx.x * ATT_FB_WARPS + (threadIdx.x >> 5); /* (b*Hq + h)*T + i */
  if (row >= (long)s.B * s.Hq * T) return;
  const int i = (int)(row % T), h = (int)(row / T % s.Hq), b = (int)(row / T / s.Hq);
  const int hk = h / (s.Hq / s.Hkv);
  float *sq = fsm + (threadIdx.x >> 5) * (dqk + dv + 32), *so = sq + dqk, *sp = so + dv;
  row_to_smem(sq, q + ((size_t)b * T + i) * s.ldq + (size_t)h * dqk, dqk, lane);
  for (int c = lane; c < dv; c += 32) so[c] = 0.f;
  __syncwarp();
  const bf16 *kb = k + (size_t)b * T * s.ldk + (size_t)hk * dqk;
  const bf16 *vb = v + (size_t)b * T * s.ldv + (size_t)hk * dv;
  float m = sinks ? sinks[h] : -INFINITY, l = sinks ? 1.f : 0.f; /* the sink: exp(s - s) */
  for (int jc = s.window > 0 ? max(0, i - s.window + 1) : 0; jc <= i; jc += 32) {
    const int j = jc + lane, n = min(32, i - jc + 1);
    const float x = j <= i ? s.scale * dot_row(kb + (size_t)j * s.ldk, sq, dqk) : -INFINITY;
    const float mn = fmaxf(m, warp_max(x)); /* finite: key jc is visible */
    const float alpha = expf(m - mn), p = expf(x - mn);
    l = l * alpha + warp_sum(p);
    sp[lane] = p;
    __syncwarp();
    for (int c = lane; c < dv; c += 32) {
      float a = so[c] * alpha;
      for (int jj = 0; jj < n; jj++)
        a += sp[jj] * __bfloat162float(vb[(size_t)(jc + jj) * s.ldv + c]);
      so[c] = a;
    }
    __syncwarp();
    m = mn;
  }
  bf16 *orow = o + ((size_t)b * T + i) * s.Hq * dv + (size_t)h * dv;
  for (int c = lane; c < dv; c += 32) orow[c] = __float2bfloat16(so[c] / l);
  if (lane == 0) lse[row] = m + logf(l);
}

/* dQ, one warp per query row (b, h, i): dS for 32 keys at a time, then
 * dq[c] += dS_j k_j[c] in key order. Per-warp smem floats: q [dqk], dO [dv],
 * dq [dqk], dS [32]. */
__global__ void __launch_bounds__(ATT_FB_WARPS * 32)
    attn_bwd_dq_ref_kernel(bf16 *__restrict__ dq, const bf16 *__restrict__ dout,
                           const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                           const bf16 *__restrict__ v, const float *__restrict__ lse,
                           const float *__restrict__ dd, AttnShape s) {
  extern __shared__ float fsm[];
  const int lane = threadIdx.x & 31, T = s.T, dqk = s.dqk, dv = s.dv;
  const long row = (long)blockIdx.x * ATT_FB_WARPS + (threadIdx.x >> 5); /* (b*Hq + h)*T + i */
  if (row >= (long)s.B * s.Hq * T) return;
  const int i = (int)(row % T), h = (int)(row / T % s.Hq), b = (int)(row / T / s.Hq);
  const int hk = h / (s.Hq / s.Hkv);
  float *sq = fsm + (threadIdx.x >> 5) * (2 * dqk + dv + 32), *sdo = sq + dqk, *sacc = sdo + dv;
  float *sds = sacc + dqk;
  row_to_smem(sq, q + ((size_t)b * T + i) * s.ldq + (size_t)h * dqk, dqk, lane);
  row_to_smem(sdo, dout + ((size_t)b * T + i) * s.Hq * dv + (size_t)h * dv, dv, lane);
  for (int c = lane; c < dqk; c += 32) sacc[c] = 0.f;
  __syncwarp();
  const bf16 *kb = k + (size_t)b * T * s.ldk + (size_t)hk * dqk;
  const bf16 *vb = v + (size_t)b * T * s.ldv + (size_t)hk * dv;
  const float lrow = lse[row], drow = dd[row];
  for (int jc = s.window > 0 ? max(0, i - s.window + 1) : 0; jc <= i; jc += 32) {
    const int j = jc + lane, n = min(32, i - jc + 1);
    float ds = 0.f;
    if (j <= i) {
      const float p = expf(s.scale * dot_row(kb + (size_t)j * s.ldk, sq, dqk) - lrow);
      ds = p * (dot_row(vb + (size_t)j * s.ldv, sdo, dv) - drow);
    }
    sds[lane] = ds;
    __syncwarp();
    for (int c = lane; c < dqk; c += 32) {
      float a = sacc[c];
      for (int jj = 0; jj < n; jj++)
        a += sds[jj] * __bfloat162float(kb[(size_t)(jc + jj) * s.ldk + c]);
      sacc[c] = a;
    }
    __syncwarp();
  }
  bf16 *qrow = dq + ((size_t)b * T + i) * s.ldq + (size_t)h * dqk;
  for (int c = lane; c < dqk; c += 32) qrow[c] = __float2bfloat16(sacc[c] * s.scale);
}

/* dK, dV, one warp per key row (b, hk, j): the query heads of its GQA group
 * in order, each over the queries that see key j, 32 at a time. Per-warp smem
 * floats: k [dqk], v [dv], dk [dqk], dv [dv], p [32], dS [32]. */
__global__ void __launch_bounds__(ATT_FB_WARPS * 32)
    attn_bwd_dkdv_ref_kernel(bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                             const bf16 *__restrict__ dout, const bf16 *__restrict__ q,
                             const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                             const float *__restrict__ lse, const float *__restrict__ dd,
                             AttnShape s) {
  extern __shared__ float fsm[];
  const int lane = threadIdx.x & 31, T = s.T, dqk = s.dqk, dw = s.dv, G = s.Hq / s.Hkv;
  const long row = (long)blockIdx.x * ATT_FB_WARPS + (threadIdx.x >> 5); /* (b*Hkv + hk)*T + j */
  if (row >= (long)s.B * s.Hkv * T) return;
  const int j = (int)(row % T), hk = (int)(row / T % s.Hkv), b = (int)(row / T / s.Hkv);
  const int ldo = s.Hq * dw;
  float *sk = fsm + (threadIdx.x >> 5) * (2 * dqk + 2 * dw + 64), *sv = sk + dqk;
  float *adk = sv + dw, *adv = adk + dqk, *sp = adv + dw, *sds = sp + 32;
  const size_t krow = ((size_t)b * T + j) * s.ldk + (size_t)hk * dqk;
  const size_t vrow = ((size_t)b * T + j) * s.ldv + (size_t)hk * dw;
  row_to_smem(sk, k + krow, dqk, lane);
  row_to_smem(sv, v + vrow, dw, lane);
  for (int c = lane; c < dqk; c += 32) adk[c] = 0.f;
  for (int c = lane; c < dw; c += 32) adv[c] = 0.f;
  __syncwarp();
  const int i_end = s.window > 0 ? min(T - 1, j + s.window - 1) : T - 1;
  for (int h = hk * G; h < (hk + 1) * G; h++) {
    const bf16 *qb = q + (size_t)b * T * s.ldq + (size_t)h * dqk;
    const bf16 *ob = dout + (size_t)b * T * ldo + (size_t)h * dw;
    const float *lb = lse + ((size_t)b * s.Hq + h) * T, *db = dd + ((size_t)b * s.Hq + h) * T;
    for (int ic = j; ic <= i_end; ic += 32) {
      const int i = ic + lane, n = min(32, i_end - ic + 1);
      float p = 0.f, ds = 0.f;
      if (i <= i_end) {
        p = expf(s.scale * dot_row(qb + (size_t)i * s.ldq, sk, dqk) - lb[i]);
        ds = p * (dot_row(ob + (size_t)i * ldo, sv, dw) - db[i]);
      }
      sp[lane] = p;
      sds[lane] = ds;
      __syncwarp();
      for (int c = lane; c < dw; c += 32) {
        float a = adv[c];
        for (int ii = 0; ii < n; ii++)
          a += sp[ii] * __bfloat162float(ob[(size_t)(ic + ii) * ldo + c]);
        adv[c] = a;
      }
      for (int c = lane; c < dqk; c += 32) {
        float a = adk[c];
        for (int ii = 0; ii < n; ii++)
          a += sds[ii] * __bfloat162float(qb[(size_t)(ic + ii) * s.ldq + c]);
        adk[c] = a;
      }
      __syncwarp();
    }
  }
  for (int c = lane; c < dqk; c += 32) dk[krow + c] = __float2bfloat16(adk[c] * s.scale);
  for (int c = lane; c < dw; c += 32) dv[vrow + c] = __float2bfloat16(adv[c]);
}

/* ------------------------------------------------------------- sinks */

#define ATT_SINK_THREADS 256

/* dsinks[h] -= sum over (b, i) of exp(s_h - lse[b,h,i]) * dd[b,h,i]: one CTA per
 * head; thread x sums the (b, i) pairs x, x + 256, ... in order, then a fixed
 * tree over the threads. */
__global__ void __launch_bounds__(ATT_SINK_THREADS)
    attn_sinks_grad_kernel(float *__restrict__ dsinks, const float *__restrict__ sinks,
                           const float *__restrict__ lse, const float *__restrict__ dd, int B,
                           int Hq, int T) {
  __shared__ float red[ATT_SINK_THREADS];
  const int h = blockIdx.x;
  const float sh = sinks[h];
  float acc = 0.f;
  for (long u = threadIdx.x; u < (long)B * T; u += ATT_SINK_THREADS) {
    const size_t r = ((size_t)(u / T) * Hq + h) * T + (size_t)(u % T);
    acc += expf(sh - lse[r]) * dd[r];
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = ATT_SINK_THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) dsinks[h] -= red[0];
}

/* ---------------------------------------------------------------- launch */

static void attn_check(const AttnShape *s) {
  if (s->Hkv <= 0 || s->Hq % s->Hkv != 0)
    nmoe_fatal("attention: Hq=%d is not a multiple of Hkv=%d", s->Hq, s->Hkv);
  if (s->dqk <= 0 || s->dv <= 0 || s->dqk > ATT_FB_MAX_D || s->dv > ATT_FB_MAX_D)
    nmoe_fatal("unsupported attention head dims dqk=%d dv=%d (each must be 1..%d)", s->dqk,
               s->dv, ATT_FB_MAX_D);
}

/* Tile width of the tensor-core path for head width d: the smallest of
 * 16/32/64/128/192/256 that holds it; 0 when d is not a multiple of 8 or
 * wider than 256. */
static int att_tile(int d) {
  static const int tiles[] = {16, 32, 64, 128, 192, 256};
  if (d <= 0 || d % 8) return 0;
  for (int t : tiles)
    if (d <= t) return t;
  return 0;
}

/* Whether the tensor-core kernels apply: both widths have a tile, and every
 * row of every operand starts 16-byte aligned (cp.async, bf16x2 stores). */
static bool att_fast(const AttnShape *s, std::initializer_list<const void *> ptrs) {
  if (!att_tile(s->dqk) || !att_tile(s->dv) || s->ldq % 8 || s->ldk % 8 || s->ldv % 8)
    return false;
  for (const void *p : ptrs)
    if ((uintptr_t)p % 16) return false;
  return true;
}

/* Tag naming one kernel instance: tile widths and whether they are padded. */
template <int DQK, int DV, bool PAD> struct AttTile {};

template <int DQK, typename F> static void att_dispatch_dv(int tv, F &&f) {
  switch (tv) {
  case 16: f(AttTile<DQK, 16, true>()); break;
  case 32: f(AttTile<DQK, 32, true>()); break;
  case 64: f(AttTile<DQK, 64, true>()); break;
  case 128: f(AttTile<DQK, 128, true>()); break;
  case 192: f(AttTile<DQK, 192, true>()); break;
  default: f(AttTile<DQK, 256, true>()); break;
  }
}

/* Calls f(AttTile<...>()) for the instance serving s (fast path only): the
 * tuned exact pairs, else the padded tile pair. */
template <typename F> static void att_dispatch(const AttnShape *s, F &&f) {
  if (s->dqk == 64 && s->dv == 64) f(AttTile<64, 64, false>());
  else if (s->dqk == 128 && s->dv == 128) f(AttTile<128, 128, false>());
  else if (s->dqk == 192 && s->dv == 128) f(AttTile<192, 128, false>());
  else {
    const int tv = att_tile(s->dv);
    switch (att_tile(s->dqk)) {
    case 16: att_dispatch_dv<16>(tv, f); break;
    case 32: att_dispatch_dv<32>(tv, f); break;
    case 64: att_dispatch_dv<64>(tv, f); break;
    case 128: att_dispatch_dv<128>(tv, f); break;
    case 192: att_dispatch_dv<192>(tv, f); break;
    default: att_dispatch_dv<256>(tv, f); break;
    }
  }
}

template <int DQK, int DV, bool PAD>
static void fwd_launch(AttTile<DQK, DV, PAD>, Backend *be, bf16 *o, float *lse, const bf16 *q,
                       const bf16 *k, const bf16 *v, const float *sinks, const AttnShape *s) {
  const size_t smem = (size_t)(ATT_BM * DQK + 2 * ATT_BN * (DQK + DV)) * sizeof(bf16);
  CUDA_CHECK(cudaFuncSetAttribute(attn_fwd_kernel<DQK, DV, PAD>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  dim3 grid(ceil_div(s->T, ATT_BM), s->Hq, s->B);
  attn_fwd_kernel<DQK, DV, PAD><<<grid, ATT_THREADS, smem, cuda_stream(be)>>>(o, lse, q, k, v,
                                                                              sinks, *s);
  CUDA_LAUNCH_CHECK();
}

/* D = rowsum(dO * O) into attention scratch (DV = 0: any width). */
template <int DV>
static float *dot_launch(Backend *be, const bf16 *dout, const bf16 *o, const AttnShape *s) {
  const int N = s->B * s->T;
  float *dd = (float *)cuda_scratch(be, SCRATCH_ATTN, (size_t)N * s->Hq * sizeof(float));
  attn_bwd_dot_kernel<DV><<<ceil_div((long)N * s->Hq, 8), 256, 0, cuda_stream(be)>>>(
      dd, dout, o, N, s->T, s->Hq, s->dv);
  CUDA_LAUNCH_CHECK();
  return dd;
}

/* Returns D (attention scratch), which the sinks gradient reads. */
template <int DQK, int DV, bool PAD>
static const float *bwd_launch(AttTile<DQK, DV, PAD>, Backend *be, bf16 *dq, bf16 *dk, bf16 *dv,
                               const bf16 *dout, const bf16 *q, const bf16 *k, const bf16 *v,
                               const bf16 *o, const float *lse, const AttnShape *s) {
  cudaStream_t st = cuda_stream(be);
  const float *dd = dot_launch<PAD ? 0 : DV>(be, dout, o, s);

  const size_t smem_kv = (size_t)(ATT_BM * (DQK + DV) + 2 * ATT_BQ * (DQK + DV)) * sizeof(bf16) +
                         4 * ATT_BQ * sizeof(float);
  CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<DQK, DV, PAD>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_kv));
  dim3 gkv(ceil_div(s->T, ATT_BM), s->Hkv, s->B);
  attn_bwd_dkdv_kernel<DQK, DV, PAD><<<gkv, ATT_THREADS, smem_kv, st>>>(dk, dv, dout, q, k, v,
                                                                        lse, dd, *s);
  CUDA_LAUNCH_CHECK();

  const size_t smem_q = (size_t)(ATT_BM * (DQK + DV) + 2 * ATT_BN * (DQK + DV)) * sizeof(bf16);
  CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dq_kernel<DQK, DV, PAD>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_q));
  dim3 gq(ceil_div(s->T, ATT_BM), s->Hq, s->B);
  attn_bwd_dq_kernel<DQK, DV, PAD><<<gq, ATT_THREADS, smem_q, st>>>(dq, dout, q, k, v, lse, dd,
                                                                    *s);
  CUDA_LAUNCH_CHECK();
  return dd;
}

/* Launch a fallback kernel over `rows` warps with `floats` smem per warp. */
template <typename Kern, typename... Args>
static void ref_launch(Backend *be, Kern kern, long rows, int floats, Args... args) {
  const size_t smem = (size_t)ATT_FB_WARPS * floats * sizeof(float);
  CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kern<<<ceil_div(rows, ATT_FB_WARPS), ATT_FB_WARPS * 32, smem, cuda_stream(be)>>>(args...);
  CUDA_LAUNCH_CHECK();
}

void cu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                 const void *sinks, const AttnShape *s) {
  attn_check(s);
  bf16 *O = (bf16 *)o;
  float *L = (float *)lse;
  const bf16 *Q = (const bf16 *)q, *K = (const bf16 *)k, *V = (const bf16 *)v;
  const float *S = (const float *)sinks;
  if (att_fast(s, {o, q, k, v}))
    att_dispatch(s, [&](auto tile) { fwd_launch(tile, be, O, L, Q, K, V, S, s); });
  else
    ref_launch(be, attn_fwd_ref_kernel, (long)s->B * s->Hq * s->T, s->dqk + s->dv + 32, O, L, Q,
               K, V, S, *s);
}

void cu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                 const void *q, const void *k, const void *v, const void *o, const void *lse,
                 const void *sinks, const AttnShape *s) {
  attn_check(s);
  NMOE_ASSERT((sinks == NULL) == (dsinks == NULL));
  bf16 *DQ = (bf16 *)dq, *DK = (bf16 *)dk, *DV = (bf16 *)dv;
  const bf16 *DO = (const bf16 *)dout, *Q = (const bf16 *)q, *K = (const bf16 *)k,
             *V = (const bf16 *)v, *O = (const bf16 *)o;
  const float *L = (const float *)lse, *dd = NULL;
  if (att_fast(s, {dq, dk, dv, dout, q, k, v, o})) {
    att_dispatch(s, [&](auto tile) {
      dd = bwd_launch(tile, be, DQ, DK, DV, DO, Q, K, V, O, L, s);
    });
  } else {
    dd = dot_launch<0>(be, DO, O, s);
    ref_launch(be, attn_bwd_dkdv_ref_kernel, (long)s->B * s->Hkv * s->T,
               2 * s->dqk + 2 * s->dv + 64, DK, DV, DO, Q, K, V, L, dd, *s);
    ref_launch(be, attn_bwd_dq_ref_kernel, (long)s->B * s->Hq * s->T, 2 * s->dqk + s->dv + 32,
               DQ, DO, Q, K, V, L, dd, *s);
  }
  if (sinks) {
    attn_sinks_grad_kernel<<<s->Hq, ATT_SINK_THREADS, 0, cuda_stream(be)>>>(
        (float *)dsinks, (const float *)sinks, L, dd, s->B, s->Hq, s->T);
    CUDA_LAUNCH_CHECK();
  }
}
