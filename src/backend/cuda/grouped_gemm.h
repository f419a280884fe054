/* grouped_gemm.h: the tensor-core grouped GEMM (grouped_gemm.cu), called by
 * cu_grouped_gemm (gemm.cu). */
#ifndef NMOE_CUDA_GROUPED_GEMM_H
#define NMOE_CUDA_GROUPED_GEMM_H

#include <stdint.h>

#include "backend/backend.h"

/* Runs grouped_gemm (contract in backend.h) with the Hopper kernels, reading
 * the expert offsets on the device only (no host sync). Returns 1 when done,
 * 0 when the shape is not one it takes (K or N not a multiple of 8, operands
 * not 16-byte aligned): the caller then uses its general path. */
int gg_tc_run(Backend *be, int mode, void *out, const void *a, const void *b, const int32_t *off,
              int E, int M, int N, int K);

#endif
