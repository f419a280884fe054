/* model_step.c: forward and backward of one batch of the whole model:
 * embedding, the blocks (model_attn.c, model_ffn.c), final norm and loss,
 * then the gradient sums over ranks (ZeRO-2 reduce-scatter of the dense
 * groups). Gradients of weights accumulate into m->grads (zeroed at the start
 * of each step). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "model/model_internal.h"

_Static_assert(GROUP_EXPERT == N_GROUPS - 1, "ZeRO shards the groups before the experts' one");

static int64_t count_valid(const Model *m, const int32_t *targets, size_t N) {
  if (!m->cfg.loss_mask_eos) return (int64_t)N;
  int64_t n = 0;
  for (size_t i = 0; i < N; i++) n += targets[i] != (int32_t)m->cfg.eos_token_id;
  return n;
}

static void *res_at(Model *m, int l) { return ACT(m, m->res, (size_t)l * m->B * m->T * m->d.D); }
static void *mid_at(Model *m, int l) { return ACT(m, m->mid, (size_t)l * m->B * m->T * m->d.D); }

/* Forward through the final norm; leaves xf ready for the loss. */
static void forward_trunk(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T) {
  model_ensure_acts(m, B, T);
  if (m->expert_q_stale) model_quant_refresh(m);
  Backend *be = m->be;
  const int N = B * T, D = m->d.D;
  phase(m, "embed_fwd");
  be->upload(be, m->tok_in, inputs, (size_t)N * sizeof(int32_t));
  be->upload(be, m->tok_tgt, targets, (size_t)N * sizeof(int32_t));
  be->embed_fwd(be, res_at(m, 0), m->tok_in, W(m, m->embedding), N, D, (float)m->cfg.embed_scale);
  for (int l = 0; l < m->d.L; l++) {
    phase(m, "attn_fwd");
    model_attn_forward(m, l, res_at(m, l), mid_at(m, l));
    phase(m, m->lp[l].moe_index < 0 ? "mlp_fwd" : "moe_fwd");
    model_ffn_forward(m, l, mid_at(m, l), res_at(m, l + 1));
  }
  phase(m, "head_fwd");
  be->rmsnorm_fwd(be, m->xf, m->rstd_f, res_at(m, m->d.L), W(m, m->final_norm), N, D, D, D,
                  (float)m->cfg.rms_norm_eps);
  m->last_aux_loss = 0;
  if (m->cfg.aux_loss_alpha > 0) {
    float load_frac[m->d.E > 0 ? m->d.E : 1];
    for (int li = 0; li < m->n_moe; li++) m->last_aux_loss += model_aux_loss(m, li, load_frac);
    if (m->comm) m->last_aux_loss = comm_sum_f64(m->comm, m->last_aux_loss);
  }
}

static int mask_id(const Model *m) {
  return m->cfg.loss_mask_eos ? (int)m->cfg.eos_token_id : -1;
}

double model_eval_loss(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                       int64_t *n_valid) {
  forward_trunk(m, inputs, targets, B, T);
  const int N = B * T;
  *n_valid = count_valid(m, targets, (size_t)N);
  double loss_sum = m->be->xent(m->be, NULL, NULL, m->xf, W(m, m->lm_head), m->tok_tgt, N, m->d.D,
                                m->d.V, (float)m->cfg.logits_scale, mask_id(m), 0);
  if (m->comm) {
    *n_valid = comm_sum_i64(m->comm, *n_valid);
    loss_sum = comm_sum_f64(m->comm, loss_sum);
  }
  return loss_sum;
}

void model_score_rows(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                      int32_t ignore_id, double *row_loss) {
  NMOE_ASSERT(ignore_id >= 0);
  forward_trunk(m, inputs, targets, B, T);
  Backend *be = m->be;
  const size_t row_bytes = (size_t)T * m->d.D * be->size[BUF_ACT];
  for (int b = 0; b < B; b++)
    row_loss[b] = be->xent(be, NULL, NULL, (const char *)m->xf + b * row_bytes, W(m, m->lm_head),
                           (const int32_t *)m->tok_tgt + (size_t)b * T, T, m->d.D, m->d.V,
                           (float)m->cfg.logits_scale, ignore_id, 0);
}

void model_rows_exact(Model *m, const int32_t *targets, int B, int T, int32_t ignore_id,
                      int *row_exact) {
  Backend *be = m->be;
  const int D = m->d.D, V = m->d.V;
  const size_t sa = be->size[BUF_ACT];
  int P = 0; /* positions with a target */
  for (size_t i = 0; i < (size_t)B * T; i++) P += targets[i] != ignore_id;
  for (int b = 0; b < B; b++) row_exact[b] = 1;
  if (P == 0) return;
  /* gather those positions' final hidden states, then their logits [P, V] */
  void *h = be->alloc(be, (size_t)P * D * sa), *logits = be->alloc(be, (size_t)P * V * be->size[BUF_F32]);
  int p = 0;
  for (size_t i = 0; i < (size_t)B * T; i++)
    if (targets[i] != ignore_id) be->copy(be, (char *)h + (size_t)p++ * D * sa, (char *)m->xf + i * D * sa, D * sa);
  be->gemm(be, logits, h, W(m, m->lm_head), P, V, D, 0, 1, (float)m->cfg.logits_scale, 0, 1);
  float *host = xmalloc((size_t)P * V * sizeof(float));
  be->get(be, host, BUF_F32, logits, (size_t)P * V);
  p = 0;
  for (size_t i = 0; i < (size_t)B * T; i++) {
    if (targets[i] == ignore_id) continue;
    const float *l = host + (size_t)p++ * V;
    int best = 0;
    for (int v = 1; v < V; v++)
      if (l[v] > l[best]) best = v;
    if (best != targets[i]) row_exact[i / T] = 0;
  }
  free(host);
  be->free(be, h);
  be->free(be, logits);
}

double model_train_step_grads(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T) {
  Backend *be = m->be;
  forward_trunk(m, inputs, targets, B, T);
  const int N = B * T, D = m->d.D;
  /* the mean is over the global batch: every rank divides by the same count */
  int64_t n_valid = count_valid(m, targets, (size_t)N);
  if (m->comm) n_valid = comm_sum_i64(m->comm, n_valid);
  m->last_n_valid = n_valid;
  float grad_scale = n_valid > 0 ? 1.0f / (float)n_valid : 0.0f;
  phase(m, "head_loss");
  be->zero(be, m->grads, m->pt.total * be->size[BUF_ACT]);
  m->last_idx_loss = 0;
  double loss_sum = be->xent(be, m->g_xn, G(m, m->lm_head), m->xf, W(m, m->lm_head), m->tok_tgt, N,
                             D, m->d.V, (float)m->cfg.logits_scale, mask_id(m), grad_scale);
  be->rmsnorm_bwd(be, m->g_res, G(m, m->final_norm), m->g_xn, res_at(m, m->d.L),
                  W(m, m->final_norm), m->rstd_f, N, D, D, D, 0);
  for (int l = m->d.L - 1; l >= 0; l--) {
    phase(m, m->lp[l].moe_index < 0 ? "mlp_bwd" : "moe_bwd");
    model_ffn_backward(m, l, mid_at(m, l));
    phase(m, "attn_bwd");
    model_attn_backward(m, l, res_at(m, l));
  }
  phase(m, "embed_bwd");
  be->embed_bwd(be, G(m, m->embedding), m->tok_in, m->g_res, N, D, m->d.V,
                (float)m->cfg.embed_scale);
  if (m->comm) {
    /* ZeRO-2: each rank gets the summed dense gradients of its shard (the
     * dense groups come before the experts' one, the last). Experts got every
     * rank's rows already. */
    phase(m, "grad_reduce_scatter");
    m->comm->reduce_scatter(m->comm, m->grads, m->dense_end, BUF_ACT);
    loss_sum = comm_sum_f64(m->comm, loss_sum);
    if (m->d.dsa) m->last_idx_loss = comm_sum_f64(m->comm, m->last_idx_loss);
  }
  return n_valid > 0 ? loss_sum / (double)n_valid : 0.0;
}
