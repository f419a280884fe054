/* cpu_math.c: dense math of the CPU backend: gemm (all transposes), grouped
 * (per-expert) gemm, elementwise add, linear-layer bias (add, gradient) and the
 * sum of squares.
 *
 * gemm splits C into MB x NB tiles, one thread per tile, and sums every C
 * element over k in ascending order (or in cpu_dot's fixed order when B is
 * transposed), so results do not depend on the thread count. */
#include <stdlib.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

enum { MB = 16, NB = 128 };

real_t cpu_dot(const real_t *a, const real_t *b, int n) {
  real_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
#pragma omp simd
    for (int u = 0; u < 8; u++) acc[u] += a[i + u] * b[i + u];
  real_t s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* One tile with B not transposed: i-k-j order, the tile accumulated in acc so
 * each B row segment is reused MB times from L1. */
static void tile_axpy(real_t acc[MB][NB], const real_t *A, int lda, const real_t *B, int ldb,
                      int i0, int ni, int j0, int nj, int K, int transA) {
  for (int k = 0; k < K; k++) {
    const real_t *b = B + (size_t)k * ldb + j0;
    for (int i = 0; i < ni; i++) {
      real_t a = transA ? A[(size_t)k * lda + i0 + i] : A[(size_t)(i0 + i) * lda + k];
      real_t *c = acc[i];
#pragma omp simd /* -O2 alone does not vectorise loops of variable length */
      for (int j = 0; j < nj; j++) c[j] += a * b[j];
    }
  }
}

/* One tile with B transposed (stored [N,K]): dot products of A rows with B rows.
 * A columns (transA) are first gathered into col, a buffer of K. */
static void tile_dot(real_t acc[MB][NB], const real_t *A, int lda, const real_t *B, int ldb,
                     int i0, int ni, int j0, int nj, int K, int transA, real_t *col) {
  for (int i = 0; i < ni; i++) {
    const real_t *a = A + (size_t)(i0 + i) * lda;
    if (transA) {
      for (int k = 0; k < K; k++) col[k] = A[(size_t)k * lda + i0 + i];
      a = col;
    }
    for (int j = 0; j < nj; j++) acc[i][j] = cpu_dot(a, B + (size_t)(j0 + j) * ldb, K);
  }
}

void cpu_gemm_strided(real_t *C, int ldc, const real_t *A, int lda, const real_t *B, int ldb,
                      int M, int N, int K, int transA, int transB, real_t alpha, real_t beta) {
  int mt = (M + MB - 1) / MB, nt = (N + NB - 1) / NB;
  long tiles = (long)mt * nt;
#pragma omp parallel if (tiles > 1)
  {
    real_t acc[MB][NB];
    real_t *col = (transA && transB) ? xmalloc((size_t)(K > 0 ? K : 1) * sizeof(real_t)) : NULL;
#pragma omp for schedule(dynamic, 1)
    for (long t = 0; t < tiles; t++) {
      int i0 = (int)(t / nt) * MB, j0 = (int)(t % nt) * NB;
      int ni = M - i0 < MB ? M - i0 : MB, nj = N - j0 < NB ? N - j0 : NB;
      for (int i = 0; i < ni; i++)
        for (int j = 0; j < nj; j++) acc[i][j] = 0;
      if (transB)
        tile_dot(acc, A, lda, B, ldb, i0, ni, j0, nj, K, transA, col);
      else
        tile_axpy(acc, A, lda, B, ldb, i0, ni, j0, nj, K, transA);
      for (int i = 0; i < ni; i++) {
        real_t *c = C + (size_t)(i0 + i) * ldc + j0;
        if (beta == 0)
          for (int j = 0; j < nj; j++) c[j] = alpha * acc[i][j];
        else
          for (int j = 0; j < nj; j++) c[j] = alpha * acc[i][j] + beta * c[j];
      }
    }
    free(col);
  }
}

void cpu_gemm(Backend *be, void *C, const void *A, const void *B, int M, int N, int K, int transA,
              int transB, float alpha, float beta, int c_f32) {
  /* ACT and F32 are both real_t here, so c_f32 takes the same path. */
  cpu_gemm_strided(C, N, A, transA ? M : K, B, transB ? K : N, M, N, K, transA, transB, alpha,
                   beta);
}

void cpu_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                      const int32_t *off, const int32_t *off_host, int E, int M, int N, int K) {
  const int32_t *o = off_host ? off_host : off;
  NMOE_ASSERT(o[0] == 0 && o[E] == M);
  for (int e = 0; e < E; e++) {
    int r0 = o[e], rows = o[e + 1] - o[e];
    NMOE_ASSERT(rows >= 0);
    if (rows == 0) continue; /* GG_DW leaves dW[e] unchanged; FWD/DX have no rows to write */
    const real_t *W = (const real_t *)b + (size_t)e * K * N; /* W[e] [K, N] */
    switch (mode) {
    case GG_FWD: /* Y[rows, N] = X[rows, K] @ W[e] */
      cpu_gemm_strided((real_t *)out + (size_t)r0 * N, N, (const real_t *)a + (size_t)r0 * K, K, W,
                       N, rows, N, K, 0, 0, 1, 0);
      break;
    case GG_DX: /* dX[rows, K] = dY[rows, N] @ W[e]^T */
      cpu_gemm_strided((real_t *)out + (size_t)r0 * K, K, (const real_t *)a + (size_t)r0 * N, N, W,
                       N, rows, K, N, 0, 1, 1, 0);
      break;
    case GG_DW: /* dW[e] [K, N] += X[rows, K]^T @ dY[rows, N]; a = X, b = dY, out = dW */
      cpu_gemm_strided((real_t *)out + (size_t)e * K * N, N, (const real_t *)a + (size_t)r0 * K, K,
                       (const real_t *)b + (size_t)r0 * N, N, K, N, rows, 1, 0, 1, 1);
      break;
    default:
      nmoe_fatal("internal error: grouped_gemm mode %d", mode);
    }
  }
}

void cpu_add(Backend *be, void *y, const void *a, const void *b, size_t n) {
  real_t *Y = y;
  const real_t *A = a, *B = b;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; i++) Y[i] = A[i] + B[i];
}

/* ACT and F32 are both real_t here: a copy or an add. */
void cpu_convert(Backend *be, void *dst, BufKind dk, const void *src, BufKind sk, size_t n,
                 int accumulate) {
  real_t *D = dst;
  const real_t *S = src;
  for (size_t i = 0; i < n; i++) D[i] = accumulate ? D[i] + S[i] : S[i];
}

void cpu_bias_add(Backend *be, void *y, const void *b, int N, int C) {
  real_t *Y = y;
  const real_t *Bv = b;
#pragma omp parallel for schedule(static) if ((long)N * C > 65536)
  for (int n = 0; n < N; n++)
    for (int c = 0; c < C; c++) Y[(size_t)n * C + c] += Bv[c];
}

/* One task per column (rows in order): deterministic, each db element once. */
void cpu_bias_grad(Backend *be, void *db, const void *dy, int N, int C) {
  real_t *dB = db;
  const real_t *dY = dy;
#pragma omp parallel for schedule(static) if ((long)N * C > 65536)
  for (int c = 0; c < C; c++) {
    real_t acc = 0;
    for (int n = 0; n < N; n++) acc += dY[(size_t)n * C + c];
    dB[c] += acc;
  }
}

double cpu_sumsq(Backend *be, const void *x, size_t n) {
  /* Fixed chunks summed in double, then the chunk sums in order. */
  enum { CH = 4096 };
  const real_t *X = x;
  size_t nch = (n + CH - 1) / CH;
  double *part = xmalloc((nch ? nch : 1) * sizeof(double));
#pragma omp parallel for schedule(static) if (nch > 1)
  for (size_t c = 0; c < nch; c++) {
    size_t end = (c + 1) * CH < n ? (c + 1) * CH : n;
    double s = 0;
    for (size_t i = c * CH; i < end; i++) s += (double)X[i] * X[i];
    part[c] = s;
  }
  double s = 0;
  for (size_t c = 0; c < nch; c++) s += part[c];
  free(part);
  return s;
}
