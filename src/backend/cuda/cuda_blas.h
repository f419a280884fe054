/* cuda_blas.h: status check for cuBLAS / cuBLASLt calls (shared by
 * cuda_backend.cu, which creates the handles, and gemm.cu, which uses them). */
#ifndef NMOE_CUDA_BLAS_H
#define NMOE_CUDA_BLAS_H
#include <cublasLt.h>
#include <cublas_v2.h>
/* Needs nmoe_fatal: include after backend/cuda/cuda_common.h. */

#define BLAS_CHECK(call)                                                                      \
  do {                                                                                        \
    cublasStatus_t s_ = (call);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                          \
      nmoe_fatal("cuBLAS error %s at %s:%d in %s (hint: NOT_SUPPORTED means an unusual "      \
                 "shape/alignment; otherwise check that libcublas matches CUDA 13)",          \
                 cublasGetStatusString(s_), __FILE__, __LINE__, #call);                       \
  } while (0)

#endif
