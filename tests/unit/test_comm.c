/* test_comm.c: the host side of multi-process runs on the CPU backend: the
 * TCP store (rendezvous, all_gather, refusals and failures that must end in an
 * error rather than a hang) and the "single" and "shm" transports (all_reduce
 * exactness and identity across ranks, put_rows delivery and its barriers,
 * symmetric allocations). Ranks are forked children (comm_test_util.h). */
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "comm_test_util.h"

/* Reads a rank's captured stderr (static buffer). */
static const char *rank_err(const char *dir, int r) {
  static char buf[4096];
  char p[512];
  snprintf(p, sizeof p, "%s/rank%d.err", dir, r);
  FILE *f = fopen(p, "r");
  size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
  if (f) fclose(f);
  buf[n] = 0;
  return buf;
}

static void assert_contains(const char *text, const char *needle) {
  if (!strstr(text, needle)) fprintf(stderr, "expected '%s' in: %s\n", needle, text);
  assert_non_null(strstr(text, needle));
}

static char *make_errdir(void) {
  static char d[64];
  strcpy(d, "/tmp/nmoe_comm_XXXXXX");
  assert_non_null(mkdtemp(d));
  return d;
}

static void remove_errdir(const char *d, int world) {
  char p[512];
  for (int r = 0; r < world; r++) {
    snprintf(p, sizeof p, "%s/rank%d.err", d, r);
    unlink(p);
  }
  rmdir(d);
}

/* ---- world 1 ---- */

static void test_single(void **state) {
  DistInfo di = {0, 1, 0, 1, "none"};
  Backend *be = backend_open("cpu", 0);
  Comm *c = comm_open(&di, be);
  assert_string_equal(c->transport, "single");
  assert_null(c->store);
  int32_t in[3] = {4, 5, 6}, out[3];
  c->all_gather_host(c, out, in, sizeof in);
  assert_memory_equal(out, in, sizeof in);
  size_t es = be->size[BUF_ACT];
  unsigned char *a = c->sym_alloc(c, 8 * es), *b = c->sym_alloc(c, 8 * es);
  assert_true(a != b);
  float src[8] = {1, 2, 3, 4, 5, 6, 7, 8}, got[8];
  be->put(be, b, BUF_ACT, src, 8);
  CommSeg segs[2] = {{0, 0, 4, 2}, {0, 6, 0, 2}}; /* rows of 1 element */
  c->put_rows(c, a, b, es, segs, 2);
  be->get(be, got, BUF_ACT, a, 8);
  float want[8] = {7, 8, 0, 0, 1, 2, 0, 0};
  assert_memory_equal(got, want, sizeof want);
  c->all_reduce(c, a, 8, BUF_ACT);
  be->get(be, got, BUF_ACT, a, 8);
  assert_memory_equal(got, want, sizeof want);
  c->barrier(c);
  assert_int_equal(comm_sum_i64(c, -7), -7);
  assert_true(comm_sum_f64(c, 0.25) == 0.25);
  c->destroy(c);
  be->destroy(be);
}

/* ---- host gathers and sums ---- */

static int check_gather(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 30);
  EXPECT(!strcmp(c->transport, "shm") && c->rank == rank && c->world == world);
  int32_t in[5], out[5 * MAX_WORLD];
  for (int k = 0; k < 5; k++) in[k] = rank * 10 + k;
  c->all_gather_host(c, out, in, sizeof in);
  for (int r = 0; r < world; r++)
    for (int k = 0; k < 5; k++) EXPECT(out[r * 5 + k] == r * 10 + k);
  /* 1 MiB per rank: many partial socket transfers. */
  size_t big = 1 << 20;
  unsigned char *bin = xmalloc(big), *bout = xmalloc(big * (size_t)world);
  for (size_t i = 0; i < big; i++) bin[i] = (unsigned char)(i * 31 + (size_t)rank);
  c->all_gather_host(c, bout, bin, big);
  for (int r = 0; r < world; r++)
    for (size_t i = 0; i < big; i += 4093) EXPECT(bout[(size_t)r * big + i] == (unsigned char)(i * 31 + (size_t)r));
  free(bin);
  free(bout);
  EXPECT(comm_sum_i64(c, (int64_t)1 << (40 + rank)) == ((int64_t)1 << (40 + world)) - ((int64_t)1 << 40));
  double x = rank == 0 ? 1e16 : 1.0, want = 1e16; /* rank order: 1e16 + 1 + 1 rounds each time */
  for (int r = 1; r < world; r++) want += 1.0;
  EXPECT(comm_sum_f64(c, x) == want);
  int64_t v[3] = {rank, -rank, 100};
  comm_sum_i64_array(c, v, 3);
  EXPECT(v[0] == world * (world - 1) / 2 && v[1] == -v[0] && v[2] == 100 * world);
  c->barrier(c);
  Backend *be = c->be;
  c->destroy(c);
  be->destroy(be);
  return 0;
}

static void test_all_gather_order(void **state) {
  run_ok(2, check_gather, NULL);
  run_ok(3, check_gather, NULL);
}

static void test_all_reduce(void **state) {
  run_ok(2, check_all_reduce, NULL);
  run_ok(3, check_all_reduce, NULL);
}

/* ---- ZeRO collectives ---- */

/* reduce_scatter leaves the rank-order sum in this rank's slice; all_gather
 * then hands every rank every slice (F32 kind; the CPU backend is float). */
static int check_zero(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 30);
  const size_t len = 37, n = len * (size_t)world;
  float *buf = c->be->alloc(c->be, n * sizeof(float));
  for (size_t i = 0; i < n; i++) buf[i] = (float)reduce_input(rank, i);
  c->reduce_scatter(c, buf, n, BUF_F32);
  for (size_t i = (size_t)rank * len; i < (size_t)(rank + 1) * len; i++) {
    float want = (float)reduce_input(0, i);
    for (int r = 1; r < world; r++) want += (float)reduce_input(r, i);
    EXPECT(memcmp(&want, &buf[i], 4) == 0);
  }
  for (size_t i = 0; i < n; i++) /* every slice: its owner's tag */
    if (i / len == (size_t)rank) buf[i] = (float)(1000 * rank + (int)i);
    else buf[i] = -1.0f;
  c->all_gather(c, buf, n, BUF_F32);
  for (size_t i = 0; i < n; i++) EXPECT(buf[i] == (float)(1000 * (int)(i / len) + (int)i));
  c->be->free(c->be, buf);
  Backend *be = c->be;
  c->destroy(c);
  be->destroy(be);
  return 0;
}

static void test_zero_collectives(void **state) {
  run_ok(2, check_zero, NULL);
  run_ok(3, check_zero, NULL);
}

/* ---- put_rows ---- */

#define ROW 3     /* int32 per row */
#define SRC_ROWS 8

/* Round t: rank s puts its src rows [p, p+2) into peer p's dst rows [2s, 2s+2)
 * for every peer p (itself included), except that rank (t % world) sends
 * nothing. src[row][k] = 1000*t + 100*s + 10*row + k. */
static int32_t put_value(int t, int s, int row, int k) { return 1000 * t + 100 * s + 10 * row + k; }

static int check_put_rows(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 30);
  Backend *be = c->be;
  size_t rb = ROW * sizeof(int32_t);
  int dst_rows = 2 * world;
  int32_t *dst = c->sym_alloc(c, (size_t)dst_rows * rb);
  int32_t *src = be->alloc(be, SRC_ROWS * rb);
  for (int i = 0; i < dst_rows * ROW; i++) EXPECT(dst[i] == 0);
  /* Many rounds into the same dst: a rank that wrote round t+1 before a slow
   * peer checked round t (no entry barrier) would show here. */
  for (int t = 0; t < 40; t++) {
    for (int row = 0; row < SRC_ROWS; row++)
      for (int k = 0; k < ROW; k++) src[row * ROW + k] = put_value(t, rank, row, k);
    CommSeg segs[MAX_WORLD];
    int nseg = 0;
    if (rank != t % world)
      for (int p = world - 1; p >= 0; p--) segs[nseg++] = (CommSeg){p, p, 2 * rank, 2};
    c->put_rows(c, dst, src, rb, segs, nseg);
    for (int s = 0; s < world; s++)
      for (int j = 0; j < 2; j++)
        for (int k = 0; k < ROW; k++) {
          int32_t got = dst[(2 * s + j) * ROW + k];
          /* the silent sender left the previous round's rows (zeros in round 0) */
          int tt = s == t % world ? t - 1 : t;
          int32_t want = tt < 0 ? 0 : put_value(tt, s, rank + j, k);
          if (got != want) fprintf(stderr, "round %d: row %d from rank %d: %d, want %d\n", t, 2 * s + j, s, got, want);
          EXPECT(got == want);
        }
  }
  be->free(be, src);
  c->destroy(c);
  be->destroy(be);
  return 0;
}

static void test_put_rows(void **state) {
  run_ok(2, check_put_rows, NULL);
  run_ok(3, check_put_rows, NULL);
}

/* ---- symmetric allocations ---- */

/* Counts /dev/shm entries named after this job's rank 0. */
static int shm_leftovers(pid_t rank0) {
  char prefix[32];
  snprintf(prefix, sizeof prefix, "nmoe-%d-", (int)rank0);
  DIR *d = opendir("/dev/shm");
  if (!d) return 0;
  int n = 0;
  for (struct dirent *e; (e = readdir(d));) n += !strncmp(e->d_name, prefix, strlen(prefix));
  closedir(d);
  return n;
}

static int check_sym_alloc(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 30);
  int64_t pid0 = rank == 0 ? getpid() : 0;
  pid0 = comm_sum_i64(c, pid0);
  int32_t *a = c->sym_alloc(c, 5 * sizeof(int32_t));   /* not a multiple of 64 bytes */
  int32_t *b = c->sym_alloc(c, 200 * sizeof(int32_t));
  EXPECT(a != b);
  c->barrier(c); /* rank 0 unlinks right after sym_alloc's own barrier */
  EXPECT(shm_leftovers((pid_t)pid0) == 0);
  for (int i = 0; i < 200; i++) EXPECT(b[i] == 0);
  /* Every rank puts its rank into row `rank` of a on the next rank; b stays untouched. */
  int32_t one[1] = {rank + 1};
  CommSeg s = {(rank + 1) % world, 0, rank, 1};
  c->put_rows(c, a, one, sizeof(int32_t), &s, 1);
  int from = (rank + world - 1) % world;
  for (int i = 0; i < 5; i++) EXPECT(a[i] == (i == from ? from + 1 : 0));
  for (int i = 0; i < 200; i++) EXPECT(b[i] == 0);
  /* An interior pointer of b addresses b's rows from there. */
  c->put_rows(c, b + 100, one, sizeof(int32_t), &s, 1);
  EXPECT(b[100 + from] == from + 1);
  Backend *be = c->be;
  c->destroy(c);
  be->destroy(be);
  return 0;
}

static void test_sym_alloc_twice(void **state) {
  run_ok(2, check_sym_alloc, NULL);
  run_ok(3, check_sym_alloc, NULL);
}

/* ---- failures: an error, never a hang ---- */

/* Rank 2 leaves right after the rendezvous; the others' all_reduce fails. */
static int leave_early(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 5);
  if (rank == 2) _exit(0);
  float x[4] = {1, 2, 3, 4};
  c->all_reduce(c, x, 4, BUF_F32);
  return 0; /* not reached: all_reduce ends the process */
}

static void test_peer_exit_fails(void **state) {
  char *d = make_errdir();
  int codes[3];
  run_ranks(3, leave_early, NULL, codes, d);
  assert_int_equal(codes[0], 1);
  assert_int_equal(codes[1], 1);
  assert_int_equal(codes[2], 0);
  assert_contains(rank_err(d, 0), "nmoe: error: rank 0: all_reduce: rank 2 closed the connection");
  assert_contains(rank_err(d, 1), "rank 0 closed the connection");
  remove_errdir(d, 3);
}

/* Rank 2 stays alive but silent for longer than the 1 s timeout. */
static int stay_silent(int rank, int world, int port, void *arg) {
  Comm *c = open_comm(rank, world, port, 1);
  if (rank == 2) {
    sleep(3);
    _exit(0);
  }
  c->barrier(c);
  return 0;
}

static void test_silent_peer_times_out(void **state) {
  char *d = make_errdir();
  int codes[3];
  run_ranks(3, stay_silent, NULL, codes, d);
  assert_int_equal(codes[0], 1);
  assert_int_equal(codes[1], 1);
  assert_contains(rank_err(d, 0), "no message from rank 2 in 1 s");
  remove_errdir(d, 3);
}

/* Store-level refusals: each rank checks its own error text. */
static int open_expect_error(int rank, int world, int claimed_world, int port, int timeout_s,
                             const char *want) {
  char err[512] = "";
  Store *s = store_open(rank, claimed_world, "127.0.0.1", port, timeout_s, err, sizeof err);
  if (s) store_close(s);
  if (!strstr(err, want)) fprintf(stderr, "rank %d: error '%s' lacks '%s'\n", rank, err, want);
  EXPECT(s == NULL && strstr(err, want));
  return 0;
}

static int mismatch_world(int rank, int world, int port, void *arg) {
  return open_expect_error(rank, world, rank == 0 ? 2 : 3, port, 10,
                           "world size mismatch: rank 1 was started with world 3, rank 0 with world 2");
}

static void test_world_mismatch_refused(void **state) { run_ok(2, mismatch_world, NULL); }

/* World 3 but rank 2 never starts. */
static int missing_rank(int rank, int world, int port, void *arg) {
  if (rank == 2) return 0;
  return open_expect_error(rank, 3, 3, port, 1,
                           rank == 0 ? "only 2 of 3 ranks arrived within 1 s (missing: 2)"
                                     : "only 2 of 3 ranks arrived");
}

static void test_missing_rank_times_out(void **state) { run_ok(3, missing_rank, NULL); }

/* Rank 1 with no rank 0 at all. */
static void test_no_host_times_out(void **state) {
  char err[512];
  int port = store_pick_port(2);
  assert_null(store_open(1, 2, "127.0.0.1", port, 1, err, sizeof err));
  assert_contains(err, "could not reach rank 0 at 127.0.0.1:");
}

static void test_port_in_use_refused(void **state) {
  char err[512];
  int port = store_pick_port(2);
  Store *a = store_open(0, 1, "127.0.0.1", port, 1, err, sizeof err); /* world 1: no socket */
  assert_non_null(a);
  store_close(a);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  assert_int_equal(listen(fd, 1), 0);
  assert_null(store_open(0, 2, "127.0.0.1", port, 1, err, sizeof err));
  assert_contains(err, "cannot listen on port");
  close(fd);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_single),
      cmocka_unit_test(test_all_gather_order),
      cmocka_unit_test(test_all_reduce),
      cmocka_unit_test(test_zero_collectives),
      cmocka_unit_test(test_put_rows),
      cmocka_unit_test(test_sym_alloc_twice),
      cmocka_unit_test(test_peer_exit_fails),
      cmocka_unit_test(test_silent_peer_times_out),
      cmocka_unit_test(test_world_mismatch_refused),
      cmocka_unit_test(test_missing_rank_times_out),
      cmocka_unit_test(test_no_host_times_out),
      cmocka_unit_test(test_port_in_use_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
