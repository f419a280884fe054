/* cuda_common.h: shared helpers of the CUDA backend: error checks with hints,
 * bf16 conversions, the stream every op runs on, and the launcher header
 * contract (extern "C" entry points called from C). */
#ifndef NMOE_CUDA_COMMON_H
#define NMOE_CUDA_COMMON_H

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "backend/backend.h"
#include "core/log.h"
#ifdef __cplusplus
}
#endif

typedef __nv_bfloat16 bf16;

/* Fatal with what failed, where, and a hint. */
#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess)                                                                 \
      nmoe_fatal("CUDA error %s (%s) at %s:%d in %s (hint: out of memory? reduce "         \
                 "batch_size/seq_len or enable recompute_*; illegal address? run the GPU " \
                 "op tests under compute-sanitizer)",                                      \
                 cudaGetErrorName(e_), cudaGetErrorString(e_), __FILE__, __LINE__, #call); \
  } while (0)

/* After every launch: catches bad launch configurations immediately. */
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }


/* Per-backend CUDA state (be->impl). Owned by cuda_backend.cu. */
typedef struct CudaCtx {
  cudaStream_t stream; /* every op runs on this stream */
  int device;
  int num_sms;
  void *lt;            /* cublasLtHandle_t */
  void *blas;          /* cublasHandle_t (grouped GEMM) */
  void *lt_ws;         /* cuBLASLt workspace */
  size_t lt_ws_bytes;
  void *scratch[16];   /* grow-only device scratch, one per slot (see cuda_scratch) */
  size_t scratch_bytes[16];
  void *timing;        /* phase timing state (events) */
  size_t mem_peak;     /* highest device memory in use seen after an allocation */
} CudaCtx;

static inline CudaCtx *cuda_ctx(Backend *be) { return (CudaCtx *)be->impl; }
static inline cudaStream_t cuda_stream(Backend *be) { return cuda_ctx(be)->stream; }

/* Scratch slots: each op family uses its own slot so that buffers handed
 * between calls of one op family are not clobbered by another. */
enum {
  SCRATCH_GEMM = 0, SCRATCH_XENT = 1, SCRATCH_ROUTER = 2, SCRATCH_MOE = 3, SCRATCH_NORM = 4,
  SCRATCH_REDUCE = 5, SCRATCH_ATTN = 6, SCRATCH_EMBED = 7, SCRATCH_HOST_PINNED = 8
};
#ifdef __cplusplus
extern "C" {
#endif
/* Device scratch of at least bytes for slot (grow-only, stream-ordered reuse). */
void *cuda_scratch(Backend *be, int slot, size_t bytes);
#ifdef __cplusplus
}
#endif

#endif
