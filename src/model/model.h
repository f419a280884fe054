/* model.h: the DeepSeek-style MoE transformer (DESIGN.md section 4) as a
 * sequence of backend ops: parameter table, activations kept for backward,
 * forward + backward of one batch, router statistics and bias balancing.
 *
 *   x0 = embed_scale * embedding[tokens]
 *   per layer l:  h = x + attn(rmsnorm(x));  x' = h + ffn(rmsnorm(h))
 *     attn: global layers MLA (q/kv low rank, shared rope key), MHA/GQA, or
 *           DSA (MLA restricted to the top-k keys a lightning indexer
 *           picks, docs/ARCHITECTURE.md), causal; local layers (attn_global_every > 1) the SWA block: fused
 *           qkv Linear with bias, RoPE on the last rope dims, GQA, causal
 *           sliding window with learned per-head sinks, wo Linear with bias
 *     ffn:  dense SwiGLU for l < n_dense_layers, else MoE (sigmoid router,
 *           top-k on score+bias, routed SwiGLU experts + shared experts)
 *   loss = mean over non-masked targets of CE(logits_scale * lm_head(rmsnorm(x_L)))
 *          (+ aux_loss_alpha * switch-style balance loss when enabled)
 *          (+ the DSA indexer's KL loss, which reaches only the indexer weights)
 *
 * Weight layouts (row-major): Linear weights are [out, in] like PyTorch;
 * routed experts are w13 [E, D, 2F] (columns [gate | up]) and w2 [E, F, D]. */
#ifndef NMOE_MODEL_H
#define NMOE_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "core/config.h"
#include "dist/comm.h"
#include "model/ep_plan.h"
#include "model/params.h"

/* Dimensions derived from the config. */
typedef struct ModelDims {
  int V, D, L, n_dense;
  int mla;                 /* 1 = MLA attention (also under dsa), 0 = MHA/GQA */
  int dsa, dsa_sparse;     /* dsa: indexer on global layers; sparse (1) or dense_warmup (0) */
  int Hi, di, top_k;       /* dsa: indexer heads, dims per head, keys per query */
  int H, Hkv, hd;          /* mha: heads, kv heads, head dim */
  int qr, kvr, dn, dr, dvh; /* mla: q/kv low ranks, nope/rope/v head dims */
  int dqk, dv;             /* attention head dims (q/k and v) of global layers */
  int swa_Hkv, swa_hd;     /* swa (local layers): kv heads, head dim (v_head_dim) */
  int rope_dim;            /* rotary dims per head */
  int F;                   /* dense SwiGLU hidden */
  int E, K, Fm, Fs;        /* experts, top-k, expert hidden, shared hidden */
} ModelDims;

/* Parameter row indices of one layer (-1 when absent). */
typedef struct LayerParams {
  int attn_norm, ffn_norm;
  int wq, wk, wv;                      /* mha (adjacent: one [Hq+2Hkv)*hd, D] GEMM) */
  int wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b; /* mla (wq when q_lora_rank == 0) */
  int idx_wq, idx_wk, idx_k_norm, idx_w; /* dsa indexer: wq_b [Hi*di, qr], wk [di, D],
                                          k_norm [di], weights_proj [Hi, D] */
  int wqkv, wqkv_b, wo_b, sinks;       /* swa (local layers): [(H+2Hkv)*hd, D], its
                                          bias, wo's bias [D], sinks [H] */
  int wo;                              /* [D, H*dv] (swa: [D, H*swa_hd]) */
  int w1, w3, w2;                      /* dense (w1|w3 adjacent) */
  int gate, exp_w13, exp_w2, sh_w1, sh_w3, sh_w2; /* moe */
  int moe_index;                       /* index among MoE layers, -1 if dense */
  int window;                          /* 0 = global attention, else swa */
} LayerParams;

typedef struct LayerActs LayerActs; /* model_step.c */

/* A backend buffer that grows (never shrinks) to the rows a step needs: the
 * rows an expert-parallel rank receives vary from step to step. */
typedef struct GrowBuf {
  void *p;
  size_t bytes;
} GrowBuf;

/* Rows at the experts of one MoE layer: what the backward needs of them. */
typedef struct ExpertRows {
  GrowBuf x, gu, h; /* [R, D], [R, 2Fm], [R, Fm] */
} ExpertRows;

typedef struct Model {
  Config cfg; /* copy; strings borrowed from the caller's Config */
  ModelDims d;
  Backend *be;
  /* Ranks of the run (NULL: one process). Dense weights are replicated and
   * their gradients summed over ranks; routed experts are split: this rank
   * owns experts [ep_rank*E_local, (ep_rank+1)*E_local) (RDEP). */
  Comm *comm;
  int ep_rank, ep_world, E_local;
  ParamTable pt;
  LayerParams *lp;
  int embedding, final_norm, lm_head;
  int n_moe;

  /* One allocation each, laid out by pt. */
  void *params;  /* ACT [pt.total] */
  void *grads;   /* ACT [pt.total] */
  /* ZeRO-2: the dense range [0, dense_end) splits into ep_world equal shards;
   * this rank keeps optimizer state and the fp32 master only for its shard
   * [shard_lo, shard_hi) and for its experts, laid out [shard | experts]
   * (n_state elements; model_state_offset maps a parameter element). One
   * process: the shard is every dense element and the layout is pt's. */
  size_t dense_end, shard_lo, shard_hi, n_state;
  void *master;  /* F32 [n_state] or NULL */
  void *adam_m, *adam_v; /* F32 [n_state] */
  void *router_bias;     /* F32 [n_moe, E]: buffers, not parameters */
  float *router_bias_host; /* [n_moe, E] mirror */

  /* Activations for one (B, T) batch shape, allocated on first use. */
  int B, T;
  LayerActs *acts;
  void **owned;              /* every activation/scratch buffer, freed together */
  int n_owned, cap_owned;
  void *rope_cos, *rope_sin; /* F32 [T, rope_dim/2] */
  void *sinks_f32, *dsinks_f32; /* F32 [H]: one swa layer's sinks and their gradient */
  void *tok_in, *tok_tgt;    /* I32 [N] */
  void *res;                 /* ACT [L+1, N, D]: residual stream per layer boundary */
  void *mid;                 /* ACT [L, N, D]: after attention, before the ffn */
  void *xf, *rstd_f;         /* final norm output and rstd */
  void *g_res, *g_xn, *g_tmp; /* backward scratch [N, D] each */
  void *g_big[5];            /* backward scratch sized to the widest intermediate */
  size_t g_big_elems;

  /* Router statistics of the last forward: counts [n_moe, E] (assignments) and
   * importance sums [n_moe, E]. */
  int32_t *counts_host;
  double *imp_host;
  int32_t *off_host;         /* [E+1] scratch for grouped GEMMs */
  /* Expert parallelism (ep_world > 1): each layer's all-gathered counts
   * [n_moe, world, E], its exchange plan, the symmetric receive buffers
   * (ep_in [world*N*K, D] at the owners, ep_ret [N*K, D] at the sources) and
   * scratch for rows at the experts. */
  int32_t *ep_counts;
  EpPlan *ep_plan;           /* [n_moe] */
  void *ep_in, *ep_ret;
  size_t ep_M;               /* rows (N*K) the symmetric buffers were sized for */
  ExpertRows *ep_rows;       /* [n_moe], or one shared with recompute_experts */
  GrowBuf ep_s1, ep_s2;      /* [R, 2Fm], [R, max(Fm, D)] */
  /* Routed-expert numerics (cfg.dtype): QFMT_BF16, or fp8/nvfp4 fake
   * quantization of both routed-expert GEMM inputs (blocks of 32 along K;
   * emulated: the decoded values go through the bf16 GEMMs). expert_q mirrors
   * the expert parameter group [dense_end, pt.total): every w13 [E_local, D,
   * 2Fm] and w2 [E_local, Fm, D] quantized down its columns (along K). */
  int quant_fmt;
  void *expert_q;            /* ACT [pt.total - dense_end], NULL for bf16 */
  int expert_q_stale;        /* rebuild before the next forward (init, restore) */
  GrowBuf quant_rows;        /* [R, max(D, Fm)]: quantized expert-input rows */
  void *dsa_score, *dsa_p;   /* F32 [B, T, T]: indexer scores (then their gradient), target */
  double last_aux_loss;
  /* The DSA indexer loss of the last train step: over DSA layers, the sum of
   * the mean over the global batch's tokens of KL(target || softmax(scores));
   * in the gradients (of the indexer weights only). 0 without dsa. */
  double last_idx_loss;
  int64_t last_n_valid;
} Model;

/* Builds the table, allocates parameters/optimizer state on be and initialises
 * them from cfg->seed (every rank's expert shard equals that slice of the
 * one-process model). comm: the run's ranks, or NULL for one process. Fatal on
 * inconsistent dimensions. */
Model *model_create(const Config *cfg, Backend *be, Comm *comm);
void model_free(Model *m);
ModelDims model_dims(const Config *cfg);

/* Forward + backward of one batch: inputs/targets are host int32 [B*T] (this
 * rank's slice of the global batch). Zeroes and fills m->grads; with several
 * ranks the dense gradients are summed over ranks, so every rank holds the
 * gradient of the global batch. Returns the mean cross-entropy over the
 * non-masked targets of the global batch (the aux loss, when enabled, is in
 * m->last_aux_loss and included in the gradients). Collective. */
double model_train_step_grads(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T);
/* Forward only: returns the summed loss over kept targets and their count,
 * both over all ranks. Collective. */
double model_eval_loss(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                       int64_t *n_valid);

/* Forward only, for scoring: row_loss[b] = summed cross-entropy over the
 * targets of row b (of this rank's B rows of T) that are not ignore_id. The
 * ignore id must be >= 0 (xent masks only then) and is best outside the
 * vocabulary (the vocabulary size V), so no real token is ever skipped.
 * Collective (every rank calls it equally often). */
void model_score_rows(Model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                      int32_t ignore_id, double *row_loss);
/* After model_score_rows (same inputs, still in the model): row_exact[b] = 1
 * when every non-ignored target of row b is the most likely token (argmax of
 * the logits, ties to the lower id), i.e. greedy decoding from the row's
 * prompt would produce exactly its targets. Not collective (local logits of
 * the positions with targets only). */
void model_rows_exact(Model *m, const int32_t *targets, int B, int T, int32_t ignore_id,
                      int *row_exact);

/* Aux-loss-free balancing: bias -= rate * (sign(load - 1/E) - mean(sign)),
 * clamped to [-16, 16]; counts [n_moe, E] are assignments summed over ranks. */
void model_update_router_bias(Model *m, const int32_t *counts, double rate);

/* Parameter counts: total, and active per token (matmul weights incl. lm_head,
 * excl. embedding; top-k + shared experts, router). */
int64_t model_param_count(const Model *m);
int64_t model_active_matmul_params(const ModelDims *d, const Config *cfg);
/* Training FLOPs per token: 6 * active matmul params + attention scores and
 * values 6 * H * (dqk + dv) * keys per layer (forward and backward), keys =
 * T/2 for causal global layers and the mean visible window for local ones;
 * DSA layers add 6 * Hi * di * T/2 for the indexer scores and, in sparse
 * mode, see at most top_k keys (counted as a window of top_k). */
double model_flops_per_token(const ModelDims *d, const Config *cfg, int T);

/* The parameter table of rank ep_rank of ep_world (its experts' rows, ZeRO
 * padding 16 * ep_world) without building a model: what a checkpoint of that
 * layout holds (`nmoe ckpt reshard`). The caller checks that ep_world divides
 * n_routed_experts and frees out with params_free. */
void model_table(const Config *cfg, int ep_rank, int ep_world, ParamTable *out);
/* ZeRO-2 shard [lo, hi) of rank ep_rank: the dense range [0,
 * t->group_off[GROUP_EXPERT]) split into ep_world equal parts. */
void model_shard_bounds(const ParamTable *t, int ep_rank, int ep_world, size_t *lo, size_t *hi);
/* Pointer to row p inside an ACT allocation (params or grads). */
void *model_ptr(const Model *m, void *base, int p);
/* Whether layer l is global (attn) or local (the swa block). */
int model_layer_global(const Config *cfg, int l);
/* Offset in the optimizer state buffers of parameter element elem (which must
 * lie in this rank's dense shard or in the expert group). */
size_t model_state_offset(const Model *m, size_t elem);

/* Rebuilds the quantized expert weight cache (m->expert_q) from the current
 * expert weights; nothing for dtype bf16. optim_step calls it after every
 * update; the first forward after model_create (init, or a restore that wrote
 * the weights) does it too. Call it after changing expert weights otherwise. */
void model_quant_refresh(Model *m);
/* The quantized copy of expert parameter row p (exp_w13 or exp_w2). */
void *model_expert_q(const Model *m, int p);

#endif
