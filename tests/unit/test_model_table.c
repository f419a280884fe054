/* test_model_table.c: the parameter table of a world without a model
 * (model_table, used by `nmoe ckpt reshard`): the same table model_create
 * builds, dense rows at the same offsets for every world (only the padding
 * before the expert group, 16 x world, changes), ZeRO shards that split the
 * dense range exactly, and expert rows that are the rank's slice. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/config.h"
#include "model/model.h"

static void small_config(Config *c) {
  config_defaults(c);
  c->vocab_size = 100;
  c->eos_token_id = 0;
  c->dim = 24;
  c->n_layers = 3;
  c->n_dense_layers = 1;
  c->n_heads = 2;
  c->inter_dim = 40;
  c->moe_inter_dim = 8;
  c->n_routed_experts = 4;
  c->n_activated_experts = 2;
  c->n_shared_experts = 1;
  c->q_lora_rank = 8;
  c->kv_lora_rank = 8;
  c->qk_nope_head_dim = 4;
  c->qk_rope_head_dim = 4;
  c->v_head_dim = 4;
  c->seq_len = 8;
  c->batch_size = 4;
}

static void test_same_as_model_create(void **state) {
  Config c;
  small_config(&c);
  Model *m = model_create(&c, backend_cpu(), NULL);
  ParamTable t;
  model_table(&c, 0, 1, &t);
  assert_int_equal(t.n, m->pt.n);
  assert_int_equal(t.total, m->pt.total);
  for (int i = 0; i < t.n; i++) {
    assert_string_equal(t.p[i].name, m->pt.p[i].name);
    assert_int_equal(t.p[i].offset, m->pt.p[i].offset);
    assert_int_equal(t.p[i].numel, m->pt.p[i].numel);
    assert_int_equal(t.p[i].group, m->pt.p[i].group);
  }
  size_t lo, hi;
  model_shard_bounds(&t, 0, 1, &lo, &hi);
  assert_int_equal(lo, m->shard_lo);
  assert_int_equal(hi, m->shard_hi);
  assert_int_equal(hi, m->dense_end);
  params_free(&t);
  model_free(m);
  config_free(&c);
}

static void test_worlds(void **state) {
  Config c;
  small_config(&c);
  ParamTable one;
  model_table(&c, 0, 1, &one);
  /* end of the last dense row: what every world pads up from */
  size_t raw_end = 0;
  for (int i = 0; i < one.n; i++)
    if (one.p[i].owner == OWN_DENSE && one.p[i].offset + one.p[i].numel > raw_end)
      raw_end = one.p[i].offset + one.p[i].numel;
  const int worlds[3] = {1, 2, 4};
  for (int wi = 0; wi < 3; wi++) {
    const int W = worlds[wi];
    size_t next = 0; /* shards must tile [0, dense_end) */
    for (int r = 0; r < W; r++) {
      ParamTable t;
      model_table(&c, r, W, &t);
      const size_t end = t.group_off[GROUP_EXPERT];
      assert_int_equal(end % (16 * (size_t)W), 0);
      assert_true(end >= raw_end && end < raw_end + 16 * (size_t)W);
      assert_int_equal(t.n, one.n);
      for (int i = 0; i < t.n; i++) {
        const ParamInfo *p = &t.p[i], *q = &one.p[i];
        assert_string_equal(p->name, q->name);
        if (p->owner == OWN_DENSE) {
          assert_int_equal(p->offset, q->offset);
          assert_int_equal(p->numel, q->numel);
        } else {
          assert_int_equal(p->shape[0], 4 / W);
          assert_int_equal(p->numel * (size_t)W, q->numel);
          assert_int_equal(p->init_base, (size_t)r * p->numel);
          assert_true(p->offset >= end);
        }
      }
      size_t lo, hi;
      model_shard_bounds(&t, r, W, &lo, &hi);
      assert_int_equal(lo, next);
      assert_int_equal(hi - lo, end / (size_t)W);
      next = hi;
      if (r == W - 1) assert_int_equal(next, end);
      params_free(&t);
    }
  }
  params_free(&one);
  config_free(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_same_as_model_create),
      cmocka_unit_test(test_worlds),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
