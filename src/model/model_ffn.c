/* model_ffn.c: the feed-forward blocks as backend ops: dense SwiGLU, and MoE
 * (sigmoid router, sort, routed experts, shared experts, combine). With
 * several ranks the routed rows travel to their experts' owners and back by
 * RDEP puts (EpPlan); with dtype fp8/nvfp4 the expert GEMMs take
 * fake-quantized operands. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "model/model_internal.h"

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
    q = model_grow(m, &m->quant_rows, (size_t)R * max_sz((size_t)d->D, (size_t)d->Fm) * be->size[BUF_ACT]);
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
    void *x = model_grow(m, &er->x, R * row);
    be->copy(be, x, m->ep_in, R * row);
    void *y = model_grow(m, &m->ep_s2, R * (size_t)(d->Fm > d->D ? d->Fm : d->D) * sa);
    expert_rows_fwd(m, lp, y, model_grow(m, &er->h, R * d->Fm * sa), model_grow(m, &er->gu, R * 2 * d->Fm * sa),
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
void model_ffn_forward(Model *m, int l, const void *x, void *y) {
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
double model_aux_loss(const Model *m, int li, float *load_frac) {
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
void model_ffn_backward(Model *m, int l, const void *x) {
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
      void *dgu = model_grow(m, &m->ep_s1, R * 2 * d->Fm * sa);
      void *dx = model_grow(m, &m->ep_s2, R * (size_t)(d->Fm > d->D ? d->Fm : d->D) * sa);
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
      model_aux_loss(m, li, load_frac);
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
