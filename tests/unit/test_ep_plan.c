/* test_ep_plan.c: the RDEP row layout (model/ep_plan.c). Simulates the puts of
 * every rank with host arrays: dispatch lands each source's rows of an expert
 * in the owner's [local expert][source] layout, and the return trip puts every
 * row back exactly where its source sorted it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "core/rng.h"
#include "model/ep_plan.h"

/* rows are tagged (source, expert, index within that expert) */
static int64_t tag(int s, int e, int i) { return ((int64_t)s << 40) | ((int64_t)e << 20) | i; }

static void check_world(int W, int E, uint64_t seed) {
  int32_t *counts = calloc((size_t)W * E, sizeof *counts);
  for (int i = 0; i < W * E; i++) counts[i] = (int32_t)(rng_u64(seed, 1, (uint64_t)i, 0) % 5);
  counts[0] = 0; /* an empty (source, expert) pair */
  EpPlan *plans = calloc((size_t)W, sizeof *plans);
  int64_t **sorted = calloc((size_t)W, sizeof *sorted), **recv = calloc((size_t)W, sizeof *recv),
          **back = calloc((size_t)W, sizeof *back);
  for (int r = 0; r < W; r++) {
    ep_plan_init(&plans[r], r, W, E);
    ep_plan_build(&plans[r], counts);
    int64_t n = 0;
    for (int e = 0; e < E; e++) n += counts[(size_t)r * E + e];
    assert_int_equal(plans[r].sent_rows, n);
    sorted[r] = calloc((size_t)n + 1, sizeof(int64_t));
    back[r] = calloc((size_t)n + 1, sizeof(int64_t));
    recv[r] = calloc((size_t)W * n + 64 * W * E + 1, sizeof(int64_t));
    int64_t row = 0;
    for (int e = 0; e < E; e++)
      for (int i = 0; i < counts[(size_t)r * E + e]; i++) sorted[r][row++] = tag(r, e, i);
  }
  for (int r = 0; r < W; r++) /* dispatch */
    for (int k = 0; k < plans[r].n_to_owner; k++) {
      CommSeg g = plans[r].to_owner[k];
      for (int64_t i = 0; i < g.rows; i++) recv[g.peer][g.dst_row + i] = sorted[r][g.src_row + i];
    }
  for (int o = 0; o < W; o++) { /* owner layout: [local expert][source] */
    const EpPlan *p = &plans[o];
    int64_t row = 0;
    for (int j = 0; j < p->El; j++) {
      assert_int_equal(p->recv_off[j], row);
      for (int s = 0; s < W; s++)
        for (int i = 0; i < counts[(size_t)s * E + o * p->El + j]; i++)
          assert_true(recv[o][row++] == tag(s, o * p->El + j, i));
    }
    assert_int_equal(p->recv_off[p->El], row);
    assert_int_equal(p->recv_rows, row);
    for (int k = 0; k < p->n_to_source; k++) { /* return */
      CommSeg g = p->to_source[k];
      for (int64_t i = 0; i < g.rows; i++) back[g.peer][g.dst_row + i] = recv[o][g.src_row + i];
    }
  }
  for (int r = 0; r < W; r++) {
    for (int64_t i = 0; i < plans[r].sent_rows; i++) assert_true(back[r][i] == sorted[r][i]);
    ep_plan_free(&plans[r]);
    free(sorted[r]);
    free(recv[r]);
    free(back[r]);
  }
  free(sorted);
  free(recv);
  free(back);
  free(plans);
  free(counts);
}

static void test_round_trip(void **state) {
  (void)state;
  check_world(1, 4, 1);
  check_world(2, 8, 2);
  check_world(4, 8, 3);
  check_world(4, 4, 4); /* one expert per rank */
  check_world(8, 64, 5);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_round_trip)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
