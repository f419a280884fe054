/* cpu.h: shared definitions of the CPU backend (the ground truth).
 *
 * Every buffer is host memory holding real_t (ACT and F32 alike) or int32.
 * real_t is float, or double when built with NMOE_REAL_DOUBLE (the copy of this
 * backend that gradient-check tests link). <tgmath.h> makes exp/log/sqrt follow
 * real_t, so one source serves both precisions.
 *
 * Determinism rule for every op here: each output element is produced by one
 * thread with a fixed reduction order, so results never depend on the number of
 * OpenMP threads. Ops parallelise over output rows/elements, never over the
 * terms of a sum.
 *
 * Files: cpu_backend.c (table, memory, timing), cpu_math.c (gemm, grouped gemm,
 * add, bias, sumsq), cpu_layers.c (embedding, RMSNorm, RoPE, SwiGLU, MLA kv split),
 * cpu_attn.c (dense and key-list attention), cpu_dsa.c (DSA indexer), cpu_moe.c (router, permutation), cpu_loss.c (xent),
 * cpu_optim.c (AdamW), cpu_quant.c (block-scaled fp8/fp4 fake quantization,
 * codec in quant.h). */
#ifndef NMOE_CPU_H
#define NMOE_CPU_H

#include <tgmath.h>

#include "backend/backend.h"

#ifdef NMOE_REAL_DOUBLE
typedef double real_t;
#else
typedef float real_t;
#endif

/* C[M,N] (row stride ldc) = alpha * op(A) @ op(B) + beta * C on real_t arrays.
 * A is [M,K] (or [K,M] when transA) with row stride lda; B is [K,N] (or [N,K]
 * when transB) with row stride ldb. beta == 0 never reads C. Each C element is
 * summed over k in a fixed order; work is split over tiles of C only. */
void cpu_gemm_strided(real_t *C, int ldc, const real_t *A, int lda, const real_t *B, int ldb,
                      int M, int N, int K, int transA, int transB, real_t alpha, real_t beta);
/* Dot product of n elements, in a fixed order (8 interleaved partial sums). */
real_t cpu_dot(const real_t *a, const real_t *b, int n);

/* Op implementations (contracts in backend.h). */
void cpu_gemm(Backend *be, void *C, const void *A, const void *B, int M, int N, int K, int transA,
              int transB, float alpha, float beta, int c_f32);
void cpu_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                      const int32_t *off, const int32_t *off_host, int E, int M, int N, int K);
void cpu_add(Backend *be, void *y, const void *a, const void *b, size_t n);
void cpu_convert(Backend *be, void *dst, BufKind dk, const void *src, BufKind sk, size_t n,
                 int accumulate);
void cpu_bias_add(Backend *be, void *y, const void *b, int N, int C);
void cpu_bias_grad(Backend *be, void *db, const void *dy, int N, int C);
double cpu_sumsq(Backend *be, const void *x, size_t n);

void cpu_embed_fwd(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                   float scale);
void cpu_embed_bwd(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                   int V, float scale);
void cpu_rmsnorm_fwd(Backend *be, void *y, void *rstd, const void *x, const void *w, int N, int D,
                     int ldx, int ldy, float eps);
void cpu_rmsnorm_bwd(Backend *be, void *dx, void *dw, const void *dy, const void *x,
                     const void *w, const void *rstd, int N, int D, int ldx, int ldy,
                     int accumulate);
void cpu_rope(Backend *be, void *x, const void *cos, const void *sin, int N, int T, int H, int ldx,
              int hs, int off, int rd, int inverse);
void cpu_mla_kv_split(Backend *be, void *k, void *v, const void *kv, const void *kr, int ldkr,
                      int N, int H, int dn, int dr, int dv);
void cpu_mla_kv_split_bwd(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                          const void *dv, int N, int H, int dn, int dr, int dv_dim);
void cpu_swiglu_fwd(Backend *be, void *h, const void *gu, int M, int F);
void cpu_swiglu_bwd(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F);
void cpu_quantize_blocks(Backend *be, void *q, const void *x, int outer, int K, int inner, int fmt);

void cpu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                  const void *sinks, const AttnShape *s);
void cpu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                  const void *q, const void *k, const void *v, const void *o, const void *lse,
                  const void *sinks, const AttnShape *s);

void cpu_attn_sel_fwd(Backend *be, void *o, void *lse, const void *q, const void *k,
                      const void *v, const int32_t *sel, int K, const AttnShape *s);
void cpu_attn_sel_bwd(Backend *be, void *dq, void *dk, void *dv, const void *dout, const void *q,
                      const void *k, const void *v, const void *o, const void *lse,
                      const int32_t *sel, int K, const AttnShape *s);
void cpu_dsa_index_fwd(Backend *be, void *score, const void *q, const void *k, const void *w, int B,
                       int T, int Hi, int di);
void cpu_dsa_index_bwd(Backend *be, void *dq, void *dk, void *dw, const void *dscore, const void *q,
                       const void *k, const void *w, int B, int T, int Hi, int di);
void cpu_dsa_topk(Backend *be, int32_t *sel, const void *score, int B, int T, int K);
void cpu_dsa_attn_dist(Backend *be, void *p, const void *q, const void *k, const void *lse,
                       const int32_t *sel, int K, const AttnShape *s);
double cpu_dsa_kl(Backend *be, void *dscore, const void *score, const void *p, const int32_t *sel, int K,
                  int B, int T, float grad_scale);

void cpu_router_fwd(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts, void *imp,
                    const void *x, const void *wg, const void *bias, int N, int D, int E, int K,
                    float route_scale);
void cpu_router_bwd(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                    const int32_t *idx, const void *x, const void *wg, int N, int D, int E, int K,
                    float route_scale, float aux_coef, const void *load_frac);
void cpu_moe_sort(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of,
                  const int32_t *idx, int N, int K, int E);
void cpu_moe_gather(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N, int K,
                    int D);
void cpu_moe_combine(Backend *be, void *y, const void *ye, const void *w, const int32_t *row_of,
                     int N, int K, int D, int accumulate);
void cpu_moe_combine_bwd(Backend *be, void *dye, void *dw, const void *dy, const void *ye,
                         const void *w, const int32_t *row_of, int N, int K, int D);
void cpu_moe_gather_bwd(Backend *be, void *dx, const void *dxe, const int32_t *row_of, int N,
                        int K, int D, int accumulate);

double cpu_xent(Backend *be, void *dh, void *dW, const void *h, const void *W,
                const int32_t *targets, int N, int D, int V, float scale, int mask_id,
                float grad_scale);
void cpu_adamw(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
               const AdamParams *ap);

#endif
