/* bench_gemm.c: how close the expert GEMMs run to one dense GEMM of the same
 * FLOPs, for the speedrun super/moe and moonlet expert shapes (GPU machine).
 *
 * For each shape: grouped GEMM (all experts in one call, rows spread evenly
 * with a +-25% jitter so groups differ) in the three modes, on the default
 * path ("impl":"default": the tensor-core kernels, or cuBLAS where gemm.cu
 * picks it) and on the cuBLAS grouped path ("impl":"cublas",
 * NMOE_GROUPED_GEMM=cublas), then one dense GEMM
 * [M, K] x [K, N] ("dense_gemm") and the dense weight-gradient product
 * X^T dY ("dense_dw") as ceilings. Prints one JSON line per measurement with ms
 * and TFLOP/s (median of 20 after 3 warm-ups), and one "grouped_check" line per
 * mode: ||default - cublas|| / ||cublas|| over the whole output (both bf16). */
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

/* Uniform in [-0.1, 0.1): cheap enough for the ~1e9 elements the shapes need. */
static void *rand_act(Backend *be, size_t n, uint64_t seed) {
  float *h = xmalloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = (float)(rng_u64(seed, 0, i, 0) >> 40) * (0.2f / 16777216.0f) - 0.1f;
  void *d = be->alloc(be, n * be->size[BUF_ACT]);
  be->put(be, d, BUF_ACT, h, n);
  free(h);
  return d;
}

static void set_impl(const char *impl) {
  if (strcmp(impl, "cublas") == 0) setenv("NMOE_GROUPED_GEMM", "cublas", 1);
  else unsetenv("NMOE_GROUPED_GEMM");
}

/* One grouped call of mode into out (DW: out zeroed first, so it holds the
 * product alone). */
static void grouped_into(Backend *be, int mode, void *out, void *x, void *w, void *y, void *offd,
                         const int32_t *off, int E, int M, int D, int F2) {
  if (mode == GG_FWD) be->grouped_gemm(be, GG_FWD, out, x, w, offd, off, E, M, F2, D);
  else if (mode == GG_DX) be->grouped_gemm(be, GG_DX, out, y, w, offd, off, E, M, F2, D);
  else {
    be->zero(be, out, (size_t)E * D * F2 * 2);
    be->grouped_gemm(be, GG_DW, out, x, y, offd, off, E, M, F2, D);
  }
}

/* ||default - cublas|| / ||cublas|| of one mode's whole output. */
static double grouped_check(Backend *be, int mode, void *out, void *x, void *w, void *y, void *offd,
                            const int32_t *off, int E, int M, int D, int F2) {
  size_t n = mode == GG_FWD ? (size_t)M * F2 : mode == GG_DX ? (size_t)M * D : (size_t)E * D * F2;
  uint16_t *h[2];
  const char *impls[2] = {"default", "cublas"};
  for (int i = 0; i < 2; i++) {
    set_impl(impls[i]);
    grouped_into(be, mode, out, x, w, y, offd, off, E, M, D, F2);
    h[i] = xmalloc(n * 2);
    be->download(be, h[i], out, n * 2);
  }
  set_impl("default");
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t a = (uint32_t)h[0][i] << 16, b = (uint32_t)h[1][i] << 16;
    float fa, fb;
    memcpy(&fa, &a, 4);
    memcpy(&fb, &b, 4);
    num += ((double)fa - fb) * ((double)fa - fb);
    den += (double)fb * fb;
  }
  free(h[0]);
  free(h[1]);
  return den > 0 ? sqrt(num / den) : sqrt(num);
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
  void *y = rand_act(be, (size_t)M * F2, 3);
  size_t on = (size_t)M * (D > F2 ? D : F2);
  if ((size_t)E * D * F2 > on) on = (size_t)E * D * F2;
  void *out = be->alloc(be, on * 2);
  double flops = 2.0 * M * D * F2, ms;
  const char *modes[3] = {"fwd", "dx", "dw"}, *impls[2] = {"default", "cublas"};
  for (int m = 0; m < 3; m++) {
    double rel = grouped_check(be, m, out, x, w, y, offd, off, E, M, D, F2);
    printf("{\"bench\":\"grouped_check\",\"shape\":\"%s\",\"mode\":\"%s\",\"rel_default_vs_cublas\":%.3g}\n",
           name, modes[m], rel);
    for (int i = 0; i < 2; i++) {
      set_impl(impls[i]);
      TIME_MEDIAN(be, ms, grouped_into(be, m, out, x, w, y, offd, off, E, M, D, F2));
      printf("{\"bench\":\"grouped_gemm\",\"impl\":\"%s\",\"shape\":\"%s\",\"mode\":\"%s\",\"E\":%d,"
             "\"M\":%d,\"K\":%d,\"N\":%d,\"ms\":%.3f,\"tflops\":%.1f}\n",
             impls[i], name, modes[m], E, M, D, F2, ms, flops / ms / 1e9);
    }
    set_impl("default");
  }
  TIME_MEDIAN(be, ms, be->gemm(be, out, x, w, M, F2, D, 0, 0, 1, 0, 0));
  printf("{\"bench\":\"dense_gemm\",\"shape\":\"%s\",\"M\":%d,\"K\":%d,\"N\":%d,\"ms\":%.3f,"
         "\"tflops\":%.1f}\n", name, M, D, F2, ms, flops / ms / 1e9);
  TIME_MEDIAN(be, ms, be->gemm(be, out, x, y, D, F2, M, 1, 0, 1, 0, 0));
  printf("{\"bench\":\"dense_dw\",\"shape\":\"%s\",\"M\":%d,\"K\":%d,\"N\":%d,\"ms\":%.3f,"
         "\"tflops\":%.1f}\n", name, M, D, F2, ms, flops / ms / 1e9);
  fflush(stdout);
  be->free(be, x); be->free(be, w); be->free(be, y); be->free(be, out); be->free(be, offd);
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
