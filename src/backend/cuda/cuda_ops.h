/* cuda_ops.h: the CUDA implementations of the Backend ops (backend.h gives
 * each op's contract). cuda_backend.cu fills the Backend table with these;
 * each family lives in its own .cu file:
 *   cuda_backend.cu  memory, put/get, sync, phase timing, backend_cuda()
 *   gemm.cu          gemm, grouped_gemm
 *   elementwise.cu   add, sumsq, embed_*, swiglu_*, adamw
 *   norm_rope.cu     rmsnorm_*, rope, mla_kv_split*
 *   router_moe.cu    router_*, moe_*
 *   xent.cu          xent
 *   attention.cu     attn_fwd, attn_bwd
 *   bias.cu          bias_add, bias_grad
 *   quant.cu         quantize_blocks */
#ifndef NMOE_CUDA_OPS_H
#define NMOE_CUDA_OPS_H
#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif
void cu_gemm(Backend *be, void *C, const void *A, const void *B, int M, int N, int K, int transA,
             int transB, float alpha, float beta, int c_f32);
void cu_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                     const int32_t *off, const int32_t *off_host, int E, int M, int N, int K);
void cu_add(Backend *be, void *y, const void *a, const void *b, size_t n);
double cu_sumsq(Backend *be, const void *x, size_t n);
void cu_embed_fwd(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                  float scale);
void cu_embed_bwd(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                  int V, float scale);
void cu_rmsnorm_fwd(Backend *be, void *y, void *rstd, const void *x, const void *w, int N, int D,
                    int ldx, int ldy, float eps);
void cu_rmsnorm_bwd(Backend *be, void *dx, void *dw, const void *dy, const void *x, const void *w,
                    const void *rstd, int N, int D, int ldx, int ldy, int accumulate);
void cu_rope(Backend *be, void *x, const void *cos, const void *sin, int N, int T, int H, int ldx,
             int hs, int off, int rd, int inverse);
void cu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                 const void *sinks, const AttnShape *s);
void cu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                 const void *q, const void *k, const void *v, const void *o, const void *lse,
                 const void *sinks, const AttnShape *s);
void cu_convert(Backend *be, void *dst, BufKind dk, const void *src, BufKind sk, size_t n,
                int accumulate);
void cu_bias_add(Backend *be, void *y, const void *b, int N, int C);
void cu_bias_grad(Backend *be, void *db, const void *dy, int N, int C);
void cu_mla_kv_split(Backend *be, void *k, void *v, const void *kv, const void *kr, int ldkr, int N,
                     int H, int dn, int dr, int dv);
void cu_mla_kv_split_bwd(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                         const void *dv, int N, int H, int dn, int dr, int dv_dim);
void cu_swiglu_fwd(Backend *be, void *h, const void *gu, int M, int F);
void cu_swiglu_bwd(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F);
void cu_quantize_blocks(Backend *be, void *q, const void *x, int outer, int K, int inner, int fmt);
void cu_router_fwd(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts, void *imp,
                   const void *x, const void *wg, const void *bias, int N, int D, int E, int K,
                   float route_scale);
void cu_router_bwd(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                   const int32_t *idx, const void *x, const void *wg, int N, int D, int E, int K,
                   float route_scale, float aux_coef, const void *load_frac);
void cu_moe_sort(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of, const int32_t *idx,
                 int N, int K, int E);
void cu_moe_gather(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N, int K,
                   int D);
void cu_moe_combine(Backend *be, void *y, const void *ye, const void *w, const int32_t *row_of,
                    int N, int K, int D, int accumulate);
void cu_moe_combine_bwd(Backend *be, void *dye, void *dw, const void *dy, const void *ye,
                        const void *w, const int32_t *row_of, int N, int K, int D);
void cu_moe_gather_bwd(Backend *be, void *dx, const void *dxe, const int32_t *row_of, int N, int K,
                       int D, int accumulate);
double cu_xent(Backend *be, void *dh, void *dW, const void *h, const void *W,
               const int32_t *targets, int N, int D, int V, float scale, int mask_id,
               float grad_scale);
void cu_adamw(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
              const AdamParams *ap);
#ifdef __cplusplus
}
#endif
#endif
