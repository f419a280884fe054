/* test_model_gradcheck_f64.c: the whole model's analytic gradient against
 * central finite differences, on the CPU backend in double precision.
 *
 * Bound: with eps = 1e-5 in double, the central difference has truncation
 * error ~eps^2 * f''' ~ 1e-10 and rounding error ~1e-16 * |L| / eps ~ 1e-11,
 * so analytic and numeric gradients of magnitude >= 1e-6 agree to ~1e-4
 * relative at worst; we require rel < 1e-4 or abs < 1e-8. A wrong backward
 * (a missing term, a transposed weight) gives O(1) relative errors. The only
 * non-smooth point is the router's top-k; perturbations of 1e-5 cannot cross
 * a selection boundary unless two biased scores are within ~1e-5, which the
 * test checks and skips (none occur for these seeds). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend/backend.h"
#include "core/config.h"
#include "core/rng.h"
#include "model/model.h"
#include "model_test_util.h"

typedef double real_t; /* this test links the double-precision CPU backend */

static void tiny_config(Config *c) {
  tiny_model_config(c);
  c->n_layers = 3;
  c->n_routed_experts = 5;
  c->route_scale = 1.7;
  c->embed_scale = 1.3;
  c->logits_scale = 0.9;
  c->seed = 1234;
}

/* ---- the fp8/nvfp4 straight-through estimator (STE) as a surrogate loss ----
 * The expert backward runs the bf16 formulas on the forward's saved values and
 * the bf16 weights. That is exactly the gradient, at theta0, of the surrogate
 *   L_s(theta) = the bf16 forward in which every expert GEMM output gets the
 *                constant C_i = q(a0) q(b0) - a0 b0 (its quantization error at
 *                theta0; a0, b0 the unquantized operands of GEMM call i),
 * because d(a b + C)/da = dY b^T and d/db = a^T dY, with gu and h the values
 * the fp8 forward produced (L_s(theta0) = L_fp8(theta0)). So with the backend
 * wrapped below, finite differences of L_s check the fp8 model's analytic
 * gradient of EVERY parameter (upstream ones included) to the usual bound. */
enum { STE_OFF, STE_PASS, STE_RECORD, STE_SURROGATE };
static struct {
  int mode, calls;
  void (*quantize)(Backend *, void *, const void *, int, int, int, int);
  void (*grouped_gemm)(Backend *, int, void *, const void *, const void *, const int32_t *,
                       const int32_t *, int, int, int, int);
  const void *q[64], *src[64]; /* quantized buffer -> what it was quantized from */
  int nq;
  double *C[64];               /* per GG_FWD call of one forward */
} ste;

/* Records q <- x; in surrogate mode "quantization" is the identity. */
static void ste_quantize(Backend *be, void *q, const void *x, int outer, int K, int inner, int fmt) {
  int i = 0;
  while (i < ste.nq && ste.q[i] != q) i++;
  assert_true(i < 64);
  if (i == ste.nq) ste.nq++;
  ste.q[i] = q;
  ste.src[i] = x;
  if (ste.mode == STE_SURROGATE) be->copy(be, q, x, (size_t)outer * K * inner * sizeof(real_t));
  else ste.quantize(be, q, x, outer, K, inner, fmt);
}

static const void *ste_src(const void *p) {
  for (int i = 0; i < ste.nq; i++)
    if (ste.q[i] == p) return ste.src[i];
  return p;
}

static void ste_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                             const int32_t *off, const int32_t *offh, int E, int M, int N, int K) {
  ste.grouped_gemm(be, mode, out, a, b, off, offh, E, M, N, K);
  if (mode != GG_FWD || ste.mode < STE_RECORD) return;
  const int i = ste.calls++;
  real_t *y = out;
  assert_true(i < 64);
  if (ste.mode == STE_RECORD) { /* C = q(a) q(b) - a b */
    real_t *ab = malloc((size_t)M * N * sizeof(real_t));
    ste.grouped_gemm(be, mode, ab, ste_src(a), ste_src(b), off, offh, E, M, N, K);
    free(ste.C[i]);
    ste.C[i] = malloc((size_t)M * N * sizeof(double));
    for (size_t j = 0; j < (size_t)M * N; j++) ste.C[i][j] = y[j] - ab[j];
    free(ab);
  } else {
    for (size_t j = 0; j < (size_t)M * N; j++) y[j] += ste.C[i][j];
  }
}

static double full_loss(Model *m, const int32_t *in, const int32_t *tg, int B, int T) {
  if (ste.mode >= STE_RECORD) {
    model_quant_refresh(m); /* surrogate: the weight "cache" is the perturbed weights */
    ste.calls = 0;
  }
  int64_t nv;
  double s = model_eval_loss(m, in, tg, B, T, &nv);
  return s / (double)nv + m->last_aux_loss;
}

/* Checks `samples` random elements of every parameter tensor. */
static void gradcheck(Config *c, int samples) {
  Backend *be = backend_cpu();
  Model *m = model_create(c, be, NULL);
  const int B = (int)c->batch_size, T = (int)c->seq_len, N = B * T;
  int32_t in[N], tg[N];
  for (int i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64(99, 1, (uint64_t)i, 0) % (uint64_t)c->vocab_size);
    tg[i] = (int32_t)(rng_u64(99, 2, (uint64_t)i, 0) % (uint64_t)c->vocab_size);
  }
  tg[3] = (int32_t)c->eos_token_id; /* exercise loss masking */
  /* Non-zero router bias so top-k on biased scores is exercised. */
  for (int i = 0; i < m->n_moe * m->d.E; i++)
    m->router_bias_host[i] = 0.05f * (float)((i * 7) % 5 - 2);
  if (m->n_moe) be->put(be, m->router_bias, BUF_F32, m->router_bias_host, (size_t)m->n_moe * m->d.E);
  real_t *p = m->params, *g = m->grads;
  /* Non-zero swa biases and sinks (init 0), so their effect on every other
   * gradient is exercised too. */
  for (int r = 0; r < m->pt.n; r++)
    if (m->pt.p[r].init == INIT_ZEROS)
      for (size_t i = 0; i < m->pt.p[r].numel; i++)
        p[m->pt.p[r].offset + i] = 0.5 * ((double)(rng_u64(11, (uint64_t)r, i, 0) % 1000) / 500.0 - 1);
  double l_fp8 = 0;
  if (m->quant_fmt != QFMT_BF16) { /* record the quantization errors C_i at theta0 */
    ste.quantize = be->quantize_blocks;
    ste.grouped_gemm = be->grouped_gemm;
    be->quantize_blocks = ste_quantize;
    be->grouped_gemm = ste_grouped_gemm;
    ste.mode = STE_RECORD;
    l_fp8 = full_loss(m, in, tg, B, T);
    ste.mode = STE_PASS;
    model_quant_refresh(m);
  }
  model_train_step_grads(m, in, tg, B, T);
  if (m->quant_fmt != QFMT_BF16) {
    ste.mode = STE_SURROGATE;
    double l_s = full_loss(m, in, tg, B, T);
    if (fabs(l_s - l_fp8) > 1e-12 * fabs(l_fp8)) fail_msg("L_s %.17g != L_fp8 %.17g", l_s, l_fp8);
    ste.mode = STE_OFF;
    c->dtype = "bf16"; /* the surrogate differs from the bf16 model (else the check is empty) */
    Model *mb = model_create(c, be, NULL);
    memcpy(mb->params, m->params, m->pt.total * sizeof(real_t));
    be->put(be, mb->router_bias, BUF_F32, m->router_bias_host, (size_t)m->n_moe * m->d.E);
    double l_bf16 = full_loss(mb, in, tg, B, T);
    if (fabs(l_bf16 - l_fp8) < 1e-6 * fabs(l_fp8)) fail_msg("fp8 loss equals bf16's: no quantization");
    model_free(mb);
    ste.mode = STE_SURROGATE;
  }
  const double eps = 1e-5;
  double worst = 0;
  char worst_name[256] = "";
  for (int r = 0; r < m->pt.n; r++) {
    const ParamInfo *pi = &m->pt.p[r];
    for (int s = 0; s < samples; s++) {
      size_t i = pi->offset + rng_u64(7, (uint64_t)r, (uint64_t)s, 0) % pi->numel;
      real_t keep = p[i];
      p[i] = keep + eps;
      double lp = full_loss(m, in, tg, B, T);
      p[i] = keep - eps;
      double lm = full_loss(m, in, tg, B, T);
      p[i] = keep;
      double num = (lp - lm) / (2 * eps), ana = g[i];
      double err = fabs(num - ana), rel = err / fmax(fabs(num) + fabs(ana), 1e-30);
      if (err > 1e-8 && rel > worst) {
        worst = rel;
        snprintf(worst_name, sizeof worst_name, "%s[%zu] num=%.10g ana=%.10g", pi->name,
                 i - pi->offset, num, ana);
      }
    }
  }
  if (worst >= 1e-4) fail_msg("gradient mismatch rel=%.3g at %s", worst, worst_name);
  ste.mode = STE_OFF;
  ste.nq = 0;
  model_free(m);
  be->destroy(be);
}

static void test_mla_moe_shared_dense(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  gradcheck(&c, 6);
}

static void test_mha_gqa(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  free(c.attn);
  c.attn = strdup("mha");
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.qk_rope_head_dim = 4;
  c.n_dense_layers = 3; /* all dense: the MHA path alone */
  gradcheck(&c, 6);
}

static void test_moe_aux_loss_no_qlora_window(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.q_lora_rank = 0;
  c.aux_loss_alpha = 0.3;
  c.n_shared_experts = 0;
  c.n_dense_layers = 0;
  c.attn_global_every = 2; /* layer 0 local (swa, window 3), layers 1-2 global (mla) */
  c.attn_local_window = 3;
  c.v_head_dim = 16;       /* the swa head size (and mla's value dims) */
  c.swa_kv_heads = 1;      /* GQA in the swa layer */
  gradcheck(&c, 6);
}

/* Local swa layers (fused qkv + bias, rope on the last 4 of 16 dims, GQA 4:2,
 * window 3 with sinks, wo bias) beside global MHA/GQA layers. */
static void test_swa_local_mha_global(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  free(c.attn);
  c.attn = strdup("mha");
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.v_head_dim = 16;
  c.swa_kv_heads = 2;
  c.attn_global_every = 3; /* layers 0-1 local, layer 2 global */
  c.attn_local_window = 3;
  gradcheck(&c, 6);
}

/* The swa block's parameters: names, shapes, groups and init as the original. */
static void test_swa_params(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.n_heads = 4;
  c.v_head_dim = 16;
  c.swa_kv_heads = 2;
  c.attn_global_every = 2;
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  const struct { const char *name; int64_t r, c; OptGroup g; } want[] = {
      {"layers.0.attn.wqkv.weight", (4 + 2 * 2) * 16, 16, GROUP_DECAY},
      {"layers.0.attn.wqkv.bias", (4 + 2 * 2) * 16, 0, GROUP_NO_DECAY},
      {"layers.0.attn.wo.weight", 16, 4 * 16, GROUP_DECAY},
      {"layers.0.attn.wo.bias", 16, 0, GROUP_NO_DECAY},
      {"layers.0.attn.sinks", 4, 0, GROUP_NO_DECAY},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    int r = params_find(&m->pt, want[i].name);
    assert_true(r >= 0);
    const ParamInfo *pi = &m->pt.p[r];
    assert_int_equal(pi->shape[0], want[i].r);
    if (want[i].c) assert_int_equal(pi->shape[1], want[i].c);
    assert_int_equal(pi->ndim, want[i].c ? 2 : 1);
    assert_int_equal(pi->group, want[i].g);
    const real_t *p = (const real_t *)m->params + pi->offset;
    double ss = 0;
    for (size_t e = 0; e < pi->numel; e++) ss += p[e] * p[e];
    if (want[i].c) assert_true(ss > 0);
    else assert_true(ss == 0); /* biases and sinks start at 0 */
  }
  assert_true(params_find(&m->pt, "layers.0.attn.wq_a.weight") < 0); /* no mla rows */
  assert_true(params_find(&m->pt, "layers.1.attn.wq_a.weight") >= 0); /* layer 1 global */
  assert_true(params_find(&m->pt, "layers.1.attn.sinks") < 0);
  model_free(m);
  be->destroy(be);
}

/* FLOPs: a local layer counts its swa projections and only the keys of its
 * window; with the window as long as T it costs what a causal layer costs. */
static void test_swa_flops(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  free(c.attn);
  c.attn = strdup("mha");
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.head_dim = 16;
  c.v_head_dim = 16;
  c.n_layers = 2;
  ModelDims d = model_dims(&c);
  const double glob = model_flops_per_token(&d, &c, 64);
  c.attn_global_every = 2; /* layer 0 local: same projections when swa_kv_heads = n_kv_heads */
  c.attn_local_window = 64;
  d = model_dims(&c);
  assert_true(fabs(model_flops_per_token(&d, &c, 64) - glob) < 1e-9 * glob);
  c.attn_local_window = 8; /* mean keys 8 - 64/128 = 7.5 instead of 32 */
  const double want = glob - 6.0 * 4 * 32 * (32 - 7.5);
  assert_true(fabs(model_flops_per_token(&d, &c, 64) - want) < 1e-9 * glob);
  const int64_t full = model_active_matmul_params(&d, &c);
  c.swa_kv_heads = 2; /* 2 x 2 fewer kv heads of 16 rows (by dim 16) in the local wqkv */
  d = model_dims(&c);
  assert_int_equal(full - model_active_matmul_params(&d, &c), (int64_t)2 * 2 * 16 * 16);
}

static void test_yarn_rope(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.rope_scaling_factor = 4.0;
  c.max_position_embeddings = 16;
  c.loss_mask_eos = false;
  gradcheck(&c, 4);
}

/* Hand-computed bias update: loads [6,2,2,2]/12 for E=4 -> signs [+,-,-,-],
 * mean -0.5, so bias -= rate * [1.5, -0.5, -0.5, -0.5]; clamping at +-16. */
static void test_router_bias_update(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.n_routed_experts = 4;
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  int32_t counts[2 * 4] = {6, 2, 2, 2, 3, 3, 3, 3};
  m->router_bias_host[4] = 15.99f;
  model_update_router_bias(m, counts, 0.1);
  assert_float_equal(m->router_bias_host[0], -0.15f, 1e-7);
  assert_float_equal(m->router_bias_host[1], 0.05f, 1e-7);
  assert_float_equal(m->router_bias_host[3], 0.05f, 1e-7);
  /* balanced layer: all signs 0, no change */
  assert_float_equal(m->router_bias_host[4], 15.99f, 1e-7);
  assert_float_equal(m->router_bias_host[5], 0.0f, 1e-7);
  int32_t skew[8] = {12, 0, 0, 0, 12, 0, 0, 0};
  for (int i = 0; i < 300; i++) model_update_router_bias(m, skew, 0.1);
  assert_float_equal(m->router_bias_host[0], -16.0f, 1e-6);
  assert_true(m->router_bias_host[1] <= 16.0f);
  model_free(m);
  be->destroy(be);
}

/* Recomputing attention and the expert path in backward gives exactly the
 * gradients of keeping them (same ops on the same inputs). */
static void test_recompute_bit_identical(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.attn_global_every = 2; /* layer 0 swa: its buffers are shared apart from the mla ones */
  c.v_head_dim = 16;
  const int B = (int)c.batch_size, T = (int)c.seq_len, N = B * T;
  int32_t in[N], tg[N];
  for (int i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64(5, 1, (uint64_t)i, 0) % (uint64_t)c.vocab_size);
    tg[i] = (int32_t)(rng_u64(5, 2, (uint64_t)i, 0) % (uint64_t)c.vocab_size);
  }
  Backend *be = backend_cpu();
  Model *keep = model_create(&c, be, NULL);
  double l1 = model_train_step_grads(keep, in, tg, B, T);
  c.recompute_attn = true;
  c.recompute_experts = true;
  Model *re = model_create(&c, be, NULL);
  double l2 = model_train_step_grads(re, in, tg, B, T);
  assert_true(l1 == l2);
  assert_int_equal(keep->pt.total, re->pt.total);
  assert_memory_equal(keep->grads, re->grads, keep->pt.total * be->size[BUF_ACT]);
  model_free(keep);
  model_free(re);
  be->destroy(be);
}

/* Sizes whose tensors are not multiples of 16 elements (dim 10, head 5, ffn
 * 25, shared 5): the fused projections (wq|wk|wv, w1|w3, shared w1|w3) run as
 * one GEMM over adjacent rows, so no alignment padding may sit between them,
 * and no gradient may land outside a tensor (such padding would be trained
 * but never checkpointed). */
static void test_odd_dims_fused_weights(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  free(c.attn);
  c.attn = strdup("mha");
  c.dim = 10;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.qk_rope_head_dim = 4;
  c.inter_dim = 25;
  c.moe_inter_dim = 5;
  c.n_layers = 2;
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  const ParamInfo *p = m->pt.p;
  for (int l = 0; l < m->d.L; l++) {
    const LayerParams *lp = &m->lp[l];
    int runs[][3] = {{lp->wq, lp->wk, lp->wv}, {lp->w1, lp->w3, -1}, {lp->sh_w1, lp->sh_w3, -1}};
    for (int r = 0; r < 3; r++)
      for (int i = 0; i + 1 < 3 && runs[r][i + 1] >= 0; i++) {
        const ParamInfo *a = &p[runs[r][i]], *b = &p[runs[r][i + 1]];
        if (b->offset != a->offset + a->numel)
          fail_msg("%s not adjacent to %s (%zu vs %zu)", b->name, a->name, b->offset,
                   a->offset + a->numel);
      }
  }
  const int B = (int)c.batch_size, T = (int)c.seq_len, N = B * T;
  int32_t in[N], tg[N];
  for (int i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64(3, 1, (uint64_t)i, 0) % (uint64_t)c.vocab_size);
    tg[i] = (int32_t)(rng_u64(3, 2, (uint64_t)i, 0) % (uint64_t)c.vocab_size);
  }
  model_train_step_grads(m, in, tg, B, T);
  char *covered = calloc(m->pt.total, 1);
  for (int r = 0; r < m->pt.n; r++) memset(covered + p[r].offset, 1, p[r].numel);
  const real_t *g = m->grads;
  for (size_t i = 0; i < m->pt.total; i++)
    if (!covered[i] && g[i] != 0) fail_msg("gradient %g in padding at element %zu", g[i], i);
  free(covered);
  model_free(m);
  be->destroy(be);
  gradcheck(&c, 4);
}

/* dtype fp8 and nvfp4: the analytic gradient is the STE's (see ste above);
 * dim and moe_inter_dim 32 (one block along each expert K). */
static void test_quantized_experts_ste(void **state) {
  (void)state;
  const char *dtypes[] = {"fp8", "nvfp4"};
  for (int i = 0; i < 2; i++) {
    Config c;
    tiny_config(&c);
    c.dim = 32;
    c.moe_inter_dim = 32;
    c.n_layers = 2;
    c.dtype = (char *)dtypes[i];
    gradcheck(&c, 4);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_quantized_experts_ste),
      cmocka_unit_test(test_mla_moe_shared_dense),
      cmocka_unit_test(test_mha_gqa),
      cmocka_unit_test(test_moe_aux_loss_no_qlora_window),
      cmocka_unit_test(test_swa_local_mha_global),
      cmocka_unit_test(test_swa_params),
      cmocka_unit_test(test_swa_flops),
      cmocka_unit_test(test_yarn_rope),
      cmocka_unit_test(test_router_bias_update),
      cmocka_unit_test(test_recompute_bit_identical),
      cmocka_unit_test(test_odd_dims_fused_weights),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
