/* model_internal.h: what the files of the model's forward/backward share:
 * the activations kept per layer, buffer helpers, and the per-block passes.
 *   model_acts.c   activation and scratch buffers for one (B, T) shape
 *   model_attn.c   attention blocks (MLA, MHA/GQA, SWA, DSA's indexer)
 *   model_ffn.c    dense SwiGLU and MoE blocks (routing, experts, RDEP)
 *   model_step.c   the whole model: forward, loss, backward, gradient sums
 * N = B*T tokens; M = N*K routed (token, slot) rows. */
#ifndef NMOE_MODEL_INTERNAL_H
#define NMOE_MODEL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

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

static inline void *W(Model *m, int p) { return model_ptr(m, m->params, p); }
static inline void *G(Model *m, int p) { return model_ptr(m, m->grads, p); }
/* Names the time that follows (per-phase breakdown in `nmoe bench train`). */
static inline void phase(Model *m, const char *name) {
  if (m->be->phase) m->be->phase(m->be, name);
}
static inline size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* model_acts.c */
/* Allocates activations for batches of B sequences of T tokens (no-op when
 * the shape is unchanged). */
void model_ensure_acts(Model *m, int B, int T);
/* Grows gb to at least bytes (contents are not kept). */
void *model_grow(Model *m, GrowBuf *gb, size_t bytes);
/* Keys per query of DSA's sparse attention (the selection's row width). */
int model_dsa_keys(const Model *m);

/* model_attn.c: mid = x + attn(rmsnorm(x)); the backward turns dL/dmid in
 * m->g_res into dL/dx. */
void model_attn_forward(Model *m, int l, const void *x, void *mid);
void model_attn_backward(Model *m, int l, const void *x);

/* model_ffn.c: y = x + ffn(rmsnorm(x)); the backward turns dL/dy in m->g_res
 * into dL/dx. */
void model_ffn_forward(Model *m, int l, const void *x, void *y);
void model_ffn_backward(Model *m, int l, const void *x);
/* Switch-style aux loss of MoE layer li from the last forward's statistics
 * (this rank's share); fills load_frac (host [E]). */
double model_aux_loss(const Model *m, int li, float *load_frac);

#endif
