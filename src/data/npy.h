/* npy.h: NumPy .npy headers and memory-mapped token shards.
 *
 * Token shards are 1-D little-endian uint32 arrays in NPY v1.0 format (what
 * np.save writes and the original nmoe reads). We parse the header strictly
 * enough to reject anything we would misread (Fortran order, another dtype, a
 * file whose size disagrees with its shape) with one line naming the file. */
#ifndef NMOE_NPY_H
#define NMOE_NPY_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct NpyInfo {
  char descr[16];     /* dtype string as written, e.g. "<u4" */
  int fortran_order;
  int ndim;
  int64_t shape[4];
  size_t data_offset; /* bytes from file start to the first element */
} NpyInfo;

/* Parses the NPY header at buf[0..len) (len may cover just the header or the
 * whole file). path is used only in messages. 0, or -1 with err. */
int npy_parse_header(const void *buf, size_t len, const char *path, NpyInfo *out, char *err,
                     size_t errlen);

/* Writes an NPY v1.0 header for a C-order array; padded so the data starts at
 * a multiple of 64 bytes, as numpy does. 0, or -1 with err. */
int npy_write_header(FILE *f, const char *descr, const int64_t *shape, int ndim, char *err,
                     size_t errlen);

/* A read-only mapped token shard. */
typedef struct TokenShard {
  const uint32_t *tokens; /* (n,) */
  int64_t n;
  void *map;              /* whole-file mapping (NULL for an empty file body) */
  size_t map_len;
  char path[1024];
} TokenShard;

/* Maps a 1-D '<u4' (or '|u4'/'=u4' on little-endian) C-order .npy. Every
 * problem (missing, truncated, wrong magic, wrong dtype, size != shape) is -1
 * with a message naming the file. */
int shard_map(const char *path, TokenShard *s, char *err, size_t errlen);
void shard_unmap(TokenShard *s);

#endif
