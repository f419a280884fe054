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

#endif
