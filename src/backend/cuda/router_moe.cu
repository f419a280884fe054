/* router_moe.cu: router top-k and single-GPU MoE permutation ops. (stub) */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

extern "C" void cu_router_fwd(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts, void *imp,
                   const void *x, const void *wg, const void *bias, int N, int D, int E, int K,
                   float route_scale) { nmoe_fatal("cu_router_fwd: not implemented"); }
extern "C" void cu_router_bwd(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                   const int32_t *idx, const void *x, const void *wg, int N, int D, int E, int K,
                   float route_scale, float aux_coef, const void *load_frac) { nmoe_fatal("cu_router_bwd: not implemented"); }
extern "C" void cu_moe_sort(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of, const int32_t *idx,
                 int N, int K, int E) { nmoe_fatal("cu_moe_sort: not implemented"); }
extern "C" void cu_moe_gather(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N, int K,
                   int D) { nmoe_fatal("cu_moe_gather: not implemented"); }
extern "C" void cu_moe_combine(Backend *be, void *y, const void *ye, const void *w, const int32_t *row_of,
                    int N, int K, int D, int accumulate) { nmoe_fatal("cu_moe_combine: not implemented"); }
extern "C" void cu_moe_combine_bwd(Backend *be, void *dye, void *dw, const void *dy, const void *ye,
                        const void *w, const int32_t *row_of, int N, int K, int D) { nmoe_fatal("cu_moe_combine_bwd: not implemented"); }
extern "C" void cu_moe_gather_bwd(Backend *be, void *dx, const void *dxe, const int32_t *row_of, int N, int K,
                       int D, int accumulate) { nmoe_fatal("cu_moe_gather_bwd: not implemented"); }
