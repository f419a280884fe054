/* manifest.h: dataset manifest.json (the inventory of a prepared dataset) and
 * its verification.
 *
 * The manifest is the source of truth: a shard is part of a dataset only when
 * a manifest lists it. Fields follow the original exactly: dataset, version,
 * tokenizer, vocab_size, eos_token_id, dtype ("uint32"), created_at,
 * total_tokens, total_documents, num_shards, shards[{path, index_path,
 * num_tokens, num_documents, checksum}], source_info. Shard paths are relative
 * to the manifest's directory. */
#ifndef NMOE_DATA_MANIFEST_H
#define NMOE_DATA_MANIFEST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct ManifestShard {
  char *path;          /* relative to the manifest's directory */
  char *index_path;
  int64_t num_tokens;  /* including one EOS per document */
  int64_t num_documents;
  char checksum[65];   /* SHA-256 hex of the .npy file */
} ManifestShard;

typedef struct Manifest {
  char *dataset, *version, *tokenizer, *dtype, *created_at;
  int64_t vocab_size, eos_token_id;
  int64_t total_tokens, total_documents, num_shards;
  ManifestShard *shards;
  int n_shards;
  char *source;        /* source_info.source (may be NULL) */
  int num_shard_dirs;  /* source_info.num_shard_dirs; -1 when absent (per-bucket manifests) */
} Manifest;

/* Writes m as pretty JSON to path atomically. */
int manifest_write(const char *path, const Manifest *m, char *err, size_t errlen);
/* Reads and type-checks every field; err names the file and the field. */
int manifest_read(const char *path, Manifest *m, char *err, size_t errlen);
void manifest_free(Manifest *m);

/* "<dir>/manifest.json" when path is a directory, else path. */
void manifest_resolve(const char *path, char *out, size_t outlen);

/* Checks a dataset against its manifest (path: manifest.json or its
 * directory): fields and totals, each shard's npy header and size, its .idx
 * (header, offsets contiguous and within bounds, each document ending in EOS),
 * token ids < vocab_size, SHA-256 when checksums, and stray files (*.tmp, or
 * shards/indexes the manifest does not list). Each problem is one line on
 * out. Returns the number of problems, or -1 with err when there is no
 * readable manifest (and then lists shard files found as unlisted on out). */
int manifest_verify(const char *path, int checksums, FILE *out, char *err, size_t errlen);

#endif
