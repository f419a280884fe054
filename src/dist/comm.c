/* comm.c: picks the transport for this run (comm.h), the "single" transport
 * of a one-process run, and the host sums every transport shares. */
#include "dist/comm.h"

#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "dist/store.h"

/* ---- "single": world 1, no peers ---- */

typedef struct SingleState {
  void **bufs; /* sym_alloc'ed buffers, freed by destroy */
  int n, cap;
} SingleState;

/* One rank: every reduction is the identity. */
static void single_reduce(Comm *c, void *buf, size_t n, BufKind kind) {}

static void single_all_gather_host(Comm *c, void *out, const void *in, size_t bytes) {
  memmove(out, in, bytes);
}

static void *single_sym_alloc(Comm *c, size_t bytes) {
  SingleState *s = c->impl;
  if (s->n == s->cap) {
    s->cap = s->cap ? 2 * s->cap : 8;
    s->bufs = xrealloc(s->bufs, sizeof *s->bufs * (size_t)s->cap);
  }
  return s->bufs[s->n++] = c->be->alloc(c->be, bytes);
}

static void single_put_rows(Comm *c, void *dst, const void *src, size_t row_bytes,
                            const CommSeg *segs, int nseg) {
  for (int i = 0; i < nseg; i++) {
    const CommSeg *g = &segs[i];
    if (g->peer != 0 || g->rows < 0)
      nmoe_fatal("put_rows: segment %d targets rank %d with %lld rows in a world of 1", i, g->peer,
                 (long long)g->rows);
    if (g->rows > 0)
      c->be->copy(c->be, (char *)dst + g->dst_row * row_bytes,
                  (const char *)src + g->src_row * row_bytes, (size_t)g->rows * row_bytes);
  }
}

static void single_barrier(Comm *c) {}

static void single_destroy(Comm *c) {
  SingleState *s = c->impl;
  for (int i = 0; i < s->n; i++) c->be->free(c->be, s->bufs[i]);
  free(s->bufs);
  free(s);
  free(c);
}

static Comm *comm_single_open(Backend *be) {
  Comm *c = xcalloc(1, sizeof *c);
  c->rank = 0;
  c->world = 1;
  c->transport = "single";
  c->be = be;
  c->impl = xcalloc(1, sizeof(SingleState));
  c->all_reduce = single_reduce;
  c->reduce_scatter = single_reduce;
  c->all_gather = single_reduce;
  c->all_gather_host = single_all_gather_host;
  c->sym_alloc = single_sym_alloc;
  c->put_rows = single_put_rows;
  c->barrier = single_barrier;
  c->destroy = single_destroy;
  return c;
}

/* ---- transport choice ---- */

static int env_port(const char *name, int def) {
  const char *v = getenv(name);
  if (!v || !*v) return def;
  char *end;
  long p = strtol(v, &end, 10);
  if (*end || p < 1 || p > 65535) nmoe_fatal("environment variable %s=%s is not a port number", name, v);
  return (int)p;
}

Comm *comm_open(const DistInfo *di, Backend *be) {
  if (di->world == 1) return comm_single_open(be);
  log_set_rank(di->rank, di->world); /* every message of a rank names it */
  const char *addr = getenv("MASTER_ADDR");
  if (!addr || !*addr) addr = "127.0.0.1";
  int master_port = env_port("MASTER_PORT", 29500);
  /* torchrun's agent holds MASTER_PORT itself; the store takes the next one. */
  int port = env_port("NMOE_STORE_PORT", master_port < 65535 ? master_port + 1 : master_port);
  int timeout_s = 300;
  const char *t = getenv("NMOE_DIST_TIMEOUT_S");
  if (t && *t) {
    char *end;
    long v = strtol(t, &end, 10);
    if (*end || v < 1 || v > 1000000)
      nmoe_fatal("environment variable NMOE_DIST_TIMEOUT_S=%s is not a number of seconds", t);
    timeout_s = (int)v;
  }
  char err[512];
  Store *st = store_open(di->rank, di->world, addr, port, timeout_s, err, sizeof err);
  if (!st) nmoe_fatal("rendezvous at %s:%d failed: %s", addr, port, err);
  /* Every rank must pick the same transport: compare the backends first. */
  char mine[16] = {0}, *all = xcalloc((size_t)di->world, sizeof mine);
  snprintf(mine, sizeof mine, "%s", be->name);
  if (store_all_gather(st, all, mine, sizeof mine, err, sizeof err))
    nmoe_fatal("rendezvous at %s:%d failed: %s", addr, port, err);
  for (int r = 1; r < di->world; r++)
    if (strcmp(all + (size_t)r * sizeof mine, all))
      nmoe_fatal("rank %d runs the %s backend and rank 0 the %s backend: every rank needs the same "
                 "device", r, all + (size_t)r * sizeof mine, all);
  free(all);
  if (!strcmp(be->name, "cpu")) return comm_shm_open(di, be, st);
#ifdef NMOE_CUDA
  if (!strcmp(be->name, "cuda")) return comm_cuda_open(di, be, st);
#endif
  store_close(st);
  nmoe_fatal("no multi-process transport for the %s backend", be->name);
}

void comm_host_barrier(Comm *c, int timeout_s) {
  if (!c->store) return;
  char err[512];
  int old = timeout_s > 0 ? store_set_timeout(c->store, timeout_s) : 0;
  if (store_barrier(c->store, err, sizeof err)) nmoe_fatal("barrier: %s", err);
  if (timeout_s > 0) store_set_timeout(c->store, old);
}

size_t comm_zero_slice(const Comm *c, size_t n, const char *what) {
  if (n % (size_t)c->world)
    nmoe_fatal("%s of %zu elements: not a multiple of the world size %d", what, n, c->world);
  return n / (size_t)c->world;
}

/* ---- host sums ---- */

void comm_sum_i64_array(Comm *c, int64_t *x, size_t n) {
  int64_t *all = xmalloc(sizeof *all * n * (size_t)c->world + 1);
  c->all_gather_host(c, all, x, sizeof *x * n);
  for (size_t i = 0; i < n; i++) {
    int64_t s = 0;
    for (int r = 0; r < c->world; r++) s += all[(size_t)r * n + i];
    x[i] = s;
  }
  free(all);
}

int64_t comm_sum_i64(Comm *c, int64_t x) {
  comm_sum_i64_array(c, &x, 1);
  return x;
}

double comm_sum_f64(Comm *c, double x) {
  double *all = xmalloc(sizeof *all * (size_t)c->world);
  c->all_gather_host(c, all, &x, sizeof x);
  double s = 0;
  for (int r = 0; r < c->world; r++) s += all[r];
  free(all);
  return s;
}
