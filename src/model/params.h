/* params.h: the parameter table. Every trainable tensor of the model is one
 * row (name, shape, offset into the single parameter allocation, owner,
 * optimizer group, init). Checkpoints, the optimizer, grad norm and parity
 * tests all walk this table; nothing else knows where a weight lives.
 *
 * Rows are laid out group by group (in table order within a group), so each
 * optimizer group is one contiguous range [group_off[g], group_off[g+1]).
 * Every row starts 16-element aligned, except a row marked packed: it follows
 * the previous row of its group with no gap (the model relies on this to run
 * w1|w3 and wq|wk|wv as single GEMMs). */
#ifndef NMOE_PARAMS_H
#define NMOE_PARAMS_H

#include <stddef.h>
#include <stdint.h>

typedef enum { OWN_DENSE = 0, OWN_EXPERT = 1 } ParamOwner;

/* The original's AdamW groups (reference section 3). */
typedef enum {
  GROUP_DECAY = 0,    /* dense matrices: lr_dense, weight_decay */
  GROUP_NO_DECAY = 1, /* norms, embedding, lm_head: lr_dense, no decay */
  GROUP_ROUTER = 2,   /* router gates: lr_router, no decay */
  GROUP_EXPERT = 3,   /* routed experts: lr_expert, weight_decay, adam_beta2_expert */
  N_GROUPS = 4
} OptGroup;

typedef enum { INIT_NORMAL = 0, INIT_TRUNC_NORMAL = 1, INIT_ONES = 2, INIT_ZEROS = 3 } InitKind;

typedef struct ParamInfo {
  char name[96];
  int ndim;
  int64_t shape[4];
  size_t numel;
  size_t offset; /* elements from the start of the allocation */
  ParamOwner owner;
  OptGroup group;
  InitKind init;
  float std;
  int packed; /* 1: placed right after the previous row of its group, unpadded */
  size_t init_base; /* element of the full tensor this row starts at (a rank's
                       expert shard), so a shard draws the same values */
} ParamInfo;

typedef struct ParamTable {
  int n, cap;
  ParamInfo *p;
  size_t total;                 /* elements */
  size_t group_off[N_GROUPS + 1];
} ParamTable;

/* Adds a row (offsets are assigned by params_finalize). Returns its index. */
int params_add(ParamTable *t, const char *name, int ndim, const int64_t *shape, ParamOwner owner,
               OptGroup group, InitKind init, float std);
/* Assigns offsets group by group and fills group_off/total. Set packed on
 * rows before calling it. The expert group (last) starts at a multiple of
 * dense_multiple elements, so the dense groups before it split into equal,
 * aligned ZeRO shards (the gap belongs to the router group and stays zero). */
void params_finalize(ParamTable *t, size_t dense_multiple);
/* Row index by name, or -1. */
int params_find(const ParamTable *t, const char *name);
void params_free(ParamTable *t);

/* Deterministic init value of element i of row p (counter-based: independent of
 * order, thread count and backend). */
float params_init_value(const ParamInfo *pi, int row, uint64_t seed, size_t i);

#endif
