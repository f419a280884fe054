/* gemm.cu: dense and grouped (per-expert) GEMMs on cuBLASLt / cuBLAS. (stub) */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

void cu_gemm(Backend *be, void *C, const void *A, const void *B, int M, int N, int K, int transA,
             int transB, float alpha, float beta, int c_f32) {
  nmoe_fatal("cu_gemm: not implemented yet");
}
void cu_grouped_gemm(Backend *be, int mode, void *out, const void *a, const void *b,
                     const int32_t *off, const int32_t *off_host, int E, int M, int N, int K) {
  nmoe_fatal("cu_grouped_gemm: not implemented yet");
}
