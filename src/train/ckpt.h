/* ckpt.h: split checkpoints with bit-exact resume (reference section 7, in
 * safetensors instead of torch pickles).
 *
 * Layout of one step, checkpoint_dir/iter_XXXXXXX/:
 *   dense.safetensors        rank 0: replicated (dense) tensors
 *   rank_RRR.safetensors     every rank: its expert tensors and optimizer state
 *   rank_RRR.json            every rank: step, tokens, RNG, loader cursor,
 *                            fingerprint, plan hash, git commit, world, ...
 *   manifest.json            written last by rank 0: files, sizes, SHA-256
 * and checkpoint_dir/latest_checkpointed_iteration.txt, the tracker, naming
 * the newest finalised step. Every file is written to a temporary name,
 * fsynced and renamed; the tracker moves only after the manifest exists, so a
 * crash at any moment leaves the previous finalised step intact.
 *
 * Saving runs on a background thread from a host snapshot; the queue is
 * bounded and a full queue blocks the caller (never drops a checkpoint). */
#ifndef NMOE_CKPT_H
#define NMOE_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "core/json.h"

/* One tensor of a snapshot (host memory owned by the snapshot). dtype is a
 * safetensors dtype string: "F32", "BF16", "F64", "I32", "I64", "U8". */
typedef struct CkptTensor {
  char name[128];
  char dtype[8];
  int ndim;
  int64_t shape[4];
  void *data;
  size_t nbytes;
} CkptTensor;

typedef struct CkptSnapshot {
  int64_t step;
  int n_dense, n_rank;
  CkptTensor *dense;   /* written by rank 0 only (ignored on other ranks) */
  CkptTensor *rank_t;  /* this rank's tensors */
  char *meta_json;     /* this rank's metadata document */
} CkptSnapshot;

/* Frees a snapshot and every tensor's data. */
void ckpt_snapshot_free(CkptSnapshot *s);

typedef struct Ckpt Ckpt;
/* Starts the saver thread. keep_last_n = 0 keeps everything. */
Ckpt *ckpt_open(const char *dir, int rank, int world, int keep_last_n, char *err, size_t errlen);
/* Queues snap (ownership passes to the saver). Blocks while the queue is
 * full. Fails if an earlier save failed (the error is reported once). */
int ckpt_save_async(Ckpt *c, CkptSnapshot *snap, char *err, size_t errlen);
/* Writes snap synchronously as rank of world under dir, exactly as the saver
 * thread does (atomic files; rank 0 writes dense.safetensors and, once every
 * rank's files exist, the manifest and the tracker; no purge). Used by
 * `nmoe ckpt reshard`, which writes ranks world-1..0 in turn. */
int ckpt_save(const char *dir, int rank, int world, const CkptSnapshot *snap, char *err, size_t errlen);
/* Waits until every queued save is written and finalised. */
int ckpt_wait(Ckpt *c, char *err, size_t errlen);
/* ckpt_wait, then stops the thread. */
int ckpt_close(Ckpt *c, char *err, size_t errlen);

/* Newest finalised step under dir (tracker, else newest iter_* with a valid
 * manifest), or -1 when there is none. */
int64_t ckpt_latest(const char *dir);

typedef struct CkptLoaded {
  int64_t step;
  Json *meta;          /* this rank's metadata document */
  int n, n_dense;
  CkptTensor *t;       /* dense (rank 0's file: the first n_dense) + this rank's tensors */
} CkptLoaded;

/* Loads step for rank (verifying the manifest, sizes and SHA-256 of the files
 * it reads, and that the manifest's world equals world). Each problem is one
 * clear message in err. */
CkptLoaded *ckpt_load(const char *dir, int64_t step, int rank, int world, char *err, size_t errlen);
const CkptTensor *ckpt_find(const CkptLoaded *l, const char *name);
void ckpt_loaded_free(CkptLoaded *l);

/* Checks one finalised step fully: manifest, sizes and SHA-256 of every
 * file, and that each safetensors/json file parses. */
int ckpt_verify_step(const char *dir, int64_t step, char *err, size_t errlen);

/* Writes step of src (verified fully first) for world ranks as a finalised
 * step of dst, with the tracker (ckpt_reshard.c). Refuses an existing step
 * in dst, experts or batch not divisible by world, a corrupt source. */
int ckpt_reshard(const char *src, const char *dst, int world, int64_t step, char *err, size_t errlen);

/* `nmoe ckpt list|info|verify|reshard`. */
int ckpt_main(int argc, char **argv);

#endif
