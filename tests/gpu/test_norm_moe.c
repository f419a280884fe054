/* test_norm_moe.c: checks the CUDA RMSNorm, RoPE, MLA kv split, router and
 * MoE permutation ops against the CPU backend (the ground truth), on the GPU
 * machine. Inputs are random and rounded to bf16 first so both backends see
 * the same values; GPU outputs are poisoned with NaN before each op so an
 * unwritten element fails. Float outputs pass on ||gpu - cpu|| / ||cpu|| under
 * a bf16- or fp32-sized bound; integer outputs must match exactly (router
 * top-k may differ only between experts whose biased scores tie within
 * rounding). Ops documented as deterministic are run twice and compared bit
 * for bit. Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any
 * failure, 2 when no GPU is usable. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"

static Backend *cpu, *gpu;
static int npass, nfail;
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double urand(void) { /* splitmix64 -> [0, 1) */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

static float bf16_round(float f) { /* round to nearest even, as the GPU stores */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static void report(int ok, const char *name, const char *fmt, double v) {
  printf("%s %-44s ", ok ? "PASS" : "FAIL", name);
  printf(fmt, v);
  printf("\n");
  if (ok) npass++; else nfail++;
}

/* One tensor on both backends, with the host values last put there. */
typedef struct Buf {
  BufKind k;
  size_t n;
  void *c, *g;
  float *h;
} Buf;

static Buf buf_new(BufKind k, size_t n) {
  Buf b = {k, n, cpu->alloc(cpu, n * cpu->size[k] + 1), gpu->alloc(gpu, n * gpu->size[k] + 16),
           xcalloc(n + 1, sizeof(float))};
  return b;
}

static void buf_free(Buf *b) {
  cpu->free(cpu, b->c);
  gpu->free(gpu, b->g);
  free(b->h);
}

/* Same values on both sides (ACT values rounded to bf16 first). */
static void buf_set(Buf *b, const float *v) {
  for (size_t i = 0; i < b->n; i++) b->h[i] = b->k == BUF_ACT ? bf16_round(v[i]) : v[i];
  cpu->put(cpu, b->c, b->k, b->h, b->n);
  gpu->put(gpu, b->g, b->k, b->h, b->n);
}

static void buf_rand(Buf *b, float lo, float hi) {
  float *v = xmalloc(b->n * sizeof(float) + 1);
  for (size_t i = 0; i < b->n; i++) v[i] = lo + (hi - lo) * (float)urand();
  buf_set(b, v);
  free(v);
}

static void buf_poison(Buf *b) {
  float *v = xmalloc(b->n * sizeof(float) + 1);
  for (size_t i = 0; i < b->n; i++) v[i] = NAN;
  gpu->put(gpu, b->g, b->k, v, b->n);
  cpu->put(cpu, b->c, b->k, v, b->n);
  free(v);
}

/* I32 buffers. */
typedef struct IBuf {
  size_t n;
  int32_t *c, *g;
} IBuf;

static IBuf ibuf_new(size_t n) {
  IBuf b = {n, cpu->alloc(cpu, n * 4 + 4), gpu->alloc(gpu, n * 4 + 16)};
  return b;
}

static void ibuf_free(IBuf *b) {
  cpu->free(cpu, b->c);
  gpu->free(gpu, b->g);
}

static void ibuf_set(IBuf *b, const int32_t *v) {
  cpu->upload(cpu, b->c, v, b->n * 4);
  gpu->upload(gpu, b->g, v, b->n * 4);
}

static void ibuf_poison(IBuf *b) {
  int32_t *v = xmalloc(b->n * 4 + 4);
  for (size_t i = 0; i < b->n; i++) v[i] = -777;
  ibuf_set(b, v);
  free(v);
}

/* Rel-error check over rows x cols of a row-strided buffer. */
static void check(const char *name, Buf *b, int rows, int cols, int ld, double tol) {
  float *c = xmalloc(b->n * sizeof(float) + 1), *g = xmalloc(b->n * sizeof(float) + 1);
  cpu->get(cpu, c, b->k, b->c, b->n);
  gpu->get(gpu, g, b->k, b->g, b->n);
  double num = 0, den = 0;
  int bad = 0;
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < cols; j++) {
      size_t i = (size_t)r * ld + j;
      if (!isfinite(g[i]) || !isfinite(c[i])) bad++;
      double d = (double)g[i] - c[i];
      num += d * d;
      den += (double)c[i] * c[i];
    }
  double rel = bad ? INFINITY : sqrt(num / (den > 0 ? den : 1e-300));
  report(rel <= tol, name, "rel_err %.3g", rel);
  free(c);
  free(g);
}

static void icheck(const char *name, IBuf *b) {
  int32_t *c = xmalloc(b->n * 4 + 4), *g = xmalloc(b->n * 4 + 4);
  cpu->download(cpu, c, b->c, b->n * 4);
  gpu->download(gpu, g, b->g, b->n * 4);
  size_t bad = 0;
  for (size_t i = 0; i < b->n; i++) bad += c[i] != g[i];
  report(bad == 0, name, "mismatches %.0f", (double)bad);
  free(c);
  free(g);
}

/* Downloads the GPU side raw (for bit-exact repeat checks); caller frees. */
static void *gpu_bytes(void *g, size_t bytes) {
  void *h = xmalloc(bytes + 1);
  gpu->download(gpu, h, g, bytes);
  return h;
}

static void same_bits(const char *name, void *first, void *g, size_t bytes) {
  unsigned char *a = first, *b = gpu_bytes(g, bytes);
  size_t diff = 0;
  for (size_t i = 0; i < bytes; i++) diff += a[i] != b[i];
  report(diff == 0, name, "differing bytes %.0f", (double)diff);
  free(b);
  free(first);
}

/* ---- RMSNorm ---- */

static void test_rmsnorm(int N, int D, int ldx) {
  char nm[96];
  Buf x = buf_new(BUF_ACT, (size_t)N * ldx), w = buf_new(BUF_ACT, D);
  Buf y = buf_new(BUF_ACT, (size_t)N * D), rs = buf_new(BUF_F32, N);
  Buf dy = buf_new(BUF_ACT, (size_t)N * D), dx = buf_new(BUF_ACT, (size_t)N * ldx);
  Buf dw = buf_new(BUF_ACT, D);
  buf_rand(&x, -2, 2);
  buf_rand(&w, 0.5f, 1.5f);
  buf_poison(&y);
  buf_poison(&rs);
  cpu->rmsnorm_fwd(cpu, y.c, rs.c, x.c, w.c, N, D, ldx, D, 1e-6f);
  gpu->rmsnorm_fwd(gpu, y.g, rs.g, x.g, w.g, N, D, ldx, D, 1e-6f);
  snprintf(nm, sizeof nm, "rmsnorm_fwd y N=%d D=%d ldx=%d", N, D, ldx);
  check(nm, &y, N, D, D, 1e-2);
  snprintf(nm, sizeof nm, "rmsnorm_fwd rstd N=%d D=%d", N, D);
  check(nm, &rs, 1, N, N, 1e-5);

  /* backward from the same (CPU) rstd on both sides */
  float *r = xmalloc(N * sizeof(float));
  cpu->get(cpu, r, BUF_F32, rs.c, N);
  buf_set(&rs, r);
  free(r);
  buf_rand(&dy, -1, 1);
  for (int acc = 0; acc <= 1; acc++) {
    if (acc) buf_rand(&dx, -1, 1); else buf_poison(&dx);
    buf_rand(&dw, -1, 1);
    cpu->rmsnorm_bwd(cpu, dx.c, dw.c, dy.c, x.c, w.c, rs.c, N, D, ldx, D, acc);
    gpu->rmsnorm_bwd(gpu, dx.g, dw.g, dy.g, x.g, w.g, rs.g, N, D, ldx, D, acc);
    snprintf(nm, sizeof nm, "rmsnorm_bwd dx acc=%d N=%d D=%d ldx=%d", acc, N, D, ldx);
    check(nm, &dx, N, D, ldx, 1e-2);
    snprintf(nm, sizeof nm, "rmsnorm_bwd dw acc=%d N=%d D=%d", acc, N, D);
    check(nm, &dw, 1, D, D, 1e-2);
  }
  /* dw twice from the same start: bit-identical */
  buf_rand(&dw, -1, 1);
  gpu->rmsnorm_bwd(gpu, dx.g, dw.g, dy.g, x.g, w.g, rs.g, N, D, ldx, D, 0);
  void *first = gpu_bytes(dw.g, (size_t)D * 2);
  buf_set(&dw, dw.h);
  gpu->rmsnorm_bwd(gpu, dx.g, dw.g, dy.g, x.g, w.g, rs.g, N, D, ldx, D, 0);
  snprintf(nm, sizeof nm, "rmsnorm_bwd dw deterministic N=%d D=%d", N, D);
  same_bits(nm, first, dw.g, (size_t)D * 2);
  Buf *all[] = {&x, &w, &y, &rs, &dy, &dx, &dw};
  for (int i = 0; i < 7; i++) buf_free(all[i]);
}

/* ---- RoPE ---- */

static void test_rope(int B, int T, int Tt, int H, int hs, int off, int rd, int ldx) {
  char nm[96];
  int N = B * T, half = rd / 2;
  Buf x = buf_new(BUF_ACT, (size_t)N * ldx), c = buf_new(BUF_F32, (size_t)Tt * half),
      s = buf_new(BUF_F32, (size_t)Tt * half);
  float *cv = xmalloc((size_t)Tt * half * sizeof(float)), *sv = xmalloc((size_t)Tt * half * sizeof(float));
  for (int t = 0; t < Tt; t++)
    for (int i = 0; i < half; i++) {
      double a = t * pow(10000.0, -2.0 * i / rd);
      cv[t * half + i] = (float)cos(a);
      sv[t * half + i] = (float)sin(a);
    }
  buf_set(&c, cv);
  buf_set(&s, sv);
  buf_rand(&x, -1, 1);
  for (int inv = 0; inv <= 1; inv++) {
    cpu->rope(cpu, x.c, c.c, s.c, N, T, H, ldx, hs, off, rd, inv);
    gpu->rope(gpu, x.g, c.g, s.g, N, T, H, ldx, hs, off, rd, inv);
    snprintf(nm, sizeof nm, "rope inv=%d N=%d H=%d hs=%d off=%d rd=%d", inv, N, H, hs, off, rd);
    check(nm, &x, N, ldx, ldx, 1e-2);
  }
  /* forward then inverse returns the input (up to two bf16 roundings) */
  float *back = xmalloc((size_t)N * ldx * sizeof(float));
  gpu->get(gpu, back, BUF_ACT, x.g, (size_t)N * ldx);
  double num = 0, den = 0;
  for (size_t i = 0; i < (size_t)N * ldx; i++) {
    num += (back[i] - x.h[i]) * (double)(back[i] - x.h[i]);
    den += (double)x.h[i] * x.h[i];
  }
  snprintf(nm, sizeof nm, "rope inverse(forward(x)) = x rd=%d", rd);
  report(sqrt(num / den) < 1e-2, nm, "rel_err %.3g", sqrt(num / den));
  free(back);
  free(cv);
  free(sv);
  buf_free(&x);
  buf_free(&c);
  buf_free(&s);
}

/* ---- MLA kv split ---- */

static void test_mla(int N, int H, int dn, int dr, int dv, int kv_lora) {
  char nm[96];
  int ldkr = kv_lora + dr; /* kr lives after the latent in the packed wkv_a output */
  Buf kv = buf_new(BUF_ACT, (size_t)N * H * (dn + dv)), pk = buf_new(BUF_ACT, (size_t)N * ldkr);
  Buf k = buf_new(BUF_ACT, (size_t)N * H * (dn + dr)), v = buf_new(BUF_ACT, (size_t)N * H * dv);
  buf_rand(&kv, -1, 1);
  buf_rand(&pk, -1, 1);
  buf_poison(&k);
  buf_poison(&v);
  size_t ka = (size_t)kv_lora * cpu->size[BUF_ACT], kg = (size_t)kv_lora * gpu->size[BUF_ACT];
  cpu->mla_kv_split(cpu, k.c, v.c, kv.c, (char *)pk.c + ka, ldkr, N, H, dn, dr, dv);
  gpu->mla_kv_split(gpu, k.g, v.g, kv.g, (char *)pk.g + kg, ldkr, N, H, dn, dr, dv);
  snprintf(nm, sizeof nm, "mla_kv_split k N=%d H=%d dn=%d dr=%d dv=%d", N, H, dn, dr, dv);
  check(nm, &k, 1, (int)k.n, (int)k.n, 0);
  snprintf(nm, sizeof nm, "mla_kv_split v N=%d H=%d dn=%d dr=%d dv=%d", N, H, dn, dr, dv);
  check(nm, &v, 1, (int)v.n, (int)v.n, 0);

  /* backward: dkv written, dkr written into the packed gradient's rope columns */
  Buf dkv = buf_new(BUF_ACT, kv.n), dpk = buf_new(BUF_ACT, pk.n);
  buf_rand(&k, -1, 1);
  buf_rand(&v, -1, 1);
  buf_poison(&dkv);
  buf_poison(&dpk);
  cpu->mla_kv_split_bwd(cpu, dkv.c, (char *)dpk.c + ka, ldkr, k.c, v.c, N, H, dn, dr, dv);
  gpu->mla_kv_split_bwd(gpu, dkv.g, (char *)dpk.g + kg, ldkr, k.g, v.g, N, H, dn, dr, dv);
  snprintf(nm, sizeof nm, "mla_kv_split_bwd dkv N=%d H=%d", N, H);
  check(nm, &dkv, 1, (int)dkv.n, (int)dkv.n, 0);
  /* dkr: rows of dr columns starting at column kv_lora */
  float *c = xmalloc(dpk.n * sizeof(float)), *g = xmalloc(dpk.n * sizeof(float));
  cpu->get(cpu, c, BUF_ACT, dpk.c, dpk.n);
  gpu->get(gpu, g, BUF_ACT, dpk.g, dpk.n);
  double num = 0, den = 0;
  int bad = 0;
  for (int n = 0; n < N; n++)
    for (int j = 0; j < dr; j++) {
      size_t i = (size_t)n * ldkr + kv_lora + j;
      if (!isfinite(g[i])) bad++;
      num += (g[i] - c[i]) * (double)(g[i] - c[i]);
      den += (double)c[i] * c[i];
    }
  for (int n = 0; n < N; n++) /* the latent columns must stay untouched (NaN) */
    for (int j = 0; j < kv_lora; j++) bad += !isnan(g[(size_t)n * ldkr + j]);
  double rel = bad ? INFINITY : sqrt(num / den);
  snprintf(nm, sizeof nm, "mla_kv_split_bwd dkr N=%d H=%d dr=%d", N, H, dr);
  report(rel < 1e-2, nm, "rel_err %.3g", rel);
  free(c);
  free(g);
  Buf *all[] = {&kv, &pk, &k, &v, &dkv, &dpk};
  for (int i = 0; i < 6; i++) buf_free(all[i]);
}

/* ---- router ---- */

static void test_router(int N, int D, int E, int K, float route_scale, float aux) {
  char nm[96];
  Buf x = buf_new(BUF_ACT, (size_t)N * D), wg = buf_new(BUF_ACT, (size_t)E * D);
  Buf bias = buf_new(BUF_F32, E), sc = buf_new(BUF_F32, (size_t)N * E);
  Buf w = buf_new(BUF_F32, (size_t)N * K), imp = buf_new(BUF_F32, E);
  IBuf idx = ibuf_new((size_t)N * K), cnt = ibuf_new(E);
  buf_rand(&x, -1, 1);
  buf_rand(&wg, -0.1f, 0.1f);
  buf_rand(&bias, -0.05f, 0.05f);
  buf_poison(&sc);
  buf_poison(&w);
  buf_poison(&imp);
  ibuf_poison(&idx);
  ibuf_poison(&cnt);
  cpu->router_fwd(cpu, sc.c, idx.c, w.c, cnt.c, imp.c, x.c, wg.c, bias.c, N, D, E, K, route_scale);
  gpu->router_fwd(gpu, sc.g, idx.g, w.g, cnt.g, imp.g, x.g, wg.g, bias.g, N, D, E, K, route_scale);
  snprintf(nm, sizeof nm, "router_fwd scores N=%d E=%d K=%d", N, E, K);
  check(nm, &sc, N, E, E, 1e-5);
  snprintf(nm, sizeof nm, "router_fwd imp N=%d E=%d", N, E);
  check(nm, &imp, 1, E, E, 1e-4);

  /* top-k: equal ids, or ids whose (CPU) biased scores tie within rounding */
  size_t P = (size_t)N * K;
  int32_t *ic = xmalloc(P * 4), *ig = xmalloc(P * 4), *cg = xmalloc((size_t)E * 4);
  float *s = xmalloc((size_t)N * E * sizeof(float)), *wc = xmalloc(P * sizeof(float)),
        *wgp = xmalloc(P * sizeof(float));
  cpu->download(cpu, ic, idx.c, P * 4);
  gpu->download(gpu, ig, idx.g, P * 4);
  gpu->download(gpu, cg, cnt.g, (size_t)E * 4);
  cpu->get(cpu, s, BUF_F32, sc.c, (size_t)N * E);
  cpu->get(cpu, wc, BUF_F32, w.c, P);
  gpu->get(gpu, wgp, BUF_F32, w.g, P);
  size_t differ = 0, bad = 0;
  double wnum = 0, wden = 0;
  int *hist = xcalloc(E, sizeof(int));
  for (int t = 0; t < N; t++) {
    int same_row = 1;
    for (int k = 0; k < K; k++) {
      size_t p = (size_t)t * K + k;
      int a = ic[p], b = ig[p];
      if (b < 0 || b >= E) { bad++; continue; }
      hist[b]++;
      for (int j = 0; j < k; j++) bad += ig[(size_t)t * K + j] == b; /* distinct */
      if (a != b) {
        same_row = 0;
        differ++;
        float va = s[(size_t)t * E + a] + bias.h[a], vb = s[(size_t)t * E + b] + bias.h[b];
        if (fabsf(va - vb) > 1e-5f) bad++;
      }
    }
    for (int k = 0; k < K && same_row; k++) {
      size_t p = (size_t)t * K + k;
      wnum += (wgp[p] - wc[p]) * (double)(wgp[p] - wc[p]);
      wden += (double)wc[p] * wc[p];
    }
  }
  snprintf(nm, sizeof nm, "router_fwd idx N=%d E=%d K=%d (ties %zu)", N, E, K, differ);
  report(bad == 0 && differ <= P / 1000, nm, "bad %.0f", (double)bad);
  snprintf(nm, sizeof nm, "router_fwd w N=%d E=%d K=%d", N, E, K);
  double wrel = sqrt(wnum / wden);
  report(wrel < 1e-5, nm, "rel_err %.3g", wrel);
  size_t cbad = 0;
  for (int e = 0; e < E; e++) cbad += hist[e] != cg[e];
  snprintf(nm, sizeof nm, "router_fwd counts match idx E=%d", E);
  report(cbad == 0, nm, "mismatches %.0f", (double)cbad);

  /* imp twice: bit-identical */
  void *first = gpu_bytes(imp.g, (size_t)E * 4);
  gpu->router_fwd(gpu, sc.g, idx.g, w.g, cnt.g, imp.g, x.g, wg.g, bias.g, N, D, E, K, route_scale);
  snprintf(nm, sizeof nm, "router_fwd imp deterministic N=%d E=%d", N, E);
  same_bits(nm, first, imp.g, (size_t)E * 4);

  /* backward from identical inputs: the CPU's scores and idx on both sides */
  Buf dw = buf_new(BUF_F32, P), dx = buf_new(BUF_ACT, (size_t)N * D), dwg = buf_new(BUF_ACT, (size_t)E * D);
  Buf lf = buf_new(BUF_F32, E);
  buf_set(&sc, s);
  ibuf_set(&idx, ic);
  buf_rand(&dw, -1, 1);
  buf_rand(&lf, 0, 2.0f / E);
  buf_rand(&dx, -1, 1);
  buf_rand(&dwg, -1, 1);
  cpu->router_bwd(cpu, dx.c, dwg.c, dw.c, sc.c, idx.c, x.c, wg.c, N, D, E, K, route_scale, aux, lf.c);
  gpu->router_bwd(gpu, dx.g, dwg.g, dw.g, sc.g, idx.g, x.g, wg.g, N, D, E, K, route_scale, aux, lf.g);
  snprintf(nm, sizeof nm, "router_bwd dx N=%d E=%d K=%d aux=%g", N, E, K, aux);
  check(nm, &dx, N, D, D, 1e-2);
  snprintf(nm, sizeof nm, "router_bwd dwg N=%d E=%d K=%d aux=%g", N, E, K, aux);
  check(nm, &dwg, E, D, D, 1e-2);
  /* the gradient alone (a zero start), so start values cannot hide its errors */
  float *zero = xcalloc(dx.n + dwg.n, sizeof(float));
  buf_set(&dx, zero);
  buf_set(&dwg, zero);
  free(zero);
  cpu->router_bwd(cpu, dx.c, dwg.c, dw.c, sc.c, idx.c, x.c, wg.c, N, D, E, K, route_scale, aux, lf.c);
  gpu->router_bwd(gpu, dx.g, dwg.g, dw.g, sc.g, idx.g, x.g, wg.g, N, D, E, K, route_scale, aux, lf.g);
  snprintf(nm, sizeof nm, "router_bwd dx from 0 N=%d E=%d aux=%g", N, E, aux);
  check(nm, &dx, N, D, D, 1e-2);
  snprintf(nm, sizeof nm, "router_bwd dwg from 0 N=%d E=%d aux=%g", N, E, aux);
  check(nm, &dwg, E, D, D, 1e-2);
  free(hist);
  free(ic);
  free(ig);
  free(cg);
  free(s);
  free(wc);
  free(wgp);
  Buf *all[] = {&x, &wg, &bias, &sc, &w, &imp, &dw, &dx, &dwg, &lf};
  for (int i = 0; i < 10; i++) buf_free(all[i]);
  ibuf_free(&idx);
  ibuf_free(&cnt);
}

/* ---- MoE permutation ---- */

/* skew: fraction of pairs sent to expert 0 (an overloaded expert). */
static void test_moe(int N, int K, int E, int D, double skew) {
  char nm[96];
  size_t P = (size_t)N * K;
  IBuf idx = ibuf_new(P), off = ibuf_new((size_t)E + 1), row = ibuf_new(P), pair = ibuf_new(P);
  int32_t *iv = xmalloc(P * 4);
  for (int t = 0; t < N; t++) /* distinct experts per token, as the router gives */
    for (int k = 0; k < K; k++) {
      int e, dup;
      do {
        e = urand() < skew && k == 0 ? 0 : (int)(urand() * E);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= iv[(size_t)t * K + j] == e;
      } while (dup);
      iv[(size_t)t * K + k] = e;
    }
  ibuf_set(&idx, iv);
  ibuf_poison(&off);
  ibuf_poison(&row);
  ibuf_poison(&pair);
  cpu->moe_sort(cpu, off.c, row.c, pair.c, idx.c, N, K, E);
  gpu->moe_sort(gpu, off.g, row.g, pair.g, idx.g, N, K, E);
  snprintf(nm, sizeof nm, "moe_sort off N=%d K=%d E=%d skew=%.1f", N, K, E, skew);
  icheck(nm, &off);
  snprintf(nm, sizeof nm, "moe_sort row_of N=%d K=%d E=%d", N, K, E);
  icheck(nm, &row);
  snprintf(nm, sizeof nm, "moe_sort pair_of N=%d K=%d E=%d", N, K, E);
  icheck(nm, &pair);
  void *first = gpu_bytes(pair.g, P * 4);
  gpu->moe_sort(gpu, off.g, row.g, pair.g, idx.g, N, K, E);
  snprintf(nm, sizeof nm, "moe_sort deterministic N=%d K=%d E=%d", N, K, E);
  same_bits(nm, first, pair.g, P * 4);

  /* gather / combine on the CPU's (== GPU's, checked above) permutation */
  Buf x = buf_new(BUF_ACT, (size_t)N * D), xe = buf_new(BUF_ACT, P * D);
  Buf w = buf_new(BUF_F32, P), y = buf_new(BUF_ACT, (size_t)N * D), dw = buf_new(BUF_F32, P);
  buf_rand(&x, -1, 1);
  buf_poison(&xe);
  cpu->moe_gather(cpu, xe.c, x.c, pair.c, N, K, D);
  gpu->moe_gather(gpu, xe.g, x.g, pair.g, N, K, D);
  snprintf(nm, sizeof nm, "moe_gather N=%d K=%d D=%d", N, K, D);
  check(nm, &xe, 1, (int)xe.n, (int)xe.n, 0);

  buf_rand(&xe, -1, 1); /* expert outputs */
  buf_rand(&w, 0, 1);
  for (int acc = 0; acc <= 1; acc++) {
    if (acc) buf_rand(&y, -1, 1); else buf_poison(&y);
    cpu->moe_combine(cpu, y.c, xe.c, w.c, row.c, N, K, D, acc);
    gpu->moe_combine(gpu, y.g, xe.g, w.g, row.g, N, K, D, acc);
    snprintf(nm, sizeof nm, "moe_combine acc=%d N=%d K=%d D=%d", acc, N, K, D);
    check(nm, &y, N, D, D, 1e-2);
    if (acc) buf_rand(&y, -1, 1); else buf_poison(&y);
    cpu->moe_gather_bwd(cpu, y.c, xe.c, row.c, N, K, D, acc);
    gpu->moe_gather_bwd(gpu, y.g, xe.g, row.g, N, K, D, acc);
    snprintf(nm, sizeof nm, "moe_gather_bwd acc=%d N=%d K=%d D=%d", acc, N, K, D);
    check(nm, &y, N, D, D, 1e-2);
  }

  Buf dye = buf_new(BUF_ACT, P * D);
  buf_rand(&y, -1, 1); /* dy */
  buf_poison(&dye);
  buf_poison(&dw);
  cpu->moe_combine_bwd(cpu, dye.c, dw.c, y.c, xe.c, w.c, row.c, N, K, D);
  gpu->moe_combine_bwd(gpu, dye.g, dw.g, y.g, xe.g, w.g, row.g, N, K, D);
  snprintf(nm, sizeof nm, "moe_combine_bwd dye N=%d K=%d D=%d", N, K, D);
  check(nm, &dye, 1, (int)dye.n, (int)dye.n, 1e-2);
  snprintf(nm, sizeof nm, "moe_combine_bwd dw N=%d K=%d D=%d", N, K, D);
  check(nm, &dw, 1, (int)dw.n, (int)dw.n, 1e-5);

  free(iv);
  Buf *all[] = {&x, &xe, &w, &y, &dw, &dye};
  for (int i = 0; i < 6; i++) buf_free(all[i]);
  IBuf *ia[] = {&idx, &off, &row, &pair};
  for (int i = 0; i < 4; i++) ibuf_free(ia[i]);
}

int main(void) {
  char err[256];
  cpu = backend_cpu();
  gpu = backend_cuda(0, err, sizeof err);
  if (!gpu) {
    fprintf(stderr, "test_norm_moe: no usable GPU: %s\n", err);
    return 2;
  }
  /* RMSNorm: model dims, kv_norm (512 of 576 columns), odd sizes (scalar path) */
  test_rmsnorm(1000, 512, 576);
  test_rmsnorm(777, 2048, 2048);
  test_rmsnorm(300, 7168, 7168);
  test_rmsnorm(257, 100, 103);
  /* RoPE: MLA q (rope after 128 nope dims of 192), shared kr in the kv buffer,
   * plain MHA, odd layout */
  test_rope(2, 64, 100, 4, 192, 128, 64, 4 * 192);
  test_rope(3, 50, 50, 1, 0, 512, 64, 576);
  test_rope(2, 33, 40, 8, 64, 0, 64, 8 * 64);
  test_rope(1, 17, 17, 3, 10, 2, 6, 31);
  /* MLA kv split: dsv3 head dims, and odd ones */
  test_mla(96, 4, 128, 64, 128, 512);
  test_mla(37, 3, 6, 4, 10, 5);
  /* router: small, moonlight-like, dsv3-like, the largest E, aux term on */
  test_router(512, 256, 64, 6, 2.5f, 0);
  test_router(1024, 512, 64, 6, 2.446f, 0.01f);
  test_router(1000, 256, 256, 8, 2.5f, 0);
  test_router(300, 128, 512, 16, 16.f, 0.1f);
  /* MoE permutation: chunk edges, skewed load, a large sort, odd sizes */
  test_moe(512, 6, 64, 256, 0);
  test_moe(1000, 8, 256, 512, 0.5);
  test_moe(40000, 8, 256, 64, 0.2);
  test_moe(333, 3, 7, 100, 0);
  test_moe(128, 1, 1, 24, 0);

  printf("%d passed, %d failed\n", npass, nfail);
  gpu->destroy(gpu);
  cpu->destroy(cpu);
  return nfail ? 1 : 0;
}
