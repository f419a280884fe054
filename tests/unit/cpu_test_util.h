/* cpu_test_util.h: helpers shared by the CPU backend tests (float and double
 * builds): seeded random buffers, a naive double-precision attention reference,
 * a packed-qkv attention problem, the thread-count determinism check, and
 * finite-difference gradient checks (double builds).
 * Header-only: each test binary is one translation unit. */
#ifndef NMOE_CPU_TEST_UTIL_H
#define NMOE_CPU_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <cmocka.h>
#include <omp.h>

#include "backend/cpu/cpu.h"

static Backend *be;

/* Group fixture: one CPU backend for the whole test binary. */
static int setup(void **state) {
  (void)state;
  be = backend_cpu();
  return 0;
}

static int teardown(void **state) {
  (void)state;
  be->destroy(be);
  return 0;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static void seed(uint64_t s) { rng = s * 0x9E3779B97F4A7C15ull + 1; }

/* Uniform in [-1, 1) (splitmix64). */
static double urand(void) {
  uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 11) / (double)(1ull << 52) - 1.0;
}

static real_t *zbuf(size_t n) { return be->alloc(be, n * sizeof(real_t)); }
static real_t *rbuf(size_t n, double amp) {
  real_t *p = zbuf(n);
  for (size_t i = 0; i < n; i++) p[i] = amp * urand();
  return p;
}
static int32_t *ibuf(size_t n) { return be->alloc(be, n * sizeof(int32_t)); }
static void bfree(void *p) { be->free(be, p); }

static double dotr(const real_t *a, const real_t *b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}


/* Stores the r x c matrix m transposed into t (c x r). */
static void transpose(real_t *t, const real_t *m, int r, int c) {
  for (int i = 0; i < r; i++)
    for (int j = 0; j < c; j++) t[(size_t)j * r + i] = m[(size_t)i * c + j];
}

/* gemm in all four transpose forms on a 37 x 300 x 19 problem (more than one
 * tile in every direction) against a double triple loop; each element within
 * rel_tol of the sum of |terms| (plus abs_tol). */
static void check_gemm_transposes(uint64_t s, double rel_tol, double abs_tol) {
  seed(s);
  int M = 37, N = 300, K = 19;
  real_t *A = rbuf((size_t)M * K, 1), *B = rbuf((size_t)K * N, 1);
  real_t *At = zbuf((size_t)M * K), *Bt = zbuf((size_t)K * N), *C = zbuf((size_t)M * N);
  transpose(At, A, M, K);
  transpose(Bt, B, K, N);
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      be->gemm(be, C, ta ? At : A, tb ? Bt : B, M, N, K, ta, tb, 1.0f, 0.0f, 0);
      for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
          double sum = 0, mag = 0;
          for (int k = 0; k < K; k++) {
            sum += (double)A[i * K + k] * B[k * N + j];
            mag += fabs((double)A[i * K + k] * B[k * N + j]);
          }
          if (fabs(C[i * N + j] - sum) > rel_tol * mag + abs_tol)
            fail_msg("gemm ta=%d tb=%d [%d,%d]: %.17g vs %.17g", ta, tb, i, j, (double)C[i * N + j], sum);
        }
    }
  bfree(A), bfree(B), bfree(At), bfree(Bt), bfree(C);
}

/* Naive reference: full score matrix with the mask, softmax (with the sink
 * logit sinks[h] in the denominator when sinks != NULL), weighted sum. */
static void attn_naive(double *o, double *lse, const real_t *q, const real_t *k, const real_t *v,
                       const real_t *sinks, const AttnShape *s) {
  int grp = s->Hq / s->Hkv;
  double *p = malloc((size_t)s->T * sizeof(double));
  for (int b = 0; b < s->B; b++)
    for (int h = 0; h < s->Hq; h++)
      for (int i = 0; i < s->T; i++) {
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < s->T; j++) {
          int vis = j <= i && (s->window == 0 || i - s->window < j);
          p[j] = -INFINITY;
          if (!vis) continue;
          double d = 0;
          for (int c = 0; c < s->dqk; c++)
            d += (double)q[(size_t)(b * s->T + i) * s->ldq + h * s->dqk + c] *
                 k[(size_t)(b * s->T + j) * s->ldk + (h / grp) * s->dqk + c];
          p[j] = s->scale * d;
          mx = fmax(mx, p[j]);
        }
        if (sinks) mx = fmax(mx, sinks[h]);
        for (int j = 0; j < s->T; j++) sum += p[j] == -INFINITY ? 0 : exp(p[j] - mx);
        if (sinks) sum += exp(sinks[h] - mx);
        lse[(b * s->Hq + h) * s->T + i] = mx + log(sum);
        for (int c = 0; c < s->dv; c++) {
          double acc = 0;
          for (int j = 0; j <= i; j++)
            if (p[j] != -INFINITY)
              acc += exp(p[j] - mx) / sum * v[(size_t)(b * s->T + j) * s->ldv + (h / grp) * s->dv + c];
          o[(size_t)(b * s->T + i) * s->Hq * s->dv + h * s->dv + c] = acc;
        }
      }
  free(p);
}

/* q, k, v packed in one buffer [N, width]: q at column 0, k after q, v after k,
 * then 2 padding columns. sinks [Hq] (NULL = none) is set by the caller. */
typedef struct {
  AttnShape s;
  int width;
  real_t *qkv, *o, *lse, *R, *sinks;
} AttnCtx;

static const real_t *aq(AttnCtx *c) { return c->qkv; }
static const real_t *ak(AttnCtx *c) { return c->qkv + c->s.Hq * c->s.dqk; }
static const real_t *av(AttnCtx *c) { return c->qkv + (c->s.Hq + c->s.Hkv) * c->s.dqk; }

static double attn_obj(void *p) {
  AttnCtx *c = p;
  be->attn_fwd(be, c->o, c->lse, aq(c), ak(c), av(c), c->sinks, &c->s);
  return dotr(c->o, c->R, (size_t)c->s.B * c->s.T * c->s.Hq * c->s.dv);
}

static AttnCtx attn_make(int B, int T, int Hq, int Hkv, int dqk, int dv, int window) {
  AttnCtx c = {.s = {.B = B, .T = T, .Hq = Hq, .Hkv = Hkv, .dqk = dqk, .dv = dv, .window = window}};
  c.width = (Hq + Hkv) * dqk + Hkv * dv + 2;
  c.s.ldq = c.s.ldk = c.s.ldv = c.width;
  c.s.scale = 1 / sqrt((double)dqk);
  size_t N = (size_t)B * T;
  c.qkv = rbuf(N * c.width, 1.5), c.o = zbuf(N * Hq * dv), c.lse = zbuf(N * Hq);
  c.R = rbuf(N * Hq * dv, 1);
  return c;
}

static void attn_free(AttnCtx *c) {
  bfree(c->qkv), bfree(c->o), bfree(c->lse), bfree(c->R);
  if (c->sinks) bfree(c->sinks);
}

/* Output slices of the determinism run, handed out in order. */
static real_t *det_out;
static size_t det_len;
static real_t *take(size_t n) {
  det_out = realloc(det_out, (det_len + n) * sizeof(real_t));
  assert_non_null(det_out);
  memset(det_out + det_len, 0, n * sizeof(real_t));
  det_len += n;
  return det_out + det_len - n;
}

/* Runs a batch of ops with `threads` OpenMP threads; their outputs are copied
 * into slices of det_out (returned, caller frees). */
static real_t *run_ops(int threads, size_t *len) {
  omp_set_num_threads(threads);
  seed(16);
  det_out = NULL, det_len = 0;
  int M = 70, N = 150, K = 90, V = 300, D = 32, T = 24, B = 2, E = 6, BT = B * T;
  real_t *A = rbuf((size_t)M * K, 1), *Bm = rbuf((size_t)K * N, 1), *C = zbuf((size_t)M * N);
  AttnCtx c = attn_make(B, T, 4, 2, 12, 8, 5);
  c.sinks = rbuf(4, 1);
  real_t *g = zbuf((size_t)BT * c.width), *dsk = zbuf(4);
  real_t *h = rbuf((size_t)BT * D, 1), *W = rbuf((size_t)V * D, 1);
  real_t *dh = zbuf((size_t)BT * D), *dW = zbuf((size_t)V * D), *dT = zbuf((size_t)V * D);
  int32_t *tg = ibuf(BT), *idx = ibuf((size_t)BT * 2), *cnt = ibuf(E);
  for (int i = 0; i < BT; i++) tg[i] = (i * 37) % V;
  real_t *wg = rbuf((size_t)E * D, 1), *bias = zbuf(E), *sc = zbuf((size_t)BT * E);
  real_t *rw = zbuf((size_t)BT * 2), *nw = rbuf(D, 1), *rs = zbuf(BT), *y = zbuf((size_t)BT * D);
  real_t *ndx = zbuf((size_t)BT * D), *ndw = zbuf(D), *rdx = zbuf((size_t)BT * D);
  real_t *rdwg = zbuf((size_t)E * D);

  be->gemm(be, C, A, Bm, M, N, K, 1, 0, 1, 0, 0); /* A read as [K, M] */
  attn_obj(&c);
  be->attn_bwd(be, g, g + c.s.Hq * c.s.dqk, g + (c.s.Hq + c.s.Hkv) * c.s.dqk, dsk, c.R, aq(&c),
               ak(&c), av(&c), c.o, c.lse, c.sinks, &c.s);
  double loss = be->xent(be, dh, dW, h, W, tg, BT, D, V, 0.5f, -1, 1);
  be->embed_bwd(be, dT, tg, h, BT, D, V, 2.0f);
  be->rmsnorm_fwd(be, y, rs, h, nw, BT, D, D, D, 1e-5f);
  be->rmsnorm_bwd(be, ndx, ndw, h, h, nw, rs, BT, D, D, D, 0);
  be->router_fwd(be, sc, idx, rw, cnt, NULL, h, wg, bias, BT, D, E, 2, 1.0f);
  be->router_bwd(be, rdx, rdwg, rw, sc, idx, h, wg, BT, D, E, 2, 1.0f, 0.01f, nw);

  struct { real_t *p; size_t n; } outs[] = {
      {C, (size_t)M * N}, {c.o, (size_t)BT * c.s.Hq * c.s.dv}, {c.lse, (size_t)BT * c.s.Hq},
      {g, (size_t)BT * c.width}, {dsk, 4}, {dh, (size_t)BT * D}, {dW, (size_t)V * D}, {dT, (size_t)V * D},
      {y, (size_t)BT * D}, {ndx, (size_t)BT * D}, {ndw, D}, {sc, (size_t)BT * E},
      {rw, (size_t)BT * 2}, {rdx, (size_t)BT * D}, {rdwg, (size_t)E * D}};
  for (size_t i = 0; i < sizeof outs / sizeof outs[0]; i++)
    memcpy(take(outs[i].n), outs[i].p, outs[i].n * sizeof(real_t));
  real_t *tail = take(2);
  tail[0] = loss, tail[1] = be->sumsq(be, W, (size_t)V * D);
  *len = det_len;
  bfree(A), bfree(Bm), bfree(C), attn_free(&c), bfree(g), bfree(dsk), bfree(h), bfree(W), bfree(dh);
  bfree(dW), bfree(dT), bfree(tg), bfree(idx), bfree(cnt), bfree(wg), bfree(bias), bfree(sc);
  bfree(rw), bfree(nw), bfree(rs), bfree(y), bfree(ndx), bfree(ndw), bfree(rdx), bfree(rdwg);
  return det_out;
}

/* The same ops with 1, 2 and 3 threads give bit-identical results. */
static void test_determinism(void **state) {
  int saved = omp_get_max_threads();
  size_t n1, n2, n3;
  real_t *r1 = run_ops(1, &n1), *r2 = run_ops(2, &n2), *r3 = run_ops(3, &n3);
  omp_set_num_threads(saved);
  assert_int_equal(n1, n2);
  assert_memory_equal(r1, r2, n1 * sizeof(real_t));
  assert_memory_equal(r1, r3, n1 * sizeof(real_t));
  free(r1), free(r2), free(r3);
}

#ifdef NMOE_REAL_DOUBLE /* finite differences need double */
typedef double (*Objective)(void *ctx);

/* Central differences of L over x[0..n) (elements with skip[i] set are not
 * checked) against the analytic gradient g; fails the test on a mismatch after
 * printing every bad element. FD_DEBUG=1 in the environment prints the worst
 * error of each check. */
static void fd_check(const char *what, Objective L, void *ctx, real_t *x, size_t n,
                     const real_t *g, const unsigned char *skip) {
  const double eps = 1e-6;
  double worst = 0, worst_abs = 0;
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    if (skip && skip[i]) continue;
    real_t x0 = x[i];
    x[i] = x0 + eps;
    double lp = L(ctx);
    x[i] = x0 - eps;
    double lm = L(ctx);
    x[i] = x0;
    double num = (lp - lm) / (2 * eps), ana = g[i];
    double err = fabs(num - ana) / fmax(fmax(fabs(num), fabs(ana)), 1e-2);
    worst = fmax(worst, err);
    worst_abs = fmax(worst_abs, fabs(num - ana));
    if (err >= 1e-6) {
      print_error("%s[%zu]: analytic %.12g numeric %.12g (rel err %.3g)\n", what, i, ana, num, err);
      bad = 1;
    }
  }
  if (getenv("FD_DEBUG")) print_message("%-14s n=%4zu worst rel err %.3g, abs %.3g\n", what, n, worst,
                                         worst_abs);
  if (bad) fail();
}

#endif /* NMOE_REAL_DOUBLE */

#endif
