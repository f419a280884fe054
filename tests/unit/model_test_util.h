/* model_test_util.h: the tiny MLA + MoE model the model-level CPU tests build
 * on (one dense and one MoE layer, 4 experts top-2 plus a shared one, MLA with
 * q/kv low ranks 12/10): small enough for finite differences in double, every
 * path present. Tests set what they vary after it. Header-only. */
#ifndef NMOE_MODEL_TEST_UTIL_H
#define NMOE_MODEL_TEST_UTIL_H

#include "core/config.h"

static void tiny_model_config(Config *c) {
  config_defaults(c);
  c->vocab_size = 37;
  c->eos_token_id = 0;
  c->dim = 16;
  c->n_layers = 2;
  c->n_dense_layers = 1;
  c->n_heads = 2;
  c->inter_dim = 24;
  c->moe_inter_dim = 8;
  c->n_routed_experts = 4;
  c->n_activated_experts = 2;
  c->n_shared_experts = 1;
  c->q_lora_rank = 12;
  c->kv_lora_rank = 10;
  c->qk_nope_head_dim = 6;
  c->qk_rope_head_dim = 4;
  c->v_head_dim = 6;
  c->max_position_embeddings = 64;
  c->seq_len = 7;
  c->batch_size = 2;
}

#endif
