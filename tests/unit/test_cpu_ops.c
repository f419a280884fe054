/* test_cpu_ops.c: smoke checks of the CPU backend as the trainer builds it
 * (real_t = float): forward results agree with double-precision references to
 * 1e-5 relative (measured against the size of the terms summed), and every op
 * gives bit-identical results for any thread count. The gradient formulas are
 * checked by finite differences in test_cpu_ops_f64.c: the same source. */
#include "cpu_test_util.h"

/* |got - want| within 1e-5 of max(|want|, mag), mag the size of the terms summed. */
static void expect_close(const char *what, size_t i, double got, double want, double mag) {
  if (fabs(got - want) <= 1e-5 * fmax(fabs(want), mag)) return;
  print_error("%s[%zu]: float %.9g double %.9g\n", what, i, got, want);
  fail();
}

static void test_memory(void **state) {
  assert_int_equal(be->size[BUF_ACT], 4);
  assert_int_equal(be->size[BUF_F32], 4);
  assert_int_equal(be->size[BUF_I32], 4);
  float host[3] = {1.5f, -2e-7f, 3e8f}, back[3];
  void *p = be->alloc(be, sizeof host);
  be->put(be, p, BUF_ACT, host, 3);
  be->get(be, back, BUF_ACT, p, 3);
  assert_memory_equal(back, host, sizeof host);
  bfree(p);
}

static void test_gemm(void **state) { check_gemm_transposes(21, 1e-5, 0); }

static void test_attention(void **state) {
  seed(22);
  const int cases[][7] = {{2, 9, 4, 2, 12, 8, 0}, {1, 11, 2, 1, 16, 16, 4}};
  for (int ci = 0; ci < 2; ci++) {
    const int *a = cases[ci];
    AttnCtx c = attn_make(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
    size_t N = (size_t)a[0] * a[1], no = N * a[2] * a[5], nl = N * a[2];
    double *o = malloc(no * sizeof(double)), *lse = malloc(nl * sizeof(double));
    attn_obj(&c);
    attn_naive(o, lse, aq(&c), ak(&c), av(&c), NULL, &c.s);
    for (size_t i = 0; i < no; i++) expect_close("attn o", i, c.o[i], o[i], 1.5);
    for (size_t i = 0; i < nl; i++) expect_close("attn lse", i, c.lse[i], lse[i], 1);
    free(o), free(lse);
    attn_free(&c);
  }
}

/* Loss, dh and dW of the fused lm_head + cross-entropy against double loops. */
static void test_xent(void **state) {
  seed(23);
  int N = 100, D = 16, V = 300, mask = 5;
  float scale = 0.5f, gs = 0.25f;
  real_t *h = rbuf((size_t)N * D, 1), *W = rbuf((size_t)V * D, 1);
  real_t *dh = zbuf((size_t)N * D), *dW = zbuf((size_t)V * D);
  int32_t *tg = ibuf(N);
  for (int n = 0; n < N; n++) tg[n] = (n * 13) % V;
  double *gh = calloc((size_t)N * D, sizeof(double)), *gW = calloc((size_t)V * D, sizeof(double));
  double *p = malloc((size_t)V * sizeof(double)), want = 0;
  for (int n = 0; n < N; n++) {
    if (tg[n] == mask) continue;
    double mx = -INFINITY, se = 0;
    for (int v = 0; v < V; v++) {
      p[v] = scale * dotr(h + n * D, W + v * D, D);
      mx = fmax(mx, p[v]);
    }
    for (int v = 0; v < V; v++) se += exp(p[v] - mx);
    want += mx + log(se) - p[tg[n]];
    for (int v = 0; v < V; v++) {
      double g = gs * (exp(p[v] - mx) / se - (v == tg[n]));
      for (int d = 0; d < D; d++) {
        gh[n * D + d] += scale * g * W[v * D + d];
        gW[v * D + d] += scale * g * h[n * D + d];
      }
    }
  }
  double got = be->xent(be, dh, dW, h, W, tg, N, D, V, scale, mask, gs);
  expect_close("xent loss", 0, got, want, 0);
  double mh = 0, mw = 0;
  for (int i = 0; i < N * D; i++) mh = fmax(mh, fabs(gh[i]));
  for (int i = 0; i < V * D; i++) mw = fmax(mw, fabs(gW[i]));
  for (int i = 0; i < N * D; i++) expect_close("xent dh", i, dh[i], gh[i], mh);
  for (int i = 0; i < V * D; i++) expect_close("xent dW", i, dW[i], gW[i], mw);
  free(gh), free(gW), free(p);
  bfree(h), bfree(W), bfree(dh), bfree(dW), bfree(tg);
}

/* Router scores and choices, RMSNorm and SwiGLU outputs against double loops. */
static void test_router_norm_swiglu(void **state) {
  seed(24);
  int N = 16, D = 12, E = 8, K = 2;
  real_t *x = rbuf((size_t)N * D, 1), *wg = rbuf((size_t)E * D, 1), *bias = rbuf(E, 0.05);
  real_t *s = zbuf((size_t)N * E), *w = zbuf((size_t)N * K), *imp = zbuf(E);
  int32_t *idx = ibuf((size_t)N * K), *cnt = ibuf(E);
  be->router_fwd(be, s, idx, w, cnt, imp, x, wg, bias, N, D, E, K, 1.5f);
  for (int t = 0; t < N; t++) {
    for (int e = 0; e < E; e++) {
      double z = 1.5 * dotr(x + t * D, wg + e * D, D);
      expect_close("router score", (size_t)t * E + e, s[t * E + e], 1 / (1 + exp(-z)), 0);
    }
    double wsum = 0;
    for (int k = 0; k < K; k++) wsum += w[t * K + k];
    expect_close("router weight sum", (size_t)t, wsum, 1, 0);
  }
  real_t *y = zbuf((size_t)N * D), *nw = rbuf(D, 1), *rs = zbuf(N);
  be->rmsnorm_fwd(be, y, rs, x, nw, N, D, D, D, 1e-5f);
  for (int n = 0; n < N; n++) {
    double r = 1 / sqrt(dotr(x + n * D, x + n * D, D) / D + 1e-5);
    for (int d = 0; d < D; d++)
      expect_close("rmsnorm", (size_t)n * D + d, y[n * D + d], x[n * D + d] * r * nw[d], r);
  }
  real_t *hh = zbuf((size_t)N * (D / 2));
  be->swiglu_fwd(be, hh, x, N, D / 2); /* x rows read as [gate | up] */
  for (int n = 0; n < N; n++)
    for (int f = 0; f < D / 2; f++) {
      double g = x[n * D + f], u = x[n * D + D / 2 + f];
      expect_close("swiglu", (size_t)n * (D / 2) + f, hh[n * (D / 2) + f], g / (1 + exp(-g)) * u, 1);
    }
  bfree(x), bfree(wg), bfree(bias), bfree(s), bfree(w), bfree(imp), bfree(idx), bfree(cnt);
  bfree(y), bfree(nw), bfree(rs), bfree(hh);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_memory),
      cmocka_unit_test(test_gemm),
      cmocka_unit_test(test_attention),
      cmocka_unit_test(test_xent),
      cmocka_unit_test(test_router_norm_swiglu),
      cmocka_unit_test(test_determinism),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
