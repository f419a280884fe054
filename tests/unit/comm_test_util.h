/* comm_test_util.h: multi-process comm tests. run_ranks forks one child per
 * rank; each child runs a RankFn that returns 0 when every check held (checks
 * print what failed to stderr), and the parent collects the exit codes. The
 * all_reduce check lives here because the float and double builds share it. */
#ifndef NMOE_COMM_TEST_UTIL_H
#define NMOE_COMM_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "backend/backend.h"
#include "core/log.h"
#include "dist/comm.h"
#include "dist/store.h"

#define MAX_WORLD 4

/* In a rank: report the failed condition and fail this rank. */
#define EXPECT(cond)                                                                       \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      fprintf(stderr, "rank %d: %s:%d: check failed: %s\n", rank, __FILE__, __LINE__, #cond); \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

typedef int (*RankFn)(int rank, int world, int port, void *arg);

/* Runs fn as ranks 0..world-1 of one job on a fresh pair of ports; codes[r] =
 * rank r's exit status (128 + signal when killed). A child still running
 * after 60 s is killed by SIGALRM, so a hang fails instead of stalling CI.
 * errdir != NULL: rank r's stderr goes to errdir/rank<r>.err. */
static void run_ranks(int world, RankFn fn, void *arg, int *codes, const char *errdir) {
  int port = store_pick_port(2);
  assert_true(port > 0);
  pid_t pids[MAX_WORLD];
  fflush(NULL);
  for (int r = 0; r < world; r++) {
    pids[r] = fork();
    assert_true(pids[r] >= 0);
    if (pids[r] == 0) {
      alarm(60);
      if (errdir) {
        char p[512];
        snprintf(p, sizeof p, "%s/rank%d.err", errdir, r);
        if (!freopen(p, "w", stderr)) _exit(99);
      }
      int rc = fn(r, world, port, arg);
      fflush(NULL);
      _exit(rc);
    }
  }
  for (int r = 0; r < world; r++) {
    int ws;
    assert_int_equal(waitpid(pids[r], &ws, 0), pids[r]);
    codes[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
  }
}

/* Every rank must exit 0. */
static void run_ok(int world, RankFn fn, void *arg) {
  int codes[MAX_WORLD];
  run_ranks(world, fn, arg, codes, NULL);
  for (int r = 0; r < world; r++) {
    if (codes[r]) fprintf(stderr, "world %d: rank %d exited with %d\n", world, r, codes[r]);
    assert_int_equal(codes[r], 0);
  }
}

/* comm_open the way a launched rank does: from the environment. */
static Comm *open_comm(int rank, int world, int port, int timeout_s) {
  char s[16];
  snprintf(s, sizeof s, "%d", port);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", s, 1);
  unsetenv("NMOE_STORE_PORT");
  snprintf(s, sizeof s, "%d", timeout_s);
  setenv("NMOE_DIST_TIMEOUT_S", s, 1);
  DistInfo di = {rank, world, rank, world, "test"};
  return comm_open(&di, backend_open("cpu", 0));
}

/* Element i of rank r's input: values of mixed magnitude, so the sum depends
 * on the order of the additions. */
static double reduce_input(int r, size_t i) {
  return (double)((i * 7919 + (size_t)r * 104729) % 1000) * (r % 2 ? 1e-3 : 1.7) + 1.0 / (r + 1);
}

/* all_reduce of ACT and F32 buffers, at sizes that grow and shrink the
 * scratch: the result is the rank-order sum in the element type (float or
 * double, be->size[kind]) and the same bits on every rank. */
static int check_all_reduce(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 30);
  static const size_t sizes[] = {10, 1000, 3, 4099};
  for (int kind = BUF_ACT; kind <= BUF_F32; kind++) {
    size_t es = c->be->size[kind];
    EXPECT(es == 4 || es == 8);
    for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
      size_t n = sizes[t];
      unsigned char *buf = c->be->alloc(c->be, n * es);
      for (size_t i = 0; i < n; i++) {
        if (es == 4)
          ((float *)buf)[i] = (float)reduce_input(rank, i);
        else
          ((double *)buf)[i] = reduce_input(rank, i);
      }
      c->all_reduce(c, buf, n, (BufKind)kind);
      for (size_t i = 0; i < n; i++) {
        if (es == 4) {
          float want = (float)reduce_input(0, i);
          for (int r = 1; r < world; r++) want += (float)reduce_input(r, i);
          EXPECT(memcmp(&want, buf + i * 4, 4) == 0);
        } else {
          double want = reduce_input(0, i);
          for (int r = 1; r < world; r++) want += reduce_input(r, i);
          EXPECT(memcmp(&want, buf + i * 8, 8) == 0);
        }
      }
      unsigned char *all = xmalloc(n * es * (size_t)world);
      c->all_gather_host(c, all, buf, n * es);
      for (int r = 0; r < world; r++) EXPECT(memcmp(all + (size_t)r * n * es, buf, n * es) == 0);
      free(all);
      c->be->free(c->be, buf);
    }
  }
  Backend *be = c->be;
  c->destroy(c);
  be->destroy(be);
  return 0;
}

#endif
