/* model_attn.c: the attention blocks as backend ops: MLA, MHA/GQA, the SWA
 * block of local layers (fused qkv + bias, sinks, wo bias) and DSA (MLA over
 * the keys a lightning indexer selects, plus the indexer's own loss). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "model/model_internal.h"

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

/* Sinks (row p, ACT [H]) as the F32 the attention ops take, in m->sinks_f32
 * (exact: the CPU kinds are one type, bf16 -> float is exact on a device). */
static const void *sinks_as_f32(Model *m, int p) {
  m->be->convert(m->be, m->sinks_f32, BUF_F32, W(m, p), BUF_ACT, (size_t)m->d.H, 0);
  return m->sinks_f32;
}

/* Gradient of sinks row p += m->dsinks_f32 (F32 [H]), one rounding into ACT. */
static void sinks_grad_add(Model *m, int p) {
  m->be->convert(m->be, G(m, p), BUF_ACT, m->dsinks_f32, BUF_F32, (size_t)m->d.H, 1);
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
    be->dsa_topk(be, a->sel, m->dsa_score, m->B, T, model_dsa_keys(m));
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
  be->dsa_attn_dist(be, m->dsa_p, a->q, a->k, a->lse, a->sel, model_dsa_keys(m), &s);
  m->last_idx_loss += scale * be->dsa_kl(be, m->dsa_score, m->dsa_score, m->dsa_p, a->sel,
                                          model_dsa_keys(m), m->B, T, (float)scale);
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
  if (a->sel) be->attn_sel_fwd(be, a->attn_o, a->lse, q, k, v, a->sel, model_dsa_keys(m), &s);
  else be->attn_fwd(be, a->attn_o, a->lse, q, k, v, sinks, &s);
}

/* mid = x + wo(attn(rmsnorm(x))) (+ wo's bias on swa layers) */
void model_attn_forward(Model *m, int l, const void *x, void *mid) {
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
void model_attn_backward(Model *m, int l, const void *x) {
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
                       model_dsa_keys(m), &s);
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
