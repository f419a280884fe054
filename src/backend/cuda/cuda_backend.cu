/* cuda_backend.cu: the CUDA Backend: device selection (Hopper only), the
 * stream and library handles every op uses, device memory (plain cudaMalloc,
 * zero-filled), host float <-> bf16/fp32 transfers through pinned staging,
 * grow-only scratch slots, and phase timing with CUDA events.
 *
 * All work is queued on one stream per backend, so ops need no other ordering;
 * only download, get, sumsq, xent and phase_report wait for the device. */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_blas.h"
#include "backend/cuda/cuda_ops.h"

#define LT_WORKSPACE_BYTES (32u << 20)
#define STAGE_BYTES (8u << 20)   /* pinned staging chunk for put/get */
#define PHASE_NAMES_MAX 64

/* Phase timing: one event per mark since the last report; names are interned
 * so that report can hand back stable pointers. */
typedef struct PhaseMark {
  int name;           /* index into names */
  cudaEvent_t ev;
} PhaseMark;

typedef struct PhaseState {
  char *names[PHASE_NAMES_MAX];
  int n_names;
  PhaseMark *marks;   /* marks since the last report (events reused) */
  int n_marks, cap_marks;
  cudaEvent_t end;
} PhaseState;

/* ---- memory accounting ---- */

/* Device memory only grows at allocations, so sampling the card's used bytes
 * after each one gives the peak (context, library workspaces included). */
static void note_usage(CudaCtx *c) {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && total_b - free_b > c->mem_peak)
    c->mem_peak = total_b - free_b;
}

static size_t cu_mem_peak(Backend *be) { return cuda_ctx(be)->mem_peak; }

/* ---- scratch ---- */

extern "C" void *cuda_scratch(Backend *be, int slot, size_t bytes) {
  CudaCtx *c = cuda_ctx(be);
  NMOE_ASSERT(slot >= 0 && slot < 16);
  if (bytes <= c->scratch_bytes[slot]) return c->scratch[slot];
  /* Grow by at least 25% so that slowly growing requests do not reallocate
   * every call; the old buffer may still be read by queued work, so wait. */
  size_t want = bytes + bytes / 4;
  CUDA_CHECK(cudaStreamSynchronize(c->stream));
  if (slot == SCRATCH_HOST_PINNED) {
    if (c->scratch[slot]) CUDA_CHECK(cudaFreeHost(c->scratch[slot]));
    CUDA_CHECK(cudaMallocHost(&c->scratch[slot], want));
  } else {
    if (c->scratch[slot]) CUDA_CHECK(cudaFree(c->scratch[slot]));
    CUDA_CHECK(cudaMalloc(&c->scratch[slot], want));
  }
  c->scratch_bytes[slot] = want;
  note_usage(c);
  return c->scratch[slot];
}

/* ---- memory ---- */

static void *cu_alloc(Backend *be, size_t bytes) {
  if (bytes == 0) return NULL;
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    nmoe_fatal("GPU out of memory allocating %.1f MiB (%.1f MiB free of %.1f MiB): reduce "
               "batch_size/seq_len or enable recompute_*", bytes / 1048576.0, free_b / 1048576.0,
               total_b / 1048576.0);
  }
  CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda_stream(be)));
  note_usage(cuda_ctx(be));
  return p;
}

static void cu_free(Backend *be, void *p) {
  if (p) CUDA_CHECK(cudaFree(p));
}

static void cu_zero(Backend *be, void *p, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda_stream(be)));
}

static void cu_copy(Backend *be, void *dst, const void *src, size_t bytes) {
  if (bytes)
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_stream(be)));
}

/* Pageable source: the call returns once the bytes are staged, so the caller
 * may reuse its buffer at once. */
static void cu_upload(Backend *be, void *dst, const void *host, size_t bytes) {
  if (bytes)
    CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, cuda_stream(be)));
}

static void cu_download(Backend *be, void *host, const void *src, size_t bytes) {
  if (bytes)
    CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, cuda_stream(be)));
  CUDA_CHECK(cudaStreamSynchronize(cuda_stream(be)));
}

static void cu_sync(Backend *be) { CUDA_CHECK(cudaStreamSynchronize(cuda_stream(be))); }

/* put/get: convert in a pinned chunk; each chunk waits for its copy before
 * the staging buffer is refilled. F32 and I32 need no conversion. */
static void cu_put(Backend *be, void *dst, BufKind k, const float *host, size_t n) {
  cudaStream_t st = cuda_stream(be);
  if (k != BUF_ACT) {
    cu_upload(be, dst, host, n * sizeof(float));
    return;
  }
  bf16 *stage = (bf16 *)cuda_scratch(be, SCRATCH_HOST_PINNED, STAGE_BYTES);
  size_t chunk = STAGE_BYTES / sizeof(bf16);
  for (size_t i = 0; i < n; i += chunk) {
    size_t m = n - i < chunk ? n - i : chunk;
    for (size_t j = 0; j < m; j++) stage[j] = __float2bfloat16(host[i + j]);
    CUDA_CHECK(cudaMemcpyAsync((bf16 *)dst + i, stage, m * sizeof(bf16), cudaMemcpyHostToDevice, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
  }
}

static void cu_get(Backend *be, float *host, BufKind k, const void *src, size_t n) {
  cudaStream_t st = cuda_stream(be);
  if (k != BUF_ACT) {
    cu_download(be, host, src, n * sizeof(float));
    return;
  }
  bf16 *stage = (bf16 *)cuda_scratch(be, SCRATCH_HOST_PINNED, STAGE_BYTES);
  size_t chunk = STAGE_BYTES / sizeof(bf16);
  for (size_t i = 0; i < n; i += chunk) {
    size_t m = n - i < chunk ? n - i : chunk;
    CUDA_CHECK(cudaMemcpyAsync(stage, (const bf16 *)src + i, m * sizeof(bf16),
                               cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    for (size_t j = 0; j < m; j++) host[i + j] = __bfloat162float(stage[j]);
  }
}

/* ---- phase timing ---- */

static int phase_intern(PhaseState *ps, const char *name) {
  for (int i = 0; i < ps->n_names; i++)
    if (strcmp(ps->names[i], name) == 0) return i;
  NMOE_ASSERT(ps->n_names < PHASE_NAMES_MAX);
  ps->names[ps->n_names] = xstrdup(name);
  return ps->n_names++;
}

static void cu_phase(Backend *be, const char *name) {
  PhaseState *ps = (PhaseState *)cuda_ctx(be)->timing;
  if (ps->n_marks == ps->cap_marks) {
    int cap = ps->cap_marks ? 2 * ps->cap_marks : 64;
    ps->marks = (PhaseMark *)xrealloc(ps->marks, cap * sizeof(PhaseMark));
    for (int i = ps->cap_marks; i < cap; i++) CUDA_CHECK(cudaEventCreate(&ps->marks[i].ev));
    ps->cap_marks = cap;
  }
  PhaseMark *m = &ps->marks[ps->n_marks++];
  m->name = phase_intern(ps, name);
  CUDA_CHECK(cudaEventRecord(m->ev, cuda_stream(be)));
}

/* Each phase runs from its mark to the next mark (the last one to now);
 * time is summed per name, in order of first appearance. */
static int cu_phase_report(Backend *be, const char **names, double *ms, int cap) {
  PhaseState *ps = (PhaseState *)cuda_ctx(be)->timing;
  if (ps->n_marks == 0) return 0;
  CUDA_CHECK(cudaEventRecord(ps->end, cuda_stream(be)));
  CUDA_CHECK(cudaEventSynchronize(ps->end));
  int count = 0;
  for (int i = 0; i < ps->n_marks; i++) {
    cudaEvent_t next = i + 1 < ps->n_marks ? ps->marks[i + 1].ev : ps->end;
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, ps->marks[i].ev, next));
    const char *nm = ps->names[ps->marks[i].name];
    int j = 0;
    while (j < count && names[j] != nm) j++;
    if (j == count) {
      if (count == cap) continue;
      names[count] = nm;
      ms[count++] = 0;
    }
    ms[j] += t;
  }
  ps->n_marks = 0;
  return count;
}

/* ---- lifetime ---- */

static void cu_destroy(Backend *be) {
  if (!be) return;
  CudaCtx *c = cuda_ctx(be);
  CUDA_CHECK(cudaStreamSynchronize(c->stream));
  PhaseState *ps = (PhaseState *)c->timing;
  for (int i = 0; i < ps->cap_marks; i++) CUDA_CHECK(cudaEventDestroy(ps->marks[i].ev));
  CUDA_CHECK(cudaEventDestroy(ps->end));
  for (int i = 0; i < ps->n_names; i++) free(ps->names[i]);
  free(ps->marks);
  free(ps);
  for (int s = 0; s < 16; s++) {
    if (!c->scratch[s]) continue;
    if (s == SCRATCH_HOST_PINNED) CUDA_CHECK(cudaFreeHost(c->scratch[s]));
    else CUDA_CHECK(cudaFree(c->scratch[s]));
  }
  BLAS_CHECK(cublasDestroy((cublasHandle_t)c->blas));
  BLAS_CHECK(cublasLtDestroy((cublasLtHandle_t)c->lt));
  CUDA_CHECK(cudaFree(c->lt_ws));
  CUDA_CHECK(cudaStreamDestroy(c->stream));
  free(c);
  free(be);
}

extern "C" Backend *backend_cuda(int device, char *err, size_t errlen) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    snprintf(err, errlen, "no usable CUDA GPU (%s)",
             e != cudaSuccess ? cudaGetErrorString(e) : "no devices");
    cudaGetLastError(); /* clear it so that later CUDA calls start clean */
    return NULL;
  }
  if (device < 0 || device >= n) {
    snprintf(err, errlen, "CUDA device %d requested but only %d present", device, n);
    return NULL;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  if (prop.major != 9 || prop.minor != 0) {
    snprintf(err, errlen, "nmoe needs a Hopper GPU (sm_90): found %s cc %d.%d", prop.name,
             prop.major, prop.minor);
    return NULL;
  }
  CUDA_CHECK(cudaSetDevice(device));

  CudaCtx *c = (CudaCtx *)xcalloc(1, sizeof(CudaCtx));
  c->device = device;
  c->num_sms = prop.multiProcessorCount;
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  cublasLtHandle_t lt;
  BLAS_CHECK(cublasLtCreate(&lt));
  c->lt = lt;
  cublasHandle_t blas;
  BLAS_CHECK(cublasCreate(&blas));
  c->blas = blas;
  c->lt_ws_bytes = LT_WORKSPACE_BYTES;
  CUDA_CHECK(cudaMalloc(&c->lt_ws, c->lt_ws_bytes));
  /* Both handles run on the one stream, so they may share the workspace. */
  BLAS_CHECK(cublasSetStream(blas, c->stream));
  BLAS_CHECK(cublasSetWorkspace(blas, c->lt_ws, c->lt_ws_bytes));
  BLAS_CHECK(cublasSetAtomicsMode(blas, CUBLAS_ATOMICS_NOT_ALLOWED)); /* determinism */
  PhaseState *ps = (PhaseState *)xcalloc(1, sizeof(PhaseState));
  CUDA_CHECK(cudaEventCreate(&ps->end));
  c->timing = ps;

  Backend *be = (Backend *)xcalloc(1, sizeof(Backend));
  be->name = "cuda";
  be->size[BUF_ACT] = 2;
  be->size[BUF_F32] = 4;
  be->size[BUF_I32] = 4;
  be->impl = c;
  be->alloc = cu_alloc;
  be->free = cu_free;
  be->zero = cu_zero;
  be->copy = cu_copy;
  be->upload = cu_upload;
  be->download = cu_download;
  be->put = cu_put;
  be->get = cu_get;
  be->sync = cu_sync;
  be->destroy = cu_destroy;
  be->gemm = cu_gemm;
  be->grouped_gemm = cu_grouped_gemm;
  be->add = cu_add;
  be->convert = cu_convert;
  be->bias_add = cu_bias_add;
  be->bias_grad = cu_bias_grad;
  be->sumsq = cu_sumsq;
  be->embed_fwd = cu_embed_fwd;
  be->embed_bwd = cu_embed_bwd;
  be->rmsnorm_fwd = cu_rmsnorm_fwd;
  be->rmsnorm_bwd = cu_rmsnorm_bwd;
  be->rope = cu_rope;
  be->attn_fwd = cu_attn_fwd;
  be->attn_bwd = cu_attn_bwd;
  be->mla_kv_split = cu_mla_kv_split;
  be->mla_kv_split_bwd = cu_mla_kv_split_bwd;
  be->swiglu_fwd = cu_swiglu_fwd;
  be->swiglu_bwd = cu_swiglu_bwd;
  be->quantize_blocks = cu_quantize_blocks;
  be->router_fwd = cu_router_fwd;
  be->router_bwd = cu_router_bwd;
  be->moe_sort = cu_moe_sort;
  be->moe_gather = cu_moe_gather;
  be->moe_combine = cu_moe_combine;
  be->moe_combine_bwd = cu_moe_combine_bwd;
  be->moe_gather_bwd = cu_moe_gather_bwd;
  be->xent = cu_xent;
  be->adamw = cu_adamw;
  be->phase = cu_phase;
  be->phase_report = cu_phase_report;
  be->mem_peak = cu_mem_peak;
  return be;
}
