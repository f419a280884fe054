/* comm_cuda.cu: the "cuda" transport of the comm layer (dist/comm.h) for the
 * GPUs of one node: NCCL for all_reduce, CUDA IPC peer writes for put_rows.
 *
 * Symmetric buffers: every rank cudaMallocs the same size in the same order,
 * the IPC handles travel over the store, and each rank maps every peer's copy
 * (own rank: the local pointer). put_rows turns each segment into one
 * contiguous byte copy (rows of a segment are contiguous on both sides) and
 * one kernel copies all of them straight into the peers' memory over NVLink.
 *
 * GPU barriers, in stream order, never a host sync: a symmetric flags buffer
 * holds one uint64 per rank. A barrier with epoch e makes every rank write e
 * into flags[rank] on every peer (after __threadfence_system, with a
 * release store) and wait until its own flags[q] >= e for every q (acquire
 * loads). One slot per rank suffices: a rank can only signal e+1 after it saw
 * every rank's e, so the values a slot receives only grow. Epochs come from a
 * host counter that every rank advances identically (collectives are called in
 * the same order everywhere).
 *
 * put_rows = entry barrier kernel (no rank still reads the old dst) + copy
 * kernel whose last finished block (a done counter after every block fenced
 * its stores) runs the exit barrier (every rank's puts into this rank have
 * landed, every rank is done reading its src).
 *
 * A barrier that waits longer than NMOE_DIST_TIMEOUT_S (default 300) writes
 * what it waited for into mapped host memory; a watchdog thread turns that
 * into one fatal line, and the kernel traps shortly after. */
#include <nccl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cuda/cuda_common.h"
extern "C" {
#include "dist/comm.h"
#include "dist/store.h"
}

#define COMM_MAX_WORLD 8       /* GPUs of one node: peer tables go by value */
#define COPY_THREADS 512
#define COPY_UNROLL 4
#define CHUNK_BYTES (COPY_THREADS * COPY_UNROLL * 16) /* one block's unit of work: 32 KiB */
#define NSTAGE 4               /* pinned staging slots for segment tables */
#define TRAP_DELAY_NS 3000000000ull /* time the watchdog gets before a stuck kernel traps */

#define NCCL_CHECK(call)                                                                      \
  do {                                                                                        \
    ncclResult_t r_ = (call);                                                                 \
    if (r_ != ncclSuccess)                                                                    \
      nmoe_fatal("NCCL error '%s' at %s:%d in %s: %s (hint: rerun with NCCL_DEBUG=WARN; all " \
                 "ranks must call the same collectives in the same order)",                   \
                 ncclGetErrorString(r_), __FILE__, __LINE__, #call, ncclGetLastError(NULL));  \
  } while (0)

/* Peer pointers by value (kernel parameter). */
typedef struct PeerPtrs {
  unsigned long long *p[COMM_MAX_WORLD];
} PeerPtrs;

/* One contiguous copy of a put; chunk0 = chunks of all earlier copies. */
typedef struct CopyDesc {
  const char *src;
  char *dst;
  unsigned long long bytes, chunk0;
} CopyDesc;

/* What a stuck barrier saw (mapped host memory, written by the device). */
typedef struct StallInfo {
  volatile int stalled;
  volatile int peer;
  volatile unsigned long long epoch, seen;
} StallInfo;

/* One symmetric buffer: the local copy and every rank's mapping of it. */
typedef struct SymBuf {
  char *base;
  size_t bytes;
  char *peer[COMM_MAX_WORLD];
} SymBuf;

typedef struct CudaComm {
  ncclComm_t nccl;
  cudaStream_t stream;
  int num_sms;
  SymBuf *bufs;
  int nbufs, cap_bufs;
  PeerPtrs flags;                  /* every rank's flags buffer (uint64 [world]) */
  unsigned long long *my_flags;
  unsigned long long epoch;        /* last barrier epoch issued */
  unsigned int *done;              /* copy kernel's finished-block counter */
  CopyDesc *stage[NSTAGE];         /* pinned */
  size_t stage_cap[NSTAGE];
  cudaEvent_t stage_ev[NSTAGE];    /* upload from the slot finished */
  int stage_next;
  CopyDesc *desc;                  /* device copy of the current segment table */
  size_t desc_cap;
  StallInfo *stall;                /* mapped pinned host memory */
  unsigned long long timeout_ns;
  pthread_t watchdog;
  volatile int stop;
} CudaComm;

static CudaComm *impl(Comm *c) { return (CudaComm *)c->impl; }

/* ---- device side: barriers ---- */

__device__ __forceinline__ unsigned long long now_ns(void) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long load_acquire_sys(const unsigned long long *p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(unsigned long long *p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* Threads q < world of one block: tell rank q that this rank reached epoch,
 * then wait for rank q's signal. Everything this thread's block (and, through
 * the caller's fences, grid) wrote before is visible to q first. Call with
 * the whole block; returns after every q arrived. */
__device__ void barrier_block(PeerPtrs flags, unsigned long long *mine, int rank, int world,
                              unsigned long long epoch, unsigned long long timeout_ns,
                              StallInfo *stall) {
  int q = threadIdx.x;
  if (q < world) {
    __threadfence_system();
    store_release_sys(flags.p[q] + rank, epoch);
    unsigned long long t0 = now_ns(), seen;
    int reported = 0;
    while ((seen = load_acquire_sys(mine + q)) < epoch) {
      unsigned long long dt = now_ns() - t0;
      if (!reported && dt > timeout_ns) {
        stall->peer = q;
        stall->epoch = epoch;
        stall->seen = seen;
        __threadfence_system();
        stall->stalled = 1;
        __threadfence_system();
        printf("nmoe: error: comm cuda: rank %d waited at barrier epoch %llu for rank %d "
               "(last seen %llu)\n", rank, epoch, q, seen);
        reported = 1;
      }
      if (reported && dt > timeout_ns + TRAP_DELAY_NS) __trap();
    }
  }
  __syncthreads();
}

__global__ void barrier_kernel(PeerPtrs flags, unsigned long long *mine, int rank, int world,
                               unsigned long long epoch, unsigned long long timeout_ns,
                               StallInfo *stall) {
  barrier_block(flags, mine, rank, world, epoch, timeout_ns, stall);
}

/* ---- device side: the copy ---- */

/* Bytes [lo, hi) of one copy, in units of V (the copy is V-aligned). */
template <typename V>
__device__ __forceinline__ void copy_range(const CopyDesc &d, unsigned long long lo,
                                           unsigned long long hi) {
  const V *s = (const V *)(d.src + lo);
  V *t = (V *)(d.dst + lo);
  long n = (long)((hi - lo) / sizeof(V));
  long i = threadIdx.x;
  /* COPY_UNROLL loads in flight per thread before the remote stores. */
  for (; i + (COPY_UNROLL - 1) * COPY_THREADS < n; i += COPY_UNROLL * COPY_THREADS) {
    V v[COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; u++) v[u] = s[i + u * COPY_THREADS];
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; u++) t[i + u * COPY_THREADS] = v[u];
  }
  for (; i < n; i += COPY_THREADS) t[i] = s[i];
}

/* Blocks take 32 KiB chunks of the concatenated copies, grid-stride; the
 * block that finishes last runs the exit barrier. */
template <typename V>
__global__ void __launch_bounds__(COPY_THREADS)
    put_kernel(const CopyDesc *desc, int ndesc, unsigned long long nchunks, unsigned int *done,
               PeerPtrs flags, unsigned long long *mine, int rank, int world,
               unsigned long long epoch, unsigned long long timeout_ns, StallInfo *stall) {
  for (unsigned long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
    int lo = 0, hi = ndesc - 1; /* last copy with chunk0 <= c (empty copies own no chunk) */
    while (lo < hi) {
      int mid = (lo + hi + 1) / 2;
      if (desc[mid].chunk0 <= c) lo = mid;
      else hi = mid - 1;
    }
    CopyDesc d = desc[lo];
    unsigned long long b0 = (c - d.chunk0) * CHUNK_BYTES;
    unsigned long long b1 = b0 + CHUNK_BYTES < d.bytes ? b0 + CHUNK_BYTES : d.bytes;
    copy_range<V>(d, b0, b1);
  }
  __threadfence_system(); /* this thread's remote stores before the done count */
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) {
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) {
      __threadfence();
      *done = 0; /* ready for the next launch (stream order) */
    }
  }
  __syncthreads();
  if (last) barrier_block(flags, mine, rank, world, epoch, timeout_ns, stall);
}

/* ---- host side ---- */

static void *watchdog_main(void *arg) {
  Comm *c = (Comm *)arg;
  CudaComm *k = impl(c);
  while (!k->stop) {
    if (k->stall->stalled)
      nmoe_fatal("comm cuda: rank %d waited more than %llu s at GPU barrier %llu for rank %d "
                 "(its last signal: %llu): a peer died, hangs, or called a different sequence "
                 "of collectives (raise NMOE_DIST_TIMEOUT_S if it is only slow)",
                 c->rank, k->timeout_ns / 1000000000ull, k->stall->epoch, k->stall->peer,
                 k->stall->seen);
    usleep(20000);
  }
  return NULL;
}

static void gather_or_die(Comm *c, void *out, const void *in, size_t bytes, const char *what) {
  char err[256] = "";
  if (store_all_gather(c->store, out, in, bytes, err, sizeof err) != 0)
    nmoe_fatal("comm cuda: all-gather of %s failed on rank %d: %s", what, c->rank, err);
}

static void cc_all_gather_host(Comm *c, void *out, const void *in, size_t bytes) {
  gather_or_die(c, out, in, bytes, "host values");
}

/* The NCCL type of kind, after checking that every rank passes the same n: a
 * mismatch would hang inside NCCL (no timeout there); one host gather per
 * collective (a few per step) turns it into one clear line. */
static ncclDataType_t nccl_type(Comm *c, BufKind kind, size_t n, const char *what) {
  if (kind != BUF_ACT && kind != BUF_F32)
    nmoe_fatal("comm cuda: %s supports ACT and F32 buffers (got kind %d)", what, (int)kind);
  uint64_t mine = n, *all = (uint64_t *)xmalloc(sizeof *all * (size_t)c->world);
  gather_or_die(c, all, &mine, sizeof mine, what);
  for (int r = 1; r < c->world; r++)
    if (all[r] != all[0])
      nmoe_fatal("comm cuda: %s sizes differ: rank %d has %llu elements, rank 0 %llu", what, r,
                 (unsigned long long)all[r], (unsigned long long)all[0]);
  free(all);
  return kind == BUF_ACT ? ncclBfloat16 : ncclFloat32;
}

static void cc_all_reduce(Comm *c, void *buf, size_t n, BufKind kind) {
  ncclDataType_t t = nccl_type(c, kind, n, "all_reduce");
  if (n == 0) return;
  CudaComm *k = impl(c);
  NCCL_CHECK(ncclAllReduce(buf, buf, n, t, ncclSum, k->nccl, k->stream));
}

/* In place, NCCL wants this rank's slice at buf + rank * len (both ZeRO ops). */
static void cc_reduce_scatter(Comm *c, void *buf, size_t n, BufKind kind) {
  ncclDataType_t t = nccl_type(c, kind, n, "reduce_scatter");
  size_t len = comm_zero_slice(c, n, "reduce_scatter");
  if (len == 0) return;
  CudaComm *k = impl(c);
  char *mine = (char *)buf + (size_t)c->rank * len * c->be->size[kind];
  NCCL_CHECK(ncclReduceScatter(buf, mine, len, t, ncclSum, k->nccl, k->stream));
}

static void cc_all_gather(Comm *c, void *buf, size_t n, BufKind kind) {
  ncclDataType_t t = nccl_type(c, kind, n, "all_gather");
  size_t len = comm_zero_slice(c, n, "all_gather");
  if (len == 0) return;
  CudaComm *k = impl(c);
  const char *mine = (const char *)buf + (size_t)c->rank * len * c->be->size[kind];
  NCCL_CHECK(ncclAllGather(mine, buf, len, t, k->nccl, k->stream));
}

/* The symmetric buffer holding p, or NULL. */
static SymBuf *sym_find(CudaComm *k, const void *p) {
  for (int i = 0; i < k->nbufs; i++)
    if ((const char *)p >= k->bufs[i].base && (const char *)p < k->bufs[i].base + k->bufs[i].bytes)
      return &k->bufs[i];
  return NULL;
}

static void *cc_sym_alloc(Comm *c, size_t bytes) {
  CudaComm *k = impl(c);
  size_t want = (bytes + 255) & ~(size_t)255;
  if (want == 0) want = 256;
  /* Every rank must ask for the same size: a mismatch would let puts run past
   * a smaller peer copy. */
  unsigned long long sizes[COMM_MAX_WORLD], mine = want;
  gather_or_die(c, sizes, &mine, sizeof mine, "symmetric buffer sizes");
  for (int q = 0; q < c->world; q++)
    if (sizes[q] != want)
      nmoe_fatal("comm cuda: sym_alloc is collective with equal sizes: rank %d asked for %llu "
                 "bytes, rank %d for %llu", c->rank, mine, q, sizes[q]);
  SymBuf b;
  memset(&b, 0, sizeof b);
  b.bytes = want;
  cudaError_t e = cudaMalloc((void **)&b.base, want);
  if (e != cudaSuccess)
    nmoe_fatal("comm cuda: rank %d cannot allocate a %zu-byte symmetric buffer: %s", c->rank,
               want, cudaGetErrorString(e));
  /* Zeroed and finished before any peer can learn the handle. */
  CUDA_CHECK(cudaMemset(b.base, 0, want));
  CUDA_CHECK(cudaDeviceSynchronize());
  cudaIpcMemHandle_t h, all[COMM_MAX_WORLD];
  CUDA_CHECK(cudaIpcGetMemHandle(&h, b.base));
  gather_or_die(c, all, &h, sizeof h, "CUDA IPC handles");
  for (int q = 0; q < c->world; q++) {
    if (q == c->rank) {
      b.peer[q] = b.base;
      continue;
    }
    e = cudaIpcOpenMemHandle((void **)&b.peer[q], all[q], cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess)
      nmoe_fatal("comm cuda: rank %d cannot map rank %d's symmetric buffer (cudaIpcOpenMemHandle: "
                 "%s): both GPUs must be on this node with peer access (NVLink or PCIe P2P)",
                 c->rank, q, cudaGetErrorString(e));
  }
  if (k->nbufs == k->cap_bufs) {
    k->cap_bufs = k->cap_bufs ? 2 * k->cap_bufs : 16;
    k->bufs = (SymBuf *)xrealloc(k->bufs, k->cap_bufs * sizeof(SymBuf));
  }
  k->bufs[k->nbufs++] = b;
  return b.base;
}

/* Epoch of a new barrier; the same number on every rank. */
static unsigned long long next_epoch(CudaComm *k) { return ++k->epoch; }

static void cc_barrier(Comm *c) {
  CudaComm *k = impl(c);
  barrier_kernel<<<1, 32, 0, k->stream>>>(k->flags, k->my_flags, c->rank, c->world,
                                          next_epoch(k), k->timeout_ns, k->stall);
  CUDA_LAUNCH_CHECK();
}

/* A pinned staging slot of at least n descriptors whose last upload finished. */
static CopyDesc *stage_take(CudaComm *k, int n, int *slot) {
  int s = k->stage_next;
  k->stage_next = (s + 1) % NSTAGE;
  CUDA_CHECK(cudaEventSynchronize(k->stage_ev[s]));
  if ((size_t)n > k->stage_cap[s]) {
    if (k->stage[s]) CUDA_CHECK(cudaFreeHost(k->stage[s]));
    k->stage_cap[s] = (size_t)n + n / 2;
    CUDA_CHECK(cudaMallocHost((void **)&k->stage[s], k->stage_cap[s] * sizeof(CopyDesc)));
  }
  *slot = s;
  return k->stage[s];
}

static void cc_put_rows(Comm *c, void *dst, const void *src, size_t row_bytes, const CommSeg *segs,
                        int nseg) {
  CudaComm *k = impl(c);
  SymBuf *b = sym_find(k, dst);
  if (!b)
    nmoe_fatal("comm cuda: put_rows on rank %d: dst %p is not inside a buffer from sym_alloc",
               c->rank, dst);
  if (nseg < 0 || row_bytes == 0)
    nmoe_fatal("comm cuda: put_rows on rank %d: nseg %d, row_bytes %zu (need nseg >= 0, "
               "row_bytes > 0)", c->rank, nseg, row_bytes);
  size_t off = (size_t)((const char *)dst - b->base), cap_rows = (b->bytes - off) / row_bytes;
  int slot = 0;
  CopyDesc *d = stage_take(k, nseg > 0 ? nseg : 1, &slot);
  int nd = 0;
  unsigned long long chunks = 0;
  uintptr_t align = (uintptr_t)src | (uintptr_t)dst | row_bytes;
  for (int i = 0; i < nseg; i++) {
    const CommSeg *s = &segs[i];
    if (s->peer < 0 || s->peer >= c->world || s->rows < 0 || s->src_row < 0 || s->dst_row < 0 ||
        (size_t)(s->dst_row + s->rows) > cap_rows)
      nmoe_fatal("comm cuda: put_rows on rank %d: segment %d (peer %d, src_row %lld, dst_row "
                 "%lld, rows %lld) is out of range (world %d, dst holds %zu rows of %zu bytes)",
                 c->rank, i, s->peer, (long long)s->src_row, (long long)s->dst_row,
                 (long long)s->rows, c->world, cap_rows, row_bytes);
    unsigned long long bytes = (unsigned long long)s->rows * row_bytes;
    if (bytes == 0) continue;
    d[nd].src = (const char *)src + (size_t)s->src_row * row_bytes;
    d[nd].dst = b->peer[s->peer] + off + (size_t)s->dst_row * row_bytes;
    d[nd].bytes = bytes;
    d[nd].chunk0 = chunks;
    chunks += (bytes + CHUNK_BYTES - 1) / CHUNK_BYTES;
    nd++;
  }
  if (nd > 0) {
    if ((size_t)nd > k->desc_cap) {
      CUDA_CHECK(cudaStreamSynchronize(k->stream)); /* the old table may still be read */
      if (k->desc) CUDA_CHECK(cudaFree(k->desc));
      k->desc_cap = (size_t)nd + nd / 2;
      CUDA_CHECK(cudaMalloc((void **)&k->desc, k->desc_cap * sizeof(CopyDesc)));
    }
    CUDA_CHECK(cudaMemcpyAsync(k->desc, d, nd * sizeof(CopyDesc), cudaMemcpyHostToDevice,
                               k->stream));
  }
  CUDA_CHECK(cudaEventRecord(k->stage_ev[slot], k->stream));

  /* Entry: every rank is past its earlier reads of dst. */
  cc_barrier(c);
  unsigned long long epoch = next_epoch(k);
  int grid = (int)(chunks < (unsigned long long)(4 * k->num_sms) ? chunks : 4 * k->num_sms);
  if (grid < 1) grid = 1;
#define PUT_ARGS                                                                            \
  k->desc, nd, chunks, k->done, k->flags, k->my_flags, c->rank, c->world, epoch, k->timeout_ns, \
      k->stall
  if (align % 16 == 0) put_kernel<uint4><<<grid, COPY_THREADS, 0, k->stream>>>(PUT_ARGS);
  else if (align % 4 == 0) put_kernel<unsigned int><<<grid, COPY_THREADS, 0, k->stream>>>(PUT_ARGS);
  else put_kernel<unsigned char><<<grid, COPY_THREADS, 0, k->stream>>>(PUT_ARGS);
#undef PUT_ARGS
  CUDA_LAUNCH_CHECK();
}

static void cc_destroy(Comm *c) {
  CudaComm *k = impl(c);
  CUDA_CHECK(cudaStreamSynchronize(k->stream));
  k->stop = 1;
  pthread_join(k->watchdog, NULL);
  NCCL_CHECK(ncclCommDestroy(k->nccl));
  /* Every put into this rank landed before its stream drained (exit
   * barriers); the store barrier only keeps each buffer alive until no peer
   * maps it any more. */
  for (int i = 0; i < k->nbufs; i++)
    for (int q = 0; q < c->world; q++)
      if (q != c->rank) CUDA_CHECK(cudaIpcCloseMemHandle(k->bufs[i].peer[q]));
  char err[256] = "";
  if (store_barrier(c->store, err, sizeof err) != 0)
    nmoe_fatal("comm cuda: closing barrier failed on rank %d: %s", c->rank, err);
  for (int i = 0; i < k->nbufs; i++) CUDA_CHECK(cudaFree(k->bufs[i].base));
  for (int s = 0; s < NSTAGE; s++) {
    if (k->stage[s]) CUDA_CHECK(cudaFreeHost(k->stage[s]));
    CUDA_CHECK(cudaEventDestroy(k->stage_ev[s]));
  }
  if (k->desc) CUDA_CHECK(cudaFree(k->desc));
  CUDA_CHECK(cudaFree(k->done));
  CUDA_CHECK(cudaFreeHost(k->stall));
  store_close(c->store);
  free(k->bufs);
  free(k);
  free(c);
}

/* Every rank's GPU (PCI bus id) is distinct, and reachable from this one. */
static void check_peers(Comm *c, int device) {
  char mine[32] = "", all[COMM_MAX_WORLD][32];
  CUDA_CHECK(cudaDeviceGetPCIBusId(mine, sizeof mine, device));
  gather_or_die(c, all, mine, sizeof mine, "GPU bus ids");
  for (int q = 0; q < c->world; q++) {
    if (q == c->rank) continue;
    if (strcmp(all[q], mine) == 0)
      nmoe_fatal("comm cuda: ranks %d and %d both use GPU %s: run one rank per GPU (LOCAL_RANK "
                 "picks the device)", c->rank, q, mine);
    int dev = -1;
    if (cudaDeviceGetByPCIBusId(&dev, all[q]) != cudaSuccess) {
      cudaGetLastError(); /* peer GPU hidden (CUDA_VISIBLE_DEVICES): IPC mapping decides */
      continue;
    }
    int ok = 0;
    CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, device, dev));
    if (!ok)
      nmoe_fatal("comm cuda: GPU %s (rank %d) cannot access GPU %s (rank %d) as a peer: RDEP "
                 "puts need NVLink or PCIe peer-to-peer between all GPUs of the run",
                 mine, c->rank, all[q], q);
    cudaError_t e = cudaDeviceEnablePeerAccess(dev, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
    else CUDA_CHECK(e);
  }
}

extern "C" Comm *comm_cuda_open(const DistInfo *di, Backend *be, Store *st) {
  if (di->local_world != di->world)
    nmoe_fatal("comm cuda: multi-node runs need the NVSHMEM transport (not built yet): world %d, "
               "%d ranks on this node", di->world, di->local_world);
  if (di->world > COMM_MAX_WORLD)
    nmoe_fatal("comm cuda: at most %d GPUs per node are supported (world %d)", COMM_MAX_WORLD,
               di->world);
  if (strcmp(be->name, "cuda") != 0)
    nmoe_fatal("comm cuda: needs the CUDA backend (got %s)", be->name);
  Comm *c = (Comm *)xcalloc(1, sizeof(Comm));
  CudaComm *k = (CudaComm *)xcalloc(1, sizeof(CudaComm));
  c->rank = di->rank;
  c->world = di->world;
  c->transport = "cuda";
  c->be = be;
  c->store = st;
  c->impl = k;
  c->all_reduce = cc_all_reduce;
  c->reduce_scatter = cc_reduce_scatter;
  c->all_gather = cc_all_gather;
  c->all_gather_host = cc_all_gather_host;
  c->sym_alloc = cc_sym_alloc;
  c->put_rows = cc_put_rows;
  c->barrier = cc_barrier;
  c->destroy = cc_destroy;
  k->stream = cuda_stream(be);
  k->num_sms = cuda_ctx(be)->num_sms;
  const char *to = getenv("NMOE_DIST_TIMEOUT_S");
  long tos = to && *to ? strtol(to, NULL, 10) : 300;
  k->timeout_ns = (unsigned long long)(tos > 0 ? tos : 300) * 1000000000ull;

  check_peers(c, cuda_ctx(be)->device);

  /* NCCL: rank 0's id reaches everyone through the store. */
  ncclUniqueId id, ids[COMM_MAX_WORLD];
  memset(&id, 0, sizeof id);
  if (c->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  gather_or_die(c, ids, &id, sizeof id, "the NCCL unique id");
  NCCL_CHECK(ncclCommInitRank(&k->nccl, c->world, ids[0], c->rank));

  /* Barrier state: symmetric flags (uint64 [world]), done counter, stall report. */
  k->my_flags = (unsigned long long *)cc_sym_alloc(c, COMM_MAX_WORLD * sizeof(unsigned long long));
  for (int q = 0; q < c->world; q++) k->flags.p[q] = (unsigned long long *)k->bufs[0].peer[q];
  CUDA_CHECK(cudaMalloc((void **)&k->done, sizeof(unsigned int)));
  CUDA_CHECK(cudaMemset(k->done, 0, sizeof(unsigned int)));
  CUDA_CHECK(cudaHostAlloc((void **)&k->stall, sizeof(StallInfo), cudaHostAllocMapped));
  memset((void *)k->stall, 0, sizeof(StallInfo));
  for (int s = 0; s < NSTAGE; s++)
    CUDA_CHECK(cudaEventCreateWithFlags(&k->stage_ev[s], cudaEventDisableTiming));
  CUDA_CHECK(cudaDeviceSynchronize());
  if (pthread_create(&k->watchdog, NULL, watchdog_main, c) != 0)
    nmoe_fatal("comm cuda: cannot start the barrier watchdog thread");
  return c;
}
