/* test_comm.c: checks the "cuda" comm transport (NCCL collectives, RDEP
 * put_rows over CUDA IPC) with one process per GPU:
 *   nmoe launch -n 2 -- build/cuda/gpu/test_comm   (and -n 4)
 *
 * all_reduce: F32 and ACT (bf16) inputs are small multiples of 1/4 chosen so
 * that every partial sum is exact in bf16, so the result must equal the
 * expected sum exactly, and be bit-identical on all ranks (hash compare).
 * reduce_scatter + all_gather (ZeRO): this rank's slice holds the exact sum,
 * then every slice its owner's values (NCCL's in-place slice offsets).
 * put_rows: a plan of segments known to every rank (same seed) with zero-row
 * segments, self puts, gaps, odd row sizes (6: byte path, 4100 and a 4-byte
 * offset src: 4-byte path, 14336: 16-byte path) and big segments; each rank
 * checks its whole dst (rows nobody wrote stay zero). Then 50 back-to-back
 * puts into one buffer with changing contents, each followed by a device-side
 * snapshot of dst and no host sync, one rank per round slowed down before
 * its snapshot: catches a missing entry barrier (a fast peer overwrites dst
 * before the snapshot) or exit barrier (the snapshot misses a peer's rows);
 * both mutations were seen to fail it on 2 H100s.
 * Prints one line per failure; rank 0 prints "test_comm: ok (world W)" when
 * every rank passed. Exit 0 on success, 1 on any failure on any rank. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"
#include "dist/comm.h"
#include "dist/dist.h"

static int rank, world, nfail;
static Backend *be;
static Comm *comm;

static uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void fail(const char *what, const char *fmt, long long a, long long b) {
  if (nfail < 20) {
    printf("FAIL rank %d: %s: ", rank, what);
    printf(fmt, a, b);
    printf("\n");
    fflush(stdout);
  }
  nfail++;
}

static uint64_t hash_bytes(const void *p, size_t n) {
  const unsigned char *b = p;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

/* Same bits on every rank: gather a hash of them. */
static void check_identical(const char *what, const void *p, size_t n) {
  uint64_t h = hash_bytes(p, n), all[64];
  comm->all_gather_host(comm, all, &h, sizeof h);
  for (int q = 1; q < world; q++)
    if (all[q] != all[0]) fail(what, "rank %lld's result differs from rank %lld's", q, 0);
}

/* ---- all_reduce ---- */

/* Rank r's input: multiples of 1/4 in [-2, 2]; sums of up to 8 ranks stay
 * within 5 significant bits, exact in bf16 and fp32. */
static float ar_value(int r, size_t i) { return (float)((int)((i * 7 + (size_t)r * 13) % 17) - 8) * 0.25f; }

static void test_all_reduce(BufKind kind, size_t n) {
  char what[64];
  snprintf(what, sizeof what, "all_reduce %s n=%zu", kind == BUF_ACT ? "ACT" : "F32", n);
  float *h = xmalloc(n * sizeof(float) + 4);
  for (size_t i = 0; i < n; i++) h[i] = ar_value(rank, i);
  void *buf = be->alloc(be, n * be->size[kind] + 16);
  be->put(be, buf, kind, h, n);
  comm->all_reduce(comm, buf, n, kind);
  be->get(be, h, kind, buf, n);
  long long bad = 0, first = -1;
  for (size_t i = 0; i < n; i++) {
    float want = 0;
    for (int r = 0; r < world; r++) want += ar_value(r, i);
    if (h[i] != want && bad++ == 0) first = (long long)i;
  }
  if (bad) fail(what, "%lld wrong elements, first at %lld", bad, first);
  size_t bytes = n * be->size[kind];
  void *raw = xmalloc(bytes + 1);
  be->download(be, raw, buf, bytes);
  check_identical(what, raw, bytes);
  free(raw);
  be->free(be, buf);
  free(h);
}

/* ---- ZeRO: reduce_scatter, then all_gather ---- */

/* reduce_scatter leaves the exact sum in this rank's slice; all_gather then
 * gives every rank every owner's slice (tags exact in bf16 and fp32). */
static void test_zero(BufKind kind, size_t len) {
  char what[64];
  snprintf(what, sizeof what, "zero %s len=%zu", kind == BUF_ACT ? "ACT" : "F32", len);
  const size_t n = len * (size_t)world;
  float *h = xmalloc(n * sizeof(float) + 4);
  for (size_t i = 0; i < n; i++) h[i] = ar_value(rank, i);
  void *buf = be->alloc(be, n * be->size[kind] + 16);
  be->put(be, buf, kind, h, n);
  comm->reduce_scatter(comm, buf, n, kind);
  be->get(be, h, kind, buf, n);
  long long bad = 0, first = -1;
  for (size_t i = (size_t)rank * len; i < (size_t)(rank + 1) * len; i++) {
    float want = 0;
    for (int r = 0; r < world; r++) want += ar_value(r, i);
    if (h[i] != want && bad++ == 0) first = (long long)i;
  }
  if (bad) fail(what, "reduce_scatter: %lld wrong elements, first at %lld", bad, first);
  for (size_t i = 0; i < n; i++)
    h[i] = i / len == (size_t)rank ? (float)(rank * 64 + (int)(i % 64)) * 0.25f : -1.0f;
  be->put(be, buf, kind, h, n);
  comm->all_gather(comm, buf, n, kind);
  be->get(be, h, kind, buf, n);
  bad = 0;
  for (size_t i = 0; i < n; i++)
    if (h[i] != (float)((int)(i / len) * 64 + (int)(i % 64)) * 0.25f && bad++ == 0) first = (long long)i;
  if (bad) fail(what, "all_gather: %lld wrong elements, first at %lld", bad, first);
  size_t bytes = n * be->size[kind];
  void *raw = xmalloc(bytes + 1);
  be->download(be, raw, buf, bytes);
  check_identical(what, raw, bytes);
  free(raw);
  be->free(be, buf);
  free(h);
}

/* ---- put_rows ---- */

/* Byte j of source row `row` of rank r in case `tag`. */
static unsigned char src_byte(uint64_t tag, int r, int64_t row, size_t j) {
  uint64_t h = mix64(tag * 1000003u + (uint64_t)r * 7919u + (uint64_t)row * 104729u + j / 8);
  return (unsigned char)(h >> (8 * (j % 8)));
}

typedef struct Plan {
  int nseg[64];        /* segments sent by each rank */
  CommSeg *seg[64];    /* seg[s][i]: rank s's segments */
  int64_t src_rows;    /* rows of every rank's source */
  int64_t dst_rows;    /* rows of the symmetric dst (max over ranks) */
} Plan;

/* Segments every rank would make from seed: for each (sender, receiver) pair
 * 0..3 segments (some of zero rows), placed back to back in the receiver's
 * dst with random gaps, reading random source ranges. */
static Plan plan_make(uint64_t seed, int64_t src_rows, int64_t max_rows) {
  Plan p;
  memset(&p, 0, sizeof p);
  p.src_rows = src_rows;
  int64_t next[64] = {0};
  uint64_t z = seed;
  for (int s = 0; s < world; s++) {
    p.seg[s] = xmalloc(sizeof(CommSeg) * 4 * (size_t)world);
    for (int r = 0; r < world; r++) {
      int k = (int)((z = mix64(z)) % 4);
      for (int i = 0; i < k; i++) {
        int64_t rows = (int64_t)((z = mix64(z)) % (uint64_t)(max_rows + 1));
        if ((z = mix64(z)) % 5 == 0) rows = 0;
        next[r] += (int64_t)((z = mix64(z)) % 3); /* gap: rows nobody writes */
        CommSeg g = {r, (int64_t)((z = mix64(z)) % (uint64_t)(src_rows - rows + 1)), next[r], rows};
        next[r] += rows;
        p.seg[s][p.nseg[s]++] = g;
      }
    }
  }
  for (int r = 0; r < world; r++)
    if (next[r] + 1 > p.dst_rows) p.dst_rows = next[r] + 1;
  return p;
}

static void plan_free(Plan *p) {
  for (int s = 0; s < world; s++) free(p->seg[s]);
}

/* Host image of this rank's dst after plan p with source tag. */
static unsigned char *plan_expect(const Plan *p, uint64_t tag, size_t row_bytes) {
  unsigned char *e = xcalloc((size_t)p->dst_rows, row_bytes);
  for (int s = 0; s < world; s++)
    for (int i = 0; i < p->nseg[s]; i++) {
      const CommSeg *g = &p->seg[s][i];
      if (g->peer != rank) continue;
      for (int64_t k = 0; k < g->rows; k++)
        for (size_t j = 0; j < row_bytes; j++)
          e[(size_t)(g->dst_row + k) * row_bytes + j] = src_byte(tag, s, g->src_row + k, j);
    }
  return e;
}

/* A device source of rows rows with tag's contents, at byte offset skew of
 * its allocation (*base gets the allocation to free). */
static void *make_src(uint64_t tag, int64_t rows, size_t row_bytes, size_t skew, void **base) {
  size_t bytes = (size_t)rows * row_bytes;
  unsigned char *h = xmalloc(bytes + 1);
  for (int64_t k = 0; k < rows; k++)
    for (size_t j = 0; j < row_bytes; j++) h[(size_t)k * row_bytes + j] = src_byte(tag, rank, k, j);
  *base = be->alloc(be, bytes + skew + 16);
  void *src = (char *)*base + skew;
  be->upload(be, src, h, bytes);
  free(h);
  return src;
}

static void compare(const char *what, const unsigned char *got, const unsigned char *want,
                    size_t rows, size_t row_bytes) {
  long long bad = 0, first = -1;
  for (size_t i = 0; i < rows * row_bytes; i++)
    if (got[i] != want[i] && bad++ == 0) first = (long long)(i / row_bytes);
  if (bad) fail(what, "%lld wrong bytes, first in row %lld", bad, first);
}

static void test_put(uint64_t seed, size_t row_bytes, int64_t src_rows, int64_t max_rows,
                     size_t skew) {
  char what[96];
  snprintf(what, sizeof what, "put_rows seed=%llu row_bytes=%zu max_rows=%lld skew=%zu",
           (unsigned long long)seed, row_bytes, (long long)max_rows, skew);
  Plan p = plan_make(seed, src_rows, max_rows);
  void *base;
  void *src = make_src(seed, src_rows, row_bytes, skew, &base);
  void *dst = comm->sym_alloc(comm, (size_t)p.dst_rows * row_bytes);
  comm->put_rows(comm, dst, src, row_bytes, p.seg[rank], p.nseg[rank]);
  size_t bytes = (size_t)p.dst_rows * row_bytes;
  unsigned char *got = xmalloc(bytes), *want = plan_expect(&p, seed, row_bytes);
  be->download(be, got, dst, bytes);
  compare(what, got, want, (size_t)p.dst_rows, row_bytes);
  free(got);
  free(want);
  be->free(be, base);
  plan_free(&p);
}

/* 50 puts into one dst, each from a different source, snapshots in stream
 * order only; verified after the last. */
static void test_back_to_back(size_t row_bytes, int iters) {
  const int64_t src_rows = 64, max_rows = 24;
  Plan p = plan_make(777, src_rows, max_rows);
  size_t sbytes = (size_t)src_rows * row_bytes, dbytes = (size_t)p.dst_rows * row_bytes;
  unsigned char *h = xmalloc(sbytes * (size_t)iters);
  for (int it = 0; it < iters; it++)
    for (int64_t k = 0; k < src_rows; k++)
      for (size_t j = 0; j < row_bytes; j++)
        h[(size_t)it * sbytes + (size_t)k * row_bytes + j] = src_byte(1000 + (uint64_t)it, rank, k, j);
  char *srcs = be->alloc(be, sbytes * (size_t)iters);
  be->upload(be, srcs, h, sbytes * (size_t)iters);
  char *hist = be->alloc(be, dbytes * (size_t)iters);
  void *dst = comm->sym_alloc(comm, dbytes);
  be->sync(be);
  comm->barrier(comm);
  /* One rank per iteration is slow to read its dst (a 256 MiB local copy
   * first): without the entry barrier the others' next puts overwrite dst
   * before its snapshot. */
  const size_t busy_bytes = (size_t)256 << 20;
  char *busy = be->alloc(be, 2 * busy_bytes);
  for (int it = 0; it < iters; it++) {
    comm->put_rows(comm, dst, srcs + (size_t)it * sbytes, row_bytes, p.seg[rank], p.nseg[rank]);
    if (it % world == rank) be->copy(be, busy + busy_bytes, busy, busy_bytes);
    be->copy(be, hist + (size_t)it * dbytes, dst, dbytes);
  }
  unsigned char *got = xmalloc(dbytes * (size_t)iters);
  be->download(be, got, hist, dbytes * (size_t)iters);
  for (int it = 0; it < iters; it++) {
    char what[64];
    snprintf(what, sizeof what, "back-to-back put %d/%d row_bytes=%zu", it + 1, iters, row_bytes);
    unsigned char *want = plan_expect(&p, 1000 + (uint64_t)it, row_bytes);
    compare(what, got + (size_t)it * dbytes, want, (size_t)p.dst_rows, row_bytes);
    free(want);
  }
  free(got);
  free(h);
  be->free(be, srcs);
  be->free(be, hist);
  be->free(be, busy);
  plan_free(&p);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  DistInfo di = dist_from_env();
  if (di.world < 2 || di.world > 8) {
    fprintf(stderr, "test_comm: needs 2..8 ranks, one per GPU (nmoe launch -n 2 -- %s); world is %d\n",
            "build/cuda/gpu/test_comm", di.world);
    return 1;
  }
  rank = di.rank;
  world = di.world;
  be = backend_open("cuda", di.local_rank);
  comm = comm_open(&di, be);
  if (strcmp(comm->transport, "cuda") != 0) nmoe_fatal("test_comm: transport is %s, not cuda", comm->transport);

  test_all_reduce(BUF_F32, 1);
  test_all_reduce(BUF_F32, 1000);
  test_all_reduce(BUF_F32, 3000017);
  test_all_reduce(BUF_ACT, 1);
  test_all_reduce(BUF_ACT, 4099);
  test_all_reduce(BUF_ACT, 5000011);
  test_zero(BUF_F32, 1);
  test_zero(BUF_F32, 4099);
  test_zero(BUF_ACT, 1);
  test_zero(BUF_ACT, 4099);

  test_put(1, 14336, 300, 200, 0);   /* model rows, 16-byte path */
  test_put(2, 6, 500, 300, 0);       /* byte path */
  test_put(3, 4100, 100, 80, 0);     /* 4-byte path */
  test_put(4, 32, 1000, 900, 4);     /* 4-byte aligned src only */
  test_put(5, 16, 20, 3, 0);         /* many tiny segments */
  test_put(6, 14336, 2000, 1500, 0); /* big segments (up to 21 MB each) */
  for (int s = 7; s < 15; s++) test_put((uint64_t)s, 16 * (size_t)(1 + s % 5), 200, 150, 0);
  comm->barrier(comm);
  comm->barrier(comm);

  test_back_to_back(14336, 50);
  test_back_to_back(6, 50);

  int64_t failed = comm_sum_i64(comm, nfail);
  be->sync(be);
  comm->destroy(comm);
  if (failed == 0 && rank == 0) printf("test_comm: ok (world %d)\n", world);
  if (failed && rank == 0) printf("test_comm: %lld failures over all ranks (world %d)\n", (long long)failed, world);
  be->destroy(be);
  return failed ? 1 : 0;
}
