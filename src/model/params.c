/* params.c: the parameter table and counter-based initialisation. */
#include "model/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/rng.h"

int params_add(ParamTable *t, const char *name, int ndim, const int64_t *shape, ParamOwner owner,
               OptGroup group, InitKind init, float std) {
  NMOE_ASSERT(ndim >= 1 && ndim <= 4);
  if (t->n == t->cap) {
    t->cap = t->cap ? t->cap * 2 : 64;
    t->p = xrealloc(t->p, (size_t)t->cap * sizeof *t->p);
  }
  ParamInfo *pi = &t->p[t->n];
  memset(pi, 0, sizeof *pi);
  NMOE_ASSERT(strlen(name) < sizeof pi->name);
  strcpy(pi->name, name);
  pi->ndim = ndim;
  pi->numel = 1;
  for (int d = 0; d < ndim; d++) {
    pi->shape[d] = shape[d];
    pi->numel *= (size_t)shape[d];
  }
  pi->owner = owner;
  pi->group = group;
  pi->init = init;
  pi->std = std;
  return t->n++;
}

/* 16-element alignment: 32 bytes in bf16, 64 in fp32, so vector loads never
 * straddle tensors and every group range suits the vectorised optimizer. */
static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

void params_finalize(ParamTable *t, size_t dense_multiple) {
  size_t off = 0;
  for (int g = 0; g < N_GROUPS; g++) {
    if (g == GROUP_EXPERT && dense_multiple > 1)
      off = (off + dense_multiple - 1) / dense_multiple * dense_multiple;
    t->group_off[g] = off;
    for (int i = 0; i < t->n; i++) {
      if (t->p[i].group != (OptGroup)g) continue;
      /* A packed row continues the previous one (one fused GEMM operand):
       * padding between them would shift its rows. */
      if (!t->p[i].packed) off = align16(off);
      t->p[i].offset = off;
      off += t->p[i].numel;
    }
    off = align16(off);
  }
  t->group_off[N_GROUPS] = off;
  t->total = off;
}

int params_find(const ParamTable *t, const char *name) {
  for (int i = 0; i < t->n; i++)
    if (!strcmp(t->p[i].name, name)) return i;
  return -1;
}

void params_free(ParamTable *t) {
  free(t->p);
  memset(t, 0, sizeof *t);
}

float params_init_value(const ParamInfo *pi, int row, uint64_t seed, size_t i) {
  i += pi->init_base;
  switch (pi->init) {
    case INIT_ONES: return 1.0f;
    case INIT_ZEROS: return 0.0f;
    case INIT_NORMAL: return pi->std * rng_normal(seed, (uint64_t)row, i, 0);
    case INIT_TRUNC_NORMAL:
      /* Redraw outside +-2 std (the usual truncated-normal convention). */
      for (uint32_t attempt = 0;; attempt++) {
        float z = rng_normal(seed, (uint64_t)row, i, attempt);
        if (fabsf(z) <= 2.0f || attempt == 64) return pi->std * z;
      }
  }
  return 0.0f;
}
