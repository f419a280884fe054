/* gpu_check.h: the harness behind tests/gpu/test_ops.c: every op is run on the
 * CPU backend (the reference) and twice on the CUDA backend with the same
 * inputs, and the CUDA outputs are compared with the reference and with each
 * other (bit-identical: determinism).
 *
 * Inputs are random, drawn fresh from a seed printed at start, and rounded to
 * bf16 on the host before both backends receive them, so both compute on the
 * same values and the measured error is the op's own. Write-only outputs are
 * poisoned with NaN (INT32_MIN for I32) before every run so an unwritten
 * element fails; accumulated outputs are reset to the same random start.
 * Error: rel = ||out - ref|| / ||ref|| in double; NaN never passes.
 *
 * Header-only (one test program includes it); all helpers are static. */
#ifndef NMOE_GPU_CHECK_H
#define NMOE_GPU_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"

enum { SIDE_CPU = 0, SIDE_GPU = 1 };

/* One buffer present on both backends. */
typedef struct GBuf {
  BufKind kind;
  size_t n;          /* elements */
  int reset;         /* re-initialised before every run (outputs) */
  float *init;       /* start values (ACT/F32); NULL = NaN poison */
  int32_t *iinit;    /* start values (I32); NULL = INT32_MIN poison */
  void *p[2];        /* CPU, CUDA */
} GBuf;

#define GC_MAX_BUFS 64

typedef struct GCtx {
  Backend *be[2];
  GBuf *bufs[GC_MAX_BUFS];
  int nbufs;
  double scalar[2];  /* an op's host result (sumsq, xent), per side */
  uint64_t rng;
  int passed, failed;
} GCtx;

/* Pointer to buf b on the side an op callback is running for. */
#define P(b) ((b)->p[side])
/* Element offset into an ACT buffer on this side (packed layouts). */
#define PA(b, off) ((void *)((char *)(b)->p[side] + (size_t)(off) * g->be[side]->size[BUF_ACT]))

/* ---- random numbers ---- */

static uint64_t gc_next(GCtx *g) {
  uint64_t z = (g->rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static double gc_unif(GCtx *g) { return (gc_next(g) >> 11) * (1.0 / 9007199254740992.0); }
static int gc_int(GCtx *g, int n) { return (int)(gc_next(g) % (uint64_t)n); }
static float gc_normal(GCtx *g) {
  double u = gc_unif(g) + 1e-12, v = gc_unif(g);
  return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* Round to the nearest bf16 (ties to even), as the GPU stores ACT values. */
static float bf16_round(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  memcpy(&x, &u, 4);
  return x;
}

/* n normal values times scale, bf16-exact (caller frees). */
static float *gc_randn(GCtx *g, size_t n, float scale) {
  float *x = xmalloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) x[i] = bf16_round(scale * gc_normal(g));
  return x;
}

/* n uniform values in [lo, hi), bf16-exact. */
static float *gc_randu(GCtx *g, size_t n, float lo, float hi) {
  float *x = xmalloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) x[i] = bf16_round(lo + (hi - lo) * (float)gc_unif(g));
  return x;
}

/* ---- buffers ---- */

static void gb_load(GCtx *g, GBuf *b, int side) {
  Backend *be = g->be[side];
  if (b->kind == BUF_I32) {
    int32_t *v = b->iinit;
    if (!v) {
      v = xmalloc((b->n ? b->n : 1) * sizeof(int32_t));
      for (size_t i = 0; i < b->n; i++) v[i] = INT32_MIN;
    }
    be->upload(be, b->p[side], v, b->n * sizeof(int32_t));
    if (v != b->iinit) free(v);
  } else {
    float *v = b->init;
    if (!v) {
      v = xmalloc((b->n ? b->n : 1) * sizeof(float));
      for (size_t i = 0; i < b->n; i++) v[i] = NAN;
    }
    be->put(be, b->p[side], b->kind, v, b->n);
    if (v != b->init) free(v);
  }
}

static GBuf *gb_new(GCtx *g, BufKind k, size_t n, const float *init, const int32_t *iinit,
                    int reset) {
  NMOE_ASSERT(g->nbufs < GC_MAX_BUFS);
  GBuf *b = xcalloc(1, sizeof(GBuf));
  b->kind = k;
  b->n = n;
  b->reset = reset;
  if (init) {
    b->init = xmalloc(n * sizeof(float));
    memcpy(b->init, init, n * sizeof(float));
  }
  if (iinit) {
    b->iinit = xmalloc(n * sizeof(int32_t));
    memcpy(b->iinit, iinit, n * sizeof(int32_t));
  }
  for (int s = 0; s < 2; s++) {
    b->p[s] = g->be[s]->alloc(g->be[s], (n ? n : 1) * g->be[s]->size[k]);
    gb_load(g, b, s);
  }
  g->bufs[g->nbufs++] = b;
  return b;
}

/* Input with these values (copied). */
static GBuf *gb_in(GCtx *g, BufKind k, size_t n, const float *v) { return gb_new(g, k, n, v, NULL, 0); }
static GBuf *gb_in_i32(GCtx *g, size_t n, const int32_t *v) { return gb_new(g, BUF_I32, n, NULL, v, 0); }
/* Write-only output, poisoned before each run. */
static GBuf *gb_out(GCtx *g, BufKind k, size_t n) { return gb_new(g, k, n, NULL, NULL, 1); }
/* Output that the op reads first (accumulate, in place): reset to v each run. */
static GBuf *gb_acc(GCtx *g, BufKind k, size_t n, const float *v) { return gb_new(g, k, n, v, NULL, 1); }

/* Random bf16-exact input of n values (normal times scale). */
static GBuf *gb_randn(GCtx *g, BufKind k, size_t n, float scale) {
  float *v = gc_randn(g, n, scale);
  GBuf *b = gb_in(g, k, n, v);
  free(v);
  return b;
}
/* Accumulated output starting from random values. */
static GBuf *gb_acc_randn(GCtx *g, BufKind k, size_t n, float scale) {
  float *v = gc_randn(g, n, scale);
  GBuf *b = gb_acc(g, k, n, v);
  free(v);
  return b;
}

static float *gb_fetch(GCtx *g, GBuf *b, int side) {
  Backend *be = g->be[side];
  float *h = xmalloc((b->n ? b->n : 1) * sizeof(float));
  if (b->kind == BUF_I32) {
    int32_t *t = xmalloc((b->n ? b->n : 1) * sizeof(int32_t));
    be->download(be, t, b->p[side], b->n * sizeof(int32_t));
    for (size_t i = 0; i < b->n; i++) h[i] = (float)t[i];
    free(t);
  } else {
    be->get(be, h, b->kind, b->p[side], b->n);
  }
  return h;
}

static void *gb_raw(GCtx *g, GBuf *b) {
  Backend *be = g->be[SIDE_GPU];
  size_t bytes = b->n * be->size[b->kind];
  void *h = xmalloc(bytes ? bytes : 1);
  be->download(be, h, b->p[SIDE_GPU], bytes);
  return h;
}

/* Frees every buffer of the current case. */
static void gc_clear(GCtx *g) {
  for (int i = 0; i < g->nbufs; i++) {
    GBuf *b = g->bufs[i];
    for (int s = 0; s < 2; s++) g->be[s]->free(g->be[s], b->p[s]);
    free(b->init);
    free(b->iinit);
    free(b);
  }
  g->nbufs = 0;
}

/* ---- comparison ---- */

/* ||out - ref|| / ||ref|| (absolute when ref is zero); NaN if out has NaN/inf. */
static double rel_err(const float *out, const float *ref, size_t n) {
  double d = 0, r = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(out[i])) return NAN;
    double e = (double)out[i] - ref[i];
    d += e * e;
    r += (double)ref[i] * ref[i];
  }
  return r > 0 ? sqrt(d / r) : sqrt(d);
}

static void gc_report(GCtx *g, const char *name, const char *what, double rel, double bound) {
  int ok = rel <= bound; /* false for NaN */
  printf("%s %s%s%s rel=%.3e bound=%.1e\n", ok ? "PASS" : "FAIL", name, what ? "/" : "",
         what ? what : "", rel, bound);
  fflush(stdout);
  if (ok) g->passed++;
  else g->failed++;
}

/* Custom comparison (e.g. top-k indices with ties): returns an error measure. */
typedef double (*GCmpFn)(const float *gpu, const float *cpu, size_t n, void *arg);

typedef struct GOut {
  GBuf *b;
  const char *what;
  double bound;      /* justification next to each use */
  GCmpFn cmp;        /* NULL: rel_err */
  void *cmp_arg;
} GOut;

typedef void (*GOpFn)(GCtx *g, Backend *be, int side, void *arg);

/* Runs op on the CPU, then twice on the GPU; checks every output against the
 * CPU, the scalar result when scalar_bound >= 0, and bit-identity of the two
 * GPU runs. */
static void gc_run(GCtx *g, const char *name, GOpFn op, void *arg, GOut *outs, int nouts,
                   double scalar_bound) {
  float *ref[16], *out[16];
  void *raw[2][16];
  double gpu_scalar[2] = {0, 0};
  NMOE_ASSERT(nouts <= 16);
  for (int run = 0; run < 3; run++) {
    int side = run == 0 ? SIDE_CPU : SIDE_GPU;
    Backend *be = g->be[side];
    for (int i = 0; i < g->nbufs; i++)
      if (g->bufs[i]->reset) gb_load(g, g->bufs[i], side);
    g->scalar[side] = 0;
    op(g, be, side, arg);
    be->sync(be);
    for (int i = 0; i < nouts; i++) {
      if (run == 0) ref[i] = gb_fetch(g, outs[i].b, SIDE_CPU);
      if (run == 1) out[i] = gb_fetch(g, outs[i].b, SIDE_GPU);
      if (run > 0) raw[run - 1][i] = gb_raw(g, outs[i].b);
    }
    if (run > 0) gpu_scalar[run - 1] = g->scalar[SIDE_GPU];
  }
  for (int i = 0; i < nouts; i++) {
    size_t n = outs[i].b->n;
    double e = outs[i].cmp ? outs[i].cmp(out[i], ref[i], n, outs[i].cmp_arg)
                           : rel_err(out[i], ref[i], n);
    gc_report(g, name, outs[i].what, e, outs[i].bound);
  }
  if (scalar_bound >= 0) {
    double r = g->scalar[SIDE_CPU], o = gpu_scalar[0];
    double e = isfinite(o) ? fabs(o - r) / (fabs(r) > 0 ? fabs(r) : 1) : NAN;
    gc_report(g, name, "scalar", e, scalar_bound);
  }
  int same = memcmp(&gpu_scalar[0], &gpu_scalar[1], sizeof(double)) == 0;
  for (int i = 0; i < nouts; i++) {
    size_t bytes = outs[i].b->n * g->be[SIDE_GPU]->size[outs[i].b->kind];
    same &= memcmp(raw[0][i], raw[1][i], bytes) == 0;
    free(raw[0][i]);
    free(raw[1][i]);
    free(ref[i]);
    free(out[i]);
  }
  /* rel 0 = bit-identical, 1 = differs */
  gc_report(g, name, "determinism", same ? 0.0 : 1.0, 0.0);
}

#endif
