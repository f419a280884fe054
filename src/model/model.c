/* model.c: model dimensions, the parameter table in the original's naming,
 * allocation and initialisation, router bias balancing and FLOP counts.
 * The forward/backward orchestration lives in model_step.c. */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

ModelDims model_dims(const Config *c) {
  ModelDims d;
  memset(&d, 0, sizeof d);
  d.V = (int)c->vocab_size;
  d.D = (int)c->dim;
  d.L = (int)c->n_layers;
  d.n_dense = (int)c->n_dense_layers;
  d.dsa = !strcmp(c->attn, "dsa");
  d.mla = d.dsa || !strcmp(c->attn, "mla");
  if (d.dsa) {
    d.dsa_sparse = strcmp(c->dsa_training_mode, "dense_warmup") != 0;
    d.Hi = (int)c->dsa_idx_heads;
    d.di = (int)c->dsa_idx_dim;
    d.top_k = (int)c->dsa_top_k;
  }
  d.H = (int)c->n_heads;
  if (d.mla) {
    d.Hkv = d.H;
    d.qr = (int)c->q_lora_rank;
    d.kvr = (int)c->kv_lora_rank;
    d.dn = (int)c->qk_nope_head_dim;
    d.dr = (int)c->qk_rope_head_dim;
    d.dvh = (int)c->v_head_dim;
    d.dqk = d.dn + d.dr;
    d.dv = d.dvh;
    d.rope_dim = d.dr;
  } else {
    d.Hkv = c->n_kv_heads > 0 ? (int)c->n_kv_heads : d.H;
    d.hd = c->head_dim > 0 ? (int)c->head_dim : d.D / d.H;
    d.dqk = d.dv = d.hd;
    d.rope_dim = (int)c->qk_rope_head_dim < d.hd ? (int)c->qk_rope_head_dim : d.hd;
  }
  d.swa_Hkv = c->swa_kv_heads > 0 ? (int)c->swa_kv_heads : d.H;
  d.swa_hd = (int)c->v_head_dim;
  d.F = (int)c->inter_dim;
  d.E = (int)c->n_routed_experts;
  d.K = (int)c->n_activated_experts;
  d.Fm = (int)c->moe_inter_dim;
  d.Fs = (int)(c->n_shared_experts * c->moe_inter_dim);
  return d;
}

/* Adds "layers.<l>.<suffix>" with a 1-D or 2-D shape. */
static int add_w(ParamTable *t, int l, const char *suffix, int64_t rows, int64_t cols,
                 ParamOwner own, OptGroup g, InitKind init, float std) {
  char name[96];
  snprintf(name, sizeof name, "layers.%d.%s", l, suffix);
  int64_t shape[2] = {rows, cols};
  return params_add(t, name, cols ? 2 : 1, shape, own, g, init, std);
}

static void build_table(Model *m) {
  const ModelDims *d = &m->d;
  ParamTable *t = &m->pt;
  int64_t emb_shape[2] = {d->V, d->D};
  m->embedding = params_add(t, "embedding.weight", 2, emb_shape, OWN_DENSE, GROUP_NO_DECAY,
                            INIT_NORMAL, 0.02f);
  m->lp = xcalloc((size_t)d->L, sizeof *m->lp);
  const float in_std = 0.02f;
  for (int l = 0; l < d->L; l++) {
    LayerParams *lp = &m->lp[l];
    memset(lp, -1, sizeof *lp);
    float out_std = 0.02f / sqrtf(2.0f * (float)(l + 1));
    lp->attn_norm = add_w(t, l, "attn_norm.weight", d->D, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ONES, 0);
    const int global = model_layer_global(&m->cfg, l);
    lp->window = global ? 0 : (int)m->cfg.attn_local_window;
    int wo_in = d->H * d->dv;
    if (!global) {
      const int64_t width = (int64_t)(d->H + 2 * d->swa_Hkv) * d->swa_hd;
      lp->wqkv = add_w(t, l, "attn.wqkv.weight", width, d->D, OWN_DENSE, GROUP_DECAY,
                       INIT_TRUNC_NORMAL, in_std);
      lp->wqkv_b = add_w(t, l, "attn.wqkv.bias", width, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ZEROS, 0);
      lp->sinks = add_w(t, l, "attn.sinks", d->H, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ZEROS, 0);
      lp->wo_b = add_w(t, l, "attn.wo.bias", d->D, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ZEROS, 0);
      wo_in = d->H * d->swa_hd;
    } else if (d->mla) {
      if (d->qr > 0) {
        lp->wq_a = add_w(t, l, "attn.wq_a.weight", d->qr, d->D, OWN_DENSE, GROUP_DECAY,
                         INIT_TRUNC_NORMAL, in_std);
        lp->q_norm = add_w(t, l, "attn.q_norm.weight", d->qr, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ONES, 0);
        lp->wq_b = add_w(t, l, "attn.wq_b.weight", (int64_t)d->H * d->dqk, d->qr, OWN_DENSE,
                         GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
      } else {
        lp->wq = add_w(t, l, "attn.wq.weight", (int64_t)d->H * d->dqk, d->D, OWN_DENSE, GROUP_DECAY,
                       INIT_TRUNC_NORMAL, in_std);
      }
      lp->wkv_a = add_w(t, l, "attn.wkv_a.weight", d->kvr + d->dr, d->D, OWN_DENSE, GROUP_DECAY,
                        INIT_TRUNC_NORMAL, in_std);
      lp->kv_norm = add_w(t, l, "attn.kv_norm.weight", d->kvr, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ONES, 0);
      lp->wkv_b = add_w(t, l, "attn.wkv_b.weight", (int64_t)d->H * (d->dn + d->dvh), d->kvr,
                        OWN_DENSE, GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
      if (d->dsa) { /* the lightning indexer, named as DeepSeek-V3.2's */
        lp->idx_wq = add_w(t, l, "attn.indexer.wq_b.weight", (int64_t)d->Hi * d->di, d->qr,
                           OWN_DENSE, GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
        lp->idx_wk = add_w(t, l, "attn.indexer.wk.weight", d->di, d->D, OWN_DENSE, GROUP_DECAY,
                           INIT_TRUNC_NORMAL, in_std);
        lp->idx_k_norm = add_w(t, l, "attn.indexer.k_norm.weight", d->di, 0, OWN_DENSE,
                               GROUP_NO_DECAY, INIT_ONES, 0);
        lp->idx_w = add_w(t, l, "attn.indexer.weights_proj.weight", d->Hi, d->D, OWN_DENSE,
                          GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
      }
    } else {
      /* wq, wk, wv adjacent: one [(H + 2 Hkv) * hd, D] projection. */
      lp->wq = add_w(t, l, "attn.wq.weight", (int64_t)d->H * d->hd, d->D, OWN_DENSE, GROUP_DECAY,
                     INIT_TRUNC_NORMAL, in_std);
      lp->wk = add_w(t, l, "attn.wk.weight", (int64_t)d->Hkv * d->hd, d->D, OWN_DENSE, GROUP_DECAY,
                     INIT_TRUNC_NORMAL, in_std);
      lp->wv = add_w(t, l, "attn.wv.weight", (int64_t)d->Hkv * d->hd, d->D, OWN_DENSE, GROUP_DECAY,
                     INIT_TRUNC_NORMAL, in_std);
      t->p[lp->wk].packed = t->p[lp->wv].packed = 1;
    }
    lp->wo = add_w(t, l, "attn.wo.weight", d->D, wo_in, OWN_DENSE, GROUP_DECAY,
                   INIT_TRUNC_NORMAL, out_std);
    lp->ffn_norm = add_w(t, l, "ffn_norm.weight", d->D, 0, OWN_DENSE, GROUP_NO_DECAY, INIT_ONES, 0);
    if (l < d->n_dense) {
      lp->w1 = add_w(t, l, "ffn.w1.weight", d->F, d->D, OWN_DENSE, GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
      lp->w3 = add_w(t, l, "ffn.w3.weight", d->F, d->D, OWN_DENSE, GROUP_DECAY, INIT_TRUNC_NORMAL, in_std);
      t->p[lp->w3].packed = 1;
      lp->w2 = add_w(t, l, "ffn.w2.weight", d->D, d->F, OWN_DENSE, GROUP_DECAY, INIT_TRUNC_NORMAL, out_std);
    } else {
      lp->moe_index = m->n_moe++;
      lp->gate = add_w(t, l, "ffn.router.gate.weight", d->E, d->D, OWN_DENSE, GROUP_ROUTER,
                       INIT_TRUNC_NORMAL, out_std);
      char name[96];
      /* this rank's experts only: [E_local, ...], the slice ep_rank of [E, ...] */
      const int64_t El = m->E_local;
      int64_t s13[3] = {El, d->D, 2 * (int64_t)d->Fm}, s2[3] = {El, d->Fm, d->D};
      snprintf(name, sizeof name, "layers.%d.ffn.experts.w13", l);
      lp->exp_w13 = params_add(t, name, 3, s13, OWN_EXPERT, GROUP_EXPERT, INIT_TRUNC_NORMAL, out_std);
      snprintf(name, sizeof name, "layers.%d.ffn.experts.w2", l);
      lp->exp_w2 = params_add(t, name, 3, s2, OWN_EXPERT, GROUP_EXPERT, INIT_TRUNC_NORMAL, out_std);
      t->p[lp->exp_w13].init_base = (size_t)m->ep_rank * t->p[lp->exp_w13].numel;
      t->p[lp->exp_w2].init_base = (size_t)m->ep_rank * t->p[lp->exp_w2].numel;
      if (d->Fs > 0) {
        lp->sh_w1 = add_w(t, l, "ffn.shared.w1.weight", d->Fs, d->D, OWN_DENSE, GROUP_DECAY,
                          INIT_TRUNC_NORMAL, in_std);
        lp->sh_w3 = add_w(t, l, "ffn.shared.w3.weight", d->Fs, d->D, OWN_DENSE, GROUP_DECAY,
                          INIT_TRUNC_NORMAL, in_std);
        t->p[lp->sh_w3].packed = 1;
        lp->sh_w2 = add_w(t, l, "ffn.shared.w2.weight", d->D, d->Fs, OWN_DENSE, GROUP_DECAY,
                          INIT_TRUNC_NORMAL, out_std);
      }
    }
  }
  int64_t dshape[1] = {d->D};
  m->final_norm = params_add(t, "norm.weight", 1, dshape, OWN_DENSE, GROUP_NO_DECAY, INIT_ONES, 0);
  m->lm_head = params_add(t, "lm_head.weight", 2, emb_shape, OWN_DENSE, GROUP_NO_DECAY,
                          INIT_TRUNC_NORMAL, 1.0f / sqrtf((float)d->D));
  params_finalize(t, 16 * (size_t)m->ep_world);
}

void model_table(const Config *cfg, int ep_rank, int ep_world, ParamTable *out) {
  Model m; /* only what build_table reads and writes; nothing allocated on a backend */
  memset(&m, 0, sizeof m);
  m.cfg = *cfg;
  m.d = model_dims(cfg);
  m.ep_rank = ep_rank;
  m.ep_world = ep_world;
  m.E_local = m.d.E / ep_world;
  build_table(&m);
  free(m.lp);
  *out = m.pt;
}

void model_shard_bounds(const ParamTable *t, int ep_rank, int ep_world, size_t *lo, size_t *hi) {
  const size_t dense_end = t->group_off[GROUP_EXPERT];
  *lo = dense_end / (size_t)ep_world * (size_t)ep_rank;
  *hi = *lo + dense_end / (size_t)ep_world;
}

int model_layer_global(const Config *cfg, int l) {
  return cfg->attn_global_every <= 1 || (l + 1) % cfg->attn_global_every == 0 ||
         l == cfg->n_layers - 1;
}

void *model_ptr(const Model *m, void *base, int p) {
  NMOE_ASSERT(p >= 0 && p < m->pt.n);
  return (char *)base + m->pt.p[p].offset * m->be->size[BUF_ACT];
}

size_t model_state_offset(const Model *m, size_t elem) {
  if (elem >= m->dense_end) return (m->shard_hi - m->shard_lo) + (elem - m->dense_end);
  NMOE_ASSERT(elem >= m->shard_lo && elem < m->shard_hi);
  return elem - m->shard_lo;
}

/* Fills the parameters in chunks through a host float staging buffer (the
 * master copy: only the elements this rank keeps state for). */
static void init_params(Model *m) {
  enum { CHUNK = 1 << 22 };
  float *host = xmalloc(CHUNK * sizeof(float));
  uint64_t seed = (uint64_t)m->cfg.seed;
  for (int r = 0; r < m->pt.n; r++) {
    const ParamInfo *pi = &m->pt.p[r];
    for (size_t start = 0; start < pi->numel; start += CHUNK) {
      size_t n = pi->numel - start < CHUNK ? pi->numel - start : CHUNK;
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) host[i] = params_init_value(pi, r, seed, start + i);
      char *dst = (char *)m->params + (pi->offset + start) * m->be->size[BUF_ACT];
      m->be->put(m->be, dst, BUF_ACT, host, n);
      size_t lo = pi->offset + start, hi = lo + n; /* [lo, hi) of the table */
      if (lo < m->dense_end) {
        lo = lo > m->shard_lo ? lo : m->shard_lo;
        hi = hi < m->shard_hi ? hi : m->shard_hi;
      }
      if (m->master && lo < hi) {
        char *mdst = (char *)m->master + model_state_offset(m, lo) * m->be->size[BUF_F32];
        m->be->put(m->be, mdst, BUF_F32, host + (lo - pi->offset - start), hi - lo);
      }
    }
  }
  free(host);
}

Model *model_create(const Config *cfg, Backend *be, Comm *comm) {
  Model *m = xcalloc(1, sizeof *m);
  m->cfg = *cfg;
  m->be = be;
  m->comm = comm && comm->world > 1 ? comm : NULL;
  m->d = model_dims(cfg);
  const ModelDims *d = &m->d;
  m->ep_rank = m->comm ? m->comm->rank : 0;
  m->ep_world = m->comm ? m->comm->world : 1;
  if (d->E > 0 && d->L > d->n_dense && d->E % m->ep_world)
    nmoe_fatal("n_routed_experts (%d) must be divisible by the world size (%d): each rank owns "
               "the same number of experts", d->E, m->ep_world);
  m->E_local = d->E / m->ep_world;
  if (d->D <= 0 || d->L <= 0 || d->H <= 0 || d->V <= 0)
    nmoe_fatal("model dimensions must be positive (dim=%d n_layers=%d n_heads=%d vocab_size=%d)",
               d->D, d->L, d->H, d->V);
  if (!d->mla && (d->H % d->Hkv || d->hd <= 0 || d->rope_dim % 2))
    nmoe_fatal("mha attention needs n_heads divisible by n_kv_heads, head_dim > 0 and an even "
               "qk_rope_head_dim (n_heads=%d n_kv_heads=%d head_dim=%d)", d->H, d->Hkv, d->hd);
  if (d->mla && d->dr % 2) nmoe_fatal("qk_rope_head_dim must be even (got %d)", d->dr);
  if (d->dsa) {
    if (d->Hi <= 0 || d->di < d->dr || d->top_k <= 0 || d->qr <= 0)
      nmoe_fatal("dsa needs dsa_idx_heads > 0, dsa_idx_dim >= qk_rope_head_dim, dsa_top_k > 0 "
                 "and q_lora_rank > 0 (got %d, %d, %d, %d)", d->Hi, d->di, d->top_k, d->qr);
    if (!be->attn_sel_fwd || !be->attn_sel_bwd || !be->dsa_index_fwd || !be->dsa_index_bwd ||
        !be->dsa_topk || !be->dsa_attn_dist || !be->dsa_kl)
      nmoe_fatal("attn = dsa runs on the CPU backend only (no CUDA kernels yet)");
  }
  int n_local = 0;
  for (int l = 0; l < d->L; l++) n_local += !model_layer_global(cfg, l);
  if (n_local && (d->swa_Hkv <= 0 || d->H % d->swa_Hkv || d->swa_hd <= 0 ||
                  d->rope_dim > d->swa_hd))
    nmoe_fatal("swa local layers need swa_kv_heads dividing n_heads and qk_rope_head_dim <= "
               "v_head_dim (n_heads=%d swa_kv_heads=%d v_head_dim=%d qk_rope_head_dim=%d)",
               d->H, d->swa_Hkv, d->swa_hd, d->rope_dim);
  build_table(m);
  size_t n = m->pt.total;
  m->params = be->alloc(be, n * be->size[BUF_ACT]);
  m->grads = be->alloc(be, n * be->size[BUF_ACT]);
  m->dense_end = m->pt.group_off[GROUP_EXPERT];
  model_shard_bounds(&m->pt, m->ep_rank, m->ep_world, &m->shard_lo, &m->shard_hi);
  m->n_state = (m->shard_hi - m->shard_lo) + (n - m->dense_end);
  /* A master copy only where storage is narrower than fp32. */
  if (be->size[BUF_ACT] < be->size[BUF_F32] && !strcmp(cfg->master_weights, "fp32"))
    m->master = be->alloc(be, m->n_state * be->size[BUF_F32]);
  m->adam_m = be->alloc(be, m->n_state * be->size[BUF_F32]);
  m->adam_v = be->alloc(be, m->n_state * be->size[BUF_F32]);
  size_t nb = (size_t)(m->n_moe > 0 ? m->n_moe : 1) * (size_t)(d->E > 0 ? d->E : 1);
  m->router_bias = be->alloc(be, nb * be->size[BUF_F32]);
  m->router_bias_host = xcalloc(nb, sizeof(float));
  m->counts_host = xcalloc(nb, sizeof(int32_t));
  m->imp_host = xcalloc(nb, sizeof(double));
  m->off_host = xcalloc((size_t)d->E + 1, sizeof(int32_t));
  if (m->comm && m->n_moe > 0) {
    m->ep_counts = xcalloc((size_t)m->n_moe * m->ep_world * d->E, sizeof(int32_t));
    m->ep_plan = xcalloc((size_t)m->n_moe, sizeof *m->ep_plan);
    for (int l = 0; l < m->n_moe; l++) ep_plan_init(&m->ep_plan[l], m->ep_rank, m->ep_world, d->E);
  }
  init_params(m);
  m->quant_fmt = !strcmp(cfg->dtype, "fp8")     ? QFMT_FP8_E4M3
                 : !strcmp(cfg->dtype, "nvfp4") ? QFMT_FP4_E2M1
                                                : QFMT_BF16;
  if (m->quant_fmt != QFMT_BF16 && m->n_moe > 0) {
    if (d->D % 32 || d->Fm % 32)
      nmoe_fatal("dtype=%s needs dim (%d) and moe_inter_dim (%d) divisible by 32 (one scale per "
                 "32 elements along each expert GEMM's K)", cfg->dtype, d->D, d->Fm);
    m->expert_q = be->alloc(be, (n - m->dense_end) * be->size[BUF_ACT]);
    m->expert_q_stale = 1;
  }
  return m;
}

void *model_expert_q(const Model *m, int p) {
  NMOE_ASSERT(m->expert_q && m->pt.p[p].offset >= m->dense_end);
  return (char *)m->expert_q + (m->pt.p[p].offset - m->dense_end) * m->be->size[BUF_ACT];
}

void model_quant_refresh(Model *m) {
  if (!m->expert_q) return;
  const ModelDims *d = &m->d;
  for (int l = 0; l < d->L; l++) {
    const LayerParams *lp = &m->lp[l];
    if (lp->moe_index < 0) continue;
    m->be->quantize_blocks(m->be, model_expert_q(m, lp->exp_w13), model_ptr(m, m->params, lp->exp_w13),
                           m->E_local, d->D, 2 * d->Fm, m->quant_fmt);
    m->be->quantize_blocks(m->be, model_expert_q(m, lp->exp_w2), model_ptr(m, m->params, lp->exp_w2),
                           m->E_local, d->Fm, d->D, m->quant_fmt);
  }
  m->expert_q_stale = 0;
}

void model_update_router_bias(Model *m, const int32_t *counts, double rate) {
  const int E = m->d.E;
  for (int l = 0; l < m->n_moe; l++) {
    const int32_t *c = counts + (size_t)l * E;
    float *b = m->router_bias_host + (size_t)l * E;
    double total = 0, mean_sign = 0;
    for (int e = 0; e < E; e++) total += c[e];
    if (total <= 0) continue;
    double sgn[E];
    for (int e = 0; e < E; e++) {
      double load = c[e] / total - 1.0 / E;
      sgn[e] = (load > 0) - (load < 0);
      mean_sign += sgn[e];
    }
    mean_sign /= E;
    for (int e = 0; e < E; e++) {
      double v = b[e] - rate * (sgn[e] - mean_sign);
      b[e] = (float)(v > 16 ? 16 : v < -16 ? -16 : v);
    }
  }
  m->be->put(m->be, m->router_bias, BUF_F32, m->router_bias_host, (size_t)m->n_moe * E);
}

int64_t model_param_count(const Model *m) {
  int64_t n = 0; /* the whole model: every rank's experts */
  for (int i = 0; i < m->pt.n; i++)
    n += (int64_t)m->pt.p[i].numel * (m->pt.p[i].owner == OWN_EXPERT ? m->ep_world : 1);
  return n;
}

/* Matmul weights of layer l's attention block. */
static int64_t attn_matmul_params(const ModelDims *d, const Config *c, int l) {
  if (!model_layer_global(c, l))
    return (int64_t)(d->H + 2 * d->swa_Hkv) * d->swa_hd * d->D + (int64_t)d->D * d->H * d->swa_hd;
  int64_t attn;
  if (d->mla) {
    int64_t q = d->qr > 0 ? (int64_t)d->qr * d->D + (int64_t)d->H * d->dqk * d->qr
                          : (int64_t)d->H * d->dqk * d->D;
    attn = q + (int64_t)(d->kvr + d->dr) * d->D + (int64_t)d->H * (d->dn + d->dvh) * d->kvr;
    if (d->dsa) attn += (int64_t)d->Hi * d->di * d->qr + (int64_t)(d->di + d->Hi) * d->D;
  } else {
    attn = (int64_t)(d->H + 2 * d->Hkv) * d->hd * d->D;
  }
  return attn + (int64_t)d->D * d->H * d->dv;
}

int64_t model_active_matmul_params(const ModelDims *d, const Config *c) {
  int64_t attn = 0;
  for (int l = 0; l < d->L; l++) attn += attn_matmul_params(d, c, l);
  int64_t dense_ffn = 3 * (int64_t)d->D * d->F;
  int64_t moe_ffn = (int64_t)d->E * d->D + 3 * (int64_t)d->D * d->Fm * d->K + 3 * (int64_t)d->D * d->Fs;
  int64_t n_moe = d->L - d->n_dense;
  return attn + (int64_t)d->n_dense * dense_ffn + n_moe * moe_ffn + (int64_t)d->V * d->D;
}

/* Mean keys a causal query sees when it sees at most w: T/2 at w >= T. */
static double mean_keys(double w, int T) {
  return w < T ? w - w * w / (2.0 * T) : T / 2.0;
}

double model_flops_per_token(const ModelDims *d, const Config *c, int T) {
  double attn = 0;
  for (int l = 0; l < d->L; l++) {
    if (model_layer_global(c, l) && d->dsa) {
      /* indexer scores over every causal pair; attention over the top-k keys
       * (a window of top_k keys on average) in sparse mode */
      attn += 6.0 * d->Hi * d->di * (T / 2.0);
      attn += 6.0 * d->H * (d->dqk + d->dv) * (d->dsa_sparse ? mean_keys(d->top_k, T) : T / 2.0);
    } else if (model_layer_global(c, l)) {
      attn += 6.0 * d->H * (d->dqk + d->dv) * (T / 2.0); /* causal: T/2 keys per query */
    } else {
      attn += 6.0 * d->H * 2 * d->swa_hd * mean_keys((double)c->attn_local_window, T);
    }
  }
  return 6.0 * (double)model_active_matmul_params(d, c) + attn;
}
