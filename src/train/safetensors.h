/* safetensors.h: reader and writer for the safetensors format (the format of
 * the Hugging Face safetensors library, read by PyTorch, JAX, numpy, ...).
 *
 * File: 8-byte little-endian header length N; N bytes of UTF-8 JSON
 *   {"__metadata__": {string: string}, NAME: {"dtype": "F32", "shape": [..],
 *    "data_offsets": [begin, end]}, ...}
 * padded with spaces so the data starts at a multiple of 8; then the data
 * region, offsets relative to its start, little-endian, C order. The region
 * is covered exactly (no holes, no overlaps), as the reference library
 * demands. The writer orders data by element size, largest first, so every
 * tensor is aligned to its element size in a mapped file. */
#ifndef NMOE_SAFETENSORS_H
#define NMOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

/* A tensor to write (memory owned by the caller). */
typedef struct StTensor {
  const char *name;
  const char *dtype;     /* "F32", "BF16", "F64", "I32", "I64", "U8", ... */
  int ndim;              /* 0..ST_MAX_DIMS */
  const int64_t *shape;  /* (ndim) */
  const void *data;
  size_t nbytes;         /* must equal prod(shape) * element size */
} StTensor;

/* Bytes per element of a safetensors dtype name, or 0 when unknown. */
size_t st_dtype_size(const char *dtype);

/* Writes n tensors and n_meta string pairs (meta_kv = {k0, v0, k1, v1, ...},
 * NULL when n_meta = 0) to path atomically: streamed into "<path>.tmp.<pid>",
 * fsynced, renamed over path, directory fsynced. sha256 (may be NULL) gets
 * the SHA-256 of the bytes written. 0, or -1 with err naming the file. */
int st_write(const char *path, const StTensor *t, int n, const char *const *meta_kv, int n_meta,
             char sha256[65], char *err, size_t errlen);

/* One tensor of an opened file; data points into the mapping. */
typedef struct StEntry {
  char *name;
  char dtype[8];
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  const void *data;
  size_t nbytes;
} StEntry;

typedef struct StFile {
  char *path;
  int n;             /* tensors, in header order */
  StEntry *t;
  int n_meta;        /* __metadata__ pairs */
  char **meta_keys, **meta_vals;
  void *map;         /* the whole file, read-only */
  size_t size;
} StFile;

/* Maps and validates path: header length within the file, header JSON, known
 * dtypes, dtype size x shape = span, offsets inside the data region that
 * cover it exactly. NULL with one message naming the file on any problem. */
StFile *st_open(const char *path, char *err, size_t errlen);
const StEntry *st_get(const StFile *f, const char *name);
/* __metadata__ value for key, or NULL. */
const char *st_meta(const StFile *f, const char *key);
void st_close(StFile *f);

#endif
