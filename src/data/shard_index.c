/* shard_index.c: reading, writing and rebuilding .idx document boundaries. */
#include "data/shard_index.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fsutil.h"
#include "core/log.h"

static const char IDX_MAGIC[8] = {'N', 'M', 'O', 'E', 'I', 'D', 'X', '\0'};

static void put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

int idx_write(const char *path, const uint64_t *pairs, uint64_t num_docs, char *err, size_t errlen) {
  size_t n = IDX_HEADER_SIZE + (size_t)num_docs * 16;
  unsigned char *buf = xmalloc(n);
  memcpy(buf, IDX_MAGIC, 8);
  put_u64(buf + 8, IDX_VERSION);
  put_u64(buf + 16, num_docs);
  put_u64(buf + 24, 0);
  for (uint64_t i = 0; i < num_docs * 2; i++) put_u64(buf + IDX_HEADER_SIZE + 8 * i, pairs[i]);
  int rc = fs_write_atomic(path, buf, n, err, errlen);
  free(buf);
  return rc;
}

int idx_read(const char *path, uint64_t **pairs, uint64_t *num_docs, char *err, size_t errlen) {
  *pairs = NULL;
  *num_docs = 0;
  size_t n;
  char *buf = fs_read_all(path, &n, err, errlen);
  if (!buf) return -1;
  const unsigned char *b = (const unsigned char *)buf;
  int rc = -1;
  if (n < IDX_HEADER_SIZE) {
    snprintf(err, errlen, "%s: truncated index (%zu bytes, header needs %d)", path, n,
             IDX_HEADER_SIZE);
  } else if (memcmp(b, IDX_MAGIC, 8) != 0) {
    snprintf(err, errlen, "%s: not an nmoe index (bad magic)", path);
  } else if (get_u64(b + 8) != IDX_VERSION) {
    snprintf(err, errlen, "%s: unsupported index version %llu (expected %d)", path,
             (unsigned long long)get_u64(b + 8), IDX_VERSION);
  } else {
    uint64_t nd = get_u64(b + 16);
    if (nd > (n - IDX_HEADER_SIZE) / 16 || IDX_HEADER_SIZE + nd * 16 != n) {
      snprintf(err, errlen, "%s: index header says %llu documents but body holds %zu bytes", path,
               (unsigned long long)nd, n - IDX_HEADER_SIZE);
    } else {
      *pairs = xmalloc(nd ? nd * 16 : 1);
      for (uint64_t i = 0; i < nd * 2; i++) (*pairs)[i] = get_u64(b + IDX_HEADER_SIZE + 8 * i);
      *num_docs = nd;
      rc = 0;
    }
  }
  free(buf);
  return rc;
}

uint64_t idx_from_eos(const uint32_t *tokens, int64_t n, uint32_t eos, uint64_t **pairs) {
  uint64_t count = 0;
  for (int64_t i = 0; i < n; i++) count += tokens[i] == eos;
  uint64_t *p = xmalloc(count ? count * 16 : 1);
  uint64_t start = 0, k = 0;
  for (int64_t i = 0; i < n; i++) {
    if (tokens[i] != eos) continue;
    p[2 * k] = start;
    p[2 * k + 1] = (uint64_t)i + 1;
    start = (uint64_t)i + 1;
    k++;
  }
  *pairs = p;
  return count;
}

void idx_path_for(const char *npy_path, char *out, size_t outlen) {
  size_t n = strlen(npy_path);
  if (n >= 4 && strcmp(npy_path + n - 4, ".npy") == 0)
    snprintf(out, outlen, "%.*s.idx", (int)(n - 4), npy_path);
  else
    snprintf(out, outlen, "%s.idx", npy_path);
}
