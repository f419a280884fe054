/* attention.cu: fused causal attention forward and backward (stub). */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

void cu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                 const AttnShape *s) {
  nmoe_fatal("cu_attn_fwd: not implemented");
}

void cu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, const void *dout, const void *q,
                 const void *k, const void *v, const void *o, const void *lse, const AttnShape *s) {
  nmoe_fatal("cu_attn_bwd: not implemented");
}
