/* safetensors.c: streaming atomic writer and validating mmap reader for the
 * safetensors format (see safetensors.h for the layout). */
#include "train/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"

/* The reference library refuses headers above 100 MB; so do we. */
#define ST_MAX_HEADER (100u << 20)

static const struct {
  const char *name;
  size_t size;
} DTYPES[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},   {"F8_E5M2", 1}, {"F8_E4M3", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2},  {"BF16", 2},    {"I32", 4},
    {"U32", 4},  {"F32", 4}, {"F64", 8},  {"I64", 8},     {"U64", 8},
};

size_t st_dtype_size(const char *dtype) {
  for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
    if (!strcmp(dtype, DTYPES[i].name)) return DTYPES[i].size;
  return 0;
}

/* prod(shape) * esize, or -1 on overflow / negative dims. */
static int64_t span_bytes(const int64_t *shape, int ndim, size_t esize) {
  uint64_t n = esize;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0) return -1;
    if (shape[d] && n > (uint64_t)INT64_MAX / (uint64_t)shape[d]) return -1;
    n *= (uint64_t)shape[d];
  }
  return (int64_t)n;
}

/* ---------------------------------------------------------------- writer */

static int write_all(int fd, const void *data, size_t n, Sha256 *h, const char *path, char *err,
                     size_t errlen) {
  const char *p = data;
  if (h && n) sha256_update(h, data, n);
  while (n) {
    size_t chunk = n < (1u << 30) ? n : (1u << 30);
    ssize_t w = write(fd, p, chunk);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      snprintf(err, errlen, "%s: write failed: %s", path, w < 0 ? strerror(errno) : "no progress");
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp((*(const StTensor *const *)a)->name, (*(const StTensor *const *)b)->name);
}

/* Rejects what the format cannot hold before anything is written. */
static int check_tensors(const char *path, const StTensor *t, int n, char *err, size_t errlen) {
  for (int i = 0; i < n; i++) {
    size_t es = st_dtype_size(t[i].dtype);
    if (!t[i].name[0] || !strcmp(t[i].name, "__metadata__")) {
      snprintf(err, errlen, "%s: invalid tensor name '%s'", path, t[i].name);
      return -1;
    }
    if (!es) {
      snprintf(err, errlen, "%s: tensor '%s': unknown dtype '%s'", path, t[i].name, t[i].dtype);
      return -1;
    }
    int64_t want = t[i].ndim < 0 || t[i].ndim > ST_MAX_DIMS ? -1 : span_bytes(t[i].shape, t[i].ndim, es);
    if (want < 0 || (uint64_t)want != t[i].nbytes) {
      snprintf(err, errlen, "%s: tensor '%s': %zu bytes do not match dtype %s and its shape", path,
               t[i].name, t[i].nbytes, t[i].dtype);
      return -1;
    }
  }
  const StTensor **by_name = xmalloc((size_t)n * sizeof *by_name);
  for (int i = 0; i < n; i++) by_name[i] = &t[i];
  qsort(by_name, (size_t)n, sizeof *by_name, cmp_names);
  for (int i = 1; i < n; i++)
    if (!strcmp(by_name[i]->name, by_name[i - 1]->name)) {
      snprintf(err, errlen, "%s: duplicate tensor name '%s'", path, by_name[i]->name);
      free(by_name);
      return -1;
    }
  free(by_name);
  return 0;
}

int st_write(const char *path, const StTensor *t, int n, const char *const *meta_kv, int n_meta,
             char sha256[65], char *err, size_t errlen) {
  if (check_tensors(path, t, n, err, errlen)) return -1;
  /* Data order: element size 8, 4, 2, 1 (input order within a size), so
   * each tensor starts at a multiple of its element size. */
  int *order = xmalloc((size_t)(n ? n : 1) * sizeof *order);
  uint64_t *begin = xmalloc((size_t)(n ? n : 1) * sizeof *begin);
  int k = 0;
  uint64_t off = 0;
  for (size_t es = 8; es >= 1; es /= 2)
    for (int i = 0; i < n; i++)
      if (st_dtype_size(t[i].dtype) == es) {
        order[k++] = i;
        begin[i] = off;
        off += t[i].nbytes;
      }

  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  if (n_meta > 0) {
    jw_obj(&w, "__metadata__");
    for (int i = 0; i < n_meta; i++) jw_str(&w, meta_kv[2 * i], meta_kv[2 * i + 1]);
    jw_obj_end(&w);
  }
  for (int i = 0; i < n; i++) {
    jw_obj(&w, t[i].name);
    jw_str(&w, "dtype", t[i].dtype);
    jw_arr(&w, "shape");
    for (int d = 0; d < t[i].ndim; d++) jw_int(&w, NULL, t[i].shape[d]);
    jw_arr_end(&w);
    jw_arr(&w, "data_offsets");
    jw_uint(&w, NULL, begin[i]);
    jw_uint(&w, NULL, begin[i] + t[i].nbytes);
    jw_arr_end(&w);
    jw_obj_end(&w);
  }
  jw_obj_end(&w);
  size_t hlen = w.len;
  size_t padded = (hlen + 7) & ~(size_t)7;
  char *hdr = jw_finish(&w);
  hdr = xrealloc(hdr, padded + 8);
  memset(hdr + hlen, ' ', padded - hlen);
  uint8_t len8[8];
  for (int b = 0; b < 8; b++) len8[b] = (uint8_t)((uint64_t)padded >> (8 * b));

  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
  int rc = -1;
  Sha256 h;
  sha256_init(&h);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    snprintf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
    goto done;
  }
  if (write_all(fd, len8, 8, &h, tmp, err, errlen) || write_all(fd, hdr, padded, &h, tmp, err, errlen))
    goto fail;
  for (int j = 0; j < n; j++)
    if (write_all(fd, t[order[j]].data, t[order[j]].nbytes, &h, tmp, err, errlen)) goto fail;
  if (fsync(fd)) {
    snprintf(err, errlen, "%s: fsync failed: %s", tmp, strerror(errno));
    goto fail;
  }
  int crc = close(fd);
  fd = -1;
  if (crc) {
    snprintf(err, errlen, "%s: close failed: %s", tmp, strerror(errno));
    goto fail;
  }
  if (fs_commit_rename(tmp, path, err, errlen)) goto done;
  rc = 0;
  goto done;
fail:
  if (fd >= 0) close(fd);
  unlink(tmp);
done:
  {
    char hex[65];
    sha256_final_hex(&h, hex);
    if (sha256) memcpy(sha256, hex, 65);
  }
  free(hdr);
  free(order);
  free(begin);
  return rc;
}

/* ---------------------------------------------------------------- reader */

void st_close(StFile *f) {
  if (!f) return;
  for (int i = 0; i < f->n; i++) free(f->t[i].name);
  for (int i = 0; i < f->n_meta; i++) {
    free(f->meta_keys[i]);
    free(f->meta_vals[i]);
  }
  free(f->t);
  free(f->meta_keys);
  free(f->meta_vals);
  if (f->map && f->map != MAP_FAILED) munmap(f->map, f->size);
  free(f->path);
  free(f);
}

const StEntry *st_get(const StFile *f, const char *name) {
  for (int i = 0; i < f->n; i++)
    if (!strcmp(f->t[i].name, name)) return &f->t[i];
  return NULL;
}

const char *st_meta(const StFile *f, const char *key) {
  for (int i = 0; i < f->n_meta; i++)
    if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
  return NULL;
}

/* A non-negative JSON integer, or -1. */
static int64_t json_uint(const Json *j) {
  return j && j->type == JSON_NUM && j->is_int && j->i >= 0 ? j->i : -1;
}

static int parse_meta(StFile *f, const Json *m, char *err, size_t errlen) {
  if (m->type != JSON_OBJ) {
    snprintf(err, errlen, "%s: __metadata__ is not an object", f->path);
    return -1;
  }
  f->meta_keys = xcalloc((size_t)m->n + 1, sizeof(char *));
  f->meta_vals = xcalloc((size_t)m->n + 1, sizeof(char *));
  for (int i = 0; i < m->n; i++) {
    if (m->items[i]->type != JSON_STR) {
      snprintf(err, errlen, "%s: __metadata__ value of '%s' is not a string", f->path, m->keys[i]);
      return -1;
    }
    f->meta_keys[f->n_meta] = xstrdup(m->keys[i]);
    f->meta_vals[f->n_meta++] = xstrdup(m->items[i]->str);
  }
  return 0;
}

/* Fills e from a header entry; begin/end get its offsets. */
static int parse_entry(StFile *f, const char *name, const Json *v, StEntry *e, uint64_t *b,
                       uint64_t *end, char *err, size_t errlen) {
  const char *p = f->path;
  if (v->type != JSON_OBJ) {
    snprintf(err, errlen, "%s: header entry '%s' is not an object", p, name);
    return -1;
  }
  const char *dt = json_get_str(v, "dtype", NULL);
  const Json *shape = json_get(v, "shape"), *offs = json_get(v, "data_offsets");
  if (!dt || !shape || shape->type != JSON_ARR || !offs || offs->type != JSON_ARR) {
    snprintf(err, errlen, "%s: tensor '%s' lacks dtype, shape or data_offsets", p, name);
    return -1;
  }
  size_t es = st_dtype_size(dt);
  if (!es) {
    snprintf(err, errlen, "%s: tensor '%s': unknown dtype '%s'", p, name, dt);
    return -1;
  }
  if (shape->n > ST_MAX_DIMS) {
    snprintf(err, errlen, "%s: tensor '%s' has %d dimensions (at most %d supported)", p, name, shape->n,
             ST_MAX_DIMS);
    return -1;
  }
  e->name = xstrdup(name);
  snprintf(e->dtype, sizeof e->dtype, "%s", dt);
  e->ndim = shape->n;
  for (int d = 0; d < shape->n; d++) {
    e->shape[d] = json_uint(shape->items[d]);
    if (e->shape[d] < 0) {
      snprintf(err, errlen, "%s: tensor '%s': shape[%d] is not a non-negative integer", p, name, d);
      return -1;
    }
  }
  int64_t b0 = offs->n == 2 ? json_uint(offs->items[0]) : -1;
  int64_t b1 = offs->n == 2 ? json_uint(offs->items[1]) : -1;
  if (b0 < 0 || b1 < b0) {
    snprintf(err, errlen, "%s: tensor '%s': data_offsets must be [begin, end] with 0 <= begin <= end", p,
             name);
    return -1;
  }
  int64_t want = span_bytes(e->shape, e->ndim, es);
  if (want < 0 || want != b1 - b0) {
    snprintf(err, errlen, "%s: tensor '%s': dtype %s x shape needs %lld bytes but data_offsets span %lld",
             p, name, dt, (long long)want, (long long)(b1 - b0));
    return -1;
  }
  *b = (uint64_t)b0;
  *end = (uint64_t)b1;
  e->nbytes = (size_t)(b1 - b0);
  return 0;
}

typedef struct Span {
  uint64_t b, e;
  int idx;
} Span;

static int cmp_span(const void *a, const void *b) {
  const Span *x = a, *y = b;
  if (x->b != y->b) return x->b < y->b ? -1 : 1;
  return x->e < y->e ? -1 : x->e > y->e;
}

/* The data region [0, dlen) must be covered exactly by the tensors' spans. */
static int check_cover(StFile *f, Span *s, int n, uint64_t dlen, char *err, size_t errlen) {
  qsort(s, (size_t)n, sizeof *s, cmp_span);
  uint64_t at = 0;
  for (int i = 0; i < n; i++) {
    if (s[i].b < at) {
      snprintf(err, errlen, "%s: tensors '%s' and '%s' overlap", f->path, f->t[s[i - 1].idx].name,
               f->t[s[i].idx].name);
      return -1;
    }
    if (s[i].b > at) {
      snprintf(err, errlen, "%s: %llu unused bytes before tensor '%s' (the data region must have no holes)",
               f->path, (unsigned long long)(s[i].b - at), f->t[s[i].idx].name);
      return -1;
    }
    at = s[i].e;
  }
  if (at > dlen) {
    snprintf(err, errlen, "%s: tensor data ends at byte %llu of a %llu-byte data region (file truncated?)",
             f->path, (unsigned long long)at, (unsigned long long)dlen);
    return -1;
  }
  if (at < dlen) {
    snprintf(err, errlen, "%s: %llu trailing bytes after the last tensor", f->path,
             (unsigned long long)(dlen - at));
    return -1;
  }
  return 0;
}

static int parse_header(StFile *f, const char *text, size_t hlen, char *err, size_t errlen) {
  if (hlen == 0 || text[0] != '{') {
    snprintf(err, errlen, "%s: not a safetensors file (the header does not start with '{')", f->path);
    return -1;
  }
  char jerr[256];
  Json *h = json_parse(text, hlen, jerr, sizeof jerr);
  if (!h) {
    snprintf(err, errlen, "%s: invalid header JSON: %s", f->path, jerr);
    return -1;
  }
  int rc = -1;
  Span *spans = xcalloc((size_t)h->n + 1, sizeof *spans);
  f->t = xcalloc((size_t)h->n + 1, sizeof *f->t);
  if (h->type != JSON_OBJ) {
    snprintf(err, errlen, "%s: the header is not a JSON object", f->path);
    goto done;
  }
  for (int i = 0; i < h->n; i++) {
    const char *key = h->keys[i];
    for (int j = 0; j < i; j++)
      if (!strcmp(h->keys[j], key)) {
        snprintf(err, errlen, "%s: duplicate header key '%s'", f->path, key);
        goto done;
      }
    if (!strcmp(key, "__metadata__")) {
      if (parse_meta(f, h->items[i], err, errlen)) goto done;
      continue;
    }
    StEntry *e = &f->t[f->n];
    spans[f->n].idx = f->n;
    f->n++; /* counted before parsing so st_close frees a partial entry */
    if (parse_entry(f, key, h->items[i], e, &spans[f->n - 1].b, &spans[f->n - 1].e, err, errlen))
      goto done;
  }
  size_t data0 = 8 + hlen;
  if (check_cover(f, spans, f->n, f->size - data0, err, errlen)) goto done;
  for (int i = 0; i < f->n; i++) f->t[spans[i].idx].data = (const uint8_t *)f->map + data0 + spans[i].b;
  rc = 0;
done:
  free(spans);
  json_free(h);
  return rc;
}

StFile *st_open(const char *path, char *err, size_t errlen) {
  StFile *f = xcalloc(1, sizeof *f);
  f->path = xstrdup(path);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    goto fail;
  }
  struct stat st;
  if (fstat(fd, &st)) {
    snprintf(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
    close(fd);
    goto fail;
  }
  f->size = (size_t)st.st_size;
  if (f->size < 8) {
    snprintf(err, errlen, "%s: not a safetensors file (%zu bytes, shorter than the 8-byte header length)",
             path, f->size);
    close(fd);
    goto fail;
  }
  f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (f->map == MAP_FAILED) {
    f->map = NULL;
    snprintf(err, errlen, "%s: cannot map: %s", path, strerror(errno));
    goto fail;
  }
  const uint8_t *b = f->map;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | b[i];
  if (hlen > ST_MAX_HEADER || hlen > f->size - 8) {
    snprintf(err, errlen, "%s: header length %llu exceeds the file size (%zu bytes) or the 100 MB limit",
             path, (unsigned long long)hlen, f->size);
    goto fail;
  }
  if (parse_header(f, (const char *)b + 8, (size_t)hlen, err, errlen)) goto fail;
  return f;
fail:
  st_close(f);
  return NULL;
}
