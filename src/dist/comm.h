/* comm.h: how the ranks of one run talk to each other.
 *
 * Two planes:
 *  - control (host bytes): a TCP store hosted by rank 0 (store.h) carries
 *    small all-gathers and barriers: rendezvous, IPC handles, NCCL id, counts.
 *  - data (backend buffers, in the backend's stream order):
 *      all_reduce  sums a buffer over all ranks (dense gradients, loss sums);
 *                  every rank gets the bit-identical result;
 *      put_rows    RDEP: one-sided row copies from a local buffer into peers'
 *                  symmetric buffers (experts reached by direct writes, never
 *                  an all-to-all collective), then a barrier after which every
 *                  rank's puts into this rank have landed.
 *
 * Transports: "single" (world 1: all_reduce is a no-op, puts are local
 * copies), "shm" (CPU ranks on one host: POSIX shared memory, comm_shm.c), and
 * "cuda" (NCCL for all_reduce, CUDA IPC peer writes for put_rows;
 * backend/cuda/comm_cuda.cu). */
#ifndef NMOE_COMM_H
#define NMOE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "dist/dist.h"

/* One put: rows [src_row, src_row + rows) of the local source buffer go to
 * rows [dst_row, dst_row + rows) of rank peer's copy of the symmetric buffer. */
typedef struct CommSeg {
  int peer;
  int64_t src_row, dst_row, rows;
} CommSeg;

typedef struct Comm Comm;
struct Comm {
  int rank, world;
  const char *transport; /* "single", "shm", "cuda" */
  Backend *be;
  struct Store *store; /* control plane (NULL for "single") */
  void *impl;          /* transport state */

  /* In place: buf (n elements of kind) = sum over ranks, the same bits on every
   * rank (fixed reduction order). ACT and F32 kinds. */
  void (*all_reduce)(Comm *c, void *buf, size_t n, BufKind kind);
  /* ZeRO: buf holds n elements of kind, n a multiple of world; slice r is
   * [r*n/world, (r+1)*n/world). reduce_scatter: afterwards this rank's slice
   * holds the sum over ranks of that slice (the other slices keep unspecified
   * values). all_gather: afterwards every slice holds its owner's values. */
  void (*reduce_scatter)(Comm *c, void *buf, size_t n, BufKind kind);
  void (*all_gather)(Comm *c, void *buf, size_t n, BufKind kind);
  /* Host bytes: out (world * bytes) = every rank's in, in rank order. */
  void (*all_gather_host)(Comm *c, void *out, const void *in, size_t bytes);
  /* A backend buffer of bytes (zero-filled) that every rank allocates in the
   * same order with the same size; peers write into it with put_rows. Freed by
   * destroy. */
  void *(*sym_alloc)(Comm *c, size_t bytes);
  /* Collective: every rank calls it with its own segs (possibly none). dst is
   * a symmetric buffer, src a local backend buffer, row_bytes the row size.
   * On return (in stream order) all puts of all ranks have landed, and every
   * rank has finished reading its src. */
  void (*put_rows)(Comm *c, void *dst, const void *src, size_t row_bytes, const CommSeg *segs,
                   int nseg);
  void (*barrier)(Comm *c);
  void (*destroy)(Comm *c);
};

/* The transport for this backend and world: "single" when world == 1, else
 * "shm" for the CPU backend and "cuda" for the CUDA backend. Rendezvous at
 * MASTER_ADDR:MASTER_PORT (defaults 127.0.0.1:29500); fatal with one clear line
 * when a peer does not arrive within NMOE_DIST_TIMEOUT_S (default 300). */
Comm *comm_open(const DistInfo *di, Backend *be);

/* Transport constructors (comm_open picks one); they take ownership of st. */
Comm *comm_shm_open(const DistInfo *di, Backend *be, struct Store *st);
#ifdef NMOE_CUDA
Comm *comm_cuda_open(const DistInfo *di, Backend *be, struct Store *st);
#endif

/* A host barrier: the caller's thread blocks until every rank arrives (the
 * Comm's barrier op is ordered on the backend stream instead). timeout_s > 0
 * replaces NMOE_DIST_TIMEOUT_S for this wait: for waits that are legitimately
 * long, like rank 0 finishing a large checkpoint. */
void comm_host_barrier(Comm *c, int timeout_s);

/* Slice length n / world of a ZeRO collective over n elements; fatal with one
 * line when n is not a multiple of the world size (transports call it). */
size_t comm_zero_slice(const Comm *c, size_t n, const char *what);

/* Host helpers over all_gather_host (same result on every rank). */
int64_t comm_sum_i64(Comm *c, int64_t x);
double comm_sum_f64(Comm *c, double x);   /* summed in rank order */
void comm_sum_i64_array(Comm *c, int64_t *x, size_t n); /* in place */

#endif
