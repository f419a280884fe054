/* model_acts.c: the activation and scratch buffers of one (B, T) shape:
 * every activation the backward needs is kept per layer (LayerActs), except
 * those recompute_attn / recompute_experts share across layers; RoPE tables;
 * the growable buffers of expert parallelism. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "model/model_internal.h"

/* Allocates an activation/scratch buffer owned by the model (freed by free_acts). */
static void *alloc_kind(Model *m, BufKind k, size_t n) {
  if (m->n_owned == m->cap_owned) {
    m->cap_owned = m->cap_owned ? 2 * m->cap_owned : 64;
    m->owned = xrealloc(m->owned, (size_t)m->cap_owned * sizeof *m->owned);
  }
  return m->owned[m->n_owned++] = m->be->alloc(m->be, n * m->be->size[k]);
}

/* A layer activation: its own buffer, or (share) one buffer reused by every
 * layer, for activations recomputed in backward instead of kept. */
static void *act_buf(Model *m, void **shared, int share, BufKind k, size_t n) {
  if (!share) return alloc_kind(m, k, n);
  if (!*shared) *shared = alloc_kind(m, k, n);
  return *shared;
}

/* RoPE tables cos/sin [T, rope_dim/2], with YaRN NTK-by-parts when
 * rope_scaling_factor > 1 (reference section 2.3). */
static void build_rope(Model *m, int T) {
  const int half = m->d.rope_dim / 2;
  if (half == 0) return;
  const Config *c = &m->cfg;
  float *cs = xmalloc((size_t)T * half * sizeof(float));
  float *sn = xmalloc((size_t)T * half * sizeof(float));
  double factor = c->rope_scaling_factor, conc = 1.0;
  double low = 0, high = 0;
  if (factor > 1.0) {
    conc = 0.1 * log(factor) + 1.0;
    double ctx = (double)c->max_position_embeddings, base = c->rope_theta;
    low = half * log(ctx / (c->rope_ntk_beta * 2 * M_PI)) / log(base);
    high = half * log(ctx / (c->rope_ntk_alpha * 2 * M_PI)) / log(base);
  }
  for (int i = 0; i < half; i++) {
    double freq = pow(c->rope_theta, (2.0 * i) / m->d.rope_dim);
    double inv = 1.0 / freq;
    if (factor > 1.0) {
      double ramp = (i - low) / (high - low);
      double mask = 1.0 - (ramp < 0 ? 0 : ramp > 1 ? 1 : ramp);
      inv = (1.0 / (factor * freq)) * (1 - mask) + (1.0 / freq) * mask;
    }
    for (int t = 0; t < T; t++) {
      cs[(size_t)t * half + i] = (float)(cos(t * inv) * conc);
      sn[(size_t)t * half + i] = (float)(sin(t * inv) * conc);
    }
  }
  m->rope_cos = alloc_kind(m, BUF_F32, (size_t)T * half);
  m->rope_sin = alloc_kind(m, BUF_F32, (size_t)T * half);
  m->be->put(m->be, m->rope_cos, BUF_F32, cs, (size_t)T * half);
  m->be->put(m->be, m->rope_sin, BUF_F32, sn, (size_t)T * half);
  free(cs);
  free(sn);
}


/* Grows gb to at least bytes (contents are not kept). */
void *model_grow(Model *m, GrowBuf *gb, size_t bytes) {
  if (bytes > gb->bytes) {
    if (gb->p) m->be->free(m->be, gb->p);
    gb->bytes = bytes + bytes / 4; /* headroom: routing varies from step to step */
    gb->p = m->be->alloc(m->be, gb->bytes);
  }
  return gb->p;
}

static void grow_free(Model *m, GrowBuf *gb) {
  if (gb->p) m->be->free(m->be, gb->p);
  gb->p = NULL;
  gb->bytes = 0;
}

static void free_acts(Model *m) {
  for (int i = 0; i < m->n_owned; i++) m->be->free(m->be, m->owned[i]);
  m->n_owned = 0;
  m->dsa_score = m->dsa_p = NULL;
  const int n_rows = m->cfg.recompute_experts ? 1 : m->n_moe;
  for (int i = 0; m->ep_rows && i < n_rows; i++) {
    grow_free(m, &m->ep_rows[i].x);
    grow_free(m, &m->ep_rows[i].gu);
    grow_free(m, &m->ep_rows[i].h);
  }
  free(m->ep_rows);
  m->ep_rows = NULL;
  grow_free(m, &m->ep_s1);
  grow_free(m, &m->ep_s2);
  grow_free(m, &m->quant_rows);
  free(m->acts);
  m->acts = NULL;
}

/* Keys per query of DSA's sparse attention (the selection's row width). */
int model_dsa_keys(const Model *m) {
  return m->d.top_k < m->T ? m->d.top_k : m->T;
}

/* Allocates activations for batches of B sequences of T tokens. */
void model_ensure_acts(Model *m, int B, int T) {
  if (m->acts && m->B == B && m->T == T) return;
  free_acts(m);
  const ModelDims *d = &m->d;
  const size_t N = (size_t)B * T, M = N * (size_t)d->K;
  m->B = B;
  m->T = T;
  m->acts = xcalloc((size_t)d->L, sizeof(LayerActs));
  size_t wide = max_sz((size_t)d->D, (size_t)d->H * d->dqk); /* widest per-token scratch */
  wide = max_sz(wide, (size_t)(d->H + 2 * d->Hkv) * (d->mla ? 0 : d->hd));
  wide = max_sz(wide, (size_t)d->H * (d->dn + d->dvh));
  wide = max_sz(wide, (size_t)d->kvr + d->dr);
  wide = max_sz(wide, (size_t)d->qr);
  wide = max_sz(wide, (size_t)d->Hi * d->di);
  for (int l = 0; l < d->L; l++)
    if (m->lp[l].wqkv >= 0) wide = max_sz(wide, (size_t)(d->H + 2 * d->swa_Hkv) * d->swa_hd);
  size_t big = N * wide;
  /* With recompute_attn only the attention input survives the forward; with
   * recompute_experts only the routing (ids, weights, permutation). */
  const int ra = m->cfg.recompute_attn, re = m->cfg.recompute_experts;
  LayerActs sh, sh_swa; /* shared buffers; swa layers' attention sizes differ */
  memset(&sh, 0, sizeof sh);
  memset(&sh_swa, 0, sizeof sh_swa);
  for (int l = 0; l < d->L; l++) {
    LayerActs *a = &m->acts[l];
    const LayerParams *lp = &m->lp[l];
    a->xn1 = act_buf(m, &sh.xn1, ra, BUF_ACT, N * d->D);
    a->rstd1 = act_buf(m, &sh.rstd1, ra, BUF_F32, N);
    if (lp->wqkv >= 0) {
      const int hd = d->swa_hd;
      a->qkv = act_buf(m, &sh_swa.qkv, ra, BUF_ACT, N * (d->H + 2 * d->swa_Hkv) * hd);
      a->attn_o = act_buf(m, &sh_swa.attn_o, ra, BUF_ACT, N * d->H * hd);
      a->lse = act_buf(m, &sh_swa.lse, ra, BUF_F32, N * d->H);
    } else if (d->mla) {
      if (d->qr > 0) {
        a->q_a = act_buf(m, &sh.q_a, ra, BUF_ACT, N * d->qr);
        a->q_a_rstd = act_buf(m, &sh.q_a_rstd, ra, BUF_F32, N);
        a->q_an = act_buf(m, &sh.q_an, ra, BUF_ACT, N * d->qr);
      }
      a->q = act_buf(m, &sh.q, ra, BUF_ACT, N * d->H * d->dqk);
      a->kv_a = act_buf(m, &sh.kv_a, ra, BUF_ACT, N * (d->kvr + d->dr));
      a->kv_rstd = act_buf(m, &sh.kv_rstd, ra, BUF_F32, N);
      a->kvn = act_buf(m, &sh.kvn, ra, BUF_ACT, N * d->kvr);
      a->kv = act_buf(m, &sh.kv, ra, BUF_ACT, N * d->H * (d->dn + d->dvh));
      a->k = act_buf(m, &sh.k, ra, BUF_ACT, N * d->H * d->dqk);
      a->v = act_buf(m, &sh.v, ra, BUF_ACT, N * d->H * d->dvh);
      if (lp->idx_wq >= 0) {
        a->idx_q = act_buf(m, &sh.idx_q, ra, BUF_ACT, N * d->Hi * d->di);
        a->idx_kraw = act_buf(m, &sh.idx_kraw, ra, BUF_ACT, N * d->di);
        a->idx_krstd = act_buf(m, &sh.idx_krstd, ra, BUF_F32, N);
        a->idx_k = act_buf(m, &sh.idx_k, ra, BUF_ACT, N * d->di);
        a->idx_w = act_buf(m, &sh.idx_w, ra, BUF_ACT, N * d->Hi);
        if (d->dsa_sparse) a->sel = act_buf(m, &sh.sel, ra, BUF_I32, N * (size_t)model_dsa_keys(m));
        if (!m->dsa_score) {
          m->dsa_score = alloc_kind(m, BUF_F32, N * T);
          m->dsa_p = alloc_kind(m, BUF_F32, N * T);
        }
      }
    } else {
      a->qkv = act_buf(m, &sh.qkv, ra, BUF_ACT, N * (d->H + 2 * d->Hkv) * d->hd);
    }
    if (lp->wqkv < 0) {
      a->attn_o = act_buf(m, &sh.attn_o, ra, BUF_ACT, N * d->H * d->dv);
      a->lse = act_buf(m, &sh.lse, ra, BUF_F32, N * d->H);
    }
    a->xn2 = alloc_kind(m, BUF_ACT, N * d->D);
    a->rstd2 = alloc_kind(m, BUF_F32, N);
    if (lp->moe_index < 0) {
      a->gu = alloc_kind(m, BUF_ACT, N * 2 * d->F);
      a->h = alloc_kind(m, BUF_ACT, N * d->F);
      big = max_sz(big, N * 2 * d->F);
    } else {
      a->scores = alloc_kind(m, BUF_F32, N * d->E);
      a->w = alloc_kind(m, BUF_F32, M);
      a->idx = alloc_kind(m, BUF_I32, M);
      a->counts = alloc_kind(m, BUF_I32, d->E);
      a->off = alloc_kind(m, BUF_I32, d->E + 1);
      a->row_of = alloc_kind(m, BUF_I32, M);
      a->pair_of = alloc_kind(m, BUF_I32, M);
      a->imp = alloc_kind(m, BUF_F32, d->E);
      a->ye = act_buf(m, &sh.ye, re, BUF_ACT, M * d->D);
      if (m->comm) {
        a->xe = act_buf(m, &sh.xe, 1, BUF_ACT, M * d->D); /* sent at once: scratch */
        a->off_r = alloc_kind(m, BUF_I32, (size_t)m->E_local + 1);
      } else {
        a->xe = act_buf(m, &sh.xe, re, BUF_ACT, M * d->D);
        a->gu_e = act_buf(m, &sh.gu_e, re, BUF_ACT, M * 2 * d->Fm);
        a->h_e = act_buf(m, &sh.h_e, re, BUF_ACT, M * d->Fm);
      }
      if (d->Fs > 0) {
        a->gu_s = act_buf(m, &sh.gu_s, re, BUF_ACT, N * 2 * d->Fs);
        a->h_s = act_buf(m, &sh.h_s, re, BUF_ACT, N * d->Fs);
      }
      big = max_sz(big, M * max_sz((size_t)d->D, 2 * (size_t)d->Fm));
      big = max_sz(big, N * 2 * (size_t)d->Fs);
      big = max_sz(big, M); /* dw (F32 [N,K]) lives in g_big[3] */
    }
  }
  big = max_sz(big, M * (m->be->size[BUF_F32] / m->be->size[BUF_ACT] + 1));
  if (m->comm && m->n_moe > 0) {
    m->ep_rows = xcalloc(re ? 1 : (size_t)m->n_moe, sizeof *m->ep_rows);
    /* Symmetric buffers live until the comm is destroyed; a larger batch shape
     * takes new ones (all ranks change shape together). */
    if (M > m->ep_M) {
      const size_t row = (size_t)d->D * m->be->size[BUF_ACT];
      m->ep_in = m->comm->sym_alloc(m->comm, (size_t)m->ep_world * M * row);
      m->ep_ret = m->comm->sym_alloc(m->comm, M * row);
      m->ep_M = M;
    }
  }
  build_rope(m, T);
  m->sinks_f32 = alloc_kind(m, BUF_F32, (size_t)d->H);
  m->dsinks_f32 = alloc_kind(m, BUF_F32, (size_t)d->H);
  m->tok_in = alloc_kind(m, BUF_I32, N);
  m->tok_tgt = alloc_kind(m, BUF_I32, N);
  m->res = alloc_kind(m, BUF_ACT, (size_t)(d->L + 1) * N * d->D);
  m->mid = alloc_kind(m, BUF_ACT, (size_t)d->L * N * d->D);
  m->xf = alloc_kind(m, BUF_ACT, N * d->D);
  m->rstd_f = alloc_kind(m, BUF_F32, N);
  m->g_res = alloc_kind(m, BUF_ACT, N * d->D);
  m->g_xn = alloc_kind(m, BUF_ACT, N * d->D);
  m->g_tmp = alloc_kind(m, BUF_ACT, N * d->D);
  for (int i = 0; i < 5; i++) m->g_big[i] = alloc_kind(m, BUF_ACT, big);
  m->g_big_elems = big;
}

void model_free(Model *m) {
  if (!m) return;
  free_acts(m);
  Backend *be = m->be;
  void *bufs[] = {m->params, m->grads, m->master, m->adam_m, m->adam_v, m->router_bias, m->expert_q};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) be->free(be, bufs[i]);
  free(m->router_bias_host);
  free(m->counts_host);
  free(m->imp_host);
  free(m->off_host);
  for (int l = 0; m->ep_plan && l < m->n_moe; l++) ep_plan_free(&m->ep_plan[l]);
  free(m->ep_plan);
  free(m->ep_counts);
  free(m->owned);
  free(m->lp);
  params_free(&m->pt);
  free(m);
}
