/* backend.c: picks the backend for a device name ("cpu", "cuda" or "auto"). */
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"

Backend *backend_open(const char *device, int local_rank) {
  if (strcmp(device, "cpu") == 0) return backend_cpu();
  if (strcmp(device, "cuda") != 0 && strcmp(device, "auto") != 0)
    nmoe_fatal("unknown device '%s' (expected cpu, cuda or auto)", device);
#ifdef NMOE_CUDA
  char err[256] = "";
  Backend *be = backend_cuda(local_rank, err, sizeof err);
  if (be) return be;
  if (strcmp(device, "cuda") == 0) nmoe_fatal("device cuda: %s", err);
  log_info("nmoe: no usable GPU (%s); running on the CPU", err);
#else
  if (strcmp(device, "cuda") == 0)
    nmoe_fatal("this nmoe was built without CUDA: rebuild with make CUDA=1");
  log_info("nmoe: built without CUDA; running on the CPU");
#endif
  return backend_cpu();
}
