/* test_quant_model.c: the model with fp8 / nvfp4 routed experts on the CPU
 * backend (float): the loss stays close to the bf16 model's with the same
 * weights but is not equal (quantization is applied), the quantized weight
 * cache equals a fresh quantization of the weights after every optimizer
 * step, and a short training on a fixed batch lowers the loss. The gradient
 * definition (STE) is checked by finite differences in
 * test_model_gradcheck_f64.c. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/config.h"
#include "core/rng.h"
#include "model/model.h"
#include "train/optim.h"

static void small_config(Config *c, const char *dtype) {
  config_defaults(c);
  c->vocab_size = 64;
  c->eos_token_id = 0;
  c->dim = 64;
  c->n_layers = 2;
  c->n_dense_layers = 0;
  c->n_heads = 2;
  c->inter_dim = 64;
  c->moe_inter_dim = 32;
  c->n_routed_experts = 4;
  c->n_activated_experts = 2;
  c->n_shared_experts = 1;
  c->q_lora_rank = 16;
  c->kv_lora_rank = 16;
  c->qk_nope_head_dim = 8;
  c->qk_rope_head_dim = 8;
  c->v_head_dim = 8;
  c->max_position_embeddings = 64;
  c->seq_len = 16;
  c->batch_size = 4;
  c->lr_dense = c->lr_expert = c->lr_router = 3e-3;
  c->weight_decay = 0;
  free(c->dtype);
  c->dtype = strdup(dtype);
}

static void batch(int32_t *in, int32_t *tg, int N, int V) {
  for (int i = 0; i < N; i++) { /* a learnable pattern: next = (3 * tok + 1) mod V */
    in[i] = 1 + (int32_t)(rng_u64(17, (uint64_t)i, 0, 0) % (uint64_t)(V - 1));
    tg[i] = 1 + (3 * in[i]) % (V - 1);
  }
}

static double eval_loss(Model *m, const int32_t *in, const int32_t *tg, int B, int T) {
  int64_t nv;
  double s = model_eval_loss(m, in, tg, B, T, &nv);
  return s / (double)nv;
}

/* loss(dtype) vs loss(bf16) on the same weights: relative difference in (0, bound). */
static void check_close_to_bf16(const char *dtype, double bound) {
  Config cq, cb;
  small_config(&cq, dtype);
  small_config(&cb, "bf16");
  Backend *be = backend_cpu();
  Model *mq = model_create(&cq, be, NULL), *mb = model_create(&cb, be, NULL);
  assert_int_equal(mq->pt.total, mb->pt.total);
  assert_memory_equal(mq->params, mb->params, mq->pt.total * be->size[BUF_ACT]); /* same init */
  const int B = 4, T = 16, N = B * T;
  int32_t in[N], tg[N];
  batch(in, tg, N, (int)cq.vocab_size);
  double lq = eval_loss(mq, in, tg, B, T), lb = eval_loss(mb, in, tg, B, T);
  double rel = fabs(lq - lb) / lb;
  if (!(rel > 0 && rel < bound)) fail_msg("%s loss %.7g vs bf16 %.7g: rel %.3g", dtype, lq, lb, rel);
  model_free(mq), model_free(mb);
  config_free(&cq), config_free(&cb);
  be->destroy(be);
}

static void test_fp8_loss_near_bf16(void **state) { check_close_to_bf16("fp8", 2e-3); }
static void test_nvfp4_loss_near_bf16(void **state) { check_close_to_bf16("nvfp4", 2e-2); }

/* Training steps: the cache tracks the weights, and the loss falls. */
static void train_falls(const char *dtype) {
  Config c;
  small_config(&c, dtype);
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  const int B = 4, T = 16, N = B * T;
  int32_t in[N], tg[N];
  batch(in, tg, N, (int)c.vocab_size);
  const size_t ne = m->pt.total - m->dense_end, sa = be->size[BUF_ACT];
  void *fresh = be->alloc(be, ne * sa);
  double first = 0, last = 0;
  for (int step = 1; step <= 30; step++) {
    double loss = model_train_step_grads(m, in, tg, B, T);
    if (step == 1) first = loss;
    last = loss;
    optim_step(m, step, 1.0, 1.0);
    for (int l = 0; l < m->d.L; l++) { /* the cache is the new weights, quantized */
      const LayerParams *lp = &m->lp[l];
      if (lp->moe_index < 0) continue;
      be->quantize_blocks(be, fresh, model_ptr(m, m->params, lp->exp_w13), m->E_local, m->d.D,
                          2 * m->d.Fm, m->quant_fmt);
      assert_memory_equal(fresh, model_expert_q(m, lp->exp_w13), m->pt.p[lp->exp_w13].numel * sa);
      be->quantize_blocks(be, fresh, model_ptr(m, m->params, lp->exp_w2), m->E_local, m->d.Fm,
                          m->d.D, m->quant_fmt);
      assert_memory_equal(fresh, model_expert_q(m, lp->exp_w2), m->pt.p[lp->exp_w2].numel * sa);
    }
  }
  if (!(last < 0.7 * first)) fail_msg("%s: loss %.4f -> %.4f did not fall", dtype, first, last);
  be->free(be, fresh);
  model_free(m);
  config_free(&c);
  be->destroy(be);
}

static void test_fp8_training(void **state) { train_falls("fp8"); }
static void test_nvfp4_training(void **state) { train_falls("nvfp4"); }

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fp8_loss_near_bf16), cmocka_unit_test(test_nvfp4_loss_near_bf16),
      cmocka_unit_test(test_fp8_training),       cmocka_unit_test(test_nvfp4_training),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
