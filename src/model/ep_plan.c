/* ep_plan.c: the RDEP row layout of one MoE layer (see ep_plan.h). */
#include "model/ep_plan.h"

#include <stdlib.h>

#include "core/log.h"

void ep_plan_init(EpPlan *p, int rank, int world, int E) {
  NMOE_ASSERT(world >= 1 && E % world == 0 && rank >= 0 && rank < world);
  p->rank = rank;
  p->world = world;
  p->E = E;
  p->El = E / world;
  p->to_owner = xcalloc((size_t)E, sizeof *p->to_owner);
  p->to_source = xcalloc((size_t)p->El * world, sizeof *p->to_source);
  p->recv_off = xcalloc((size_t)p->El + 1, sizeof *p->recv_off);
  p->n_to_owner = p->n_to_source = 0;
  p->sent_rows = p->recv_rows = 0;
}

/* Row where source s's rows of expert e start in owner(e)'s receive layout. */
static int64_t recv_start(const EpPlan *p, const int32_t *counts_all, int e, int s) {
  const int owner = e / p->El, j = e % p->El;
  int64_t row = 0;
  for (int jj = 0; jj < j; jj++)
    for (int ss = 0; ss < p->world; ss++) row += counts_all[(size_t)ss * p->E + owner * p->El + jj];
  for (int ss = 0; ss < s; ss++) row += counts_all[(size_t)ss * p->E + e];
  return row;
}

void ep_plan_build(EpPlan *p, const int32_t *counts_all) {
  const int E = p->E, El = p->El, W = p->world, r = p->rank;
  const int32_t *mine = counts_all + (size_t)r * E;
  p->n_to_owner = 0;
  p->sent_rows = 0;
  for (int e = 0; e < E; e++) {
    if (mine[e] > 0)
      p->to_owner[p->n_to_owner++] = (CommSeg){.peer = e / El, .src_row = p->sent_rows,
                                               .dst_row = recv_start(p, counts_all, e, r),
                                               .rows = mine[e]};
    p->sent_rows += mine[e];
  }
  p->n_to_source = 0;
  p->recv_off[0] = 0;
  int64_t row = 0;
  for (int j = 0; j < El; j++) {
    const int e = r * El + j;
    for (int s = 0; s < W; s++) {
      const int32_t n = counts_all[(size_t)s * E + e];
      if (n > 0) {
        /* where source s sorted expert e: after its rows of experts < e */
        int64_t at = 0;
        for (int ee = 0; ee < e; ee++) at += counts_all[(size_t)s * E + ee];
        p->to_source[p->n_to_source++] = (CommSeg){.peer = s, .src_row = row, .dst_row = at, .rows = n};
      }
      row += n;
    }
    NMOE_ASSERT(row < INT32_MAX);
    p->recv_off[j + 1] = (int32_t)row;
  }
  p->recv_rows = row;
}

void ep_plan_free(EpPlan *p) {
  free(p->to_owner);
  free(p->to_source);
  free(p->recv_off);
  p->to_owner = p->to_source = NULL;
  p->recv_off = NULL;
}
