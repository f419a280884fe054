/* cuda_backend.cu: backend_cuda() and device memory. (stub) */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"

extern "C" void *cuda_scratch(Backend *be, int slot, size_t bytes) { nmoe_fatal("cuda_scratch: not implemented yet"); }
extern "C" Backend *backend_cuda(int device, char *err, size_t errlen) {
  snprintf(err, errlen, "CUDA backend not implemented yet");
  return NULL;
}
