/* shard_index.h: the .idx sidecar of a token shard: document boundaries.
 *
 * Layout (little-endian, struct '<8sQQQ' then the body):
 *   "NMOEIDX\0" | version u64 = 1 | num_docs u64 | reserved u64 = 0
 *   num_docs pairs of u64 (start, end-exclusive) token offsets into the .npy;
 *   each document's range includes its trailing EOS. */
#ifndef NMOE_DATA_SHARD_INDEX_H
#define NMOE_DATA_SHARD_INDEX_H

#include <stddef.h>
#include <stdint.h>

#define IDX_HEADER_SIZE 32
#define IDX_VERSION 1

/* Writes pairs (num_docs x 2) to path atomically (tmp, fsync, rename). */
int idx_write(const char *path, const uint64_t *pairs, uint64_t num_docs, char *err, size_t errlen);

/* Reads an .idx: checks magic, version and that the body holds exactly
 * num_docs pairs. *pairs is malloc'd (num_docs x 2). 0, or -1 with err. */
int idx_read(const char *path, uint64_t **pairs, uint64_t *num_docs, char *err, size_t errlen);

/* Boundaries from EOS positions: a document ends just after each EOS; tokens
 * after the last EOS belong to no document. *pairs malloc'd; returns num_docs. */
uint64_t idx_from_eos(const uint32_t *tokens, int64_t n, uint32_t eos, uint64_t **pairs);

/* The .idx path of a shard: "x.npy" -> "x.idx" (other names get ".idx" appended). */
void idx_path_for(const char *npy_path, char *out, size_t outlen);

#endif
