/* test_cpu_ops_f64.c: the CPU backend in double precision against hand
 * computations, naive reference loops and central finite differences.
 *
 * Gradient checks: a scalar objective L = sum(out * R) with a fixed random R;
 * each input element is moved by +-eps (eps = 1e-6) and (L+ - L-)/(2 eps) is
 * compared with the analytic gradient the backward ops give. Error bound: the
 * truncation error of a central difference is eps^2/6 * L''' ~ 1e-13 here; the
 * rounding noise in L (|L| kept below about 20, outputs and R of order 1, a few
 * hundred terms, u = 1.1e-16) is about 1e-14, i.e. about 1e-8 in the
 * difference quotient (observed worst: 3e-9 absolute). So we require
 * |analytic - numeric| < 1e-6 * max(|analytic|, |numeric|, 1e-2): relative
 * error 1e-6 where gradients are of order 1e-2 or more, an absolute 1e-8 for
 * smaller ones (a few times the worst noise seen, while any real bug shows as an error of
 * the size of the gradient itself). */
#include "cpu_test_util.h"

/* ------------------------------------------------------------------ gemm */


static void test_gemm_small(void **state) {
  real_t A[6] = {1, 2, 3, 4, 5, 6};       /* [2,3] */
  real_t B[6] = {7, 8, 9, 10, 11, 12};    /* [3,2] */
  real_t At[6], Bt[6];
  transpose(At, A, 2, 3);
  transpose(Bt, B, 3, 2);
  const real_t want[4] = {58, 64, 139, 154};
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      real_t C[4] = {1, 1, 1, 1};
      be->gemm(be, C, ta ? At : A, tb ? Bt : B, 2, 2, 3, ta, tb, 2.0f, 0.5f, 0);
      for (int i = 0; i < 4; i++) assert_true(C[i] == 2 * want[i] + 0.5);
      real_t D[4] = {NAN, NAN, NAN, NAN}; /* beta = 0 must not read C */
      be->gemm(be, D, ta ? At : A, tb ? Bt : B, 2, 2, 3, ta, tb, 1.0f, 0.0f, 1);
      for (int i = 0; i < 4; i++) assert_true(D[i] == want[i]);
    }
}

/* Larger than one tile in every direction, against a naive triple loop. */
static void test_gemm_tiles(void **state) { check_gemm_transposes(1, 0, 1e-12); }

typedef struct {
  real_t *A, *B, *C, *R;
  int M, N, K, ta, tb;
} GemmCtx;

static double gemm_obj(void *p) {
  GemmCtx *c = p;
  be->gemm(be, c->C, c->A, c->B, c->M, c->N, c->K, c->ta, c->tb, 1.0f, 0.0f, 0);
  return dotr(c->C, c->R, (size_t)c->M * c->N);
}

/* The gradients of C = op(A) op(B), themselves computed with gemm transposes,
 * match finite differences for all four storage combinations. */
static void test_gemm_grad(void **state) {
  seed(2);
  int M = 20, N = 5, K = 7;
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      GemmCtx c = {rbuf((size_t)M * K, 1), rbuf((size_t)K * N, 1), zbuf((size_t)M * N),
                   rbuf((size_t)M * N, 1), M, N, K, ta, tb};
      real_t *dA = zbuf((size_t)M * K), *dB = zbuf((size_t)K * N);
      if (!ta) be->gemm(be, dA, c.R, c.B, M, K, N, 0, !tb, 1, 0, 0); /* R op(B)^T */
      else be->gemm(be, dA, c.B, c.R, K, M, N, tb, 1, 1, 0, 0);      /* op(B) R^T */
      if (!tb) be->gemm(be, dB, c.A, c.R, K, N, M, !ta, 0, 1, 0, 0); /* op(A)^T R */
      else be->gemm(be, dB, c.R, c.A, N, K, M, 1, ta, 1, 0, 0);      /* R^T op(A) */
      fd_check("gemm dA", gemm_obj, &c, c.A, (size_t)M * K, dA, NULL);
      fd_check("gemm dB", gemm_obj, &c, c.B, (size_t)K * N, dB, NULL);
      bfree(c.A), bfree(c.B), bfree(c.C), bfree(c.R), bfree(dA), bfree(dB);
    }
}

/* ---------------------------------------- grouped gemm + MoE permutation */

typedef struct {
  int N, K, E, D, F;
  int32_t *idx, *off, *row_of, *pair_of;
  real_t *x, *W, *w, *xe, *ye, *y, *R;
} MoeCtx;

/* y = sum_k w[t,k] * (x[t] @ W[idx[t,k]]) through sort, gather, grouped gemm, combine. */
static double moe_obj(void *p) {
  MoeCtx *c = p;
  be->moe_gather(be, c->xe, c->x, c->pair_of, c->N, c->K, c->D);
  be->grouped_gemm(be, GG_FWD, c->ye, c->xe, c->W, c->off, c->off, c->E, c->N * c->K, c->F, c->D);
  be->moe_combine(be, c->y, c->ye, c->w, c->row_of, c->N, c->K, c->F, 0);
  return dotr(c->y, c->R, (size_t)c->N * c->F);
}

static void test_moe_grad(void **state) {
  seed(3);
  MoeCtx c = {.N = 7, .K = 2, .E = 5, .D = 6, .F = 4};
  int M = c.N * c.K;
  c.idx = ibuf(M), c.off = ibuf(c.E + 1), c.row_of = ibuf(M), c.pair_of = ibuf(M);
  /* Experts 1 and 3 get no tokens: each token picks two of {0, 2, 4}. */
  const int pairs[3][2] = {{0, 2}, {4, 0}, {2, 4}};
  for (int t = 0; t < c.N; t++)
    for (int k = 0; k < c.K; k++) c.idx[t * c.K + k] = pairs[t % 3][k];
  be->moe_sort(be, c.off, c.row_of, c.pair_of, c.idx, c.N, c.K, c.E);
  assert_int_equal(c.off[1] - c.off[0] + c.off[3] - c.off[2] + c.off[5] - c.off[4], M);
  assert_int_equal(c.off[2], c.off[1]);
  assert_int_equal(c.off[4], c.off[3]);
  c.x = rbuf((size_t)c.N * c.D, 1), c.W = rbuf((size_t)c.E * c.D * c.F, 1);
  c.w = rbuf(M, 1), c.xe = zbuf((size_t)M * c.D), c.ye = zbuf((size_t)M * c.F);
  c.y = zbuf((size_t)c.N * c.F), c.R = rbuf((size_t)c.N * c.F, 1);
  moe_obj(&c);

  real_t *dye = zbuf((size_t)M * c.F), *dw = zbuf(M), *dxe = zbuf((size_t)M * c.D);
  real_t *dx = zbuf((size_t)c.N * c.D), *dW = zbuf((size_t)c.E * c.D * c.F);
  for (size_t i = 0; i < (size_t)c.E * c.D * c.F; i++) dW[i] = 0.5; /* accumulate onto this */
  be->moe_combine_bwd(be, dye, dw, c.R, c.ye, c.w, c.row_of, c.N, c.K, c.F);
  be->grouped_gemm(be, GG_DX, dxe, dye, c.W, c.off, NULL, c.E, M, c.F, c.D);
  be->grouped_gemm(be, GG_DW, dW, c.xe, dye, c.off, c.off, c.E, M, c.F, c.D);
  be->moe_gather_bwd(be, dx, dxe, c.row_of, c.N, c.K, c.D, 0);
  for (size_t i = 0; i < (size_t)c.E * c.D * c.F; i++) {
    int e = (int)(i / ((size_t)c.D * c.F));
    if (e == 1 || e == 3) assert_true(dW[i] == 0.5); /* experts without rows untouched */
    dW[i] -= 0.5;
  }
  fd_check("moe dx", moe_obj, &c, c.x, (size_t)c.N * c.D, dx, NULL);
  fd_check("moe dW", moe_obj, &c, c.W, (size_t)c.E * c.D * c.F, dW, NULL);
  fd_check("moe dw", moe_obj, &c, c.w, M, dw, NULL);
  moe_obj(&c); /* fd_check leaves outputs of a perturbed evaluation */

  /* accumulate = 1 adds onto what is there. */
  real_t *acc = zbuf((size_t)c.N * c.D);
  for (int i = 0; i < c.N * c.D; i++) acc[i] = 1;
  be->moe_gather_bwd(be, acc, dxe, c.row_of, c.N, c.K, c.D, 1);
  for (int i = 0; i < c.N * c.D; i++) assert_true(fabs(acc[i] - (1 + dx[i])) < 1e-14);
  real_t *y2 = zbuf((size_t)c.N * c.F);
  for (int i = 0; i < c.N * c.F; i++) y2[i] = 2;
  be->moe_combine(be, y2, c.ye, c.w, c.row_of, c.N, c.K, c.F, 1);
  for (int i = 0; i < c.N * c.F; i++) assert_true(fabs(y2[i] - (2 + c.y[i])) < 1e-14);
  bfree(acc), bfree(y2);
  bfree(dye), bfree(dw), bfree(dxe), bfree(dx), bfree(dW);
  bfree(c.idx), bfree(c.off), bfree(c.row_of), bfree(c.pair_of), bfree(c.x), bfree(c.W);
  bfree(c.w), bfree(c.xe), bfree(c.ye), bfree(c.y), bfree(c.R);
}

static void test_moe_sort_stable(void **state) {
  enum { N = 6, K = 2, E = 4 };
  int32_t idx[N * K] = {2, 0, 0, 2, 3, 2, 0, 3, 2, 0, 3, 0};
  int32_t off[E + 1], row_of[N * K], pair_of[N * K];
  be->moe_sort(be, off, row_of, pair_of, idx, N, K, E);
  const int32_t want_off[E + 1] = {0, 5, 5, 9, 12};
  for (int e = 0; e <= E; e++) assert_int_equal(off[e], want_off[e]);
  /* Expert 0 gets pairs 1, 2, 6, 9, 11 in that order; expert 2: 0, 3, 5, 8; expert 3: 4, 7, 10. */
  const int32_t want_pair[N * K] = {1, 2, 6, 9, 11, 0, 3, 5, 8, 4, 7, 10};
  for (int r = 0; r < N * K; r++) {
    assert_int_equal(pair_of[r], want_pair[r]);
    assert_int_equal(row_of[pair_of[r]], r);
  }
}

/* ------------------------------------------------------------- embedding */

typedef struct {
  int N, D, V;
  int32_t *tok;
  real_t *table, *y, *R;
  float scale;
} EmbCtx;

static double emb_obj(void *p) {
  EmbCtx *c = p;
  be->embed_fwd(be, c->y, c->tok, c->table, c->N, c->D, c->scale);
  return dotr(c->y, c->R, (size_t)c->N * c->D);
}

static void test_embed(void **state) {
  seed(4);
  EmbCtx c = {.N = 9, .D = 5, .V = 6, .scale = 1.5f};
  c.tok = ibuf(c.N);
  const int32_t toks[9] = {3, 0, 3, 5, 1, 3, 0, 2, 5};
  memcpy(c.tok, toks, sizeof toks);
  c.table = rbuf((size_t)c.V * c.D, 1), c.y = zbuf((size_t)c.N * c.D), c.R = rbuf((size_t)c.N * c.D, 1);
  emb_obj(&c);
  for (int n = 0; n < c.N; n++)
    for (int d = 0; d < c.D; d++) assert_true(c.y[n * c.D + d] == 1.5 * c.table[toks[n] * c.D + d]);
  real_t *dT = zbuf((size_t)c.V * c.D);
  be->embed_bwd(be, dT, c.tok, c.R, c.N, c.D, c.V, c.scale);
  fd_check("embed dtable", emb_obj, &c, c.table, (size_t)c.V * c.D, dT, NULL);
  for (int d = 0; d < c.D; d++) assert_true(dT[4 * c.D + d] == 0); /* token 4 unused */
  bfree(c.tok), bfree(c.table), bfree(c.y), bfree(c.R), bfree(dT);
}

/* --------------------------------------------------------------- RMSNorm */

static void test_rmsnorm_small(void **state) {
  real_t x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 2, 0.5}, y[4], r;
  be->rmsnorm_fwd(be, y, &r, x, w, 1, 4, 4, 4, 0.0f);
  double rs = 1 / sqrt(7.5); /* mean of squares 30/4 */
  assert_true(fabs(r - rs) < 1e-15);
  for (int i = 0; i < 4; i++) assert_true(fabs(y[i] - x[i] * rs * w[i]) < 1e-15);
}

typedef struct {
  int N, D, ldx, ldy;
  real_t *x, *w, *y, *rstd, *R;
} NormCtx;

static double norm_obj(void *p) {
  NormCtx *c = p;
  be->rmsnorm_fwd(be, c->y, c->rstd, c->x, c->w, c->N, c->D, c->ldx, c->ldy, 1e-5f);
  double s = 0;
  for (int n = 0; n < c->N; n++) s += dotr(c->y + n * c->ldy, c->R + n * c->ldy, c->D);
  return s;
}

static void test_rmsnorm_grad(void **state) {
  seed(5);
  NormCtx c = {.N = 5, .D = 7, .ldx = 9, .ldy = 10};
  c.x = rbuf((size_t)c.N * c.ldx, 1), c.w = rbuf(c.D, 1), c.y = zbuf((size_t)c.N * c.ldy);
  c.rstd = zbuf(c.N), c.R = rbuf((size_t)c.N * c.ldy, 1);
  norm_obj(&c);
  real_t *dx = zbuf((size_t)c.N * c.ldx), *dw = zbuf(c.D), *dx2 = zbuf((size_t)c.N * c.ldx);
  for (int i = 0; i < c.N * c.ldx; i++) dx[i] = 3, dx2[i] = 3;
  be->rmsnorm_bwd(be, dx, dw, c.R, c.x, c.w, c.rstd, c.N, c.D, c.ldx, c.ldy, 0);
  be->rmsnorm_bwd(be, dx2, dw, c.R, c.x, c.w, c.rstd, c.N, c.D, c.ldx, c.ldy, 1);
  unsigned char *pad = calloc((size_t)c.N * c.ldx, 1);
  for (int n = 0; n < c.N; n++)
    for (int d = c.D; d < c.ldx; d++) {
      pad[n * c.ldx + d] = 1;
      assert_true(dx[n * c.ldx + d] == 3); /* stride padding untouched */
    }
  for (int i = 0; i < c.N * c.ldx; i++)
    if (!pad[i]) assert_true(fabs(dx2[i] - (3 + dx[i])) < 1e-14);
  for (int d = 0; d < c.D; d++) dw[d] /= 2; /* two backward calls accumulated into dw */
  fd_check("rmsnorm dx", norm_obj, &c, c.x, (size_t)c.N * c.ldx, dx, pad);
  fd_check("rmsnorm dw", norm_obj, &c, c.w, c.D, dw, NULL);
  free(pad);
  bfree(c.x), bfree(c.w), bfree(c.y), bfree(c.rstd), bfree(c.R), bfree(dx), bfree(dw), bfree(dx2);
}

/* ------------------------------------------------------------------ RoPE */

static void test_rope(void **state) {
  seed(6);
  int N = 6, T = 3, H = 2, hs = 10, off = 4, rd = 6, ldx = 22, half = 3;
  real_t *cs = zbuf((size_t)T * half), *sn = zbuf((size_t)T * half);
  for (int t = 0; t < T; t++)
    for (int i = 0; i < half; i++) {
      double a = t * pow(10000.0, -2.0 * i / rd);
      cs[t * half + i] = cos(a), sn[t * half + i] = sin(a);
    }
  real_t *x = rbuf((size_t)N * ldx, 1), *y = zbuf((size_t)N * ldx);
  memcpy(y, x, (size_t)N * ldx * sizeof(real_t));
  be->rope(be, y, cs, sn, N, T, H, ldx, hs, off, rd, 0);
  for (int n = 0; n < N; n++) {
    int t = n % T;
    for (int h = 0; h < H; h++) {
      const real_t *a = x + n * ldx + h * hs + off, *b = y + n * ldx + h * hs + off;
      double na = 0, nb = 0;
      for (int i = 0; i < half; i++) {
        double c = cs[t * half + i], s = sn[t * half + i];
        assert_true(fabs(b[i] - (a[i] * c - a[i + half] * s)) < 1e-15);
        assert_true(fabs(b[i + half] - (a[i + half] * c + a[i] * s)) < 1e-15);
        na += a[i] * a[i] + a[i + half] * a[i + half];
        nb += b[i] * b[i] + b[i + half] * b[i + half];
      }
      assert_true(fabs(na - nb) < 1e-14); /* a rotation keeps the norm */
    }
  }
  /* Columns outside the rotated ranges are untouched. */
  for (int n = 0; n < N; n++)
    for (int j = 0; j < ldx; j++) {
      int h = j / hs, c = j % hs;
      if (h >= H || c < off || c >= off + rd) assert_true(y[n * ldx + j] == x[n * ldx + j]);
    }
  /* The inverse undoes the forward, and is its transpose: <rope(x), r> = <x, rope^-1(r)>. */
  be->rope(be, y, cs, sn, N, T, H, ldx, hs, off, rd, 1);
  for (int i = 0; i < N * ldx; i++) assert_true(fabs(y[i] - x[i]) < 1e-15);
  real_t *r = rbuf((size_t)N * ldx, 1), *ri = zbuf((size_t)N * ldx);
  memcpy(y, x, (size_t)N * ldx * sizeof(real_t));
  memcpy(ri, r, (size_t)N * ldx * sizeof(real_t));
  be->rope(be, y, cs, sn, N, T, H, ldx, hs, off, rd, 0);
  be->rope(be, ri, cs, sn, N, T, H, ldx, hs, off, rd, 1);
  assert_true(fabs(dotr(y, r, (size_t)N * ldx) - dotr(x, ri, (size_t)N * ldx)) < 1e-13);
  bfree(cs), bfree(sn), bfree(x), bfree(y), bfree(r), bfree(ri);
}

/* ------------------------------------------------------------- attention */

static const int attn_cases[][7] = {
    /* B, T, Hq, Hkv, dqk, dv, window */
    {2, 5, 2, 2, 4, 4, 0},  /* MHA */
    {1, 6, 4, 2, 4, 3, 3},  /* GQA with a window */
    {2, 5, 2, 1, 12, 8, 0}, /* MLA-like head sizes, packed strides */
    {1, 7, 4, 2, 12, 8, 2}, /* all at once */
};

/* Every case runs without sinks and with random sinks of order 1 (so the
 * sink's share of each softmax is far from 0 and 1). */
static void attn_with_sinks(AttnCtx *c, int with) {
  if (with) c->sinks = rbuf(c->s.Hq, 1.5);
}

static void test_attn_forward(void **state) {
  seed(7);
  for (int with = 0; with < 2; with++)
    for (size_t ci = 0; ci < sizeof attn_cases / sizeof attn_cases[0]; ci++) {
      const int *a = attn_cases[ci];
      AttnCtx c = attn_make(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
      attn_with_sinks(&c, with);
      size_t N = (size_t)a[0] * a[1];
      double *o = malloc(N * a[2] * a[5] * sizeof(double)), *lse = malloc(N * a[2] * sizeof(double));
      attn_obj(&c);
      attn_naive(o, lse, aq(&c), ak(&c), av(&c), c.sinks, &c.s);
      for (size_t i = 0; i < N * a[2] * a[5]; i++) assert_true(fabs(c.o[i] - o[i]) < 1e-13);
      for (size_t i = 0; i < N * a[2]; i++) assert_true(fabs(c.lse[i] - lse[i]) < 1e-13);
      free(o), free(lse);
      attn_free(&c);
    }
}

/* dq, dk, dv (and dsinks, which accumulate onto what the buffer held) against
 * finite differences, without and with sinks. */
static void test_attn_grad(void **state) {
  seed(8);
  for (int with = 0; with < 2; with++)
    for (size_t ci = 0; ci < sizeof attn_cases / sizeof attn_cases[0]; ci++) {
      const int *a = attn_cases[ci];
      AttnCtx c = attn_make(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
      attn_with_sinks(&c, with);
      size_t N = (size_t)a[0] * a[1], n = N * c.width;
      attn_obj(&c);
      real_t *g = zbuf(n), *ds = NULL;
      for (size_t i = 0; i < n; i++) g[i] = 7; /* sentinel for the padding columns */
      real_t *gq = g, *gk = g + c.s.Hq * c.s.dqk, *gv = g + (c.s.Hq + c.s.Hkv) * c.s.dqk;
      if (with) {
        ds = zbuf(c.s.Hq);
        for (int h = 0; h < c.s.Hq; h++) ds[h] = 0.25;
      }
      be->attn_bwd(be, gq, gk, gv, ds, c.R, aq(&c), ak(&c), av(&c), c.o, c.lse, c.sinks, &c.s);
      unsigned char *pad = calloc(n, 1);
      for (size_t r = 0; r < N; r++)
        for (int j = c.width - 2; j < c.width; j++) {
          pad[r * c.width + j] = 1;
          assert_true(g[r * c.width + j] == 7);
        }
      fd_check("attn dqkv", attn_obj, &c, c.qkv, n, g, pad);
      if (with) {
        for (int h = 0; h < c.s.Hq; h++) ds[h] -= 0.25;
        fd_check("attn dsinks", attn_obj, &c, c.sinks, c.s.Hq, ds, NULL);
        bfree(ds);
      }
      free(pad);
      bfree(g);
      attn_free(&c);
    }
}

/* ------------------------------------------------------------------ bias */

typedef struct {
  int N, C;
  real_t *y0, *y, *b, *R;
} BiasCtx;

static double bias_obj(void *p) {
  BiasCtx *c = p;
  memcpy(c->y, c->y0, (size_t)c->N * c->C * sizeof(real_t));
  be->bias_add(be, c->y, c->b, c->N, c->C);
  return dotr(c->y, c->R, (size_t)c->N * c->C);
}

/* bias_add adds b to every row exactly; bias_grad accumulates the column sums
 * (checked by hand and as the gradient of sum(R * (y + b))). */
static void test_bias(void **state) {
  seed(17);
  BiasCtx c = {.N = 9, .C = 5};
  size_t n = (size_t)c.N * c.C;
  c.y0 = rbuf(n, 1), c.y = zbuf(n), c.b = rbuf(c.C, 1), c.R = rbuf(n, 1);
  bias_obj(&c);
  for (size_t i = 0; i < n; i++) assert_true(c.y[i] == c.y0[i] + c.b[i % c.C]);
  real_t *db = zbuf(c.C);
  for (int j = 0; j < c.C; j++) db[j] = 0.5;
  be->bias_grad(be, db, c.R, c.N, c.C);
  for (int j = 0; j < c.C; j++) {
    double want = 0.5;
    for (int r = 0; r < c.N; r++) want += c.R[(size_t)r * c.C + j];
    assert_true(fabs(db[j] - want) < 1e-14);
    db[j] -= 0.5;
  }
  fd_check("bias db", bias_obj, &c, c.b, c.C, db, NULL);
  bfree(c.y0), bfree(c.y), bfree(c.b), bfree(c.R), bfree(db);
}

/* ------------------------------------------------------ MLA kv, SwiGLU */

typedef struct {
  int N, H, dn, dr, dv, ldkr;
  real_t *kv, *kr, *k, *v, *Rk, *Rv;
} MlaCtx;

static double mla_obj(void *p) {
  MlaCtx *c = p;
  be->mla_kv_split(be, c->k, c->v, c->kv, c->kr, c->ldkr, c->N, c->H, c->dn, c->dr, c->dv);
  return dotr(c->k, c->Rk, (size_t)c->N * c->H * (c->dn + c->dr)) +
         dotr(c->v, c->Rv, (size_t)c->N * c->H * c->dv);
}

static void test_mla_kv_split_grad(void **state) {
  seed(9);
  MlaCtx c = {.N = 4, .H = 3, .dn = 5, .dr = 2, .dv = 4, .ldkr = 9};
  size_t nk = (size_t)c.N * c.H * (c.dn + c.dr), nv = (size_t)c.N * c.H * c.dv;
  c.kv = rbuf((size_t)c.N * c.H * (c.dn + c.dv), 1), c.kr = rbuf((size_t)c.N * c.ldkr, 1);
  c.k = zbuf(nk), c.v = zbuf(nv), c.Rk = rbuf(nk, 1), c.Rv = rbuf(nv, 1);
  mla_obj(&c);
  real_t *dkv = zbuf((size_t)c.N * c.H * (c.dn + c.dv)), *dkr = zbuf((size_t)c.N * c.ldkr);
  for (int i = 0; i < c.N * c.ldkr; i++) dkr[i] = 5;
  be->mla_kv_split_bwd(be, dkv, dkr, c.ldkr, c.Rk, c.Rv, c.N, c.H, c.dn, c.dr, c.dv);
  unsigned char *pad = calloc((size_t)c.N * c.ldkr, 1);
  for (int n = 0; n < c.N; n++)
    for (int d = c.dr; d < c.ldkr; d++) {
      pad[n * c.ldkr + d] = 1;
      assert_true(dkr[n * c.ldkr + d] == 5);
    }
  fd_check("mla dkv", mla_obj, &c, c.kv, (size_t)c.N * c.H * (c.dn + c.dv), dkv, NULL);
  fd_check("mla dkr", mla_obj, &c, c.kr, (size_t)c.N * c.ldkr, dkr, pad);
  free(pad);
  bfree(c.kv), bfree(c.kr), bfree(c.k), bfree(c.v), bfree(c.Rk), bfree(c.Rv), bfree(dkv), bfree(dkr);
}

typedef struct {
  int M, F;
  real_t *gu, *h, *R;
} SwiCtx;

static double swi_obj(void *p) {
  SwiCtx *c = p;
  be->swiglu_fwd(be, c->h, c->gu, c->M, c->F);
  return dotr(c->h, c->R, (size_t)c->M * c->F);
}

static void test_swiglu(void **state) {
  seed(10);
  SwiCtx c = {.M = 5, .F = 6};
  c.gu = rbuf((size_t)c.M * 2 * c.F, 3), c.h = zbuf((size_t)c.M * c.F), c.R = rbuf((size_t)c.M * c.F, 1);
  swi_obj(&c);
  for (int m = 0; m < c.M; m++)
    for (int f = 0; f < c.F; f++) {
      double g = c.gu[m * 2 * c.F + f], u = c.gu[m * 2 * c.F + c.F + f];
      assert_true(fabs(c.h[m * c.F + f] - g / (1 + exp(-g)) * u) < 1e-15);
    }
  real_t *dgu = zbuf((size_t)c.M * 2 * c.F);
  be->swiglu_bwd(be, dgu, c.R, c.gu, c.M, c.F);
  fd_check("swiglu dgu", swi_obj, &c, c.gu, (size_t)c.M * 2 * c.F, dgu, NULL);
  bfree(c.gu), bfree(c.h), bfree(c.R), bfree(dgu);
}

/* ---------------------------------------------------------------- router */

static double sigm(double z) { return 1 / (1 + exp(-z)); }

static void test_router_forward(void **state) {
  enum { E = 4, K = 2 };
  /* D = 1 and x = 1, so the logits are wg itself. Experts 1 and 2 tie exactly. */
  real_t x[1] = {1}, wg[E] = {0, 1, 1, -1}, bias[E] = {0, 0, 0, 0}, s[E], w[K], imp[E];
  int32_t idx[K], counts[E];
  be->router_fwd(be, s, idx, w, counts, imp, x, wg, bias, 1, 1, E, K, 1.0f);
  assert_int_equal(idx[0], 1);
  assert_int_equal(idx[1], 2);
  assert_true(fabs(w[0] - 0.5) < 1e-15 && fabs(w[1] - 0.5) < 1e-15);
  const int32_t want_counts[E] = {0, 1, 1, 0};
  for (int e = 0; e < E; e++) assert_int_equal(counts[e], want_counts[e]);
  double tot = 0;
  for (int e = 0; e < E; e++) tot += sigm(wg[e]);
  for (int e = 0; e < E; e++) assert_true(fabs(imp[e] - sigm(wg[e]) / tot) < 1e-15);

  /* A bias lifts expert 0 (0.5 + 0.5 = 1.0 > 0.731); weights stay unbiased. route_scale
   * multiplies the logits before the sigmoid. */
  bias[0] = 0.5;
  be->router_fwd(be, s, idx, w, counts, NULL, x, wg, bias, 1, 1, E, K, 1.0f);
  assert_int_equal(idx[0], 0);
  assert_int_equal(idx[1], 1);
  assert_true(fabs(w[0] - 0.5 / (0.5 + sigm(1))) < 1e-15);
  bias[0] = 0;
  bias[3] = 0.9; /* sigmoid(-2) + 0.9 = 1.019 beats sigmoid(2) = 0.881 */
  be->router_fwd(be, s, idx, w, counts, NULL, x, wg, bias, 1, 1, E, K, 2.0f);
  for (int e = 0; e < E; e++) assert_true(fabs(s[e] - sigm(2 * wg[e])) < 1e-15);
  assert_int_equal(idx[0], 3);
  assert_int_equal(idx[1], 1);
  assert_true(fabs(w[0] + w[1] - 1) < 1e-15);

  /* Random rows: descending biased score, weights sum to 1, counts add up. */
  seed(11);
  int N = 20, D = 6, E2 = 7, K2 = 3;
  real_t *X = rbuf((size_t)N * D, 1), *WG = rbuf((size_t)E2 * D, 1), *Bs = rbuf(E2, 0.2);
  real_t *S = zbuf((size_t)N * E2), *Wt = zbuf((size_t)N * K2);
  int32_t *Ix = ibuf((size_t)N * K2), *C = ibuf(E2);
  be->router_fwd(be, S, Ix, Wt, C, NULL, X, WG, Bs, N, D, E2, K2, 1.0f);
  int total = 0;
  for (int e = 0; e < E2; e++) total += C[e];
  assert_int_equal(total, N * K2);
  for (int t = 0; t < N; t++) {
    double ws = 0, kth = INFINITY;
    for (int k = 0; k < K2; k++) {
      int e = Ix[t * K2 + k];
      double b = S[t * E2 + e] + Bs[e];
      assert_true(b <= kth);
      kth = b;
      ws += Wt[t * K2 + k];
    }
    assert_true(fabs(ws - 1) < 1e-14);
    for (int e = 0; e < E2; e++) { /* no unchosen expert beats the k-th */
      int chosen = 0;
      for (int k = 0; k < K2; k++) chosen |= Ix[t * K2 + k] == e;
      if (!chosen) assert_true(S[t * E2 + e] + Bs[e] <= kth);
    }
  }
  bfree(X), bfree(WG), bfree(Bs), bfree(S), bfree(Wt), bfree(Ix), bfree(C);
}

typedef struct {
  int N, D, E, K;
  float route_scale, aux;
  real_t *x, *wg, *bias, *s, *w, *Rw, *f;
  int32_t *idx, *idx0, *counts;
} RouterCtx;

/* L = sum w * Rw + aux * sum_t sum_e f_e s_te / sum_e s_te. */
static double router_obj(void *p) {
  RouterCtx *c = p;
  be->router_fwd(be, c->s, c->idx, c->w, c->counts, NULL, c->x, c->wg, c->bias, c->N, c->D, c->E,
                 c->K, c->route_scale);
  /* Finite differences are only valid while the selection stays put. */
  assert_memory_equal(c->idx, c->idx0, (size_t)c->N * c->K * sizeof(int32_t));
  double L = dotr(c->w, c->Rw, (size_t)c->N * c->K);
  for (int t = 0; t < c->N; t++) {
    const real_t *s = c->s + (size_t)t * c->E;
    double row = 0, fs = 0;
    for (int e = 0; e < c->E; e++) row += s[e], fs += c->f[e] * s[e];
    L += c->aux * fs / row;
  }
  return L;
}

static void test_router_grad(void **state) {
  seed(12);
  for (int with_aux = 0; with_aux < 2; with_aux++) {
    RouterCtx c = {.N = 6, .D = 5, .E = 5, .K = 2, .route_scale = 2.5f, .aux = with_aux ? 0.3f : 0};
    c.x = rbuf((size_t)c.N * c.D, 1), c.wg = rbuf((size_t)c.E * c.D, 0.5), c.bias = rbuf(c.E, 0.1);
    c.s = zbuf((size_t)c.N * c.E), c.w = zbuf((size_t)c.N * c.K), c.Rw = rbuf((size_t)c.N * c.K, 1);
    c.f = rbuf(c.E, 1);
    for (int e = 0; e < c.E; e++) c.f[e] = fabs(c.f[e]);
    c.idx = ibuf((size_t)c.N * c.K), c.idx0 = ibuf((size_t)c.N * c.K), c.counts = ibuf(c.E);
    be->router_fwd(be, c.s, c.idx0, c.w, c.counts, NULL, c.x, c.wg, c.bias, c.N, c.D, c.E, c.K,
                   c.route_scale);
    real_t *dx = zbuf((size_t)c.N * c.D), *dwg = zbuf((size_t)c.E * c.D);
    for (int i = 0; i < c.N * c.D; i++) dx[i] = 1; /* both accumulate */
    for (int i = 0; i < c.E * c.D; i++) dwg[i] = -1;
    be->router_bwd(be, dx, dwg, c.Rw, c.s, c.idx0, c.x, c.wg, c.N, c.D, c.E, c.K, c.route_scale,
                   c.aux, c.f);
    for (int i = 0; i < c.N * c.D; i++) dx[i] -= 1;
    for (int i = 0; i < c.E * c.D; i++) dwg[i] += 1;
    fd_check("router dx", router_obj, &c, c.x, (size_t)c.N * c.D, dx, NULL);
    fd_check("router dwg", router_obj, &c, c.wg, (size_t)c.E * c.D, dwg, NULL);
    bfree(c.x), bfree(c.wg), bfree(c.bias), bfree(c.s), bfree(c.w), bfree(c.Rw), bfree(c.f);
    bfree(c.idx), bfree(c.idx0), bfree(c.counts), bfree(dx), bfree(dwg);
  }
}

/* ------------------------------------------------------------------ xent */

typedef struct {
  int N, D, V, mask;
  float scale, gs;
  real_t *h, *W;
  int32_t *tg;
} XentCtx;

static double xent_obj(void *p) {
  XentCtx *c = p;
  return c->gs * be->xent(be, NULL, NULL, c->h, c->W, c->tg, c->N, c->D, c->V, c->scale, c->mask,
                          c->gs);
}

static void test_xent(void **state) {
  seed(13);
  /* N > 64 rows: more than one chunk. */
  XentCtx c = {.N = 70, .D = 5, .V = 11, .mask = 3, .scale = 0.9f, .gs = 0.7f};
  c.h = rbuf((size_t)c.N * c.D, 1.5), c.W = rbuf((size_t)c.V * c.D, 1.5), c.tg = ibuf(c.N);
  /* Most rows masked, in both chunks: few loss terms keep L, and with it the
   * rounding noise of the finite differences, small. */
  for (int n = 0; n < c.N; n++) c.tg[n] = n % 8 == 0 ? (n * 7 + 2) % c.V : c.mask;
  /* Direct log-sum-exp over the full logits. */
  double want = 0;
  for (int n = 0; n < c.N; n++) {
    if (c.tg[n] == c.mask) continue;
    double lg[11], mx = -INFINITY, se = 0;
    for (int v = 0; v < c.V; v++) {
      lg[v] = c.scale * dotr(c.h + n * c.D, c.W + v * c.D, c.D);
      mx = fmax(mx, lg[v]);
    }
    for (int v = 0; v < c.V; v++) se += exp(lg[v] - mx);
    want += mx + log(se) - lg[c.tg[n]];
  }
  double got = be->xent(be, NULL, NULL, c.h, c.W, c.tg, c.N, c.D, c.V, c.scale, c.mask, c.gs);
  assert_true(fabs(got - want) < 1e-12 * fabs(want));
  /* No mask: every row counts. */
  double all = be->xent(be, NULL, NULL, c.h, c.W, c.tg, c.N, c.D, c.V, c.scale, -1, 1);
  assert_true(all > got);

  real_t *dh = zbuf((size_t)c.N * c.D), *dW = zbuf((size_t)c.V * c.D), *dW0 = rbuf((size_t)c.V * c.D, 1);
  memcpy(dW, dW0, (size_t)c.V * c.D * sizeof(real_t));
  double l2 = be->xent(be, dh, dW, c.h, c.W, c.tg, c.N, c.D, c.V, c.scale, c.mask, c.gs);
  assert_true(l2 == got);
  for (int i = 0; i < c.V * c.D; i++) dW[i] -= dW0[i];
  for (int n = 0; n < c.N; n++)
    if (c.tg[n] == c.mask)
      for (int d = 0; d < c.D; d++) assert_true(dh[n * c.D + d] == 0);
  fd_check("xent dh", xent_obj, &c, c.h, (size_t)c.N * c.D, dh, NULL);
  fd_check("xent dW", xent_obj, &c, c.W, (size_t)c.V * c.D, dW, NULL);
  bfree(c.h), bfree(c.W), bfree(c.tg), bfree(dh), bfree(dW), bfree(dW0);
}

/* ----------------------------------------------------------- optimizer etc */

static void test_adamw(void **state) {
  seed(14);
  enum { n = 9 };
  for (int variant = 0; variant < 3; variant++) { /* no wd; wd; wd with master */
    AdamParams ap = {.lr = 0.01f, .b1 = 0.9f, .b2 = 0.95f, .eps = 1e-8f, .wd = variant ? 0.1f : 0,
                     .grad_scale = 0.5f, .stochastic_seed = 0};
    int t = 3;
    ap.bc1 = 1 - pow(ap.b1, t), ap.bc2 = 1 - pow(ap.b2, t);
    real_t *p = rbuf(n, 1), *g = rbuf(n, 1), *m = rbuf(n, 0.1), *v = rbuf(n, 0.1);
    real_t *master = variant == 2 ? rbuf(n, 1) : NULL;
    for (int i = 0; i < n; i++) v[i] = fabs(v[i]);
    real_t p0[n], m0[n], v0[n], x0[n];
    memcpy(p0, p, sizeof p0), memcpy(m0, m, sizeof m0), memcpy(v0, v, sizeof v0);
    memcpy(x0, master ? master : p, sizeof x0);
    be->adamw(be, p, master, g, m, v, n, &ap);
    double lr = ap.lr, b1 = ap.b1, b2 = ap.b2, eps = ap.eps, wd = ap.wd;
    for (int i = 0; i < n; i++) {
      double gi = (double)g[i] * ap.grad_scale;
      double mi = b1 * m0[i] + (1 - b1) * gi, vi = b2 * v0[i] + (1 - b2) * gi * gi;
      double x = x0[i] * (1 - lr * wd);
      x -= lr * (mi / ap.bc1) / (sqrt(vi / ap.bc2) + eps);
      assert_true(fabs(m[i] - mi) < 1e-15);
      assert_true(fabs(v[i] - vi) < 1e-15);
      assert_true(fabs(p[i] - x) < 1e-14);
      if (master) assert_true(master[i] == p[i]);
      if (variant == 0) assert_true(p[i] != p0[i]);
    }
    bfree(p), bfree(g), bfree(m), bfree(v);
    if (master) bfree(master);
  }
}

static void test_sumsq_add(void **state) {
  real_t x[3] = {1, -2, 3};
  assert_true(be->sumsq(be, x, 3) == 14);
  seed(15);
  size_t n = 10007; /* several chunks plus a tail */
  real_t *a = rbuf(n, 1), *b = rbuf(n, 1), *y = zbuf(n);
  double want = 0;
  for (size_t i = 0; i < n; i++) want += (double)a[i] * a[i];
  assert_true(fabs(be->sumsq(be, a, n) - want) < 1e-12 * want);
  be->add(be, y, a, b, n);
  for (size_t i = 0; i < n; i++) assert_true(y[i] == a[i] + b[i]);
  be->add(be, a, a, b, n); /* aliasing */
  for (size_t i = 0; i < n; i++) assert_true(a[i] == y[i]);
  bfree(a), bfree(b), bfree(y);
}

static void test_memory(void **state) {
  float host[5] = {1.5f, -2, 0, 3.25f, 1e-3f}, back[5];
  real_t *p = be->alloc(be, 5 * be->size[BUF_ACT]);
  for (int i = 0; i < 5; i++) assert_true(p[i] == 0); /* zero-filled */
  be->put(be, p, BUF_ACT, host, 5);
  for (int i = 0; i < 5; i++) assert_true(p[i] == (real_t)host[i]);
  be->get(be, back, BUF_F32, p, 5);
  assert_memory_equal(back, host, sizeof host);
  real_t *q = be->alloc(be, 5 * sizeof(real_t));
  be->copy(be, q, p, 5 * sizeof(real_t));
  assert_memory_equal(q, p, 5 * sizeof(real_t));
  be->zero(be, q, 5 * sizeof(real_t));
  for (int i = 0; i < 5; i++) assert_true(q[i] == 0);
  assert_int_equal(be->size[BUF_ACT], sizeof(double));
  assert_int_equal(be->size[BUF_I32], 4);
  bfree(p), bfree(q);
}

static void test_backend_open(void **state) {
  Backend *b = backend_open("cpu", 0);
  assert_string_equal(b->name, "cpu");
  b->destroy(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_memory),
      cmocka_unit_test(test_gemm_small),
      cmocka_unit_test(test_gemm_tiles),
      cmocka_unit_test(test_gemm_grad),
      cmocka_unit_test(test_moe_sort_stable),
      cmocka_unit_test(test_moe_grad),
      cmocka_unit_test(test_embed),
      cmocka_unit_test(test_rmsnorm_small),
      cmocka_unit_test(test_rmsnorm_grad),
      cmocka_unit_test(test_rope),
      cmocka_unit_test(test_attn_forward),
      cmocka_unit_test(test_attn_grad),
      cmocka_unit_test(test_bias),
      cmocka_unit_test(test_mla_kv_split_grad),
      cmocka_unit_test(test_swiglu),
      cmocka_unit_test(test_router_forward),
      cmocka_unit_test(test_router_grad),
      cmocka_unit_test(test_xent),
      cmocka_unit_test(test_adamw),
      cmocka_unit_test(test_sumsq_add),
      cmocka_unit_test(test_determinism),
      cmocka_unit_test(test_backend_open),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
