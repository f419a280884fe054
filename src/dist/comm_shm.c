/* comm_shm.c: the "shm" transport: CPU ranks of one host. The data plane is
 * POSIX shared memory, the control plane the TCP store.
 *
 * A symmetric allocation of `bytes` is one shm object of world slots (each
 * `bytes` rounded up to 64), mapped by every rank; rank r's buffer is slot r,
 * so a put into peer p's buffer is a memcpy into slot p. Rank 0 creates the
 * object, the name travels over the store, and once every rank has mapped it
 * rank 0 unlinks the name: nothing is left in /dev/shm after a crash. Store
 * round trips order the memory accesses between ranks. */
#include "dist/comm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "core/log.h"
#include "dist/store.h"

typedef struct ShmMap {
  unsigned char *base; /* (world, slot) mapping */
  size_t bytes, slot;  /* requested size, slot stride */
} ShmMap;

typedef struct ShmState {
  ShmMap *maps; /* sym_alloc'ed buffers, in allocation order */
  int nmaps, cap;
  ShmMap scratch; /* all_reduce staging, grown collectively */
  unsigned counter; /* names of rank 0's shm objects */
} ShmState;

/* Store calls fail the whole run: a lost peer leaves nothing to recover. */
static void shm_gather(Comm *c, void *out, const void *in, size_t bytes, const char *what) {
  char err[512];
  atomic_thread_fence(memory_order_seq_cst);
  if (store_all_gather(c->store, out, in, bytes, err, sizeof err))
    nmoe_fatal("%s: %s", what, err);
  atomic_thread_fence(memory_order_seq_cst);
}

static void shm_sync(Comm *c, const char *what) {
  char err[512];
  atomic_thread_fence(memory_order_seq_cst);
  if (store_barrier(c->store, err, sizeof err)) nmoe_fatal("%s: %s", what, err);
  atomic_thread_fence(memory_order_seq_cst);
}

static void shm_all_gather_host(Comm *c, void *out, const void *in, size_t bytes) {
  shm_gather(c, out, in, bytes, "all_gather_host");
}

static void shm_barrier(Comm *c) { shm_sync(c, "barrier"); }

/* Collective: a zero-filled (world, slot) mapping shared by all ranks. */
static ShmMap shm_map_new(Comm *c, size_t bytes) {
  ShmState *s = c->impl;
  ShmMap m = {.bytes = bytes, .slot = bytes ? (bytes + 63) / 64 * 64 : 64};
  size_t total = m.slot * (size_t)c->world;
  if (total / (size_t)c->world != m.slot) nmoe_fatal("sym_alloc of %zu bytes overflows", bytes);
  /* Every rank sends its size and rank 0's name; all check the sizes agree. */
  struct { uint64_t bytes; char name[48]; } mine = {.bytes = bytes}, *all;
  if (c->rank == 0) {
    unsigned rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd) rnd = (unsigned)getpid() * 2654435761u;
    snprintf(mine.name, sizeof mine.name, "/nmoe-%d-%u-%08x", (int)getpid(), s->counter++, rnd);
  }
  int fd = -1;
  if (c->rank == 0) {
    fd = shm_open(mine.name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) nmoe_fatal("shm_open %s: %s", mine.name, strerror(errno));
    if (ftruncate(fd, (off_t)total)) {
      int e = errno;
      shm_unlink(mine.name);
      nmoe_fatal("cannot size shared memory %s to %zu bytes: %s", mine.name, total, strerror(e));
    }
  }
  all = xmalloc(sizeof *all * (size_t)c->world);
  shm_gather(c, all, &mine, sizeof mine, "sym_alloc");
  for (int r = 1; r < c->world; r++)
    if (all[r].bytes != all[0].bytes) {
      if (c->rank == 0) shm_unlink(mine.name);
      nmoe_fatal("sym_alloc sizes differ: rank %d asked for %llu bytes, rank 0 for %llu",
                 r, (unsigned long long)all[r].bytes, (unsigned long long)all[0].bytes);
    }
  if (c->rank != 0) {
    fd = shm_open(all[0].name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) nmoe_fatal("shm_open %s: %s", all[0].name, strerror(errno));
  }
  m.base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int map_errno = errno;
  close(fd);
  if (m.base == MAP_FAILED) {
    if (c->rank == 0) shm_unlink(mine.name);
    nmoe_fatal("cannot map %zu bytes of shared memory: %s", total,
               strerror(map_errno));
  }
  /* Every rank holds a mapping now; a failed peer fails this barrier, and
   * rank 0 removes the name either way. */
  char err[512];
  int rc = store_barrier(c->store, err, sizeof err);
  if (c->rank == 0) shm_unlink(mine.name);
  if (rc) nmoe_fatal("sym_alloc: %s", err);
  free(all);
  return m;
}

static void *shm_sym_alloc(Comm *c, size_t bytes) {
  ShmState *s = c->impl;
  if (s->nmaps == s->cap) {
    s->cap = s->cap ? 2 * s->cap : 8;
    s->maps = xrealloc(s->maps, sizeof *s->maps * (size_t)s->cap);
  }
  ShmMap *m = &s->maps[s->nmaps++];
  *m = shm_map_new(c, bytes);
  return m->base + (size_t)c->rank * m->slot;
}

static void shm_put_rows(Comm *c, void *dst, const void *src, size_t row_bytes,
                         const CommSeg *segs, int nseg) {
  ShmState *s = c->impl;
  const ShmMap *m = NULL;
  size_t off = 0; /* dst's offset inside this rank's slot */
  for (int i = 0; i < s->nmaps && !m; i++) {
    unsigned char *mine = s->maps[i].base + (size_t)c->rank * s->maps[i].slot;
    if ((unsigned char *)dst >= mine && (unsigned char *)dst < mine + s->maps[i].slot) {
      m = &s->maps[i];
      off = (size_t)((unsigned char *)dst - mine);
    }
  }
  if (!m) nmoe_fatal("put_rows: dst is not a buffer from sym_alloc");
  /* Entry: every rank has arrived, so nobody still reads what dst held. */
  shm_sync(c, "put_rows");
  for (int i = 0; i < nseg; i++) {
    const CommSeg *g = &segs[i];
    if (g->peer < 0 || g->peer >= c->world || g->rows < 0 || g->src_row < 0 || g->dst_row < 0 ||
        off + (size_t)(g->dst_row + g->rows) * row_bytes > m->bytes)
      nmoe_fatal("put_rows: segment %d (peer %d, dst rows %lld..%lld of %zu bytes each) "
                 "falls outside the %zu-byte symmetric buffer",
                 i, g->peer, (long long)g->dst_row, (long long)(g->dst_row + g->rows),
                 row_bytes, m->bytes);
    if (g->rows > 0)
      memcpy(m->base + (size_t)g->peer * m->slot + off + (size_t)g->dst_row * row_bytes,
           (const unsigned char *)src + (size_t)g->src_row * row_bytes, (size_t)g->rows * row_bytes);
  }
  /* Exit: every rank's puts into this rank have landed. */
  shm_sync(c, "put_rows");
}

/* Sums world slots of n elements of T into dst in rank order: the same
 * operations in the same order on every rank, hence the same bits. */
#define SUM_SLOTS(T, dst, base, slot, world, n)                                    \
  do {                                                                             \
    T *d_ = (T *)(dst);                                                            \
    for (size_t i_ = 0; i_ < (n); i_++) {                                          \
      T acc_ = ((const T *)(base))[i_];                                            \
      for (int r_ = 1; r_ < (world); r_++)                                         \
        acc_ += ((const T *)((base) + (size_t)r_ * (slot)))[i_];                   \
      d_[i_] = acc_;                                                               \
    }                                                                              \
  } while (0)

/* The first half of every reduction: every rank passes the same n (checked;
 * with the entry gather every rank has also finished reading the previous
 * call's scratch), then each copies buf into its scratch slot and all meet.
 * Returns the element size; 0 when n is 0 (nothing to do). */
static size_t shm_stage(Comm *c, const void *buf, size_t n, BufKind kind, const char *what) {
  ShmState *s = c->impl;
  size_t es = c->be->size[kind];
  if (kind == BUF_I32 || (es != 4 && es != 8))
    nmoe_fatal("%s supports float and double buffers only", what);
  uint64_t mine = n, *all = xmalloc(sizeof *all * (size_t)c->world);
  shm_gather(c, all, &mine, sizeof mine, what);
  for (int r = 1; r < c->world; r++)
    if (all[r] != all[0])
      nmoe_fatal("%s sizes differ: rank %d has %llu elements, rank 0 %llu", what,
                 r, (unsigned long long)all[r], (unsigned long long)all[0]);
  free(all);
  if (n == 0) return 0;
  if (n * es > s->scratch.bytes) {
    if (s->scratch.base) munmap(s->scratch.base, s->scratch.slot * (size_t)c->world);
    s->scratch = shm_map_new(c, n * es);
  }
  memcpy(s->scratch.base + (size_t)c->rank * s->scratch.slot, buf, n * es);
  shm_sync(c, what);
  return es;
}

static void shm_all_reduce(Comm *c, void *buf, size_t n, BufKind kind) {
  ShmState *s = c->impl;
  size_t es = shm_stage(c, buf, n, kind, "all_reduce");
  if (es == 4)
    SUM_SLOTS(float, buf, s->scratch.base, s->scratch.slot, c->world, n);
  else if (es == 8)
    SUM_SLOTS(double, buf, s->scratch.base, s->scratch.slot, c->world, n);
}

static void shm_reduce_scatter(Comm *c, void *buf, size_t n, BufKind kind) {
  ShmState *s = c->impl;
  size_t len = comm_zero_slice(c, n, "reduce_scatter");
  size_t es = shm_stage(c, buf, n, kind, "reduce_scatter"), at = (size_t)c->rank * len * es;
  unsigned char *dst = (unsigned char *)buf + at;
  if (es == 4)
    SUM_SLOTS(float, dst, s->scratch.base + at, s->scratch.slot, c->world, len);
  else if (es == 8)
    SUM_SLOTS(double, dst, s->scratch.base + at, s->scratch.slot, c->world, len);
}

static void shm_all_gather(Comm *c, void *buf, size_t n, BufKind kind) {
  ShmState *s = c->impl;
  size_t len = comm_zero_slice(c, n, "all_gather");
  size_t es = shm_stage(c, buf, n, kind, "all_gather");
  for (int r = 0; es && r < c->world; r++)
    if (r != c->rank)
      memcpy((unsigned char *)buf + (size_t)r * len * es,
             s->scratch.base + (size_t)r * s->scratch.slot + (size_t)r * len * es, len * es);
}

static void shm_destroy(Comm *c) {
  ShmState *s = c->impl;
  for (int i = 0; i < s->nmaps; i++) munmap(s->maps[i].base, s->maps[i].slot * (size_t)c->world);
  if (s->scratch.base) munmap(s->scratch.base, s->scratch.slot * (size_t)c->world);
  free(s->maps);
  free(s);
  store_close(c->store);
  free(c);
}

Comm *comm_shm_open(const DistInfo *di, Backend *be, struct Store *st) {
  if (di->local_world != di->world)
    nmoe_fatal("CPU ranks share memory, so all %d must run on one host (this host has %d)",
               di->world, di->local_world);
  Comm *c = xcalloc(1, sizeof *c);
  c->rank = di->rank;
  c->world = di->world;
  c->transport = "shm";
  c->be = be;
  c->store = st;
  c->impl = xcalloc(1, sizeof(ShmState));
  c->all_reduce = shm_all_reduce;
  c->reduce_scatter = shm_reduce_scatter;
  c->all_gather = shm_all_gather;
  c->all_gather_host = shm_all_gather_host;
  c->sym_alloc = shm_sym_alloc;
  c->put_rows = shm_put_rows;
  c->barrier = shm_barrier;
  c->destroy = shm_destroy;
  return c;
}
