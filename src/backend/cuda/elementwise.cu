/* elementwise.cu: add, sumsq, embedding, SwiGLU, AdamW. (stub) */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

void cu_add(Backend *be, void *y, const void *a, const void *b, size_t n) { nmoe_fatal("cu_add: not implemented yet"); }
double cu_sumsq(Backend *be, const void *x, size_t n) { nmoe_fatal("cu_sumsq: not implemented yet"); }
void cu_embed_fwd(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                  float scale) { nmoe_fatal("cu_embed_fwd: not implemented yet"); }
void cu_embed_bwd(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                  int V, float scale) { nmoe_fatal("cu_embed_bwd: not implemented yet"); }
void cu_swiglu_fwd(Backend *be, void *h, const void *gu, int M, int F) { nmoe_fatal("cu_swiglu_fwd: not implemented yet"); }
void cu_swiglu_bwd(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F) { nmoe_fatal("cu_swiglu_bwd: not implemented yet"); }
void cu_adamw(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
              const AdamParams *ap) { nmoe_fatal("cu_adamw: not implemented yet"); }
