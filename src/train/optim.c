/* optim.c: WSD schedule, global grad norm and grouped AdamW (reference 3). */
#include "train/optim.h"

#include <math.h>

double wsd_scale(const Config *c, int64_t step, double tokens_seen) {
  if (c->warmup_steps > 0 && step < c->warmup_steps) return (double)(step + 1) / c->warmup_steps;
  if (tokens_seen < c->hold_tokens) return 1.0;
  double t = tokens_seen - c->hold_tokens;
  if (c->decay_tokens <= 0 || t >= c->decay_tokens) return 0.0;
  return 0.5 * (1.0 + cos(M_PI * t / c->decay_tokens));
}

double group_lr(const Config *c, OptGroup g, double scale) {
  double peak = g == GROUP_ROUTER ? c->lr_router : g == GROUP_EXPERT ? c->lr_expert : c->lr_dense;
  double floor = c->decay_floor;
  if (g == GROUP_ROUTER && c->lr_router < floor) floor = c->lr_router;
  return floor + (peak - floor) * scale;
}

/* Range of group g this rank updates: the whole group for experts, its
 * intersection with this rank's ZeRO shard for dense groups. */
static void group_range(const Model *m, int g, size_t *a, size_t *b) {
  *a = m->pt.group_off[g];
  *b = m->pt.group_off[g + 1];
  if (g == GROUP_EXPERT) return;
  if (*a < m->shard_lo) *a = m->shard_lo;
  if (*b > m->shard_hi) *b = m->shard_hi;
}

double grad_global_norm(Model *m) {
  double ss = 0;
  for (int g = 0; g < N_GROUPS; g++) {
    size_t a, b;
    group_range(m, g, &a, &b);
    if (b > a) ss += m->be->sumsq(m->be, (char *)m->grads + a * m->be->size[BUF_ACT], b - a);
  }
  /* each rank holds the summed gradients of its dense shard and its experts */
  if (m->comm) ss = comm_sum_f64(m->comm, ss);
  return sqrt(ss);
}

void optim_step(Model *m, int64_t step, double lr_scale, double clip_scale) {
  const Config *c = &m->cfg;
  Backend *be = m->be;
  for (int g = 0; g < N_GROUPS; g++) {
    size_t a, b;
    group_range(m, g, &a, &b);
    if (b <= a) continue;
    double b2 = g == GROUP_EXPERT ? c->adam_beta2_expert : c->adam_beta2;
    double wd = (g == GROUP_DECAY || g == GROUP_EXPERT) ? c->weight_decay : 0.0;
    AdamParams ap = {
        .lr = (float)group_lr(c, (OptGroup)g, lr_scale),
        .b1 = (float)c->adam_beta1,
        .b2 = (float)b2,
        .eps = (float)c->adam_eps,
        .wd = (float)wd,
        .bc1 = (float)(1.0 - pow(c->adam_beta1, (double)step)),
        .bc2 = (float)(1.0 - pow(b2, (double)step)),
        .grad_scale = (float)clip_scale,
        .stochastic_seed = !m->master && be->size[BUF_ACT] < be->size[BUF_F32]
                               ? ((uint64_t)c->seed << 32) ^ (uint64_t)step * 0x9E3779B97F4A7C15ull ^
                                     (uint64_t)a * 0xD1B54A32D192ED03ull ^
                                     (g == GROUP_EXPERT ? (uint64_t)m->ep_rank << 40 : 0)
                               : 0, /* keyed by where the range starts: shards draw apart */
    };
    const size_t sa = be->size[BUF_ACT], sf = be->size[BUF_F32], so = model_state_offset(m, a) * sf;
    be->adamw(be, (char *)m->params + a * sa, m->master ? (char *)m->master + so : NULL,
              (char *)m->grads + a * sa, (char *)m->adam_m + so, (char *)m->adam_v + so, b - a, &ap);
  }
  /* every rank updated its dense shard: share them */
  if (m->comm) m->comm->all_gather(m->comm, m->params, m->dense_end, BUF_ACT);
  /* the fp8/nvfp4 forward reads the new expert weights through their cache */
  model_quant_refresh(m);
}
