/* test_comm_f64.c: all_reduce of the "shm" transport with the CPU backend
 * built in double precision (real_t = double, 8-byte ACT and F32 elements, as
 * gradient checks use it): the rank-order sum, the same bits on every rank. */
#include "comm_test_util.h"

static void test_all_reduce_f64(void **state) {
  Backend *be = backend_open("cpu", 0);
  assert_int_equal(be->size[BUF_ACT], 8);
  be->destroy(be);
  run_ok(2, check_all_reduce, NULL);
  run_ok(3, check_all_reduce, NULL);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_all_reduce_f64)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
