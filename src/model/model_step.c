/* model_step.c: forward and backward of one batch as backend ops.
 *
 * Every activation the backward needs is kept per layer (LayerActs); the
 * backward walks the layers in reverse with a handful of scratch buffers.
 * N = B*T tokens; M = N*K routed (token, slot) rows. Gradients of weights
 * accumulate into m->grads (zeroed at the start of each step). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "model/model.h"

struct LayerActs {
  void *xn1, *rstd1;                 /* attn norm: [N,D], F32 [N] */
  void *qkv;                         /* mha, swa: [N, (H+2Hkv)*hd], bias (swa) and rope
                                        applied to q and k */
  void *q_a, *q_a_rstd, *q_an;       /* mla: [N,qr], F32 [N], [N,qr] */
  void *q;                           /* mla: [N, H*dqk], rope applied */
  void *kv_a, *kv_rstd, *kvn;        /* mla: [N, kvr+dr] (rope cols rotated), F32 [N], [N,kvr] */
  void *kv, *k, *v;                  /* mla: [N, H*(dn+dv)], [N, H*dqk], [N, H*dv] */
  void *idx_q, *idx_kraw, *idx_krstd, *idx_k, *idx_w; /* dsa indexer: [N, Hi*di] (rope
                                        applied), [N, di], F32 [N], [N, di] (normed, rope),
                                        [N, Hi] (scales folded in) */
  void *sel;                         /* dsa sparse: I32 [N, Kd] keys per query */
  void *attn_o, *lse;                /* [N, H*dv], F32 [B,H,T] */
  void *xn2, *rstd2;                 /* ffn norm */
  void *gu, *h;                      /* dense: [N,2F], [N,F] */
  void *scores, *w;                  /* moe: F32 [N,E], F32 [N,K] */
  void *idx, *counts, *off, *row_of, *pair_of; /* I32 [N,K], [E], [E+1], [N*K], [N*K] */
  void *imp;                         /* F32 [E] */
  void *xe, *gu_e, *h_e, *ye;        /* [M,D], [M,2Fm], [M,Fm], [M,D]; with expert
                                        parallelism xe is scratch and gu_e/h_e
                                        live at the owners (Model.ep_rows) */
  void *off_r;                       /* I32 [E_local+1]: owner-side expert ranges */
  void *gu_s, *h_s;                  /* shared: [N,2Fs], [N,Fs] */
};

#define ACT(m, p, elems) ((void *)((char *)(p) + (size_t)(elems) * (m)->be->size[BUF_ACT]))
#define F32AT(m, p, elems) ((void *)((char *)(p) + (size_t)(elems) * (m)->be->size[BUF_F32]))

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

/* Downloads an F32 buffer in full precision (double on the f64 CPU build):
 * the aux loss value must not lose digits the gradient check relies on. */
static void get_f32_as_double(Backend *be, double *out, const void *src, size_t n) {
  const size_t esz = be->size[BUF_F32];
  char *raw = xmalloc(n * esz);
  be->download(be, raw, src, n * esz);
  for (size_t i = 0; i < n; i++) {
    if (esz == sizeof(double)) memcpy(&out[i], raw + i * esz, sizeof(double));
    else { float f; memcpy(&f, raw + i * esz, sizeof f); out[i] = f; }
  }
  free(raw);
}

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* Grows gb to at least bytes (contents are not kept). */
static void *grow(Model *m, GrowBuf *gb, size_t bytes) {
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
static int dsa_keys(const Model *m) {
  return m->d.top_k < m->T ? m->d.top_k : m->T;
}

/* Allocates activations for batches of B sequences of T tokens. */
static void ensure_acts(Model *m, int B, int T) {
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
        if (d->dsa_sparse) a->sel = act_buf(m, &sh.sel, ra, BUF_I32, N * (size_t)dsa_keys(m));
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

static void *W(Model *m, int p) { return model_ptr(m, m->params, p); }

_Static_assert(GROUP_EXPERT == N_GROUPS - 1, "ZeRO shards the groups before the experts' one");

/* Names the time that follows (per-phase breakdown in `nmoe bench train`). */
static void phase(Model *m, const char *name) {
  if (m->be->phase) m->be->phase(m->be, name);
}
static void *G(Model *m, int p) { return model_ptr(m, m->grads, p); }

/* A packed-qkv attention block (global MHA or local SWA): kv heads, head size
 * and the parameter rows of its qkv weight, qkv bias, sinks and wo bias (-1
 * when absent). */
typedef struct Packed {
  int Hkv, hd;
  int w, b, sinks, wo_b;
} Packed;

static Packed packed_of(const Model *m, const LayerParams *lp) {
  if (lp->wqkv >= 0) return (Packed){m->d.swa_Hkv, m->d.swa_hd, lp->wqkv, lp->wqkv_b, lp->sinks, lp->wo_b};
  return (Packed){m->d.Hkv, m->d.hd, lp->wq, -1, -1, -1};
}

static AttnShape attn_shape(const Model *m, const LayerParams *lp) {
  const ModelDims *d = &m->d;
  AttnShape s = {.B = m->B, .T = m->T, .Hq = d->H, .Hkv = d->Hkv, .dqk = d->dqk, .dv = d->dv,
                 .window = lp->window};
  if (d->mla && lp->wqkv < 0) {
    s.ldq = s.ldk = d->H * d->dqk;
    s.ldv = d->H * d->dv;
  } else {
    const Packed pk = packed_of(m, lp);
    s.Hkv = pk.Hkv;
    s.dqk = s.dv = pk.hd;
    s.ldq = s.ldk = s.ldv = (d->H + 2 * pk.Hkv) * pk.hd;
  }
  s.scale = 1.0f / sqrtf((float)s.dqk);
  return s;
}

/* Sinks (row p, ACT [H]) as the F32 the attention ops take, in m->sinks_f32.
 * Where the two kinds share one representation (CPU: real_t) a copy keeps
 * every bit (the double build's gradient check needs them); on a device
 * bf16 -> float through the host is exact. */
static const void *sinks_as_f32(Model *m, int p) {
  Backend *be = m->be;
  const int H = m->d.H;
  if (be->size[BUF_ACT] == be->size[BUF_F32]) {
    be->copy(be, m->sinks_f32, W(m, p), (size_t)H * be->size[BUF_F32]);
  } else {
    float host[H];
    be->get(be, host, BUF_ACT, W(m, p), (size_t)H);
    be->put(be, m->sinks_f32, BUF_F32, host, (size_t)H);
  }
  return m->sinks_f32;
}

/* Gradient of sinks row p += m->dsinks_f32 (F32 [H]), like sinks_as_f32. */
static void sinks_grad_add(Model *m, int p) {
  Backend *be = m->be;
  const int H = m->d.H;
  if (be->size[BUF_ACT] == be->size[BUF_F32]) {
    be->add(be, G(m, p), G(m, p), m->dsinks_f32, (size_t)H);
  } else {
    float ds[H], g[H];
    be->get(be, ds, BUF_F32, m->dsinks_f32, (size_t)H);
    be->get(be, g, BUF_ACT, G(m, p), (size_t)H);
    for (int h = 0; h < H; h++) g[h] += ds[h];
    be->put(be, G(m, p), BUF_ACT, g, (size_t)H);
  }
}

/* ---------------------------------------------------------------- dsa indexer */

/* Scale of the indexer's per-head weights (DeepSeek-V3.2: Hi^-0.5 on the
 * weights, di^-0.5 as the softmax scale), folded into weights_proj's GEMM. */
static float dsa_w_scale(const ModelDims *d) {
  return 1.0f / sqrtf((float)d->Hi * (float)d->di);
}

/* The lightning indexer of layer l from the attention input xn1 and MLA's q
 * latent q_an (both only read: the indexer's loss never reaches them):
 *   q_I = rope(q_an Wq_b^T)  [N, Hi, di]   k_I = rope(rmsnorm(xn1 Wk^T))  [N, di]
 *   w = xn1 Wproj^T / sqrt(Hi di)  [N, Hi]
 * rope on the last rope dims of each head. In sparse mode the scores pick
 * each query's keys (a->sel). */
static void indexer_forward(Model *m, int l) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, T = m->T, hd = d->Hi * d->di, off = d->di - d->dr;
  be->gemm(be, a->idx_q, a->q_an, W(m, lp->idx_wq), N, hd, d->qr, 0, 1, 1, 0, 0);
  be->rope(be, a->idx_q, m->rope_cos, m->rope_sin, N, T, d->Hi, hd, d->di, off, d->dr, 0);
  be->gemm(be, a->idx_kraw, a->xn1, W(m, lp->idx_wk), N, d->di, d->D, 0, 1, 1, 0, 0);
  be->rmsnorm_fwd(be, a->idx_k, a->idx_krstd, a->idx_kraw, W(m, lp->idx_k_norm), N, d->di, d->di,
                  d->di, (float)m->cfg.rms_norm_eps);
  be->rope(be, a->idx_k, m->rope_cos, m->rope_sin, N, T, 1, d->di, d->di, off, d->dr, 0);
  be->gemm(be, a->idx_w, a->xn1, W(m, lp->idx_w), N, d->Hi, d->D, 0, 1, dsa_w_scale(d), 0, 0);
  if (a->sel) {
    phase(m, "attn_fwd.indexer");
    be->dsa_index_fwd(be, m->dsa_score, a->idx_q, a->idx_k, a->idx_w, m->B, T, d->Hi, d->di);
    be->dsa_topk(be, a->sel, m->dsa_score, m->B, T, dsa_keys(m));
  }
}

/* The indexer's loss and its gradient (indexer weights only): target p = the
 * main attention's distribution averaged over heads (over the selected keys
 * in sparse mode), KL(p || softmax(scores)) per token, mean over the global
 * batch's tokens. Adds the value to m->last_idx_loss. Uses g_big[0..3]. */
static void indexer_backward(Model *m, int l) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, T = m->T, hd = d->Hi * d->di, off = d->di - d->dr;
  const AttnShape s = attn_shape(m, lp);
  const double scale = 1.0 / ((double)N * m->ep_world);
  void **g = m->g_big;
  phase(m, "attn_bwd.indexer");
  be->dsa_index_fwd(be, m->dsa_score, a->idx_q, a->idx_k, a->idx_w, m->B, T, d->Hi, d->di);
  be->dsa_attn_dist(be, m->dsa_p, a->q, a->k, a->lse, a->sel, dsa_keys(m), &s);
  m->last_idx_loss += scale * be->dsa_kl(be, m->dsa_score, m->dsa_score, m->dsa_p, a->sel,
                                          dsa_keys(m), m->B, T, (float)scale);
  void *dq = g[0], *dk = g[1], *dw = g[2], *dkraw = g[3];
  be->dsa_index_bwd(be, dq, dk, dw, m->dsa_score, a->idx_q, a->idx_k, a->idx_w, m->B, T, d->Hi,
                    d->di);
  be->gemm(be, G(m, lp->idx_w), dw, a->xn1, d->Hi, d->D, N, 1, 0, dsa_w_scale(d), 1, 0);
  be->rope(be, dq, m->rope_cos, m->rope_sin, N, T, d->Hi, hd, d->di, off, d->dr, 1);
  be->gemm(be, G(m, lp->idx_wq), dq, a->q_an, hd, d->qr, N, 1, 0, 1, 1, 0);
  be->rope(be, dk, m->rope_cos, m->rope_sin, N, T, 1, d->di, d->di, off, d->dr, 1);
  be->rmsnorm_bwd(be, dkraw, G(m, lp->idx_k_norm), dk, a->idx_kraw, W(m, lp->idx_k_norm),
                  a->idx_krstd, N, d->di, d->di, d->di, 0);
  be->gemm(be, G(m, lp->idx_wk), dkraw, a->xn1, d->di, d->D, N, 1, 0, 1, 1, 0);
}

/* ---------------------------------------------------------------- attention */

/* Everything of the attention block up to attn_o (and lse) from its input x:
 * run in forward, and again in backward when recompute_attn. */
static void attn_core(Model *m, int l, const void *x) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, T = m->T;
  const float eps = (float)m->cfg.rms_norm_eps;
  AttnShape s = attn_shape(m, lp);
  be->rmsnorm_fwd(be, a->xn1, a->rstd1, x, W(m, lp->attn_norm), N, d->D, d->D, d->D, eps);
  const void *q, *k, *v, *sinks = NULL;
  if (d->mla && lp->wqkv < 0) {
    if (d->qr > 0) {
      be->gemm(be, a->q_a, a->xn1, W(m, lp->wq_a), N, d->qr, d->D, 0, 1, 1, 0, 0);
      be->rmsnorm_fwd(be, a->q_an, a->q_a_rstd, a->q_a, W(m, lp->q_norm), N, d->qr, d->qr, d->qr, eps);
      be->gemm(be, a->q, a->q_an, W(m, lp->wq_b), N, d->H * d->dqk, d->qr, 0, 1, 1, 0, 0);
    } else {
      be->gemm(be, a->q, a->xn1, W(m, lp->wq), N, d->H * d->dqk, d->D, 0, 1, 1, 0, 0);
    }
    be->rope(be, a->q, m->rope_cos, m->rope_sin, N, T, d->H, d->H * d->dqk, d->dqk, d->dn, d->dr, 0);
    const int lda = d->kvr + d->dr;
    be->gemm(be, a->kv_a, a->xn1, W(m, lp->wkv_a), N, lda, d->D, 0, 1, 1, 0, 0);
    be->rmsnorm_fwd(be, a->kvn, a->kv_rstd, a->kv_a, W(m, lp->kv_norm), N, d->kvr, lda, d->kvr, eps);
    void *kr = ACT(m, a->kv_a, d->kvr);
    be->rope(be, kr, m->rope_cos, m->rope_sin, N, T, 1, lda, 0, 0, d->dr, 0);
    be->gemm(be, a->kv, a->kvn, W(m, lp->wkv_b), N, d->H * (d->dn + d->dvh), d->kvr, 0, 1, 1, 0, 0);
    be->mla_kv_split(be, a->k, a->v, a->kv, kr, lda, N, d->H, d->dn, d->dr, d->dvh);
    if (lp->idx_wq >= 0) indexer_forward(m, l);
    q = a->q;
    k = a->k;
    v = a->v;
  } else {
    const Packed pk = packed_of(m, lp);
    const int width = (d->H + 2 * pk.Hkv) * pk.hd, off = pk.hd - d->rope_dim;
    be->gemm(be, a->qkv, a->xn1, W(m, pk.w), N, width, d->D, 0, 1, 1, 0, 0);
    if (pk.b >= 0) be->bias_add(be, a->qkv, W(m, pk.b), N, width);
    if (d->rope_dim > 0) {
      be->rope(be, a->qkv, m->rope_cos, m->rope_sin, N, T, d->H, width, pk.hd, off, d->rope_dim, 0);
      be->rope(be, ACT(m, a->qkv, d->H * pk.hd), m->rope_cos, m->rope_sin, N, T, pk.Hkv, width,
               pk.hd, off, d->rope_dim, 0);
    }
    q = a->qkv;
    k = ACT(m, a->qkv, d->H * pk.hd);
    v = ACT(m, a->qkv, (d->H + pk.Hkv) * pk.hd);
    if (pk.sinks >= 0) sinks = sinks_as_f32(m, pk.sinks);
  }
  phase(m, "attn_fwd.flash");
  if (a->sel) be->attn_sel_fwd(be, a->attn_o, a->lse, q, k, v, a->sel, dsa_keys(m), &s);
  else be->attn_fwd(be, a->attn_o, a->lse, q, k, v, sinks, &s);
}

/* mid = x + wo(attn(rmsnorm(x))) (+ wo's bias on swa layers) */
static void attn_forward(Model *m, int l, const void *x, void *mid) {
  Backend *be = m->be;
  const LayerParams *lp = &m->lp[l];
  const int N = m->B * m->T, D = m->d.D;
  const AttnShape s = attn_shape(m, lp);
  attn_core(m, l, x);
  phase(m, "attn_fwd.out_proj");
  be->gemm(be, m->g_tmp, m->acts[l].attn_o, W(m, lp->wo), N, D, s.Hq * s.dv, 0, 1, 1, 0, 0);
  if (lp->wo_b >= 0) be->bias_add(be, m->g_tmp, W(m, lp->wo_b), N, D);
  be->add(be, mid, x, m->g_tmp, (size_t)N * D);
}

/* g_res holds dL/d(mid) on entry and dL/d(x) on return. */
static void attn_backward(Model *m, int l, const void *x) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, T = m->T;
  AttnShape s = attn_shape(m, lp);
  const int ow = s.Hq * s.dv; /* attention output width */
  void **g = m->g_big;
  if (m->cfg.recompute_attn) attn_core(m, l, x);
  if (lp->idx_wq >= 0) indexer_backward(m, l);
  phase(m, "attn_bwd.out_proj");
  /* d_o = g_res @ wo; dwo += g_res^T @ attn_o (dbo += column sums of g_res) */
  be->gemm(be, g[0], m->g_res, W(m, lp->wo), N, ow, d->D, 0, 0, 1, 0, 0);
  be->gemm(be, G(m, lp->wo), m->g_res, a->attn_o, d->D, ow, N, 1, 0, 1, 1, 0);
  if (lp->wo_b >= 0) be->bias_grad(be, G(m, lp->wo_b), m->g_res, N, d->D);
  if (d->mla && lp->wqkv < 0) {
    const int lda = d->kvr + d->dr, hq = d->H * d->dqk;
    void *dq = g[1], *dk = g[2], *dv = g[3];
    phase(m, "attn_bwd.flash");
    if (a->sel)
      be->attn_sel_bwd(be, dq, dk, dv, g[0], a->q, a->k, a->v, a->attn_o, a->lse, a->sel,
                       dsa_keys(m), &s);
    else
      be->attn_bwd(be, dq, dk, dv, NULL, g[0], a->q, a->k, a->v, a->attn_o, a->lse, NULL, &s);
    phase(m, "attn_bwd.proj");
    void *dkv = g[0], *dkv_a = g[4]; /* d_o consumed by attn_bwd */
    be->mla_kv_split_bwd(be, dkv, ACT(m, dkv_a, d->kvr), lda, dk, dv, N, d->H, d->dn, d->dr, d->dvh);
    void *d_kvn = g[2]; /* dk consumed */
    be->gemm(be, d_kvn, dkv, W(m, lp->wkv_b), N, d->kvr, d->H * (d->dn + d->dvh), 0, 0, 1, 0, 0);
    be->gemm(be, G(m, lp->wkv_b), dkv, a->kvn, d->H * (d->dn + d->dvh), d->kvr, N, 1, 0, 1, 1, 0);
    be->rmsnorm_bwd(be, dkv_a, G(m, lp->kv_norm), d_kvn, a->kv_a, W(m, lp->kv_norm), a->kv_rstd, N,
                    d->kvr, lda, d->kvr, 0);
    be->rope(be, ACT(m, dkv_a, d->kvr), m->rope_cos, m->rope_sin, N, T, 1, lda, 0, 0, d->dr, 1);
    be->gemm(be, m->g_xn, dkv_a, W(m, lp->wkv_a), N, d->D, lda, 0, 0, 1, 0, 0);
    be->gemm(be, G(m, lp->wkv_a), dkv_a, a->xn1, lda, d->D, N, 1, 0, 1, 1, 0);
    be->rope(be, dq, m->rope_cos, m->rope_sin, N, T, d->H, hq, d->dqk, d->dn, d->dr, 1);
    if (d->qr > 0) {
      void *d_qan = g[2], *d_qa = g[3];
      be->gemm(be, d_qan, dq, W(m, lp->wq_b), N, d->qr, hq, 0, 0, 1, 0, 0);
      be->gemm(be, G(m, lp->wq_b), dq, a->q_an, hq, d->qr, N, 1, 0, 1, 1, 0);
      be->rmsnorm_bwd(be, d_qa, G(m, lp->q_norm), d_qan, a->q_a, W(m, lp->q_norm), a->q_a_rstd, N,
                      d->qr, d->qr, d->qr, 0);
      be->gemm(be, m->g_xn, d_qa, W(m, lp->wq_a), N, d->D, d->qr, 0, 0, 1, 1, 0);
      be->gemm(be, G(m, lp->wq_a), d_qa, a->xn1, d->qr, d->D, N, 1, 0, 1, 1, 0);
    } else {
      be->gemm(be, m->g_xn, dq, W(m, lp->wq), N, d->D, hq, 0, 0, 1, 1, 0);
      be->gemm(be, G(m, lp->wq), dq, a->xn1, hq, d->D, N, 1, 0, 1, 1, 0);
    }
  } else {
    const Packed pk = packed_of(m, lp);
    const int width = (d->H + 2 * pk.Hkv) * pk.hd, hd = pk.hd;
    void *dqkv = g[1];
    void *dk = ACT(m, dqkv, d->H * hd), *dv = ACT(m, dqkv, (d->H + pk.Hkv) * hd);
    const void *k = ACT(m, a->qkv, d->H * hd), *v = ACT(m, a->qkv, (d->H + pk.Hkv) * hd);
    const void *sinks = NULL;
    void *dsinks = NULL;
    if (pk.sinks >= 0) {
      sinks = sinks_as_f32(m, pk.sinks);
      dsinks = m->dsinks_f32;
      be->zero(be, dsinks, (size_t)d->H * be->size[BUF_F32]);
    }
    phase(m, "attn_bwd.flash");
    be->attn_bwd(be, dqkv, dk, dv, dsinks, g[0], a->qkv, k, v, a->attn_o, a->lse, sinks, &s);
    if (dsinks) sinks_grad_add(m, pk.sinks);
    phase(m, "attn_bwd.proj");
    const int off = hd - d->rope_dim;
    if (d->rope_dim > 0) {
      be->rope(be, dqkv, m->rope_cos, m->rope_sin, N, T, d->H, width, hd, off, d->rope_dim, 1);
      be->rope(be, dk, m->rope_cos, m->rope_sin, N, T, pk.Hkv, width, hd, off, d->rope_dim, 1);
    }
    if (pk.b >= 0) be->bias_grad(be, G(m, pk.b), dqkv, N, width);
    be->gemm(be, m->g_xn, dqkv, W(m, pk.w), N, d->D, width, 0, 0, 1, 0, 0);
    be->gemm(be, G(m, pk.w), dqkv, a->xn1, width, d->D, N, 1, 0, 1, 1, 0);
  }
  be->rmsnorm_bwd(be, m->g_res, G(m, lp->attn_norm), m->g_xn, x, W(m, lp->attn_norm), a->rstd1, N,
                  d->D, d->D, d->D, 1);
}

/* ---------------------------------------------------------------- ffn */

/* The routed experts on R rows grouped by expert (nE experts, ranges off on
 * the device and offh on the host): gu = x W13, h = swiglu(gu), y = h W2.
 * With dtype fp8/nvfp4 both GEMMs take fake-quantized operands: the cached
 * weights and a quantized copy of x (then of h), blocks of 32 along K. gu and
 * h stay what the forward produced and x, h unquantized: the backward
 * (expert_rows_bwd, unchanged) runs on them and the bf16 weights, the
 * straight-through estimator. */
static void expert_rows_fwd(Model *m, const LayerParams *lp, void *y, void *h, void *gu,
                            const void *x, const void *off, const int32_t *offh, int nE, int R) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  if (R == 0) return;
  const int fmt = m->quant_fmt;
  const void *w13 = W(m, lp->exp_w13), *w2 = W(m, lp->exp_w2), *xin = x, *hin = h;
  void *q = NULL;
  if (fmt != QFMT_BF16) {
    q = grow(m, &m->quant_rows, (size_t)R * max_sz((size_t)d->D, (size_t)d->Fm) * be->size[BUF_ACT]);
    w13 = model_expert_q(m, lp->exp_w13);
    w2 = model_expert_q(m, lp->exp_w2);
    be->quantize_blocks(be, q, x, R, d->D, 1, fmt);
    xin = q;
  }
  be->grouped_gemm(be, GG_FWD, gu, xin, w13, off, offh, nE, R, 2 * d->Fm, d->D);
  be->swiglu_fwd(be, h, gu, R, d->Fm);
  if (fmt != QFMT_BF16) {
    be->quantize_blocks(be, q, h, R, d->Fm, 1, fmt);
    hin = q;
  }
  be->grouped_gemm(be, GG_FWD, y, hin, w2, off, offh, nE, R, d->D, d->Fm);
}

/* Backward of expert_rows_fwd: dy [R, D] in, dx [R, D] out (dx may alias dy or
 * dh: each is dead when dx is written); weight gradients accumulate. */
static void expert_rows_bwd(Model *m, const LayerParams *lp, void *dx, void *dgu, void *dh,
                            const void *dy, const void *x, const void *gu, const void *h,
                            const void *off, const int32_t *offh, int nE, int R) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  if (R == 0) return;
  be->grouped_gemm(be, GG_DX, dh, dy, W(m, lp->exp_w2), off, offh, nE, R, d->D, d->Fm);
  be->grouped_gemm(be, GG_DW, G(m, lp->exp_w2), h, dy, off, offh, nE, R, d->D, d->Fm);
  be->swiglu_bwd(be, dgu, dh, gu, R, d->Fm);
  be->grouped_gemm(be, GG_DX, dx, dgu, W(m, lp->exp_w13), off, offh, nE, R, 2 * d->Fm, d->D);
  be->grouped_gemm(be, GG_DW, G(m, lp->exp_w13), x, dgu, off, offh, nE, R, 2 * d->Fm, d->D);
}

static ExpertRows *ep_rows_of(Model *m, int li) {
  return &m->ep_rows[m->cfg.recompute_experts ? 0 : li];
}

/* Routed experts (ye) and shared experts (gu_s, h_s) from xn2 and the routing
 * of this layer's forward; m->off_host (one process) or the layer's EpPlan
 * must hold its offsets. Run in forward, and again in backward when
 * recompute_experts. With expert parallelism the sorted rows travel to their
 * experts' owners and the results come back (RDEP puts). */
static void experts_forward(Model *m, int l) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, M = N * d->K;
  phase(m, "moe.experts_fwd");
  be->moe_gather(be, a->xe, a->xn2, a->pair_of, N, d->K, d->D);
  if (!m->comm) {
    expert_rows_fwd(m, lp, a->ye, a->h_e, a->gu_e, a->xe, a->off, m->off_host, d->E, M);
  } else {
    const EpPlan *p = &m->ep_plan[lp->moe_index];
    ExpertRows *er = ep_rows_of(m, lp->moe_index);
    const size_t R = (size_t)p->recv_rows, sa = be->size[BUF_ACT], row = (size_t)d->D * sa;
    phase(m, "moe.dispatch");
    m->comm->put_rows(m->comm, m->ep_in, a->xe, row, p->to_owner, p->n_to_owner);
    phase(m, "moe.experts_fwd");
    void *x = grow(m, &er->x, R * row);
    be->copy(be, x, m->ep_in, R * row);
    void *y = grow(m, &m->ep_s2, R * (size_t)(d->Fm > d->D ? d->Fm : d->D) * sa);
    expert_rows_fwd(m, lp, y, grow(m, &er->h, R * d->Fm * sa), grow(m, &er->gu, R * 2 * d->Fm * sa),
                    x, a->off_r, p->recv_off, m->E_local, (int)R);
    phase(m, "moe.return");
    m->comm->put_rows(m->comm, m->ep_ret, y, row, p->to_source, p->n_to_source);
    be->copy(be, a->ye, m->ep_ret, (size_t)M * row);
  }
  phase(m, "moe.shared_fwd");
  if (d->Fs > 0) {
    be->gemm(be, a->gu_s, a->xn2, W(m, lp->sh_w1), N, 2 * d->Fs, d->D, 0, 1, 1, 0, 0);
    be->swiglu_fwd(be, a->h_s, a->gu_s, N, d->Fs);
  }
}

/* y = x + ffn(rmsnorm(x)) */
static void ffn_forward(Model *m, int l, const void *x, void *y) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T;
  be->rmsnorm_fwd(be, a->xn2, a->rstd2, x, W(m, lp->ffn_norm), N, d->D, d->D, d->D,
                  (float)m->cfg.rms_norm_eps);
  void *out = m->g_tmp;
  if (lp->moe_index < 0) {
    be->gemm(be, a->gu, a->xn2, W(m, lp->w1), N, 2 * d->F, d->D, 0, 1, 1, 0, 0);
    be->swiglu_fwd(be, a->h, a->gu, N, d->F);
    be->gemm(be, out, a->h, W(m, lp->w2), N, d->D, d->F, 0, 1, 1, 0, 0);
  } else {
    const int li = lp->moe_index, E = d->E;
    void *bias = F32AT(m, m->router_bias, (size_t)li * E);
    phase(m, "moe_fwd.route");
    be->router_fwd(be, a->scores, a->idx, a->w, a->counts, m->cfg.aux_loss_alpha > 0 ? a->imp : NULL,
                   a->xn2, W(m, lp->gate), bias, N, d->D, E, d->K, (float)m->cfg.route_scale);
    be->moe_sort(be, a->off, a->row_of, a->pair_of, a->idx, N, d->K, E);
    be->download(be, m->off_host, a->off, (size_t)(E + 1) * sizeof(int32_t));
    int32_t *cnt = m->counts_host + (size_t)li * E;
    for (int e = 0; e < E; e++) cnt[e] = m->off_host[e + 1] - m->off_host[e];
    if (m->comm) {
      /* every rank's counts: the exchange plan, and loads over all ranks */
      int32_t *all = m->ep_counts + (size_t)li * m->ep_world * E;
      m->comm->all_gather_host(m->comm, all, cnt, (size_t)E * sizeof(int32_t));
      EpPlan *p = &m->ep_plan[li];
      ep_plan_build(p, all);
      be->upload(be, a->off_r, p->recv_off, (size_t)(m->E_local + 1) * sizeof(int32_t));
      for (int e = 0; e < E; e++) {
        int64_t sum = 0;
        for (int r = 0; r < m->ep_world; r++) sum += all[(size_t)r * E + e];
        cnt[e] = (int32_t)sum;
      }
    }
    if (m->cfg.aux_loss_alpha > 0) get_f32_as_double(be, m->imp_host + (size_t)li * E, a->imp, E);
    experts_forward(m, l);
    if (d->Fs > 0) be->gemm(be, out, a->h_s, W(m, lp->sh_w2), N, d->D, d->Fs, 0, 1, 1, 0, 0);
    phase(m, "moe_fwd.combine");
    be->moe_combine(be, out, a->ye, a->w, a->row_of, N, d->K, d->D, d->Fs > 0);
  }
  be->add(be, y, x, out, (size_t)N * d->D);
}

/* Switch-style aux loss of layer li from the last forward's statistics;
 * fills load_frac (host [E]) and returns the loss value. */
static double aux_loss(const Model *m, int li, float *load_frac) {
  const int E = m->d.E, N = m->B * m->T;
  const int32_t *c = m->counts_host + (size_t)li * E; /* over all ranks */
  const double *imp = m->imp_host + (size_t)li * E;   /* this rank's tokens */
  double loss = 0;
  for (int e = 0; e < E; e++) {
    load_frac[e] = (float)c[e] / ((float)N * m->ep_world * m->d.K);
    loss += (imp[e] / N) * load_frac[e];
  }
  /* this rank's share: the ranks' shares sum to the loss of the global batch */
  return m->cfg.aux_loss_alpha * E * loss / m->ep_world;
}

/* g_res holds dL/dy on entry and dL/dx on return. */
static void ffn_backward(Model *m, int l, const void *x) {
  Backend *be = m->be;
  const ModelDims *d = &m->d;
  const LayerParams *lp = &m->lp[l];
  LayerActs *a = &m->acts[l];
  const int N = m->B * m->T, M = N * d->K;
  void **g = m->g_big;
  void *dy = m->g_res;
  if (lp->moe_index < 0) {
    be->gemm(be, g[0], dy, W(m, lp->w2), N, d->F, d->D, 0, 0, 1, 0, 0);
    be->gemm(be, G(m, lp->w2), dy, a->h, d->D, d->F, N, 1, 0, 1, 1, 0);
    be->swiglu_bwd(be, g[1], g[0], a->gu, N, d->F);
    be->gemm(be, m->g_xn, g[1], W(m, lp->w1), N, d->D, 2 * d->F, 0, 0, 1, 0, 0);
    be->gemm(be, G(m, lp->w1), g[1], a->xn2, 2 * d->F, d->D, N, 1, 0, 1, 1, 0);
  } else {
    const int li = lp->moe_index, E = d->E;
    void *dw = g[3]; /* F32 [N,K] */
    /* off_host of this layer: recomputed from the saved counts. */
    const int32_t *cnt = m->counts_host + (size_t)li * E;
    m->off_host[0] = 0;
    for (int e = 0; e < E; e++) m->off_host[e + 1] = m->off_host[e] + cnt[e];
    if (m->cfg.recompute_experts) experts_forward(m, l);
    phase(m, "moe_bwd.experts");
    be->moe_combine_bwd(be, g[0], dw, dy, a->ye, a->w, a->row_of, N, d->K, d->D);
    if (!m->comm) {
      expert_rows_bwd(m, lp, g[0], g[2], g[1], g[0], a->xe, a->gu_e, a->h_e, a->off, m->off_host,
                      E, M);
      be->moe_gather_bwd(be, m->g_xn, g[0], a->row_of, N, d->K, d->D, 0);
    } else {
      /* dye to the owners, the experts' backward there, dx rows back */
      const EpPlan *p = &m->ep_plan[li];
      ExpertRows *er = ep_rows_of(m, li);
      const size_t R = (size_t)p->recv_rows, sa = be->size[BUF_ACT], row = (size_t)d->D * sa;
      phase(m, "moe_bwd.dispatch");
      m->comm->put_rows(m->comm, m->ep_in, g[0], row, p->to_owner, p->n_to_owner);
      phase(m, "moe_bwd.experts");
      void *dgu = grow(m, &m->ep_s1, R * 2 * d->Fm * sa);
      void *dx = grow(m, &m->ep_s2, R * (size_t)(d->Fm > d->D ? d->Fm : d->D) * sa);
      expert_rows_bwd(m, lp, dx, dgu, dx, m->ep_in, er->x.p, er->gu.p, er->h.p, a->off_r,
                      p->recv_off, m->E_local, (int)R);
      phase(m, "moe_bwd.return");
      m->comm->put_rows(m->comm, m->ep_ret, dx, row, p->to_source, p->n_to_source);
      be->moe_gather_bwd(be, m->g_xn, m->ep_ret, a->row_of, N, d->K, d->D, 0);
    }
    phase(m, "moe_bwd.shared_router");
    if (d->Fs > 0) {
      be->gemm(be, g[1], dy, W(m, lp->sh_w2), N, d->Fs, d->D, 0, 0, 1, 0, 0);
      be->gemm(be, G(m, lp->sh_w2), dy, a->h_s, d->D, d->Fs, N, 1, 0, 1, 1, 0);
      be->swiglu_bwd(be, g[2], g[1], a->gu_s, N, d->Fs);
      be->gemm(be, m->g_xn, g[2], W(m, lp->sh_w1), N, d->D, 2 * d->Fs, 0, 0, 1, 1, 0);
      be->gemm(be, G(m, lp->sh_w1), g[2], a->xn2, 2 * d->Fs, d->D, N, 1, 0, 1, 1, 0);
    }
    float aux_coef = 0;
    void *load_dev = NULL;
    if (m->cfg.aux_loss_alpha > 0) {
      float load_frac[E];
      aux_loss(m, li, load_frac);
      aux_coef = (float)(m->cfg.aux_loss_alpha * E / ((double)N * m->ep_world));
      load_dev = a->imp; /* the importance buffer is free again: reuse it for f */
      be->put(be, load_dev, BUF_F32, load_frac, E);
    }
    be->router_bwd(be, m->g_xn, G(m, lp->gate), dw, a->scores, a->idx, a->xn2, W(m, lp->gate), N,
                   d->D, E, d->K, (float)m->cfg.route_scale, aux_coef, load_dev);
  }
  be->rmsnorm_bwd(be, m->g_res, G(m, lp->ffn_norm), m->g_xn, x, W(m, lp->ffn_norm), a->rstd2, N,
                  d->D, d->D, d->D, 1);
}

/* ---------------------------------------------------------------- whole model */

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
  ensure_acts(m, B, T);
  if (m->expert_q_stale) model_quant_refresh(m);
  Backend *be = m->be;
  const int N = B * T, D = m->d.D;
  phase(m, "embed_fwd");
  be->upload(be, m->tok_in, inputs, (size_t)N * sizeof(int32_t));
  be->upload(be, m->tok_tgt, targets, (size_t)N * sizeof(int32_t));
  be->embed_fwd(be, res_at(m, 0), m->tok_in, W(m, m->embedding), N, D, (float)m->cfg.embed_scale);
  for (int l = 0; l < m->d.L; l++) {
    phase(m, "attn_fwd");
    attn_forward(m, l, res_at(m, l), mid_at(m, l));
    phase(m, m->lp[l].moe_index < 0 ? "mlp_fwd" : "moe_fwd");
    ffn_forward(m, l, mid_at(m, l), res_at(m, l + 1));
  }
  phase(m, "head_fwd");
  be->rmsnorm_fwd(be, m->xf, m->rstd_f, res_at(m, m->d.L), W(m, m->final_norm), N, D, D, D,
                  (float)m->cfg.rms_norm_eps);
  m->last_aux_loss = 0;
  if (m->cfg.aux_loss_alpha > 0) {
    float load_frac[m->d.E > 0 ? m->d.E : 1];
    for (int li = 0; li < m->n_moe; li++) m->last_aux_loss += aux_loss(m, li, load_frac);
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
    ffn_backward(m, l, mid_at(m, l));
    phase(m, "attn_bwd");
    attn_backward(m, l, res_at(m, l));
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
