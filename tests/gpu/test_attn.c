/* test_attn.c: GPU check of the CUDA attention forward and backward.
 *
 * `test_attn` compares the CUDA backend's attn_fwd/attn_bwd with a float64
 * host reference (plain loops over the same bf16-rounded inputs; the CPU
 * backend, the project's ground truth, must agree with it to float rounding)
 * on MHA, GQA, packed-stride MLA, sliding-window and ragged-T shapes; every output is
 * poisoned with NaN first, columns outside the q/k/v regions of packed
 * gradient buffers must come back unchanged, and a second run must give
 * bit-identical bytes. Exit status 0 only when every check passes.
 *
 * The shapes cover each path of attention.cu: the tuned exact instances
 * (64/64, 128/128, 192/128), padded tensor-core tiles for other multiples of
 * 8 (24/16 as in configs/tiny.toml, 32/32, 16/16, 200/136, 256/256), and the
 * scalar fallback (12/8, 272/40, and multiple-of-8 widths whose packed row
 * strides are not 16-byte aligned). Cases marked "sinks" add learned
 * per-head sink logits (F32 [Hq]): o, lse and dq/dk/dv with the sink in each
 * softmax denominator, and dsinks (accumulated onto 0.5, so an op that
 * overwrites instead fails) against the reference on every path.
 *
 * Tolerances: outputs are bf16 (relative rounding 2^-9 ~ 2e-3 per element)
 * and P, dS enter the second products as bf16, so the relative Frobenius
 * error lands at a few 1e-3; 1e-2 is the bound for bf16 operands with fp32
 * accumulation. lse is computed and stored in fp32 from the same inputs:
 * absolute error within 1e-3. dsinks is an fp32 sum over B*T terms of
 * exp(s - lse) * D, D a bf16-input dot product: relative 1e-2 as the rest.
 *
 * `test_attn --bench` times the MLA shape B=2 H=16 T=4096 (192/128), MHA
 * B=16 H=12 T=2048 d=64 and the small MLA heads 24/16 (B=8 H=16 T=2048,
 * padded tiles) with CUDA events (median of 20 after warm-up) and prints one
 * JSON line per shape. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double rng_uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return ((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
static float rng_normal(void) {
  double u = rng_uniform() + 1e-12, v = rng_uniform();
  return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* Device ACT buffer of n elements filled with normal values; host copy holds
 * the bf16-rounded values the device sees. */
static void *dev_random(Backend *be, float *host, size_t n) {
  for (size_t i = 0; i < n; i++) host[i] = rng_normal();
  void *d = be->alloc(be, n * be->size[BUF_ACT]);
  be->put(be, d, BUF_ACT, host, n);
  be->get(be, host, BUF_ACT, d, n);
  return d;
}

/* Fill a device buffer with NaN inside each row's region [c0, c0+w) of
 * heads and a sentinel elsewhere (rows of stride ld). */
#define SENTINEL 7.0f
static void poison(Backend *be, void *d, BufKind kind, size_t rows, int ld, int c0, int w) {
  float *h = xmalloc(rows * ld * sizeof(float));
  for (size_t r = 0; r < rows; r++)
    for (int c = 0; c < ld; c++) h[r * ld + c] = (c >= c0 && c < c0 + w) ? NAN : SENTINEL;
  be->put(be, d, kind, h, rows * ld);
  free(h);
}

typedef struct {
  double num, den, maxerr;
  long bad; /* NaN / unwritten */
} Err;

static void err_add(Err *e, double got, double ref) {
  if (!isfinite(got)) { e->bad++; return; }
  double d = got - ref;
  e->num += d * d;
  e->den += ref * ref;
  if (fabs(d) > e->maxerr) e->maxerr = fabs(d);
}

static int failures = 0;
static int report(const char *name, const char *what, Err e, double tol, int relative) {
  double v = relative ? sqrt(e.num / (e.den > 0 ? e.den : 1)) : e.maxerr;
  int ok = e.bad == 0 && v <= tol;
  printf("  %-26s %-4s %s %.3e (tol %.0e)%s%s\n", name, what, relative ? "rel" : "max", v, tol,
         e.bad ? " NON-FINITE" : "", ok ? "" : "  FAIL");
  if (!ok) failures++;
  return ok;
}

/* Host float64 reference. q [N, ldq], k [N, ldk], v [N, ldv], dout [N, Hq*dv],
 * sinks [Hq] or NULL. Writes o [N, Hq*dv], lse [B*Hq*T], dq/dk/dv in the
 * packed layouts (only head regions) and dsinks [Hq] (with sinks); all
 * zero-initialised by the caller. */
static void attn_ref(const AttnShape *s, const float *q, const float *k, const float *v,
                     const float *dout, const float *sinks, double *o, double *lse, double *dq,
                     double *dk, double *dv, double *dsinks) {
  const int T = s->T, G = s->Hq / s->Hkv, ldo = s->Hq * s->dv;
  double *p = xmalloc(T * sizeof(double)), *dp = xmalloc(T * sizeof(double));
  for (int b = 0; b < s->B; b++)
    for (int h = 0; h < s->Hq; h++) {
      const int hk = h / G;
      for (int i = 0; i < T; i++) {
        const float *qi = q + (size_t)(b * T + i) * s->ldq + h * s->dqk;
        const float *doi = dout + (size_t)(b * T + i) * ldo + h * s->dv;
        double *oi = o + (size_t)(b * T + i) * ldo + h * s->dv;
        int j0 = s->window > 0 && i - s->window + 1 > 0 ? i - s->window + 1 : 0;
        double mx = -INFINITY, sum = 0, dsum = 0;
        for (int j = j0; j <= i; j++) {
          const float *kj = k + (size_t)(b * T + j) * s->ldk + hk * s->dqk;
          double acc = 0;
          for (int c = 0; c < s->dqk; c++) acc += (double)qi[c] * kj[c];
          p[j] = acc * s->scale;
          if (p[j] > mx) mx = p[j];
        }
        if (sinks && sinks[h] > mx) mx = sinks[h];
        for (int j = j0; j <= i; j++) sum += (p[j] = exp(p[j] - mx));
        if (sinks) sum += exp(sinks[h] - mx);
        const double l = mx + log(sum);
        lse[((size_t)b * s->Hq + h) * T + i] = l;
        for (int c = 0; c < s->dv; c++) oi[c] = 0;
        for (int j = j0; j <= i; j++) {
          const float *vj = v + (size_t)(b * T + j) * s->ldv + hk * s->dv;
          p[j] /= sum;
          double acc = 0;
          for (int c = 0; c < s->dv; c++) {
            oi[c] += p[j] * vj[c];
            acc += (double)doi[c] * vj[c];
          }
          dp[j] = acc;
        }
        for (int c = 0; c < s->dv; c++) dsum += doi[c] * oi[c];
        if (sinks) dsinks[h] -= exp(sinks[h] - l) * dsum;
        double *dqi = dq + (size_t)(b * T + i) * s->ldq + h * s->dqk;
        for (int j = j0; j <= i; j++) {
          const float *kj = k + (size_t)(b * T + j) * s->ldk + hk * s->dqk;
          double *dkj = dk + (size_t)(b * T + j) * s->ldk + hk * s->dqk;
          double *dvj = dv + (size_t)(b * T + j) * s->ldv + hk * s->dv;
          double ds = p[j] * (dp[j] - dsum) * s->scale;
          for (int c = 0; c < s->dqk; c++) {
            dqi[c] += ds * kj[c];
            dkj[c] += ds * qi[c];
          }
          for (int c = 0; c < s->dv; c++) dvj[c] += p[j] * doi[c];
        }
      }
    }
  free(p);
  free(dp);
}

/* Compare a packed [N, ld] gradient: head regions [0, H*w) from col0 against
 * ref; everything else must still hold the sentinel. */
static void check_packed(const char *name, const char *what, const float *got, const double *ref,
                         size_t N, int ld, int c0, int w, double tol) {
  Err e = {0};
  long moved = 0;
  for (size_t r = 0; r < N; r++)
    for (int c = 0; c < ld; c++) {
      float x = got[r * ld + c];
      if (c >= c0 && c < c0 + w) err_add(&e, x, ref[r * ld + c]);
      else if (x != SENTINEL) moved++;
    }
  report(name, what, e, tol, 1);
  if (moved) {
    printf("  %-26s %-4s %ld values outside the head region changed  FAIL\n", name, what, moved);
    failures++;
  }
}

/* The CPU backend (the project's ground truth) on the same inputs must agree
 * with the float64 reference to float rounding: this pins the contract
 * (layouts, lse, masking) that the CUDA results are then held to. */
static void cpu_crosscheck(const char *name, const AttnShape *s, const float *q, const float *kv,
                           const float *v, const float *dout, const float *sinks,
                           const double *ro, const double *rl, const double *rdq,
                           const double *rdk, const double *rdv, const double *rds, int packed) {
  Backend *cpu = backend_cpu();
  const size_t N = (size_t)s->B * s->T, nq = N * s->ldq, nk = N * s->ldk, nv = N * s->ldv;
  const size_t no = N * s->Hq * s->dv, nl = (size_t)s->B * s->Hq * s->T;
  const size_t sz = cpu->size[BUF_ACT];
  void *bq = cpu->alloc(cpu, nq * sz), *bk = cpu->alloc(cpu, nk * sz), *bdo = cpu->alloc(cpu, no * sz);
  void *bv = packed ? NULL : cpu->alloc(cpu, nv * sz);
  void *bo = cpu->alloc(cpu, no * sz), *bl = cpu->alloc(cpu, nl * cpu->size[BUF_F32]);
  void *gq = cpu->alloc(cpu, nq * sz), *gk = cpu->alloc(cpu, nk * sz);
  void *gv = packed ? NULL : cpu->alloc(cpu, nv * sz);
  void *bs = NULL, *gs = NULL; /* sinks, dsinks F32 [Hq] */
  if (sinks) {
    bs = cpu->alloc(cpu, s->Hq * cpu->size[BUF_F32]);
    gs = cpu->alloc(cpu, s->Hq * cpu->size[BUF_F32]); /* zero-filled */
    cpu->put(cpu, bs, BUF_F32, sinks, s->Hq);
  }
  const size_t voff = packed ? (size_t)s->Hkv * s->dqk : 0;
  cpu->put(cpu, bq, BUF_ACT, q, nq);
  cpu->put(cpu, bk, BUF_ACT, kv, nk);
  if (!packed) cpu->put(cpu, bv, BUF_ACT, v, nv);
  cpu->put(cpu, bdo, BUF_ACT, dout, no);
  const void *vp = packed ? (const void *)((char *)bk + voff * sz) : bv;
  void *gvp = packed ? (void *)((char *)gk + voff * sz) : gv;
  cpu->attn_fwd(cpu, bo, bl, bq, bk, vp, bs, s);
  cpu->attn_bwd(cpu, gq, gk, gvp, gs, bdo, bq, bk, vp, bo, bl, bs, s);
  float *f = xmalloc((nq > no ? (nq > nk ? nq : nk) : (no > nk ? no : nk)) * sizeof(float));
  Err e[6] = {{0}};
  cpu->get(cpu, f, BUF_ACT, bo, no);
  for (size_t i = 0; i < no; i++) err_add(&e[0], f[i], ro[i]);
  cpu->get(cpu, f, BUF_F32, bl, nl);
  for (size_t i = 0; i < nl; i++) err_add(&e[1], f[i], rl[i]);
  cpu->get(cpu, f, BUF_ACT, gq, nq);
  for (size_t r = 0; r < N; r++)
    for (int c = 0; c < s->Hq * s->dqk; c++) err_add(&e[2], f[r * s->ldq + c], rdq[r * s->ldq + c]);
  cpu->get(cpu, f, BUF_ACT, gk, nk);
  for (size_t r = 0; r < N; r++)
    for (int c = 0; c < s->Hkv * s->dqk; c++) err_add(&e[3], f[r * s->ldk + c], rdk[r * s->ldk + c]);
  if (!packed) cpu->get(cpu, f, BUF_ACT, gv, nv);
  const float *fv = packed ? f + voff : f;
  for (size_t r = 0; r < N; r++)
    for (int c = 0; c < s->Hkv * s->dv; c++) err_add(&e[4], fv[r * s->ldv + c], rdv[r * s->ldv + c]);
  if (sinks) {
    cpu->get(cpu, f, BUF_F32, gs, s->Hq);
    for (int h = 0; h < s->Hq; h++) err_add(&e[5], f[h], rds[h]);
  }
  char label[64];
  snprintf(label, sizeof label, "%s (cpu)", name);
  static const char *what[6] = {"o", "lse", "dq", "dk", "dv", "dsnk"};
  for (int i = 0; i < (sinks ? 6 : 5); i++) report(label, what[i], e[i], 1e-4, i != 1);
  free(f);
  void *bufs[] = {bq, bk, bv, bdo, bo, bl, gq, gk, gv, bs, gs};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
    if (bufs[i]) cpu->free(cpu, bufs[i]);
  cpu->destroy(cpu);
}

typedef struct {
  const char *name;
  int B, T, Hq, Hkv, dqk, dv, window;
  int packed; /* q with extra columns; k and v inside one kv buffer */
  int skew;   /* packed: one more column per row, so rows are not 16-byte aligned */
  int sinks;  /* learned per-head sink logits */
} Case;

static void run_case(Backend *be, const Case *c) {
  AttnShape s = {c->B, c->T, c->Hq, c->Hkv, c->dqk, c->dv, 0, 0, 0, c->window,
                 (float)(1.0 / sqrt((double)c->dqk))};
  const size_t N = (size_t)c->B * c->T;
  int voff = 0; /* column offset of v in the packed kv buffer */
  if (c->packed) {
    s.ldq = c->Hq * c->dqk + 64 + c->skew;
    s.ldk = s.ldv = c->Hkv * (c->dqk + c->dv) + 32 + c->skew;
    voff = c->Hkv * c->dqk;
  } else {
    s.ldq = c->Hq * c->dqk;
    s.ldk = c->Hkv * c->dqk;
    s.ldv = c->Hkv * c->dv;
  }
  const int ldo = c->Hq * c->dv;
  const size_t nq = N * s.ldq, nk = N * s.ldk, nv = c->packed ? 0 : N * s.ldv, no = N * ldo;
  const size_t nl = (size_t)c->B * c->Hq * c->T;
  float *hq = xmalloc(nq * 4), *hk = xmalloc(nk * 4), *hv = c->packed ? NULL : xmalloc(nv * 4);
  float *hdo = xmalloc(no * 4);
  void *dq_in = dev_random(be, hq, nq);
  void *dk_in = dev_random(be, hk, nk); /* k buffer (packed: k and v) */
  void *dv_in = c->packed ? NULL : dev_random(be, hv, nv);
  void *ddo = dev_random(be, hdo, no);
  const void *kptr = dk_in;
  const void *vptr = c->packed ? (const void *)((char *)dk_in + (size_t)voff * be->size[BUF_ACT])
                               : dv_in;
  const float *hvv = c->packed ? hk + voff : hv;
  /* Sinks near the scores' log-sum-exp, so the sink takes a real share;
   * head 0's sink dominates every row and head 1's is negligible (extremes). */
  float *hs = NULL;
  void *sk = NULL, *gs = NULL;
  if (c->sinks) {
    hs = xmalloc(c->Hq * sizeof(float));
    for (int h = 0; h < c->Hq; h++) hs[h] = h == 0 ? 30.0f : h == 1 ? -30.0f : 2.0f + rng_normal();
    sk = be->alloc(be, c->Hq * be->size[BUF_F32]);
    gs = be->alloc(be, c->Hq * be->size[BUF_F32]);
    be->put(be, sk, BUF_F32, hs, c->Hq);
  }

  printf("%s: B=%d T=%d Hq=%d Hkv=%d dqk=%d dv=%d window=%d%s%s%s\n", c->name, c->B, c->T,
         c->Hq, c->Hkv, c->dqk, c->dv, c->window, c->packed ? " packed" : "",
         c->skew ? " unaligned" : "", c->sinks ? " sinks" : "");
  double *ro = xcalloc(no, 8), *rl = xcalloc(nl, 8), *rdq = xcalloc(nq, 8);
  double *rdk = xcalloc(nk, 8), *rdv = c->packed ? rdk + voff : xcalloc(N * s.ldv, 8);
  double *rds = xcalloc(c->Hq, 8);
  /* Packed: dk and dv share one gradient buffer, like k and v. */
  attn_ref(&s, hq, hk, hvv, hdo, hs, ro, rl, rdq, rdk, rdv, rds);
  cpu_crosscheck(c->name, &s, hq, hk, hv, hdo, hs, ro, rl, rdq, rdk, rdv, rds, c->packed);

  void *o = be->alloc(be, no * be->size[BUF_ACT]);
  void *lse = be->alloc(be, nl * be->size[BUF_F32]);
  void *gq = be->alloc(be, nq * be->size[BUF_ACT]);
  void *gkv = be->alloc(be, nk * be->size[BUF_ACT]);
  void *gv = c->packed ? NULL : be->alloc(be, nv * be->size[BUF_ACT]);
  void *gkp = gkv;
  void *gvp = c->packed ? (void *)((char *)gkv + (size_t)voff * be->size[BUF_ACT]) : gv;

  float *fo = xmalloc(no * 4), *fl = xmalloc(nl * 4), *fq = xmalloc(nq * 4), *fk = xmalloc(nk * 4);
  float *fv = c->packed ? NULL : xmalloc(nv * 4);
  unsigned char *first[6] = {0};
  size_t bytes[6] = {no * be->size[BUF_ACT], nl * be->size[BUF_F32], nq * be->size[BUF_ACT],
                     nk * be->size[BUF_ACT], c->packed ? 0 : nv * be->size[BUF_ACT],
                     c->sinks ? c->Hq * be->size[BUF_F32] : 0};
  void *outs[6] = {o, lse, gq, gkv, gv, gs};
  float *fs = xmalloc(c->Hq * sizeof(float));

  for (int run = 0; run < 2; run++) {
    poison(be, o, BUF_ACT, N, ldo, 0, ldo);
    poison(be, lse, BUF_F32, nl, 1, 0, 1);
    poison(be, gq, BUF_ACT, N, s.ldq, 0, c->Hq * c->dqk);
    if (c->packed) {
      poison(be, gkv, BUF_ACT, N, s.ldk, 0, c->Hkv * (c->dqk + c->dv));
    } else {
      poison(be, gkv, BUF_ACT, N, s.ldk, 0, s.ldk);
      poison(be, gv, BUF_ACT, N, s.ldv, 0, s.ldv);
    }
    if (c->sinks) { /* dsinks accumulate: start every head at 0.5 */
      for (int h = 0; h < c->Hq; h++) fs[h] = 0.5f;
      be->put(be, gs, BUF_F32, fs, c->Hq);
    }
    be->attn_fwd(be, o, lse, dq_in, kptr, vptr, sk, &s);
    be->attn_bwd(be, gq, gkp, gvp, gs, ddo, dq_in, kptr, vptr, o, lse, sk, &s);
    be->sync(be);
    if (run == 0) {
      be->get(be, fo, BUF_ACT, o, no);
      be->get(be, fl, BUF_F32, lse, nl);
      be->get(be, fq, BUF_ACT, gq, nq);
      be->get(be, fk, BUF_ACT, gkv, nk);
      if (!c->packed) be->get(be, fv, BUF_ACT, gv, nv);
      Err eo = {0}, el = {0};
      for (size_t i = 0; i < no; i++) err_add(&eo, fo[i], ro[i]);
      for (size_t i = 0; i < nl; i++) err_add(&el, fl[i], rl[i]);
      report(c->name, "o", eo, 1e-2, 1);
      report(c->name, "lse", el, 1e-3, 0);
      check_packed(c->name, "dq", fq, rdq, N, s.ldq, 0, c->Hq * c->dqk, 1e-2);
      if (c->packed) { /* dk and dv regions of the shared buffer, padding untouched */
        check_packed(c->name, "dkdv", fk, rdk, N, s.ldk, 0, c->Hkv * (c->dqk + c->dv), 1e-2);
      } else {
        check_packed(c->name, "dk", fk, rdk, N, s.ldk, 0, s.ldk, 1e-2);
        check_packed(c->name, "dv", fv, rdv, N, s.ldv, 0, s.ldv, 1e-2);
      }
      if (c->sinks) {
        Err es = {0};
        be->get(be, fs, BUF_F32, gs, c->Hq);
        for (int h = 0; h < c->Hq; h++) err_add(&es, fs[h] - 0.5, rds[h]);
        report(c->name, "dsnk", es, 1e-2, 1);
      }
      for (int i = 0; i < 6; i++) {
        if (!bytes[i]) continue;
        first[i] = xmalloc(bytes[i]);
        be->download(be, first[i], outs[i], bytes[i]);
      }
    } else {
      int same = 1;
      for (int i = 0; i < 6; i++) {
        if (!bytes[i]) continue;
        unsigned char *again = xmalloc(bytes[i]);
        be->download(be, again, outs[i], bytes[i]);
        if (memcmp(again, first[i], bytes[i])) same = 0;
        free(again);
        free(first[i]);
      }
      printf("  %-26s second run bit-identical: %s\n", c->name, same ? "yes" : "NO  FAIL");
      if (!same) failures++;
    }
  }
  void *bufs[] = {dq_in, dk_in, dv_in, ddo, o, lse, gq, gkv, gv, sk, gs};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
    if (bufs[i]) be->free(be, bufs[i]);
  free(hq), free(hk), free(hv), free(hdo), free(ro), free(rl), free(rdq), free(rdk), free(rds);
  if (!c->packed) free(rdv);
  free(fo), free(fl), free(fq), free(fk), free(fv), free(fs), free(hs);
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

#define CU(call)                                                                       \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) nmoe_fatal("%s: %s", #call, cudaGetErrorString(e_));        \
  } while (0)

/* Median ms of 20 timed calls (after 3 warm-up calls) of fwd (bwd = 0) or bwd.
 * The events sit on the legacy default stream around a backend sync, so a few
 * microseconds of host latency are included. */
static float time_op(Backend *be, int bwd, void **a, const AttnShape *s) {
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  float ms[20];
  for (int it = -3; it < 20; it++) {
    be->sync(be);
    CU(cudaEventRecord(e0, 0));
    if (bwd) be->attn_bwd(be, a[5], a[6], a[7], NULL, a[8], a[0], a[1], a[2], a[3], a[4], NULL, s);
    else be->attn_fwd(be, a[3], a[4], a[0], a[1], a[2], NULL, s);
    be->sync(be);
    CU(cudaEventRecord(e1, 0));
    CU(cudaEventSynchronize(e1));
    if (it >= 0) CU(cudaEventElapsedTime(&ms[it], e0, e1));
  }
  CU(cudaEventDestroy(e0));
  CU(cudaEventDestroy(e1));
  qsort(ms, 20, sizeof *ms, cmp_float);
  return 0.5f * (ms[9] + ms[10]);
}

static void bench(Backend *be, const char *name, int B, int T, int H, int dqk, int dv) {
  AttnShape s = {B, T, H, H, dqk, dv, H * dqk, H * dqk, H * dv, 0, (float)(1.0 / sqrt(dqk))};
  const size_t N = (size_t)B * T;
  size_t n[9] = {N * H * dqk, N * H * dqk, N * H * dv, N * H * dv, (size_t)B * H * T,
                 N * H * dqk, N * H * dqk, N * H * dv, N * H * dv};
  void *a[9]; /* q k v o lse dq dk dv dout */
  size_t maxn = 0;
  for (int i = 0; i < 9; i++) maxn = n[i] > maxn ? n[i] : maxn;
  float *h = xmalloc(maxn * sizeof(float));
  for (int i = 0; i < 9; i++) {
    BufKind kind = i == 4 ? BUF_F32 : BUF_ACT;
    a[i] = be->alloc(be, n[i] * be->size[kind]);
    for (size_t j = 0; j < n[i]; j++) h[j] = rng_normal();
    be->put(be, a[i], kind, h, n[i]);
  }
  free(h);
  be->attn_fwd(be, a[3], a[4], a[0], a[1], a[2], NULL, &s); /* real o and lse for the backward */
  float fwd = time_op(be, 0, a, &s), bwd = time_op(be, 1, a, &s);
  double flop_fwd = 2.0 * B * H * (double)T * T * (dqk + dv) / 2;
  printf("{\"bench\":\"attn\",\"shape\":\"%s B=%d H=%d T=%d dqk=%d dv=%d causal\","
         "\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,\"fwd_tflops\":%.1f,\"bwd_tflops\":%.1f,"
         "\"tflops\":%.1f}\n",
         name, B, H, T, dqk, dv, fwd, bwd, flop_fwd / fwd * 1e-9, 2.5 * flop_fwd / bwd * 1e-9,
         3.5 * flop_fwd / (fwd + bwd) * 1e-9);
  for (int i = 0; i < 9; i++) be->free(be, a[i]);
}

int main(int argc, char **argv) {
  char err[256];
  Backend *be = backend_cuda(0, err, sizeof err);
  if (!be) {
    fprintf(stderr, "test_attn: no CUDA backend: %s\n", err);
    return 1;
  }
  if (argc > 1 && !strcmp(argv[1], "--bench")) {
    bench(be, "mla", 2, 4096, 16, 192, 128);
    bench(be, "mha", 16, 2048, 12, 64, 64);
    bench(be, "mla-small", 8, 2048, 16, 24, 16);
    be->destroy(be);
    return 0;
  }
  static const Case cases[] = {
      {"mha d64", 2, 256, 4, 4, 64, 64, 0, 0, 0, 0},
      {"gqa d128", 2, 256, 8, 2, 128, 128, 0, 0, 0, 0},
      {"mla 192/128 packed", 2, 256, 4, 4, 192, 128, 0, 1, 0, 0},
      {"mha d64 window64", 2, 256, 4, 4, 64, 64, 64, 0, 0, 0},
      {"gqa d128 window50 T200", 2, 200, 8, 2, 128, 128, 50, 0, 0, 0},
      {"mla packed T200", 2, 200, 4, 4, 192, 128, 0, 1, 0, 0},
      {"mla packed window64 T200", 1, 200, 2, 2, 192, 128, 64, 1, 0, 0},
      /* padded tensor-core tiles */
      {"mla 24/16 packed", 8, 64, 4, 4, 24, 16, 0, 1, 0, 0},
      {"mha d32", 2, 256, 4, 4, 32, 32, 0, 0, 0, 0},
      {"gqa d16 T200", 2, 200, 8, 2, 16, 16, 0, 0, 0, 0},
      {"24/16 packed window20 T130", 2, 130, 4, 4, 24, 16, 20, 1, 0, 0},
      {"gqa 200/136 T150", 1, 150, 4, 2, 200, 136, 0, 0, 0, 0},
      {"d256 window100 T160", 1, 160, 2, 2, 256, 256, 100, 0, 0, 0},
      /* scalar fallback */
      {"12/8 gqa packed T100", 2, 100, 4, 2, 12, 8, 0, 1, 0, 0},
      {"12/8 window16 T100", 2, 100, 4, 4, 12, 8, 16, 0, 0, 0},
      {"272/40 gqa T64", 1, 64, 2, 1, 272, 40, 0, 0, 0, 0},
      {"d64 unaligned T96", 1, 96, 2, 2, 64, 64, 0, 1, 1, 0},
      {"24/16 unaligned window8 T70", 2, 70, 4, 2, 24, 16, 8, 1, 1, 0},
      /* sinks (the swa block): tuned, padded and fallback paths, GQA, windows */
      {"gqa d64 window64 sinks", 2, 256, 8, 2, 64, 64, 64, 0, 0, 1},
      {"gqa d128 window50 T200 sinks", 2, 200, 8, 2, 128, 128, 50, 0, 0, 1},
      {"mha d32 T200 sinks", 2, 200, 4, 4, 32, 32, 0, 0, 0, 1},
      {"gqa d16 packed window20 T130 sinks", 2, 130, 4, 2, 16, 16, 20, 1, 0, 1},
      {"12/8 window16 T100 sinks", 2, 100, 4, 4, 12, 8, 16, 0, 0, 1},
      {"d64 unaligned window8 T96 sinks", 1, 96, 4, 2, 64, 64, 8, 1, 1, 1},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(be, &cases[i]);
  be->destroy(be);
  printf("test_attn: %s (%d failures)\n", failures ? "FAIL" : "OK", failures);
  return failures ? 1 : 0;
}
