/* npy.c: NPY v1/v2/v3 header parsing, v1.0 header writing (byte-identical to
 * np.save for C-order arrays), and read-only mmap of uint32 token shards. */
#include "data/npy.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const char NPY_MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};
#define NPY_ALIGN 64
#define NPY_GROWTH_DIGITS 21 /* numpy leaves room for the first axis to grow to 21 digits */

/* Cursor over the header's Python dict literal. */
typedef struct HdrCur {
  const char *p, *end;
} HdrCur;

static void cur_ws(HdrCur *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int cur_eat(HdrCur *c, char ch) {
  cur_ws(c);
  if (c->p < c->end && *c->p == ch) {
    c->p++;
    return 1;
  }
  return 0;
}

/* A quoted Python string ('..' or ".."), copied into out (truncated to outlen-1). */
static int cur_string(HdrCur *c, char *out, size_t outlen) {
  cur_ws(c);
  if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return -1;
  char q = *c->p++;
  size_t n = 0;
  while (c->p < c->end && *c->p != q) {
    if (n + 1 < outlen) out[n++] = *c->p;
    c->p++;
  }
  if (c->p >= c->end) return -1;
  c->p++;
  out[n] = 0;
  return 0;
}

static int cur_word(HdrCur *c, const char *w) {
  cur_ws(c);
  size_t n = strlen(w);
  if ((size_t)(c->end - c->p) >= n && memcmp(c->p, w, n) == 0) {
    c->p += n;
    return 1;
  }
  return 0;
}

/* A shape tuple "(a, b,)" or "()": at most 4 non-negative dims. */
static int cur_shape(HdrCur *c, NpyInfo *out) {
  if (!cur_eat(c, '(')) return -1;
  out->ndim = 0;
  for (;;) {
    if (cur_eat(c, ')')) return 0;
    cur_ws(c);
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;
    int64_t v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
      if (v > (INT64_MAX - 9) / 10) return -1;
      v = v * 10 + (*c->p++ - '0');
    }
    if (c->p < c->end && *c->p == 'L') c->p++; /* Python 2 longs */
    if (out->ndim >= 4) return -1;
    out->shape[out->ndim++] = v;
    if (!cur_eat(c, ',')) {
      if (!cur_eat(c, ')')) return -1;
      return 0;
    }
  }
}

int npy_parse_header(const void *buf, size_t len, const char *path, NpyInfo *out, char *err,
                     size_t errlen) {
  const unsigned char *b = buf;
  memset(out, 0, sizeof *out);
  if (len < 10) {
    snprintf(err, errlen, "%s: truncated npy file (%zu bytes, no complete header)", path, len);
    return -1;
  }
  if (memcmp(b, NPY_MAGIC, 6) != 0) {
    snprintf(err, errlen, "%s: not an npy file (bad magic)", path);
    return -1;
  }
  int major = b[6];
  size_t hlen, pre;
  if (major == 1) {
    hlen = (size_t)b[8] | (size_t)b[9] << 8;
    pre = 10;
  } else if (major == 2 || major == 3) {
    if (len < 12) {
      snprintf(err, errlen, "%s: truncated npy header", path);
      return -1;
    }
    hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
    pre = 12;
  } else {
    snprintf(err, errlen, "%s: unsupported npy format version %d.%d", path, major, b[7]);
    return -1;
  }
  if (hlen > len - pre) {
    snprintf(err, errlen, "%s: truncated npy header (needs %zu bytes, file has %zu)", path,
             pre + hlen, len);
    return -1;
  }
  HdrCur c = {(const char *)b + pre, (const char *)b + pre + hlen};
  int have_descr = 0, have_order = 0, have_shape = 0;
  if (!cur_eat(&c, '{')) goto bad;
  for (;;) {
    if (cur_eat(&c, '}')) break;
    char key[32];
    if (cur_string(&c, key, sizeof key) || !cur_eat(&c, ':')) goto bad;
    if (strcmp(key, "descr") == 0) {
      if (cur_string(&c, out->descr, sizeof out->descr)) {
        snprintf(err, errlen, "%s: npy dtype is not a simple type (structured arrays unsupported)",
                 path);
        return -1;
      }
      have_descr = 1;
    } else if (strcmp(key, "fortran_order") == 0) {
      if (cur_word(&c, "True")) out->fortran_order = 1;
      else if (cur_word(&c, "False")) out->fortran_order = 0;
      else goto bad;
      have_order = 1;
    } else if (strcmp(key, "shape") == 0) {
      if (cur_shape(&c, out)) goto bad;
      have_shape = 1;
    } else {
      goto bad;
    }
    if (!cur_eat(&c, ',')) {
      if (!cur_eat(&c, '}')) goto bad;
      break;
    }
  }
  if (!have_descr || !have_order || !have_shape) {
    snprintf(err, errlen, "%s: npy header lacks %s", path,
             !have_descr ? "'descr'" : !have_order ? "'fortran_order'" : "'shape'");
    return -1;
  }
  out->data_offset = pre + hlen;
  return 0;
bad:
  snprintf(err, errlen, "%s: malformed npy header near byte %zu", path,
           (size_t)(c.p - (const char *)b));
  return -1;
}

int npy_write_header(FILE *f, const char *descr, const int64_t *shape, int ndim, char *err,
                     size_t errlen) {
  if (ndim < 0 || ndim > 4) {
    snprintf(err, errlen, "npy: unsupported ndim %d", ndim);
    return -1;
  }
  char dict[256];
  int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
  for (int i = 0; i < ndim; i++)
    n += snprintf(dict + n, sizeof dict - n, i ? ", %" PRId64 : "%" PRId64, shape[i]);
  n += snprintf(dict + n, sizeof dict - n, ndim == 1 ? ",), }" : "), }");
  if (ndim > 0) { /* numpy's growth room: keeps the header size independent of shape[0] */
    char d0[32];
    int w = snprintf(d0, sizeof d0, "%" PRId64, shape[0]);
    for (int i = w; i < NPY_GROWTH_DIGITS && n + 1 < (int)sizeof dict; i++) dict[n++] = ' ';
    dict[n] = 0;
  }
  /* magic(6) + version(2) + len(2) + dict + pad + '\n' is a multiple of 64 */
  size_t total = 10 + (size_t)n + 1;
  size_t pad = (NPY_ALIGN - total % NPY_ALIGN) % NPY_ALIGN;
  size_t hlen = (size_t)n + pad + 1;
  unsigned char pre[10];
  memcpy(pre, NPY_MAGIC, 6);
  pre[6] = 1;
  pre[7] = 0;
  pre[8] = (unsigned char)(hlen & 0xff);
  pre[9] = (unsigned char)(hlen >> 8);
  int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)n, f) == (size_t)n;
  for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
  if (ok) ok = fputc('\n', f) != EOF;
  if (!ok) {
    snprintf(err, errlen, "npy: cannot write header: %s", strerror(errno));
    return -1;
  }
  return 0;
}

static int descr_is_u4(const char *d) {
  if (strcmp(d, "<u4") == 0 || strcmp(d, "|u4") == 0) return 1;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (strcmp(d, "=u4") == 0) return 1;
#endif
  return 0;
}

int shard_map(const char *path, TokenShard *s, char *err, size_t errlen) {
  memset(s, 0, sizeof *s);
  snprintf(s->path, sizeof s->path, "%s", path);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    snprintf(err, errlen, "%s: cannot open shard: %s", path, strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(fd, &st)) {
    snprintf(err, errlen, "%s: cannot stat shard: %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "%s: not a regular file", path);
    close(fd);
    return -1;
  }
  size_t size = (size_t)st.st_size;
  if (size == 0) {
    snprintf(err, errlen, "%s: empty file (truncated npy shard)", path);
    close(fd);
    return -1;
  }
  void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    snprintf(err, errlen, "%s: mmap failed: %s", path, strerror(errno));
    return -1;
  }
  NpyInfo info;
  if (npy_parse_header(map, size, path, &info, err, errlen)) goto fail;
  if (!descr_is_u4(info.descr)) {
    snprintf(err, errlen, "%s: token shard must have dtype uint32 ('<u4'), found '%s'", path,
             info.descr);
    goto fail;
  }
  if (info.fortran_order) {
    snprintf(err, errlen, "%s: token shard is Fortran-ordered; expected C order", path);
    goto fail;
  }
  if (info.ndim != 1) {
    snprintf(err, errlen, "%s: token shard must be 1-D, found %d dimensions", path, info.ndim);
    goto fail;
  }
  int64_t n = info.shape[0];
  size_t have = size - info.data_offset;
  if ((uint64_t)n > (SIZE_MAX - info.data_offset) / 4 || (size_t)n * 4 != have) {
    snprintf(err, errlen,
             "%s: file size %zu does not match header shape (%" PRId64
             " tokens need %zu bytes of data, file has %zu)%s",
             path, size, n, (size_t)n * 4, have, (size_t)n * 4 > have ? ": truncated" : "");
    goto fail;
  }
  if (info.data_offset % 4) {
    snprintf(err, errlen, "%s: npy data offset %zu is not 4-byte aligned", path, info.data_offset);
    goto fail;
  }
  s->map = map;
  s->map_len = size;
  s->tokens = (const uint32_t *)((const char *)map + info.data_offset);
  s->n = n;
  return 0;
fail:
  munmap(map, size);
  return -1;
}

void shard_unmap(TokenShard *s) {
  if (s->map) munmap(s->map, s->map_len);
  s->map = NULL;
  s->tokens = NULL;
  s->n = 0;
  s->map_len = 0;
}
