/* bench_rdep.c: `nmoe bench rdep`: MoE dispatch + combine through put_rows
 * (RDEP), one process per GPU (or CPU rank):
 *   nmoe launch -n 4 -- nmoe bench rdep [--device cuda|cpu] [--tokens 128,512,4096]
 *       [--hidden 7168] [--iters 50] [--peer-copy-mib 1024]
 *
 * Defaults are the DeepSeek-V3 targets' shape: T tokens per rank (128, 512,
 * 4096), hidden 7168 (rows of 14336 bytes in bf16), top-8 of 256 experts
 * spread evenly over the ranks, random routing from a fixed seed. Dispatch
 * puts every (token, slot) row to its expert's owner (the sender's rows
 * already grouped by destination: one segment per peer, landing after the
 * rows of lower ranks); combine puts them back. 5 warm-up rounds, then
 * --iters timed with the backend's phase marks (CUDA events on a GPU, so
 * nothing syncs inside the timed loop). Rank 0 prints one JSON line per size;
 * gbps_per_gpu = bytes each rank sends to other ranks (average over ranks) in
 * dispatch + combine / time. A last line times one put of --peer-copy-mib to
 * the next rank (all ranks at once): the link's ceiling. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/log.h"
#include "dist/bench_rdep.h"
#include "dist/comm.h"
#include "dist/dist.h"

#define TOPK 8
#define EXPERTS 256
#define WARMUP 5
#define MAXW 8

static int rank, world, hidden = 7168, iters = 50;
static Backend *be;
static Comm *comm;

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Rows this rank sends to each rank: TOPK distinct random experts per token. */
static void route(int T, int64_t *count) {
  uint64_t s = 12345 + (uint64_t)rank * 7919;
  memset(count, 0, sizeof(int64_t) * MAXW);
  for (int t = 0; t < T; t++) {
    int chosen[TOPK];
    for (int k = 0; k < TOPK; k++) {
      int e, dup;
      do {
        e = (int)(rng_next(&s) % EXPERTS);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= chosen[j] == e;
      } while (dup);
      chosen[k] = e;
      count[e / (EXPERTS / world)]++;
    }
  }
}

/* Mean microseconds per round of each named phase over ITERS rounds of fn
 * (after WARMUP rounds); fn marks its phases with be->phase (CUDA events on
 * the backend's stream, so nothing syncs inside the timed loop). */
static void time_rounds(void (*fn)(void *), void *arg, const char **want, double *us, int n) {
  for (int i = 0; i < WARMUP; i++) fn(arg);
  be->sync(be);
  const char *names[8];
  double ms[8];
  be->phase_report(be, names, ms, 8); /* drop marks of the warm-up */
  for (int i = 0; i < iters; i++) fn(arg);
  int got = be->phase_report(be, names, ms, 8);
  for (int j = 0; j < n; j++) {
    us[j] = -1;
    for (int i = 0; i < got; i++)
      if (strcmp(names[i], want[j]) == 0) us[j] = ms[i] * 1000.0 / iters;
    if (us[j] < 0) nmoe_fatal("bench rdep: phase %s was not timed", want[j]);
  }
}

/* Bytes of one row: hidden activations in the backend's ACT dtype. */
static size_t m_row_bytes(void) { return (size_t)hidden * be->size[BUF_ACT]; }

/* One dispatch + combine problem. */
typedef struct Moe {
  size_t row_bytes;
  void *send;     /* local (T*TOPK, hidden) rows grouped by destination rank */
  void *recv;     /* symmetric (max rows any rank receives, hidden) */
  void *back;     /* symmetric (T*TOPK, hidden): combine lands here */
  CommSeg disp[MAXW], comb[MAXW];
  int ndisp, ncomb;
} Moe;

static void moe_round(void *arg) {
  Moe *m = arg;
  be->phase(be, "dispatch");
  comm->put_rows(comm, m->recv, m->send, m->row_bytes, m->disp, m->ndisp);
  be->phase(be, "combine");
  comm->put_rows(comm, m->back, m->recv, m->row_bytes, m->comb, m->ncomb);
  be->phase(be, "idle");
}

static void bench_moe(int T) {
  int64_t mine[MAXW], cnt[MAXW * MAXW]; /* cnt[s * world + r]: rows rank s sends to r */
  route(T, mine);
  comm->all_gather_host(comm, cnt, mine, sizeof(int64_t) * world);
  int64_t recv_rows = 0, peer_bytes = 0; /* max received over ranks; peer bytes of all ranks */
  for (int r = 0; r < world; r++) {
    int64_t in = 0;
    for (int s = 0; s < world; s++) {
      in += cnt[s * world + r];
      if (s != r) peer_bytes += 2 * cnt[s * world + r] * (int64_t)m_row_bytes(); /* dispatch + combine */
    }
    if (in > recv_rows) recv_rows = in;
  }
  Moe m;
  memset(&m, 0, sizeof m);
  m.row_bytes = m_row_bytes();
  size_t rows = (size_t)T * TOPK;
  m.send = be->alloc(be, rows * m.row_bytes);
  m.recv = comm->sym_alloc(comm, (size_t)recv_rows * m.row_bytes);
  m.back = comm->sym_alloc(comm, rows * m.row_bytes);
  /* Sender s's rows for r sit after its rows for lower ranks; on r they land
   * after the rows of lower senders. */
  int64_t src_off = 0;
  for (int r = 0; r < world; r++) {
    int64_t dst_off = 0, n_to = cnt[rank * world + r];
    for (int s = 0; s < rank; s++) dst_off += cnt[s * world + r];
    if (n_to) m.disp[m.ndisp++] = (CommSeg){r, src_off, dst_off, n_to};
    src_off += n_to;
  }
  /* Combine: this rank returns sender s's rows (at its recv offset for s) to
   * s's back buffer, at the place s sent them from. */
  int64_t recv_off = 0;
  for (int s = 0; s < world; s++) {
    int64_t n_from = cnt[s * world + rank], back_off = 0;
    for (int q = 0; q < rank; q++) back_off += cnt[s * world + q];
    if (n_from) m.comb[m.ncomb++] = (CommSeg){s, recv_off, back_off, n_from};
    recv_off += n_from;
  }
  const char *want[2] = {"dispatch", "combine"};
  double us[2];
  time_rounds(moe_round, &m, want, us, 2);
  double total = us[0] + us[1];
  if (rank == 0)
    printf("{\"bench\":\"rdep\",\"world\":%d,\"tokens\":%d,\"hidden\":%d,\"topk\":%d,"
           "\"dispatch_us\":%.1f,\"combine_us\":%.1f,\"total_us\":%.1f,\"gbps_per_gpu\":%.1f}\n",
           world, T, hidden, TOPK, us[0], us[1], total,
           (double)peer_bytes / world / (total * 1e-6) / 1e9);
  be->free(be, m.send);
}

typedef struct Copy {
  void *src, *dst;
  CommSeg seg;
} Copy;

static void copy_round(void *arg) {
  Copy *c = arg;
  be->phase(be, "copy");
  comm->put_rows(comm, c->dst, c->src, 1 << 20, &c->seg, 1);
  be->phase(be, "idle");
}

/* mib rows of 1 MiB to the next rank, all ranks at once. */
static void bench_peer_copy(int mib) {
  const size_t bytes = (size_t)mib << 20;
  Copy c = {be->alloc(be, bytes), comm->sym_alloc(comm, bytes), {(rank + 1) % world, 0, 0, mib}};
  const char *want[1] = {"copy"};
  double us;
  time_rounds(copy_round, &c, want, &us, 1);
  if (rank == 0)
    printf("{\"bench\":\"rdep_peer_copy\",\"world\":%d,\"bytes\":%zu,\"us\":%.1f,\"gbps\":%.1f}\n",
           world, bytes, us, (double)bytes / (us * 1e-6) / 1e9);
  be->free(be, c.src);
}

static void usage_exit(void) {
  fprintf(stderr, "usage: nmoe launch -n N -- nmoe bench rdep [--device cuda|cpu] [--tokens 128,512,4096]\n"
                  "           [--hidden 7168] [--iters 50] [--peer-copy-mib 1024]\n");
  exit(2);
}

/* A positive integer option value, or a usage error. */
static int arg_int(const char *v, const char *name) {
  char *end;
  long x = strtol(v, &end, 10);
  if (*end || x < 1 || x > (1 << 24)) {
    fprintf(stderr, "nmoe bench rdep: %s must be a positive integer (got '%s')\n", name, v);
    exit(2);
  }
  return (int)x;
}

int bench_rdep_main(int argc, char **argv) {
  const char *device = "cuda", *tokens = "128,512,4096";
  int copy_mib = 1024;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) usage_exit();
    if (!v) usage_exit();
    if (!strcmp(a, "--device")) device = v;
    else if (!strcmp(a, "--tokens")) tokens = v;
    else if (!strcmp(a, "--hidden")) hidden = arg_int(v, "--hidden");
    else if (!strcmp(a, "--iters")) iters = arg_int(v, "--iters");
    else if (!strcmp(a, "--peer-copy-mib")) copy_mib = arg_int(v, "--peer-copy-mib");
    else usage_exit();
    i++;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  DistInfo di = dist_from_env();
  if (di.world < 2 || di.world > MAXW || EXPERTS % di.world)
    nmoe_fatal("bench rdep needs 2, 4 or 8 ranks (nmoe launch -n 4 -- nmoe bench rdep); world is %d",
               di.world);
  rank = di.rank;
  world = di.world;
  be = backend_open(device, di.local_rank);
  comm = comm_open(&di, be);
  if (!be->phase || !be->phase_report) nmoe_fatal("bench rdep: the %s backend has no phase timing", be->name);
  for (const char *p = tokens; *p;) {
    char *end;
    long T = strtol(p, &end, 10);
    if (end == p || T < 1 || T > (1 << 20) || (*end && *end != ','))
      nmoe_fatal("bench rdep: --tokens wants a comma list of token counts (got '%s')", tokens);
    bench_moe((int)T);
    p = *end ? end + 1 : end;
  }
  bench_peer_copy(copy_mib);
  be->sync(be);
  comm->destroy(comm);
  be->destroy(be);
  return 0;
}
