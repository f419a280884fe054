/* cpu_backend.c: the CPU Backend table: host memory, float <-> real_t
 * conversion, and wall-clock phase timing. The math lives in the other cpu_*.c
 * files (see cpu.h). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

#define CPU_MAX_PHASES 64

/* Phase timing: names seen so far (kept for the life of the backend so the
 * pointers phase_report hands out stay valid), ms accumulated since the last
 * report, and the phase now running. */
typedef struct CpuImpl {
  char names[CPU_MAX_PHASES][32];
  double ms[CPU_MAX_PHASES];
  int n_phases;
  int cur;          /* running phase, -1 when none */
  double cur_start; /* ms timestamp when it (re)started */
} CpuImpl;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static void *cpu_alloc(Backend *be, size_t bytes) {
  size_t n = (bytes + 63) / 64 * 64; /* aligned_alloc wants a multiple of the alignment */
  void *p = aligned_alloc(64, n ? n : 64);
  if (!p) nmoe_fatal("out of host memory allocating %zu bytes for the CPU backend", bytes);
  memset(p, 0, n ? n : 64);
  return p;
}

static void cpu_free(Backend *be, void *p) { free(p); }

static void cpu_zero(Backend *be, void *p, size_t bytes) {
  if (bytes) memset(p, 0, bytes);
}

static void cpu_copy(Backend *be, void *dst, const void *src, size_t bytes) {
  if (bytes && dst != src) memmove(dst, src, bytes);
}

static void cpu_put(Backend *be, void *dst, BufKind k, const float *host, size_t n) {
  NMOE_ASSERT(k == BUF_ACT || k == BUF_F32);
  real_t *d = dst;
  for (size_t i = 0; i < n; i++) d[i] = (real_t)host[i];
}

static void cpu_get(Backend *be, float *host, BufKind k, const void *src, size_t n) {
  NMOE_ASSERT(k == BUF_ACT || k == BUF_F32);
  const real_t *s = src;
  for (size_t i = 0; i < n; i++) host[i] = (float)s[i];
}

static void cpu_sync(Backend *be) {}

static void cpu_destroy(Backend *be) {
  free(be->impl);
  free(be);
}

/* Closes the running phase's interval up to t. */
static void phase_close(CpuImpl *im, double t) {
  if (im->cur >= 0) im->ms[im->cur] += t - im->cur_start;
  im->cur_start = t;
}

static void cpu_phase(Backend *be, const char *name) {
  CpuImpl *im = be->impl;
  phase_close(im, now_ms());
  int i = 0;
  while (i < im->n_phases && strncmp(im->names[i], name, sizeof im->names[i] - 1) != 0) i++;
  if (i == im->n_phases) {
    if (i == CPU_MAX_PHASES) { /* too many distinct names: stop timing rather than fail */
      im->cur = -1;
      return;
    }
    snprintf(im->names[i], sizeof im->names[i], "%s", name);
    im->ms[i] = 0;
    im->n_phases++;
  }
  im->cur = i;
}

static int cpu_phase_report(Backend *be, const char **names, double *ms, int cap) {
  CpuImpl *im = be->impl;
  phase_close(im, now_ms());
  int n = im->n_phases < cap ? im->n_phases : cap;
  for (int i = 0; i < n; i++) {
    names[i] = im->names[i];
    ms[i] = im->ms[i];
  }
  for (int i = 0; i < im->n_phases; i++) im->ms[i] = 0;
  return n;
}

Backend *backend_cpu(void) {
  Backend *be = xcalloc(1, sizeof *be);
  CpuImpl *im = xcalloc(1, sizeof *im);
  im->cur = -1;
  im->cur_start = now_ms();
  be->name = "cpu";
  be->size[BUF_ACT] = sizeof(real_t);
  be->size[BUF_F32] = sizeof(real_t);
  be->size[BUF_I32] = sizeof(int32_t);
  be->impl = im;
  be->alloc = cpu_alloc;
  be->free = cpu_free;
  be->zero = cpu_zero;
  be->copy = cpu_copy;
  be->upload = cpu_copy; /* host memory: upload and download are plain copies */
  be->download = cpu_copy;
  be->put = cpu_put;
  be->get = cpu_get;
  be->sync = cpu_sync;
  be->destroy = cpu_destroy;
  be->gemm = cpu_gemm;
  be->grouped_gemm = cpu_grouped_gemm;
  be->add = cpu_add;
  be->convert = cpu_convert;
  be->bias_add = cpu_bias_add;
  be->bias_grad = cpu_bias_grad;
  be->sumsq = cpu_sumsq;
  be->embed_fwd = cpu_embed_fwd;
  be->embed_bwd = cpu_embed_bwd;
  be->rmsnorm_fwd = cpu_rmsnorm_fwd;
  be->rmsnorm_bwd = cpu_rmsnorm_bwd;
  be->rope = cpu_rope;
  be->attn_fwd = cpu_attn_fwd;
  be->attn_bwd = cpu_attn_bwd;
  be->attn_sel_fwd = cpu_attn_sel_fwd;
  be->attn_sel_bwd = cpu_attn_sel_bwd;
  be->dsa_index_fwd = cpu_dsa_index_fwd;
  be->dsa_index_bwd = cpu_dsa_index_bwd;
  be->dsa_topk = cpu_dsa_topk;
  be->dsa_attn_dist = cpu_dsa_attn_dist;
  be->dsa_kl = cpu_dsa_kl;
  be->mla_kv_split = cpu_mla_kv_split;
  be->mla_kv_split_bwd = cpu_mla_kv_split_bwd;
  be->swiglu_fwd = cpu_swiglu_fwd;
  be->swiglu_bwd = cpu_swiglu_bwd;
  be->quantize_blocks = cpu_quantize_blocks;
  be->router_fwd = cpu_router_fwd;
  be->router_bwd = cpu_router_bwd;
  be->moe_sort = cpu_moe_sort;
  be->moe_gather = cpu_moe_gather;
  be->moe_combine = cpu_moe_combine;
  be->moe_combine_bwd = cpu_moe_combine_bwd;
  be->moe_gather_bwd = cpu_moe_gather_bwd;
  be->xent = cpu_xent;
  be->adamw = cpu_adamw;
  be->phase = cpu_phase;
  be->phase_report = cpu_phase_report;
  return be;
}
