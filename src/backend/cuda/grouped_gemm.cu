/* grouped_gemm.cu: the per-expert GEMMs of the MoE layer (GG_FWD, GG_DX, GG_DW;
 * contract in backend.h) on Hopper tensor cores.
 *
 * Plan. A one-block scan kernel turns the device offsets off[E+1] into cum[E+1],
 * the number of work units before each expert (FWD/DX: its 128-row M tiles;
 * DW: 1 when it has rows), so no host sync is needed. Every work unit expands to
 * a fixed number of output tiles (FWD/DX: the N tiles of a row block; DW: the
 * 128 x BN tiles of dW[e] [K, N]); tiles are numbered expert-major, so CTAs that
 * run at the same time share one expert's operands in L2.
 *
 * Kernel. Persistent: one CTA per SM walks tiles t = blockIdx.x, +gridDim.x, ...
 * Warpgroup 0 is the producer (one thread issues TMA copies of 64-deep K slices
 * into a ring of STAGES shared-memory stages, 128-byte swizzled, completing on
 * "full" mbarriers); warpgroups 1 and 2 each compute 64 rows x BN columns with
 * wgmma (m64nBNk16, fp32 accumulators in registers) keeping one K slice's
 * group in flight, release a stage through its "empty" mbarrier once the
 * slice after it is issued, and store their tile straight from registers
 * (16-byte stores after a quad transpose; GG_DW loads the whole tile's old dW
 * first, prefetched into L2 at the tile's start). The ring runs on across
 * tiles, so the next tile's loads overlap this tile's stores.
 *
 * Operands in shared memory (wgmma takes K-major or MN-major bf16 tiles):
 *   FWD  A = X [rows, K]     K-major   B = W[e] [K, N]   MN-major (N contiguous)
 *   DX   A = dY [rows, N]    K-major   B = W[e]^T        K-major  (W rows are K)
 *   DW   A = X^T             MN-major  B = dY [rows, N]  MN-major (reduction over rows)
 * W is read through a 3-D tensor map [E][K][N], so a K slice never spills into
 * the next expert (TMA fills out-of-range elements with zeros). X and dY are
 * 2-D [M][.] maps: an FWD/DX row tile may read the next expert's rows, which
 * only produce rows that are not stored; a DW K slice (rows) past the expert's
 * end is zeroed in the A tile before use (B rows there are real, finite data).
 *
 * Determinism: every output element belongs to one tile and sums its K slices
 * in order; no atomics, no split-K. GG_DW adds into bf16 dW once per element
 * (fp32 add, one rounding). Shapes the tensor maps cannot describe (K or N not
 * a multiple of 8, operands not 16-byte aligned) return 0 so the caller can use
 * its general path. */
#include <cuda.h>
#include <stdint.h>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/grouped_gemm.h"

enum {
  GG_BM = 128,           /* tile rows: two consumer warpgroups of 64 */
  GG_BK = 64,            /* K slice: 64 bf16 = one 128-byte swizzle row */
  GG_THREADS = 384,      /* producer + 2 consumer warpgroups */
  GG_A_BYTES = GG_BM * GG_BK * 2,
  GG_CHUNK = 64 * GG_BK * 2, /* one 64 x 64 swizzled box: 8 KiB */
  GG_RING_BYTES = 196608 /* stages x stage bytes, for either tile width */
};

/* Kernel arguments besides the tensor maps. */
typedef struct GgArgs {
  bf16 *out;            /* FWD [M, N]; DX [M, K]; DW [E, K, N] */
  const int32_t *off;   /* [E+1] expert row offsets */
  const int32_t *cum;   /* [E+1] work units before expert e; cum[E] = all */
  int E;
  int gm, gn, gk;       /* GEMM sizes: DW gm = K (rows of dW[e]); FWD/DX rows come from off */
} GgArgs;

/* One output tile. */
typedef struct GgTile {
  int e;     /* expert */
  int row0;  /* first token row: FWD/DX of the tile, DW of the expert */
  int valid; /* FWD/DX: rows of the tile that are the expert's; DW: the expert's rows */
  int m0;    /* DW: first dW row (K index) */
  int n0;    /* first output column */
  int nk;    /* K slices */
} GgTile;

/* ---- PTX wrappers ---- */

static __device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

static __device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

static __device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

static __device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nGG_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra GG_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

static __device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

static __device__ __forceinline__ void tma_3d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                              int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
      "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

/* wgmma shared-memory descriptor, 128-byte swizzle. lbo: MN-major stride
 * between 64-element MN chunks (unused for K-major); sbo: stride between
 * groups of 8 rows (K-major: 8 M/N rows; MN-major: 8 K rows) = 1024. */
static __device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

static __device__ __forceinline__ void wgmma_fence(void) {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
static __device__ __forceinline__ void wgmma_commit(void) {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
/* Waits until at most N committed wgmma groups are still running. */
template <int N>
static __device__ __forceinline__ void wgmma_wait(void) {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/* Keeps the compiler from moving accumulator reads/writes across the async
 * wgmma boundary (the asm below is the only thing that "defines" them). */
template <int R>
static __device__ __forceinline__ void acc_fence(float *d) {
#pragma unroll
  for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* D[64, N] += A[64, 16] B[16, N]; TA / TB = 1: operand is MN-major. */
template <int TA, int TB>
__device__ __forceinline__ void wgmma_n128(float *d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

template <int TA, int TB>
__device__ __forceinline__ void wgmma_n256(float *d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, %131, %132;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

template <int BN, int TA, int TB>
static __device__ __forceinline__ void wgmma_tile(float *d, uint64_t da, uint64_t db) {
  if constexpr (BN == 256)
    wgmma_n256<TA, TB>(d, da, db);
  else
    wgmma_n128<TA, TB>(d, da, db);
}

/* ---- tile plan ---- */

static __device__ __forceinline__ int gg_units(const int32_t *off, int e, int dw) {
  int rows = off[e + 1] - off[e];
  return dw ? (rows > 0) : (rows + GG_BM - 1) / GG_BM;
}

/* cum[e] = work units of experts < e, cum[E] = total. One block of 1024
 * threads; thread t owns a contiguous run of experts. */
__global__ void __launch_bounds__(1024) gg_plan_kernel(const int32_t *off, int E, int dw,
                                                       int32_t *cum) {
  __shared__ int32_t part[1024];
  int t = threadIdx.x, per = (E + 1023) / 1024;
  int lo = min(E, t * per), hi = min(E, lo + per);
  int s = 0;
  for (int e = lo; e < hi; e++) s += gg_units(off, e, dw);
  part[t] = s;
  __syncthreads();
  for (int d = 1; d < 1024; d <<= 1) { /* inclusive scan */
    int v = t >= d ? part[t - d] : 0;
    __syncthreads();
    part[t] += v;
    __syncthreads();
  }
  int run = part[t] - s;
  for (int e = lo; e < hi; e++) {
    cum[e] = run;
    run += gg_units(off, e, dw);
  }
  if (t == 1023) cum[E] = part[1023];
}

template <int MODE, int BN>
static __device__ __forceinline__ int gg_tiles_per_unit(const GgArgs &p) {
  int nn = (p.gn + BN - 1) / BN;
  return MODE == GG_DW ? nn * ((p.gm + GG_BM - 1) / GG_BM) : nn;
}

template <int MODE, int BN>
static __device__ __forceinline__ GgTile gg_tile(const GgArgs &p, int t) {
  int tpu = gg_tiles_per_unit<MODE, BN>(p), nn = (p.gn + BN - 1) / BN;
  int unit = t / tpu, sub = t - unit * tpu;
  int lo = 0, hi = p.E; /* cum[lo] <= unit < cum[hi] */
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (p.cum[mid] <= unit) lo = mid;
    else hi = mid;
  }
  GgTile T;
  T.e = lo;
  int r0 = p.off[lo], r1 = p.off[lo + 1];
  if (MODE == GG_DW) {
    T.row0 = r0;
    T.valid = r1 - r0;
    T.m0 = (sub / nn) * GG_BM;
    T.n0 = (sub % nn) * BN;
    T.nk = (T.valid + GG_BK - 1) / GG_BK;
  } else {
    T.row0 = r0 + (unit - p.cum[lo]) * GG_BM;
    T.valid = min(GG_BM, r1 - T.row0);
    T.m0 = 0;
    T.n0 = sub * BN;
    T.nk = (p.gk + GG_BK - 1) / GG_BK;
  }
  return T;
}

/* ---- the kernel ---- */

template <int MODE, int BN>
struct GgCfg {
  static constexpr int B_BYTES = BN * GG_BK * 2;
  static constexpr int STAGE_BYTES = GG_A_BYTES + B_BYTES;
  static constexpr int STAGES = GG_RING_BYTES / STAGE_BYTES;
  /* ring (1 KiB aligned for the swizzle) + full/empty barriers */
  static constexpr int SMEM = 1024 + STAGES * STAGE_BYTES + 2 * STAGES * 8;
};

/* Producer: one thread walks the same tiles as the consumers and fills stages. */
template <int MODE, int BN>
static __device__ __forceinline__ void gg_produce(const GgArgs &p, const CUtensorMap *ma,
                                                  const CUtensorMap *mb, uint32_t ring,
                                                  uint32_t full, uint32_t empty, int total) {
  typedef GgCfg<MODE, BN> C;
  int s = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    GgTile T = gg_tile<MODE, BN>(p, t);
    for (int kb = 0; kb < T.nk; kb++) {
      mbar_wait(empty + 8 * s, phase ^ 1); /* the first pass finds every stage free */
      uint32_t bar = full + 8 * s, sa = ring + s * C::STAGE_BYTES, sb = sa + GG_A_BYTES;
      mbar_expect_tx(bar, C::STAGE_BYTES); /* boxes count in full, zero fill included */
      int k0 = kb * GG_BK;
      if (MODE == GG_FWD) {
        tma_2d(sa, ma, k0, T.row0, bar);                                   /* X [128 rows][64 k] */
        for (int c = 0; c < BN / 64; c++) tma_3d(sb + c * GG_CHUNK, mb, T.n0 + 64 * c, k0, T.e, bar);
      } else if (MODE == GG_DX) {
        tma_2d(sa, ma, k0, T.row0, bar);         /* dY [128 rows][64 n] */
        tma_3d(sb, mb, k0, T.n0, T.e, bar);      /* W[e] [BN k rows][64 n] */
      } else {
        for (int c = 0; c < 2; c++) tma_2d(sa + c * GG_CHUNK, ma, T.m0 + 64 * c, T.row0 + k0, bar);
        for (int c = 0; c < BN / 64; c++) tma_2d(sb + c * GG_CHUNK, mb, T.n0 + 64 * c, T.row0 + k0, bar);
      }
      if (++s == C::STAGES) {
        s = 0;
        phase ^= 1;
      }
    }
  }
}

/* ---- epilogue ---- */

/* Accumulator layout (per warp, m64nBN): element 4j + 2i + c sits at row
 * 16 warp + lane/4 + 8i, column 8j + 2 (lane%4) + c, so a quad of lanes holds
 * one row's 8-column group j. */

/* The output row of accumulator row half i, or NULL when the row is not
 * stored (FWD/DX: past the expert's rows; DW: past dW[e]'s K rows). Points at
 * the tile's first column. */
template <int MODE>
static __device__ __forceinline__ bf16 *gg_out_row(const GgArgs &p, const GgTile &T, int wg, int i) {
  int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  int r = 64 * wg + 16 * warp + lane / 4 + 8 * i;
  if (MODE != GG_DW) return r < T.valid ? p.out + (size_t)(T.row0 + r) * p.gn + T.n0 : NULL;
  int m = T.m0 + r;
  return m < p.gm ? p.out + ((size_t)T.e * p.gm + m) * p.gn + T.n0 : NULL;
}

/* DW: pulls the tile's old dW rows into L2 while the K loop runs, so the
 * epilogue's read of them does not wait on DRAM. Lane q of a quad takes the
 * q-th 128-byte line of its two rows. */
template <int BN>
static __device__ __forceinline__ void gg_prefetch_out(const GgArgs &p, const GgTile &T, int wg) {
  int q = threadIdx.x % 4;
  if (q >= BN / 64 || T.n0 + 64 * q >= p.gn) return;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    bf16 *o = gg_out_row<GG_DW>(p, T, wg, i);
    if (o) asm volatile("prefetch.global.L2 [%0];" ::"l"(o + 64 * q));
  }
}

/* 4 x 4 transpose of column pairs within a quad: on entry lane q holds
 * v[g] = columns 2q, 2q+1 of group g (g = 0..3 of a block of four 8-column
 * groups); on exit v[c] = columns 2c, 2c+1 of group q, i.e. one 16-byte run.
 * Two butterfly exchanges, with lane q^2 then lane q^1. */
static __device__ __forceinline__ void quad_transpose(float2 *v, int q) {
#pragma unroll
  for (int m = 2; m >= 1; m >>= 1) {
#pragma unroll
    for (int lo = 0; lo < 4; lo++) {
      if (lo & m) continue;
      int hi = lo | m, up = q & m;
      float2 send = up ? v[lo] : v[hi], got;
      got.x = __shfl_xor_sync(0xffffffffu, send.x, m);
      got.y = __shfl_xor_sync(0xffffffffu, send.y, m);
      if (up) v[lo] = got;
      else v[hi] = got;
    }
  }
}

static __device__ __forceinline__ uint32_t bf16x2_bits(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *(uint32_t *)&h;
}

static __device__ __forceinline__ float2 bf16x2_float2(uint32_t u) {
  return __bfloat1622float2(*(__nv_bfloat162 *)&u);
}

/* Stores a consumer warpgroup's 64 x BN tile with 16-byte accesses: quads
 * transpose their accumulators so each lane owns 8 consecutive columns. DW
 * adds into dW: all old values are loaded first (one wait for the whole tile,
 * the loads overlap the transposes), then each element is old + acc in fp32,
 * rounded once, as before. N is a multiple of 8, so a group is wholly inside
 * or outside the output. */
template <int MODE, int BN>
static __device__ __forceinline__ void gg_store(const GgArgs &p, const GgTile &T, float *acc, int wg) {
  constexpr int NB = BN / 32; /* blocks of four 8-column groups per row */
  int q = threadIdx.x % 4;
  bf16 *o[2] = {gg_out_row<MODE>(p, T, wg, 0), gg_out_row<MODE>(p, T, wg, 1)};
  uint4 old[2][NB];
  if (MODE == GG_DW) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int b = 0; b < NB; b++) {
        int col = 8 * (4 * b + q);
        old[i][b] = o[i] && T.n0 + col < p.gn ? *(const uint4 *)(o[i] + col) : make_uint4(0, 0, 0, 0);
      }
  }
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int b = 0; b < NB; b++) {
      float2 v[4];
#pragma unroll
      for (int g = 0; g < 4; g++) v[g] = make_float2(acc[4 * (4 * b + g) + 2 * i], acc[4 * (4 * b + g) + 2 * i + 1]);
      quad_transpose(v, q);
      int col = 8 * (4 * b + q);
      if (!o[i] || T.n0 + col >= p.gn) continue;
      if (MODE == GG_DW) {
        uint32_t w[4] = {old[i][b].x, old[i][b].y, old[i][b].z, old[i][b].w};
#pragma unroll
        for (int c = 0; c < 4; c++) {
          float2 f = bf16x2_float2(w[c]);
          v[c].x += f.x;
          v[c].y += f.y;
        }
      }
      *(uint4 *)(o[i] + col) = make_uint4(bf16x2_bits(v[0].x, v[0].y), bf16x2_bits(v[1].x, v[1].y),
                                          bf16x2_bits(v[2].x, v[2].y), bf16x2_bits(v[3].x, v[3].y));
    }
}

/* Consumer warpgroup wg (0 or 1): rows [64 wg, 64 wg + 64) of each tile. */
template <int MODE, int BN>
static __device__ __forceinline__ void gg_consume(const GgArgs &p, uint32_t ring, uint32_t full,
                                                  uint32_t empty, int total, int wg) {
  typedef GgCfg<MODE, BN> C;
  constexpr int TA = MODE == GG_DW, TB = MODE != GG_DX; /* MN-major operands */
  constexpr int R = BN / 2;                             /* accumulators per thread */
  int tid = threadIdx.x % 128, lane = tid % 32;
  float acc[R];
  int s = 0, prev = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    GgTile T = gg_tile<MODE, BN>(p, t);
    if (MODE == GG_DW) gg_prefetch_out<BN>(p, T, wg);
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    acc_fence<R>(acc);
    for (int kb = 0; kb < T.nk; kb++) {
      mbar_wait(full + 8 * s, phase);
      uint32_t sa = ring + s * C::STAGE_BYTES + wg * GG_CHUNK, sb = ring + s * C::STAGE_BYTES + GG_A_BYTES;
      if (MODE == GG_DW && T.valid - kb * GG_BK < GG_BK) {
        /* rows past the expert's end: zero them in this warpgroup's A chunk
         * (whole 128-byte rows, which the swizzle leaves in place) */
        int v = T.valid - kb * GG_BK;
        for (int i = tid; i < 64 * 8; i += 128)
          if (i / 8 >= v)
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(sa + 16 * i), "r"(0)
                         : "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("bar.sync %0, 128;" ::"r"(1 + wg) : "memory");
      }
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < GG_BK / 16; k++) {
        /* K step of 16: K-major tiles move 32 bytes along the row, MN-major
         * tiles move 16 rows of 128 bytes */
        uint64_t da = TA ? smem_desc(sa + k * 2048, GG_CHUNK) : smem_desc(sa + k * 32, 16);
        uint64_t db = TB ? smem_desc(sb + k * 2048, GG_CHUNK) : smem_desc(sb + k * 32, 16);
        wgmma_tile<BN, TA, TB>(acc, da, db);
      }
      wgmma_commit();
      /* keep this slice's group in flight; the previous slice is done, so its
       * stage goes back (one arrival per consumer warp) */
      wgmma_wait<1>();
      if (kb > 0 && lane == 0) mbar_arrive(empty + 8 * prev);
      prev = s;
      if (++s == C::STAGES) {
        s = 0;
        phase ^= 1;
      }
    }
    wgmma_wait<0>();
    acc_fence<R>(acc);
    if (T.nk > 0 && lane == 0) mbar_arrive(empty + 8 * prev);
    gg_store<MODE, BN>(p, T, acc, wg);
  }
}

template <int MODE, int BN>
__global__ void __launch_bounds__(GG_THREADS, 1)
    gg_kernel(const __grid_constant__ CUtensorMap ma, const __grid_constant__ CUtensorMap mb,
              GgArgs p) {
  typedef GgCfg<MODE, BN> C;
  extern __shared__ uint8_t smem[];
  uint32_t ring = (smem_u32(smem) + 1023) & ~1023u;
  uint32_t full = ring + C::STAGES * C::STAGE_BYTES, empty = full + 8 * C::STAGES;
  int total = p.cum[p.E] * gg_tiles_per_unit<MODE, BN>(p);
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::STAGES; s++) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 8); /* the 8 consumer warps */
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) gg_produce<MODE, BN>(p, &ma, &mb, ring, full, empty, total);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    gg_consume<MODE, BN>(p, ring, full, empty, total, wg - 1);
  }
}

/* ---- host ---- */

typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                  const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                  const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static EncodeTiledFn encode_tiled(void) {
  static EncodeTiledFn fn;
  if (!fn) {
    cudaDriverEntryPointQueryResult q;
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&fn, 12000,
                                                cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || !fn)
      nmoe_fatal("grouped_gemm: the CUDA driver has no cuTensorMapEncodeTiled (driver too old?)");
  }
  return fn;
}

/* A dense bf16 tensor of rank 2 or 3 (dims innermost first), read in boxes
 * with 128-byte swizzle; out-of-range elements read as zero. */
static void tmap_make(CUtensorMap *m, const void *ptr, int rank, const uint64_t *dims,
                      const uint32_t *box) {
  cuuint64_t d[3], st[2];
  cuuint32_t b[3], es[3] = {1, 1, 1};
  uint64_t stride = 2;
  for (int i = 0; i < rank; i++) {
    d[i] = dims[i];
    b[i] = box[i];
    if (i > 0) st[i - 1] = stride;
    stride *= dims[i];
  }
  CUresult r = encode_tiled()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, (void *)ptr, d, st, b, es,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    nmoe_fatal("grouped_gemm: cuTensorMapEncodeTiled failed (%d) for a rank-%d tensor", (int)r, rank);
}

template <int MODE, int BN>
static void gg_launch(CudaCtx *c, const CUtensorMap *ma, const CUtensorMap *mb, const GgArgs *p) {
  typedef GgCfg<MODE, BN> C;
  static int attr_set; /* per instantiation */
  if (!attr_set) {
    CUDA_CHECK(cudaFuncSetAttribute(gg_kernel<MODE, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    C::SMEM));
    attr_set = 1;
  }
  gg_kernel<MODE, BN><<<c->num_sms, GG_THREADS, C::SMEM, c->stream>>>(*ma, *mb, *p);
  CUDA_LAUNCH_CHECK();
}

int gg_tc_run(Backend *be, int mode, void *out, const void *a, const void *b, const int32_t *off,
              int E, int M, int N, int K) {
  if (N % 8 || K % 8 || E <= 0) return 0; /* TMA: row strides must be multiples of 16 bytes */
  if (((uintptr_t)out | (uintptr_t)a | (uintptr_t)b) % 16) return 0;
  if (M == 0) return 1;
  CudaCtx *c = cuda_ctx(be);
  int32_t *cum = (int32_t *)cuda_scratch(be, SCRATCH_GEMM, (size_t)(E + 1) * sizeof(int32_t));
  gg_plan_kernel<<<1, 1024, 0, c->stream>>>(off, E, mode == GG_DW, cum);
  CUDA_LAUNCH_CHECK();

  GgArgs p = {(bf16 *)out, off, cum, E, 0, 0, 0};
  CUtensorMap ma, mb;
  uint64_t w3[3] = {(uint64_t)N, (uint64_t)K, (uint64_t)E}; /* W [E][K][N] */
  if (mode == GG_FWD) {
    uint64_t xd[2] = {(uint64_t)K, (uint64_t)M};
    uint32_t xb[2] = {GG_BK, GG_BM}, wb[3] = {64, GG_BK, 1};
    tmap_make(&ma, a, 2, xd, xb);
    tmap_make(&mb, b, 3, w3, wb);
    p.gn = N;
    p.gk = K;
    if (N % 256 == 0) gg_launch<GG_FWD, 256>(c, &ma, &mb, &p);
    else gg_launch<GG_FWD, 128>(c, &ma, &mb, &p);
  } else if (mode == GG_DX) {
    uint64_t yd[2] = {(uint64_t)N, (uint64_t)M};
    uint32_t yb[2] = {GG_BK, GG_BM};
    tmap_make(&ma, a, 2, yd, yb);
    p.gn = K;
    p.gk = N;
    if (K % 256 == 0) {
      uint32_t wb[3] = {GG_BK, 256, 1};
      tmap_make(&mb, b, 3, w3, wb);
      gg_launch<GG_DX, 256>(c, &ma, &mb, &p);
    } else {
      uint32_t wb[3] = {GG_BK, 128, 1};
      tmap_make(&mb, b, 3, w3, wb);
      gg_launch<GG_DX, 128>(c, &ma, &mb, &p);
    }
  } else if (mode == GG_DW) {
    uint64_t xd[2] = {(uint64_t)K, (uint64_t)M}, yd[2] = {(uint64_t)N, (uint64_t)M};
    uint32_t box[2] = {64, GG_BK};
    tmap_make(&ma, a, 2, xd, box);
    tmap_make(&mb, b, 2, yd, box);
    p.gm = K;
    p.gn = N;
    if (N % 256 == 0) gg_launch<GG_DW, 256>(c, &ma, &mb, &p);
    else gg_launch<GG_DW, 128>(c, &ma, &mb, &p);
  } else {
    return 0;
  }
  return 1;
}
