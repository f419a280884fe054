/* shard_writer.h: streaming writer of one prepared dataset.
 *
 * Documents are assigned to bucket directories by doc id,
 *   bucket = int(md5(doc_id).hexdigest()[:16], 16) % num_buckets,
 * and appended (tokens, then one EOS) to the bucket's current shard
 *   {output}/shard_{bucket:04d}/{name}-{version}-shard-{n:06d}.npy (+ .idx).
 * A shard rotates before a document that would take it past tokens_per_shard
 * (a document longer than that gets a shard of its own).
 *
 * Crash safety: a shard is streamed to "<final>.tmp" and renamed to its final
 * name only when complete (header rewritten with the final length, fsync,
 * directory fsync); its .idx is written atomically after it. Manifests (one
 * per bucket, then the combined one at the root) are written last. Opening a
 * writer first removes the old root manifest, temporary leftovers and this
 * dataset's old shards, so until finish succeeds the output has no manifest
 * and `nmoe data verify` reports it incomplete. */
#ifndef NMOE_DATA_SHARD_WRITER_H
#define NMOE_DATA_SHARD_WRITER_H

#include <stddef.h>
#include <stdint.h>

typedef struct ShardWriterConfig {
  const char *output;        /* root directory (created if missing) */
  const char *name, *version; /* dataset name and version: file names and manifest */
  const char *tokenizer;     /* recorded in the manifest */
  const char *source;        /* source_info.source */
  int64_t vocab_size;
  uint32_t eos_id;
  int num_buckets;           /* --num-shards: bucket directories */
  int64_t tokens_per_shard;
} ShardWriterConfig;

typedef struct ShardWriterStats {
  int64_t tokens;    /* written, EOS included */
  int64_t documents;
  int shards;        /* shard files */
  int bucket_dirs;   /* buckets that received documents */
} ShardWriterStats;

typedef struct ShardWriter ShardWriter;

/* The bucket of a document id (as the original's _get_shard_id). */
int shard_bucket(const char *doc_id, size_t len, int num_buckets);

/* Prepares the output directory (see above). NULL with err. */
ShardWriter *shard_writer_open(const ShardWriterConfig *cfg, char *err, size_t errlen);

/* Appends ids[0..n) and one EOS to doc_id's bucket. */
int shard_writer_add(ShardWriter *w, const char *doc_id, size_t id_len, const uint32_t *ids,
                     size_t n, char *err, size_t errlen);

/* Running totals (tokens and documents added so far). */
void shard_writer_stats(const ShardWriter *w, ShardWriterStats *st);

/* Completes every open shard and writes the manifests; frees w. On failure
 * everything this writer wrote is removed (as shard_writer_abort). */
int shard_writer_finish(ShardWriter *w, ShardWriterStats *st, char *err, size_t errlen);

/* Removes everything this writer wrote (temporary and completed shards,
 * indexes, manifests); frees w. */
void shard_writer_abort(ShardWriter *w);

#endif
