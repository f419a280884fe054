/* norm_rope.cu: RMSNorm, RoPE and MLA key/value split on the GPU. (stub) */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

extern "C" void cu_rmsnorm_fwd(Backend *be, void *y, void *rstd, const void *x, const void *w, int N, int D,
                    int ldx, int ldy, float eps) { nmoe_fatal("cu_rmsnorm_fwd: not implemented"); }
extern "C" void cu_rmsnorm_bwd(Backend *be, void *dx, void *dw, const void *dy, const void *x, const void *w,
                    const void *rstd, int N, int D, int ldx, int ldy, int accumulate) { nmoe_fatal("cu_rmsnorm_bwd: not implemented"); }
extern "C" void cu_rope(Backend *be, void *x, const void *cos, const void *sin, int N, int T, int H, int ldx,
             int hs, int off, int rd, int inverse) { nmoe_fatal("cu_rope: not implemented"); }
extern "C" void cu_mla_kv_split(Backend *be, void *k, void *v, const void *kv, const void *kr, int ldkr, int N,
                     int H, int dn, int dr, int dv) { nmoe_fatal("cu_mla_kv_split: not implemented"); }
extern "C" void cu_mla_kv_split_bwd(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                         const void *dv, int N, int H, int dn, int dr, int dv_dim) { nmoe_fatal("cu_mla_kv_split_bwd: not implemented"); }
