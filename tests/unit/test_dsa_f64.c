/* test_dsa_f64.c: the DSA ops of the CPU backend in double precision (naive
 * loops and central finite differences), and the whole model with attn = dsa
 * (sparse and dense_warmup) against finite differences of its objectives.
 *
 * Op gradients: L = sum(out * R) with a fixed random R, each input moved by
 * +-1e-6; |analytic - numeric| < 1e-6 * max(|analytic|, |numeric|, 1e-2) as in
 * test_cpu_ops_f64.c (the same noise analysis applies). The indexer's ReLU and
 * the top-k are not smooth: inputs whose dot products lie within 1e-4 of 0
 * are not perturbed (the check reports how many), and the selection is held
 * fixed (it is an input of the sparse ops). */
#include <sys/wait.h>
#include <unistd.h>

/* the shared helpers this file does not use are not errors */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu_test_util.h"

#include "core/config.h"
#include "core/rng.h"
#include "model/model.h"
#include "model_test_util.h"

/* ------------------------------------------------------------ attention over a key list */

/* Random scores [B, T, T] and their top-k lists (the selection under test). */
static int32_t *random_sel(int B, int T, int K) {
  real_t *sc = rbuf((size_t)B * T * T, 1);
  int32_t *sel = ibuf((size_t)B * T * K);
  be->dsa_topk(be, sel, sc, B, T, K);
  bfree(sc);
  return sel;
}

typedef struct {
  AttnCtx a;
  int32_t *sel;
  int K;
} SelCtx;

static double sel_obj(void *p) {
  SelCtx *c = p;
  be->attn_sel_fwd(be, c->a.o, c->a.lse, aq(&c->a), ak(&c->a), av(&c->a), c->sel, c->K, &c->a.s);
  return dotr(c->a.o, c->a.R, (size_t)c->a.s.B * c->a.s.T * c->a.s.Hq * c->a.s.dv);
}

/* attn_sel_fwd against a naive masked softmax, and its backward against FD. */
static void test_attn_sel(void **state) {
  seed(3);
  SelCtx c = {.a = attn_make(2, 9, 4, 2, 6, 5, 0), .K = 4};
  c.sel = random_sel(2, 9, 4);
  const AttnShape *s = &c.a.s;
  const size_t N = (size_t)s->B * s->T;
  sel_obj(&c);
  for (int b = 0; b < s->B; b++)
    for (int h = 0; h < s->Hq; h++)
      for (int i = 0; i < s->T; i++) {
        const int32_t *row = c.sel + ((size_t)b * s->T + i) * c.K;
        double z[9], mx = -INFINITY, sum = 0;
        int nk = 0;
        for (int x = 0; x < c.K; x++) {
          if (row[x] < 0) continue;
          assert_true(row[x] <= i && (x == 0 || row[x] > row[x - 1]));
          const real_t *qi = aq(&c.a) + ((size_t)b * s->T + i) * s->ldq + h * s->dqk;
          const real_t *kj = ak(&c.a) + ((size_t)b * s->T + row[x]) * s->ldk + (h / 2) * s->dqk;
          z[nk] = s->scale * dotr(qi, kj, s->dqk);
          mx = fmax(mx, z[nk++]);
        }
        assert_int_equal(nk, i + 1 < c.K ? i + 1 : c.K);
        for (int x = 0; x < nk; x++) sum += exp(z[x] - mx);
        assert_true(fabs(c.a.lse[((size_t)b * s->Hq + h) * s->T + i] - (mx + log(sum))) < 1e-12);
        for (int d = 0; d < s->dv; d++) {
          double acc = 0;
          for (int x = 0; x < nk; x++)
            acc += exp(z[x] - mx) / sum *
                   av(&c.a)[((size_t)b * s->T + row[x]) * s->ldv + (h / 2) * s->dv + d];
          assert_true(fabs(c.a.o[((size_t)b * s->T + i) * s->Hq * s->dv + h * s->dv + d] - acc) < 1e-12);
        }
      }
  real_t *g = zbuf(N * c.a.width);
  be->attn_sel_bwd(be, g, g + s->Hq * s->dqk, g + (s->Hq + s->Hkv) * s->dqk, c.a.R, aq(&c.a),
                   ak(&c.a), av(&c.a), c.a.o, c.a.lse, c.sel, c.K, s);
  unsigned char *pad = calloc(N * c.a.width, 1);
  for (size_t n = 0; n < N; n++) pad[n * c.a.width + c.a.width - 1] = pad[n * c.a.width + c.a.width - 2] = 1;
  fd_check("attn_sel dqkv", sel_obj, &c, c.a.qkv, N * c.a.width, g, pad);
  free(pad);
  bfree(g), bfree(c.sel);
  attn_free(&c.a);
}

/* With every causal key listed (K >= T), the key-list ops give attn_fwd's and
 * attn_bwd's results bit for bit. */
static void test_attn_sel_full_equals_dense(void **state) {
  seed(4);
  AttnCtx c = attn_make(2, 7, 2, 1, 5, 3, 0);
  const int K = 9;
  int32_t *sel = random_sel(2, 7, K);
  const size_t N = 14, no = N * 2 * 3;
  real_t *o2 = zbuf(no), *l2 = zbuf(N * 2), *g1 = zbuf(N * c.width), *g2 = zbuf(N * c.width);
  attn_obj(&c);
  be->attn_sel_fwd(be, o2, l2, aq(&c), ak(&c), av(&c), sel, K, &c.s);
  assert_memory_equal(c.o, o2, no * sizeof(real_t));
  assert_memory_equal(c.lse, l2, N * 2 * sizeof(real_t));
  const int qo = c.s.Hq * c.s.dqk, vo = (c.s.Hq + c.s.Hkv) * c.s.dqk;
  be->attn_bwd(be, g1, g1 + qo, g1 + vo, NULL, c.R, aq(&c), ak(&c), av(&c), c.o, c.lse, NULL, &c.s);
  be->attn_sel_bwd(be, g2, g2 + qo, g2 + vo, c.R, aq(&c), ak(&c), av(&c), c.o, c.lse, sel, K, &c.s);
  assert_memory_equal(g1, g2, N * c.width * sizeof(real_t));
  bfree(sel), bfree(o2), bfree(l2), bfree(g1), bfree(g2);
  attn_free(&c);
}

/* ------------------------------------------------------------ indexer */

typedef struct {
  int B, T, Hi, di;
  real_t *q, *k, *w, *score, *R;
} IdxCtx;

static double idx_obj(void *p) {
  IdxCtx *c = p;
  be->dsa_index_fwd(be, c->score, c->q, c->k, c->w, c->B, c->T, c->Hi, c->di);
  double acc = 0; /* causal entries only: the others are never read */
  for (int n = 0; n < c->B * c->T; n++)
    for (int s = 0; s <= n % c->T; s++) acc += c->score[(size_t)n * c->T + s] * c->R[(size_t)n * c->T + s];
  return acc;
}

/* Index scores against a naive loop; the backward against FD (inputs next
 * to a ReLU kink are skipped). */
static void test_index_scores(void **state) {
  seed(5);
  IdxCtx c = {.B = 2, .T = 6, .Hi = 3, .di = 4};
  const size_t N = 12;
  c.q = rbuf(N * c.Hi * c.di, 1), c.k = rbuf(N * c.di, 1), c.w = rbuf(N * c.Hi, 1);
  c.score = rbuf(N * c.T, 1), c.R = rbuf(N * c.T, 1);
  idx_obj(&c);
  unsigned char *skq = calloc(N * c.Hi * c.di, 1), *skk = calloc(N * c.di, 1);
  int kinks = 0;
  for (size_t n = 0; n < N; n++) {
    const int t = (int)(n % c.T);
    for (int s = 0; s < c.T; s++) {
      double want = 0;
      for (int j = 0; s <= t && j < c.Hi; j++) {
        double d = dotr(c.q + (n * c.Hi + j) * c.di, c.k + (n - t + s) * c.di, c.di);
        want += c.w[n * c.Hi + j] * fmax(d, 0);
        if (fabs(d) < 1e-4) { /* a kink: perturbing these elements may cross it */
          kinks++;
          memset(skq + (n * c.Hi + j) * c.di, 1, c.di);
          memset(skk + (n - t + s) * c.di, 1, c.di);
        }
      }
      assert_true(fabs(c.score[n * c.T + s] - want) < 1e-12);
    }
  }
  assert_true(kinks < 3);
  real_t *dq = zbuf(N * c.Hi * c.di), *dk = zbuf(N * c.di), *dw = zbuf(N * c.Hi);
  real_t *dI = zbuf(N * c.T);
  memcpy(dI, c.R, N * c.T * sizeof(real_t));
  for (size_t n = 0; n < N; n++) /* entries s > t must be ignored */
    for (int s = (int)(n % c.T) + 1; s < c.T; s++) dI[n * c.T + s] = 1e3;
  be->dsa_index_bwd(be, dq, dk, dw, dI, c.q, c.k, c.w, c.B, c.T, c.Hi, c.di);
  fd_check("index dq", idx_obj, &c, c.q, N * c.Hi * c.di, dq, skq);
  fd_check("index dk", idx_obj, &c, c.k, N * c.di, dk, skk);
  fd_check("index dw", idx_obj, &c, c.w, N * c.Hi, dw, NULL);
  free(skq), free(skk);
  bfree(c.q), bfree(c.k), bfree(c.w), bfree(c.score), bfree(c.R), bfree(dq), bfree(dk), bfree(dw);
  bfree(dI);
}

/* Top-k against brute force: the set is the K best (ties to the earlier
 * key), listed ascending, -1 padded; short rows list every key. */
static void test_topk(void **state) {
  seed(6);
  const int B = 2, T = 11, K = 4;
  real_t *sc = rbuf((size_t)B * T * T, 1);
  for (int i = 0; i < B * T * T; i += 3) sc[i] = 0.25; /* ties */
  int32_t *sel = ibuf((size_t)B * T * K);
  be->dsa_topk(be, sel, sc, B, T, K);
  for (int n = 0; n < B * T; n++) {
    const int t = n % T;
    const real_t *row = sc + (size_t)n * T;
    const int32_t *out = sel + (size_t)n * K;
    int want[T], nw = 0;
    for (int s = 0; s <= t; s++) {
      int rank = 0; /* keys that beat s: higher score, or equal and earlier */
      for (int u = 0; u <= t; u++) rank += row[u] > row[s] || (row[u] == row[s] && u < s);
      if (rank < K) want[nw++] = s;
    }
    for (int x = 0; x < K; x++) assert_int_equal(out[x], x < nw ? want[x] : -1);
  }
  bfree(sc), bfree(sel);
}

/* attn_dist: the head average of the attention probabilities (naive from the
 * forward's scores), rows summing to 1 on the keys the attention saw. */
static void test_attn_dist(void **state) {
  seed(7);
  for (int sparse = 0; sparse < 2; sparse++) {
    AttnCtx c = attn_make(2, 8, 4, 2, 5, 3, 0);
    const int K = 3, T = 8, Hq = 4;
    int32_t *sel = sparse ? random_sel(2, T, K) : NULL;
    real_t *p = zbuf((size_t)2 * T * T);
    if (sel) be->attn_sel_fwd(be, c.o, c.lse, aq(&c), ak(&c), av(&c), sel, K, &c.s);
    else attn_obj(&c);
    be->dsa_attn_dist(be, p, aq(&c), ak(&c), c.lse, sel, K, &c.s);
    for (int n = 0; n < 2 * T; n++) {
      const int t = n % T, b = n / T;
      double sum = 0;
      for (int s = 0; s < T; s++) {
        int seen = s <= t;
        if (sel) {
          seen = 0;
          for (int x = 0; x < K; x++) seen |= sel[n * K + x] == s;
        }
        double want = 0;
        for (int h = 0; seen && h < Hq; h++) {
          double z = c.s.scale * dotr(aq(&c) + (size_t)n * c.s.ldq + h * 5,
                                      ak(&c) + ((size_t)b * T + s) * c.s.ldk + (h / 2) * 5, 5);
          want += exp(z - c.lse[((size_t)b * Hq + h) * T + t]) / Hq;
        }
        assert_true(fabs(p[(size_t)n * T + s] - want) < 1e-12);
        sum += p[(size_t)n * T + s];
      }
      assert_true(fabs(sum - 1) < 1e-12);
    }
    if (sel) bfree(sel);
    bfree(p);
    attn_free(&c);
  }
}

typedef struct {
  int B, T, K;
  int32_t *sel;
  real_t *score, *p, *d;
} KlCtx;

static double kl_obj(void *ctx) {
  KlCtx *c = ctx;
  return be->dsa_kl(be, c->d, c->score, c->p, c->sel, c->K, c->B, c->T, 1);
}

/* KL value against a naive sum, dscore against FD, and in place (alias). */
static void test_kl(void **state) {
  seed(8);
  for (int sparse = 0; sparse < 2; sparse++) {
    KlCtx c = {.B = 2, .T = 7, .K = 3};
    const size_t N = 14, TT = N * c.T;
    c.score = rbuf(TT, 2), c.p = zbuf(TT), c.d = zbuf(TT);
    c.sel = sparse ? random_sel(c.B, c.T, c.K) : NULL;
    /* p: a random distribution on each row's candidates; one zero entry */
    double want = 0;
    for (size_t n = 0; n < N; n++) {
      const int t = (int)(n % c.T);
      int key[7], nk = 0;
      for (int s = 0; s <= t; s++) {
        int in = !c.sel;
        for (int x = 0; c.sel && x < c.K; x++) in |= c.sel[n * c.K + x] == s;
        if (in) key[nk++] = s;
      }
      double tot = 0, z = 0;
      for (int x = 0; x < nk; x++) tot += c.p[n * c.T + key[x]] = x == 1 ? 0 : 0.5 + 0.5 * urand();
      for (int x = 0; x < nk; x++) c.p[n * c.T + key[x]] /= tot;
      for (int x = 0; x < nk; x++) z += exp(c.score[n * c.T + key[x]]);
      for (int x = 0; x < nk; x++) {
        double ps = c.p[n * c.T + key[x]];
        if (ps > 0) want += ps * (log(ps) - (c.score[n * c.T + key[x]] - log(z)));
      }
    }
    double got = kl_obj(&c);
    assert_true(fabs(got - want) < 1e-12 * fmax(1, fabs(want)));
    real_t *g = zbuf(TT);
    memcpy(g, c.d, TT * sizeof(real_t));
    fd_check("kl dscore", kl_obj, &c, c.score, TT, g, NULL);
    real_t *alias = zbuf(TT);
    memcpy(alias, c.score, TT * sizeof(real_t));
    be->dsa_kl(be, alias, alias, c.p, c.sel, c.K, c.B, c.T, 0.5f);
    for (size_t i = 0; i < TT; i++) assert_true(fabs(alias[i] - 0.5 * g[i]) < 1e-15);
    bfree(g), bfree(alias), bfree(c.score), bfree(c.p), bfree(c.d);
    if (c.sel) bfree(c.sel);
  }
}

/* The DSA ops give bit-identical results with 1 and 3 threads. */
static void dsa_ops_run(int threads, real_t *out, int32_t *sel_out) {
  omp_set_num_threads(threads);
  seed(9);
  const int B = 2, T = 10, Hi = 3, di = 4, K = 4;
  const size_t N = 20, TT = N * T;
  AttnCtx c = attn_make(B, T, 2, 1, di, 3, 0);
  real_t *q = rbuf(N * Hi * di, 1), *k = rbuf(N * di, 1), *w = rbuf(N * Hi, 1);
  real_t *sc = out, *p = out + TT, *g = out + 2 * TT, *o = out + 3 * TT; /* o: rest */
  be->dsa_index_fwd(be, sc, q, k, w, B, T, Hi, di);
  be->dsa_topk(be, sel_out, sc, B, T, K);
  be->attn_sel_fwd(be, c.o, c.lse, aq(&c), ak(&c), av(&c), sel_out, K, &c.s);
  be->dsa_attn_dist(be, p, aq(&c), ak(&c), c.lse, sel_out, K, &c.s);
  o[0] = be->dsa_kl(be, g, sc, p, sel_out, K, B, T, 1);
  be->dsa_index_bwd(be, o + 1, o + 1 + N * Hi * di, o + 1 + N * (Hi + 1) * di, g, q, k, w, B, T,
                    Hi, di);
  real_t *dq = o + 1 + N * (Hi * di + di + Hi);
  be->attn_sel_bwd(be, dq, dq + 2 * di, dq + 3 * di, c.R, aq(&c), ak(&c), av(&c), c.o, c.lse,
                   sel_out, K, &c.s);
  bfree(q), bfree(k), bfree(w);
  attn_free(&c);
}

static void test_dsa_determinism(void **state) {
  const size_t n = 3 * 200 + 1 + 20 * (12 + 4 + 3) + 20 * (3 * 4 + 3 + 2), ni = 20 * 4;
  real_t *a = calloc(n, sizeof(real_t)), *b = calloc(n, sizeof(real_t));
  int32_t *sa = ibuf(ni), *sb = ibuf(ni);
  const int saved = omp_get_max_threads();
  dsa_ops_run(1, a, sa);
  dsa_ops_run(3, b, sb);
  omp_set_num_threads(saved);
  assert_memory_equal(a, b, n * sizeof(real_t));
  assert_memory_equal(sa, sb, ni * sizeof(int32_t));
  free(a), free(b), bfree(sa), bfree(sb);
}

/* ------------------------------------------------------------ whole model */

static void dsa_config(Config *c, const char *mode, int top_k) {
  tiny_model_config(c);
  c->seq_len = 9;
  c->seed = 77;
  free(c->attn);
  c->attn = strdup("dsa");
  free(c->dsa_training_mode);
  c->dsa_training_mode = strdup(mode);
  c->dsa_idx_heads = 3;
  c->dsa_idx_dim = 6;
  c->dsa_top_k = top_k;
}

static void make_batch(const Config *c, int32_t *in, int32_t *tg, int N) {
  for (int i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64(5, 1, (uint64_t)i, 0) % (uint64_t)c->vocab_size);
    tg[i] = (int32_t)(rng_u64(5, 2, (uint64_t)i, 0) % (uint64_t)c->vocab_size);
  }
}

static int is_indexer(const char *name) { return strstr(name, ".attn.indexer.") != NULL; }

/* The model's gradient against central differences (eps 1e-5, rel < 1e-4 or
 * abs < 1e-8, as test_model_gradcheck_f64.c): main weights against the LM
 * objective (CE + aux), indexer weights against the indexer loss, which is
 * what the detachments define. Top-k and ReLU kinks are not crossed by 1e-5
 * moves for this seed (a crossing would show as a mismatch). */
static void model_gradcheck(Config *c, int samples) {
  Backend *b = backend_cpu();
  Model *m = model_create(c, b, NULL);
  const int B = (int)c->batch_size, T = (int)c->seq_len, N = B * T;
  int32_t in[N], tg[N];
  make_batch(c, in, tg, N);
  model_train_step_grads(m, in, tg, B, T);
  assert_true(m->last_idx_loss > 0);
  real_t *p = m->params, *g = malloc(m->pt.total * sizeof(real_t));
  memcpy(g, m->grads, m->pt.total * sizeof(real_t));
  const double eps = 1e-5;
  double worst = 0;
  char worst_name[256] = "";
  int n_idx = 0;
  for (int r = 0; r < m->pt.n; r++) {
    const ParamInfo *pi = &m->pt.p[r];
    const int idx = is_indexer(pi->name);
    n_idx += idx;
    for (int s = 0; s < samples; s++) {
      size_t i = pi->offset + rng_u64(9, (uint64_t)r, (uint64_t)s, 0) % pi->numel;
      double l[2];
      const real_t keep = p[i];
      for (int side = 0; side < 2; side++) {
        p[i] = keep + (side ? -eps : eps);
        if (idx) {
          model_train_step_grads(m, in, tg, B, T);
          l[side] = m->last_idx_loss;
        } else {
          int64_t nv;
          double sum = model_eval_loss(m, in, tg, B, T, &nv);
          l[side] = sum / (double)nv + m->last_aux_loss;
        }
      }
      p[i] = keep;
      double num = (l[0] - l[1]) / (2 * eps), ana = g[i];
      double err = fabs(num - ana), rel = err / fmax(fabs(num) + fabs(ana), 1e-30);
      if (err > 1e-8 && rel > worst) {
        worst = rel;
        snprintf(worst_name, sizeof worst_name, "%s[%zu] num=%.10g ana=%.10g", pi->name,
                 i - pi->offset, num, ana);
      }
    }
  }
  assert_int_equal(n_idx, 4 * (c->n_layers)); /* wq_b, wk, k_norm, weights_proj per layer */
  if (worst >= 1e-4) fail_msg("gradient mismatch rel=%.3g at %s", worst, worst_name);
  free(g);
  model_free(m);
  b->destroy(b);
}

static void test_model_sparse(void **state) {
  Config c;
  dsa_config(&c, "sparse", 3); /* 9 tokens: queries 3.. see 3 of their keys */
  model_gradcheck(&c, 5);
  config_free(&c);
}

static void test_model_dense_warmup(void **state) {
  Config c;
  dsa_config(&c, "dense_warmup", 3);
  model_gradcheck(&c, 5);
  config_free(&c);
}

/* top_k >= T: sparse attention lists every causal key, so it is dense
 * attention bit for bit, and the indexer's candidate set is the causal one:
 * loss, indexer loss and every gradient equal dense_warmup's exactly. Smaller
 * top_k changes the loss (the selection matters). */
static void test_model_full_topk_is_dense(void **state) {
  double loss[3], idx[3];
  real_t *grads[3];
  size_t total = 0;
  const char *mode[3] = {"dense_warmup", "sparse", "sparse"};
  const int top_k[3] = {3, 9, 3};
  for (int v = 0; v < 3; v++) {
    Config c;
    dsa_config(&c, mode[v], top_k[v]);
    Backend *b = backend_cpu();
    Model *m = model_create(&c, b, NULL);
    const int B = 2, T = 9;
    int32_t in[18], tg[18];
    make_batch(&c, in, tg, 18);
    loss[v] = model_train_step_grads(m, in, tg, B, T);
    idx[v] = m->last_idx_loss;
    total = m->pt.total;
    grads[v] = malloc(total * sizeof(real_t));
    memcpy(grads[v], m->grads, total * sizeof(real_t));
    model_free(m);
    b->destroy(b);
    config_free(&c);
  }
  assert_true(loss[0] == loss[1] && idx[0] == idx[1]);
  assert_memory_equal(grads[0], grads[1], total * sizeof(real_t));
  assert_true(loss[2] != loss[0] && idx[2] != idx[0]);
  for (int v = 0; v < 3; v++) free(grads[v]);
}

/* A backend without the DSA ops (the CUDA one today) is refused at model
 * creation with one line, before any op runs. */
static void test_refused_without_ops(void **state) {
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    dup2(fds[1], 2);
    Config c;
    dsa_config(&c, "sparse", 3);
    Backend *b = backend_cpu();
    b->attn_sel_fwd = NULL;
    model_create(&c, b, NULL);
    _exit(0);
  }
  close(fds[1]);
  char buf[512] = {0};
  size_t n = 0;
  ssize_t r;
  while (n < sizeof buf - 1 && (r = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)r;
  close(fds[0]);
  int st;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
  assert_string_equal(buf, "nmoe: error: attn = dsa runs on the CPU backend only (no CUDA kernels yet)\n");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_attn_sel),
      cmocka_unit_test(test_attn_sel_full_equals_dense),
      cmocka_unit_test(test_index_scores),
      cmocka_unit_test(test_topk),
      cmocka_unit_test(test_attn_dist),
      cmocka_unit_test(test_kl),
      cmocka_unit_test(test_dsa_determinism),
      cmocka_unit_test(test_model_sparse),
      cmocka_unit_test(test_model_dense_warmup),
      cmocka_unit_test(test_model_full_topk_is_dense),
      cmocka_unit_test(test_refused_without_ops),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
