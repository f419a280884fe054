/* gemm.cu: dense GEMM on cuBLASLt and the per-expert (grouped) GEMM entry point.
 *
 * The contract is row-major; cuBLAS is column-major. A row-major [R, C] matrix
 * is a column-major [C, R] one with the same leading dimension, so
 *   C = op(A) op(B)   (row-major)   <=>   C^T = op(B)^T op(A)^T   (column-major)
 * and every call below hands cuBLAS B as its first operand and A as its second.
 *
 * Dense: bf16 operands, fp32 compute, C bf16 or fp32. Matmul descriptors, layouts
 * and the chosen algorithm are cached per (device, shape, transposes, output
 * type, pointer alignment), so a repeated shape costs one hash lookup and the
 * same algorithm (hence bit-identical results) every time. Split-K reductions
 * are limited to fp32 workspace (and in-place only for fp32 outputs) so bf16
 * outputs round once.
 *
 * Grouped: the tensor-core kernels of grouped_gemm.cu (device offsets only, no
 * host sync). cublasGemmGroupedBatchedEx serves the rest: shapes the kernels
 * do not take (K or N not a multiple of 8, unaligned operands) and GG_DW with
 * a per-expert dW of K*N >= 2^22 elements (moonlet w13, 2048 x 2816: cuBLAS
 * 2.37 ms vs ours 2.58 on H100; moonlet w2, 1408 x 2048, is ours, 1.26 vs
 * 1.38: bench/results/2026-11-26-grouped-gemm.md, run 2). It runs one call
 * for all experts with rows, one group per expert (its own m). That path
 * needs the sizes on the host, which the contract gives (off_host; without
 * it the device offsets are fetched, a wait), and the operand pointers in
 * device memory: they are built on the host and copied into the SCRATCH_GEMM
 * slot on the stream. NMOE_GROUPED_GEMM=cublas in the
 * environment forces the cuBLAS path (A/B benchmarks; an escape hatch).
 * Experts with no rows are left out of the call, so GG_FWD/GG_DX write
 * nothing for them and GG_DW leaves their dW unchanged. */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_blas.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/grouped_gemm.h"

/* One row-major product expressed as its column-major cuBLAS call: the first
 * cuBLAS operand is B, the second A (see top). */
typedef struct ColMajor {
  cublasOperation_t ta, tb; /* ops on cuBLAS's A (= our B) and B (= our A) */
  int m, n, k;              /* cuBLAS sizes: m = N, n = M */
  int lda, ldb, ldc;
} ColMajor;

static ColMajor colmajor_of(int M, int N, int K, int transA, int transB) {
  ColMajor c;
  c.m = N;
  c.n = M;
  c.k = K;
  c.ta = transB ? CUBLAS_OP_T : CUBLAS_OP_N; /* B stored [N,K] or [K,N] */
  c.lda = transB ? K : N;
  c.tb = transA ? CUBLAS_OP_T : CUBLAS_OP_N; /* A stored [K,M] or [M,K] */
  c.ldb = transA ? M : K;
  c.ldc = N;
  return c;
}

/* ---- dense GEMM plan cache ---- */

typedef struct GemmKey {
  int device, M, N, K, transA, transB, c_f32;
  int alignA, alignB, alignC; /* bytes, power of two <= 256 */
} GemmKey;

typedef struct GemmPlan {
  int used;
  GemmKey key;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc; /* cuBLAS's A (= our B), B (= our A), C */
  cublasLtMatmulAlgo_t algo;
} GemmPlan;

#define GEMM_CACHE_SIZE 1024 /* a model uses tens of shapes; full slots get replaced */
static GemmPlan gemm_cache[GEMM_CACHE_SIZE];

static int ptr_align(const void *p) {
  uintptr_t a = (uintptr_t)p;
  int al = 1;
  while (al < 256 && (a & (uintptr_t)(2 * al - 1)) == 0) al *= 2;
  return al;
}

static uint64_t key_hash(const GemmKey *k) {
  const int *w = (const int *)k;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < sizeof(GemmKey) / sizeof(int); i++) h = (h ^ (uint32_t)w[i]) * 1099511628211ull;
  return h;
}

static void plan_release(GemmPlan *p) {
  BLAS_CHECK(cublasLtMatrixLayoutDestroy(p->la));
  BLAS_CHECK(cublasLtMatrixLayoutDestroy(p->lb));
  BLAS_CHECK(cublasLtMatrixLayoutDestroy(p->lc));
  BLAS_CHECK(cublasLtMatmulDescDestroy(p->desc));
  p->used = 0;
}

static void plan_build(Backend *be, GemmPlan *p, const GemmKey *k) {
  CudaCtx *c = cuda_ctx(be);
  ColMajor cm = colmajor_of(k->M, k->N, k->K, k->transA, k->transB);
  cudaDataType_t ct = k->c_f32 ? CUDA_R_32F : CUDA_R_16BF;
  BLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  BLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &cm.ta, sizeof(cm.ta)));
  BLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &cm.tb, sizeof(cm.tb)));
  /* Stored shapes (before the op): rows x cols, column-major. */
  int ar = cm.ta == CUBLAS_OP_N ? cm.m : cm.k, ac = cm.ta == CUBLAS_OP_N ? cm.k : cm.m;
  int br = cm.tb == CUBLAS_OP_N ? cm.k : cm.n, bc = cm.tb == CUBLAS_OP_N ? cm.n : cm.k;
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&p->la, CUDA_R_16BF, ar, ac, cm.lda));
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lb, CUDA_R_16BF, br, bc, cm.ldb));
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lc, ct, cm.m, cm.n, cm.ldc));

  cublasLtMatmulPreference_t pref;
  BLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = c->lt_ws_bytes;
  uint32_t red = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                 (k->c_f32 ? CUBLASLT_REDUCTION_SCHEME_INPLACE : 0);
  uint32_t al_a = k->alignB, al_b = k->alignA, al_c = k->alignC; /* cuBLAS A is our B */
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &red, sizeof(red)));
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  BLAS_CHECK(cublasLtMatmulAlgoGetHeuristic((cublasLtHandle_t)c->lt, p->desc, p->la, p->lb, p->lc,
                                            p->lc, pref, 1, &res, &found));
  BLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  if (found == 0)
    nmoe_fatal("cuBLASLt has no algorithm for gemm M=%d N=%d K=%d transA=%d transB=%d c_f32=%d "
               "(alignments %d/%d/%d bytes; hint: keep dims multiples of 8)", k->M, k->N, k->K,
               k->transA, k->transB, k->c_f32, k->alignA, k->alignB, k->alignC);
  p->algo = res.algo;
  p->key = *k;
  p->used = 1;
}

static GemmPlan *plan_get(Backend *be, const GemmKey *k) {
  uint64_t h = key_hash(k);
  for (int probe = 0; probe < 8; probe++) {
    GemmPlan *p = &gemm_cache[(h + probe) % GEMM_CACHE_SIZE];
    if (p->used && memcmp(&p->key, k, sizeof(GemmKey)) == 0) return p;
    if (!p->used) {
      plan_build(be, p, k);
      return p;
    }
  }
  GemmPlan *p = &gemm_cache[h % GEMM_CACHE_SIZE]; /* neighbourhood full: replace */
  plan_release(p);
  plan_build(be, p, k);
  return p;
}

void cu_gemm(Backend *be, void *C, const void *A, const void *B, int M, int N, int K, int transA,
             int transB, float alpha, float beta, int c_f32) {
  if (M == 0 || N == 0) return;
  NMOE_ASSERT(K > 0);
  CudaCtx *c = cuda_ctx(be);
  GemmKey key;
  memset(&key, 0, sizeof(key)); /* the key is hashed and compared bytewise */
  key.device = c->device;
  key.M = M;
  key.N = N;
  key.K = K;
  key.transA = transA;
  key.transB = transB;
  key.c_f32 = c_f32;
  key.alignA = ptr_align(A);
  key.alignB = ptr_align(B);
  key.alignC = ptr_align(C);
  GemmPlan *p = plan_get(be, &key);
  BLAS_CHECK(cublasLtMatmul((cublasLtHandle_t)c->lt, p->desc, &alpha, B, p->la, A, p->lb, &beta, C,
                            p->lc, C, p->lc, &p->algo, c->lt_ws, c->lt_ws_bytes, c->stream));
}

/* ---- grouped GEMM ---- */

/* Host-side argument arrays, grown as needed (the call copies what it needs
 * before returning). */
typedef struct GroupArgs {
  int cap;
  cublasOperation_t *ta, *tb;
  int *m, *n, *k, *lda, *ldb, *ldc, *size;
  float *alpha, *beta;
  const void **ptr; /* [3*cap]: cuBLAS A pointers, then B, then C */
  int32_t *off;     /* [cap+1]: expert offsets fetched when the caller has none */
} GroupArgs;

static GroupArgs gargs;

static void group_args_reserve(int E) {
  if (E <= gargs.cap) return;
  gargs.cap = E;
  gargs.ta = (cublasOperation_t *)xrealloc(gargs.ta, E * sizeof(cublasOperation_t));
  gargs.tb = (cublasOperation_t *)xrealloc(gargs.tb, E * sizeof(cublasOperation_t));
  int **ints[] = {&gargs.m, &gargs.n, &gargs.k, &gargs.lda, &gargs.ldb, &gargs.ldc, &gargs.size};
  for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) *ints[i] = (int *)xrealloc(*ints[i], E * sizeof(int));
  gargs.alpha = (float *)xrealloc(gargs.alpha, E * sizeof(float));
  gargs.beta = (float *)xrealloc(gargs.beta, E * sizeof(float));
  gargs.ptr = (const void **)xrealloc(gargs.ptr, 3 * E * sizeof(void *));
  gargs.off = (int32_t *)xrealloc(gargs.off, (E + 1) * sizeof(int32_t));
}

void cu_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                     const int32_t *off, const int32_t *off_host, int E, int M, int N, int K) {
  const char *impl = getenv("NMOE_GROUPED_GEMM");
  int tc = !(impl && strcmp(impl, "cublas") == 0) && !(mode == GG_DW && (long)K * N >= (1L << 22));
  if (tc && gg_tc_run(be, mode, out, a, b, off, E, M, N, K)) return;
  group_args_reserve(E);
  if (!off_host) { /* callers should pass it; fetching it here waits for the device */
    be->download(be, gargs.off, off, (E + 1) * sizeof(int32_t));
    off_host = gargs.off;
  }
  NMOE_ASSERT(off_host[0] == 0 && off_host[E] == M);
  const bf16 *A = (const bf16 *)a, *B = (const bf16 *)b;
  bf16 *O = (bf16 *)out;
  int g = 0;
  for (int e = 0; e < E; e++) {
    int rows = off_host[e + 1] - off_host[e];
    if (rows == 0) continue;
    size_t r0 = off_host[e];
    size_t w_off = (size_t)e * K * N;
    const void *pa, *pb; /* our row-major operands */
    void *pc;
    ColMajor cm;
    float beta = 0;
    if (mode == GG_FWD) {        /* Y[rows,N] = X[rows,K] @ W[e] */
      pa = A + r0 * K; pb = B + w_off; pc = O + r0 * N;
      cm = colmajor_of(rows, N, K, 0, 0);
    } else if (mode == GG_DX) {  /* dX[rows,K] = dY[rows,N] @ W[e]^T */
      pa = A + r0 * N; pb = B + w_off; pc = O + r0 * K;
      cm = colmajor_of(rows, K, N, 0, 1);
    } else {                     /* dW[e] += X[rows,K]^T @ dY[rows,N] */
      NMOE_ASSERT(mode == GG_DW);
      pa = A + r0 * K; pb = B + r0 * N; pc = O + w_off;
      cm = colmajor_of(K, N, rows, 1, 0);
      beta = 1;
    }
    gargs.ta[g] = cm.ta; gargs.tb[g] = cm.tb;
    gargs.m[g] = cm.m; gargs.n[g] = cm.n; gargs.k[g] = cm.k;
    gargs.lda[g] = cm.lda; gargs.ldb[g] = cm.ldb; gargs.ldc[g] = cm.ldc;
    gargs.alpha[g] = 1;
    gargs.beta[g] = beta;
    gargs.size[g] = 1;
    gargs.ptr[g] = pb;          /* cuBLAS A = our B */
    gargs.ptr[E + g] = pa;      /* cuBLAS B = our A */
    gargs.ptr[2 * E + g] = pc;
    g++;
  }
  if (g == 0) return;
  CudaCtx *c = cuda_ctx(be);
  const void **dptr = (const void **)cuda_scratch(be, SCRATCH_GEMM, 3 * (size_t)E * sizeof(void *));
  /* Pageable source: the copy is staged before the call returns, so gargs
   * may be refilled by the next call at once. */
  CUDA_CHECK(cudaMemcpyAsync(dptr, gargs.ptr, 3 * (size_t)E * sizeof(void *),
                             cudaMemcpyHostToDevice, c->stream));
  BLAS_CHECK(cublasGemmGroupedBatchedEx(
      (cublasHandle_t)c->blas, gargs.ta, gargs.tb, gargs.m, gargs.n, gargs.k, gargs.alpha,
      dptr, CUDA_R_16BF, gargs.lda, dptr + E, CUDA_R_16BF, gargs.ldb, gargs.beta,
      (void *const *)(dptr + 2 * E), CUDA_R_16BF, gargs.ldc, g, gargs.size, CUBLAS_COMPUTE_32F));
}
