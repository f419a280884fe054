/* ep_plan.h: where each routed row travels when the experts are spread over
 * the ranks (RDEP expert parallelism).
 *
 * Rank r owns the El = E/world experts [r*El, (r+1)*El). Every rank sorts its
 * (token, slot) rows by global expert (moe_sort: rows of expert e are
 * [off[e], off[e+1]) with off from its counts). An owner receives rows in the
 * layout [local expert j][source rank s]: the rows of expert r*El+j from rank
 * s start at recv_off[j] + (rows of that expert from ranks < s). So each owner
 * runs one grouped GEMM over El experts with offsets recv_off, and the return
 * trip (to_source) puts every result row back where its source sorted it. */
#ifndef NMOE_EP_PLAN_H
#define NMOE_EP_PLAN_H

#include <stdint.h>

#include "dist/comm.h"

typedef struct EpPlan {
  int rank, world, E, El;
  CommSeg *to_owner;   /* [E]: my sorted rows -> the owners' receive buffers */
  int n_to_owner;
  CommSeg *to_source;  /* [El*world]: rows my experts received -> back to their sources */
  int n_to_source;
  int64_t sent_rows;   /* rows I route (sum of my counts) */
  int64_t recv_rows;   /* rows my experts receive */
  int32_t *recv_off;   /* [El+1] my experts' row ranges in the receive layout */
} EpPlan;

/* E % world must be 0 (the caller checks and reports). */
void ep_plan_init(EpPlan *p, int rank, int world, int E);
/* counts_all: [world, E], rank s's rows per global expert (all-gathered). */
void ep_plan_build(EpPlan *p, const int32_t *counts_all);
void ep_plan_free(EpPlan *p);

#endif
