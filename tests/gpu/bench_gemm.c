/* bench_gemm.c: how close the expert GEMMs run to one dense GEMM of the same
 * FLOPs, for the speedrun super/moe and moonlet expert shapes (GPU machine).
 *
 * For each shape: grouped GEMM (all experts in one call, rows spread evenly
 * with a +-25% jitter so groups differ) in the three modes, and one dense GEMM
 * [M, K] x [K, N] as the ceiling. Prints one JSON line per measurement with
 * ms and TFLOP/s (median of 20 after 3 warm-ups). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "core/log.h"
#include "core/rng.h"

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median ms of reps timed calls of fn (synchronised around each). */
#define TIME_MEDIAN(be, out_ms, body)                    \
  do {                                                   \
    double t_[20];                                       \
    for (int w_ = 0; w_ < 3; w_++) { body; }             \
    (be)->sync(be);                                      \
    for (int r_ = 0; r_ < 20; r_++) {                    \
      double t0_ = now_ms();                             \
      body;                                              \
      (be)->sync(be);                                    \
      t_[r_] = now_ms() - t0_;                           \
    }                                                    \
    qsort(t_, 20, sizeof(double), cmp_d);                \
    out_ms = t_[10];                                     \
  } while (0)

static void *rand_act(Backend *be, size_t n, uint64_t seed) {
  float *h = xmalloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = 0.05f * rng_normal(seed, 0, i, 0);
  void *d = be->alloc(be, n * be->size[BUF_ACT]);
  be->put(be, d, BUF_ACT, h, n);
  free(h);
  return d;
}

static void bench_shape(Backend *be, const char *name, int E, int M, int D, int F2) {
  int32_t *off = xmalloc((size_t)(E + 1) * sizeof(int32_t));
  off[0] = 0;
  for (int e = 0; e < E; e++) {
    int base = M / E, jitter = (int)(rng_u64(3, 0, (uint64_t)e, 0) % (uint64_t)(base / 2 + 1)) - base / 4;
    off[e + 1] = off[e] + (e == E - 1 ? 0 : base + jitter);
  }
  off[E] = M;
  void *offd = be->alloc(be, (size_t)(E + 1) * 4);
  be->upload(be, offd, off, (size_t)(E + 1) * 4);
  void *x = rand_act(be, (size_t)M * D, 1), *w = rand_act(be, (size_t)E * D * F2, 2);
  void *y = rand_act(be, (size_t)M * F2, 3), *dw = be->alloc(be, (size_t)E * D * F2 * 2);
  double flops = 2.0 * M * D * F2, ms;
  struct { const char *mode; int m; } modes[] = {{"fwd", GG_FWD}, {"dx", GG_DX}, {"dw", GG_DW}};
  for (int i = 0; i < 3; i++) {
    if (modes[i].m == GG_FWD)
      TIME_MEDIAN(be, ms, be->grouped_gemm(be, GG_FWD, y, x, w, offd, off, E, M, F2, D));
    else if (modes[i].m == GG_DX)
      TIME_MEDIAN(be, ms, be->grouped_gemm(be, GG_DX, x, y, w, offd, off, E, M, F2, D));
    else
      TIME_MEDIAN(be, ms, be->grouped_gemm(be, GG_DW, dw, x, y, offd, off, E, M, F2, D));
    printf("{\"bench\":\"grouped_gemm\",\"shape\":\"%s\",\"mode\":\"%s\",\"E\":%d,\"M\":%d,\"K\":%d,"
           "\"N\":%d,\"ms\":%.3f,\"tflops\":%.1f}\n", name, modes[i].mode, E, M, D, F2, ms,
           flops / ms / 1e9);
  }
  TIME_MEDIAN(be, ms, be->gemm(be, y, x, w, M, F2, D, 0, 0, 1, 0, 0));
  printf("{\"bench\":\"dense_gemm\",\"shape\":\"%s\",\"M\":%d,\"K\":%d,\"N\":%d,\"ms\":%.3f,"
         "\"tflops\":%.1f}\n", name, M, D, F2, ms, flops / ms / 1e9);
  fflush(stdout);
  be->free(be, x); be->free(be, w); be->free(be, y); be->free(be, dw); be->free(be, offd);
  free(off);
}

int main(void) {
  char err[256];
  Backend *be = backend_cuda(0, err, sizeof err);
  if (!be) nmoe_fatal("%s", err);
  bench_shape(be, "super_w13", 256, 32768 * 7, 768, 768);
  bench_shape(be, "super_w2", 256, 32768 * 7, 384, 768);
  bench_shape(be, "moe_w13", 64, 32768 * 6, 768, 768);
  bench_shape(be, "moonlet_w13", 64, 16384 * 6, 2048, 2816);
  bench_shape(be, "moonlet_w2", 64, 16384 * 6, 1408, 2048);
  be->destroy(be);
  return 0;
}
