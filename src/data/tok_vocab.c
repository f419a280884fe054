/* tok_vocab.c: loads a tiktoken npm encoder file.
 *
 * The file is one JSON object {"pat_str": "...", "special_tokens": {"<|x|>": id},
 * "bpe_ranks": "...", "explicit_n_vocab": n}. bpe_ranks holds either classic
 * .tiktoken lines ("<base64 token> <rank>\n") or the package's compact lines
 * ("! <first rank> <base64> <base64> ...", consecutive ranks); both are read.
 * Only this fixed shape is parsed (strings, integers, one nested object); other
 * keys are skipped. */
#include "data/tok_vocab.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

typedef struct {
  const char *p, *end;
} JsonCursor;

static void json_ws(JsonCursor *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

static int json_expect(JsonCursor *j, char c) {
  json_ws(j);
  if (j->p >= j->end || *j->p != c) return -1;
  j->p++;
  return 0;
}

static int hex4(const char *p, unsigned *v) {
  *v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
                 : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                 : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16u;
    if (d > 15) return -1;
    *v = *v << 4 | d;
  }
  return 0;
}

/* Decodes a JSON string into a malloc'd NUL-terminated UTF-8 buffer (or only
 * skips it when out is NULL). */
static int json_string(JsonCursor *j, char **out, size_t *out_len) {
  if (json_expect(j, '"')) return -1;
  const char *s = j->p;
  while (j->p < j->end && *j->p != '"') j->p += *j->p == '\\' ? 2 : 1;
  if (j->p >= j->end) return -1;
  const char *e = j->p++;
  if (!out) return 0;
  char *o = xmalloc((size_t)(e - s) + 1);
  size_t n = 0;
  while (s < e) {
    if (*s != '\\') {
      o[n++] = *s++;
      continue;
    }
    char c = s[1];
    s += 2;
    unsigned u, lo;
    switch (c) {
    case 'n': o[n++] = '\n'; break;
    case 't': o[n++] = '\t'; break;
    case 'r': o[n++] = '\r'; break;
    case 'b': o[n++] = '\b'; break;
    case 'f': o[n++] = '\f'; break;
    case 'u':
      if (e - s < 4 || hex4(s, &u)) goto bad;
      s += 4;
      if (u >= 0xD800 && u < 0xDC00 && e - s >= 6 && s[0] == '\\' && s[1] == 'u' &&
          !hex4(s + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
        u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
        s += 6;
      }
      if (u >= 0xD800 && u < 0xE000) u = 0xFFFD; /* lone surrogate */
      if (u < 0x80) o[n++] = (char)u;
      else if (u < 0x800) o[n++] = (char)(0xC0 | u >> 6), o[n++] = (char)(0x80 | (u & 63));
      else if (u < 0x10000)
        o[n++] = (char)(0xE0 | u >> 12), o[n++] = (char)(0x80 | (u >> 6 & 63)),
        o[n++] = (char)(0x80 | (u & 63));
      else
        o[n++] = (char)(0xF0 | u >> 18), o[n++] = (char)(0x80 | (u >> 12 & 63)),
        o[n++] = (char)(0x80 | (u >> 6 & 63)), o[n++] = (char)(0x80 | (u & 63));
      break;
    default: o[n++] = c; /* \" \\ \/ */
    }
  }
  o[n] = 0;
  *out = o;
  if (out_len) *out_len = n;
  return 0;
bad:
  free(o);
  return -1;
}

static int json_int(JsonCursor *j, int64_t *v) {
  json_ws(j);
  char *e;
  errno = 0;
  long long x = strtoll(j->p, &e, 10);
  if (e == j->p || errno || e > j->end) return -1;
  j->p = e;
  *v = x;
  return 0;
}

/* Skips any value (string, number, literal, object, array). */
static int json_skip(JsonCursor *j) {
  json_ws(j);
  if (j->p >= j->end) return -1;
  if (*j->p == '"') return json_string(j, NULL, NULL);
  if (*j->p == '{' || *j->p == '[') {
    int depth = 0;
    while (j->p < j->end) {
      char c = *j->p;
      if (c == '"') {
        if (json_string(j, NULL, NULL)) return -1;
        continue;
      }
      j->p++;
      if (c == '{' || c == '[') depth++;
      else if ((c == '}' || c == ']') && --depth == 0) return 0;
    }
    return -1;
  }
  while (j->p < j->end && !strchr(",}] \t\r\n", *j->p)) j->p++;
  return 0;
}

/* Reads {"text": id, ...} into v->specials. */
static int parse_specials(JsonCursor *j, TokVocab *v) {
  if (json_expect(j, '{')) return -1;
  json_ws(j);
  if (j->p < j->end && *j->p == '}') return j->p++, 0;
  for (;;) {
    char *text;
    int64_t id;
    if (json_string(j, &text, NULL)) return -1;
    if (json_expect(j, ':') || json_int(j, &id) || id < 0 || id > UINT32_MAX - 1) {
      free(text);
      return -1;
    }
    v->specials = xrealloc(v->specials, (v->n_specials + 1) * sizeof *v->specials);
    v->specials[v->n_specials++] = (TokSpecial){text, (uint32_t)id};
    json_ws(j);
    if (j->p < j->end && *j->p == ',') {
      j->p++;
      continue;
    }
    return json_expect(j, '}');
  }
}

static int b64_val(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;
  if (c == '/' || c == '_') return 63;
  return -1;
}

/* Decodes base64 s[0..n) (padding optional) to out; returns bytes or -1. */
static long b64_decode(const char *s, size_t n, uint8_t *out) {
  while (n && s[n - 1] == '=') n--;
  uint32_t acc = 0;
  int bits = 0;
  long o = 0;
  for (size_t i = 0; i < n; i++) {
    int v = b64_val((unsigned char)s[i]);
    if (v < 0) return -1;
    acc = acc << 6 | (uint32_t)v, bits += 6;
    if (bits >= 8) bits -= 8, out[o++] = (uint8_t)(acc >> bits);
  }
  return o;
}

typedef struct {
  uint32_t rank, off, len;
} RawTok;

static int by_rank(const void *a, const void *b) {
  uint32_t x = ((const RawTok *)a)->rank, y = ((const RawTok *)b)->rank;
  return x < y ? -1 : x > y;
}

/* Parses the bpe_ranks text into v->ranks. */
static int parse_ranks(const char *s, size_t n, TokVocab *v, char *err, size_t errlen) {
  /* Decoded bytes are never longer than their base64. */
  uint8_t *blob = xmalloc(n + 1);
  size_t blob_len = 0, nt = 0, cap = 1024;
  RawTok *toks = xmalloc(cap * sizeof *toks);
  const char *p = s, *end = s + n;
  int rc = -1;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    int compact = p < eol && *p == '!';
    int64_t next_rank = -1;
    const char *q = p + compact;
    for (int field = 0;; field++) {
      while (q < eol && *q == ' ') q++;
      if (q >= eol) break;
      const char *w = q;
      while (q < eol && *q != ' ') q++;
      size_t wn = (size_t)(q - w);
      int is_rank = compact ? field == 0 : field == 1;
      if (is_rank) {
        char num[24];
        char *ne;
        if (wn >= sizeof num) goto bad;
        memcpy(num, w, wn), num[wn] = 0;
        long long r = strtoll(num, &ne, 10);
        if (*ne || r < 0 || r >= UINT32_MAX - 1) goto bad;
        if (compact) next_rank = r;
        else toks[nt - 1].rank = (uint32_t)r;
        continue;
      }
      if (!compact && field > 1) goto bad;
      if (compact && next_rank < 0) goto bad;
      long len = b64_decode(w, wn, blob + blob_len);
      if (len <= 0) goto bad;
      if (nt == cap) toks = xrealloc(toks, (cap *= 2) * sizeof *toks);
      toks[nt++] = (RawTok){compact ? (uint32_t)next_rank++ : UINT32_MAX, (uint32_t)blob_len,
                            (uint32_t)len};
      blob_len += (size_t)len;
      if (compact && next_rank >= UINT32_MAX - 1) goto bad;
    }
    p = eol + 1;
  }
  if (!nt) {
    snprintf(err, errlen, "bpe_ranks is empty");
    goto out;
  }
  size_t sorted = 1;
  while (sorted < nt && toks[sorted - 1].rank < toks[sorted].rank) sorted++;
  if (sorted < nt) qsort(toks, nt, sizeof *toks, by_rank);
  if (toks[nt - 1].rank == UINT32_MAX) goto bad; /* a classic line without a rank */
  for (size_t i = 1; i < nt; i++)
    if (toks[i].rank == toks[i - 1].rank) {
      snprintf(err, errlen, "bpe_ranks lists rank %u twice", toks[i].rank);
      goto out;
    }
  /* Lay the tokens out by rank; ranks with no token get length 0. */
  uint32_t n_ranks = toks[nt - 1].rank + 1;
  uint8_t *bytes = xmalloc(blob_len + 1);
  uint32_t *off = xmalloc(((size_t)n_ranks + 1) * sizeof *off);
  size_t t = 0, o = 0;
  for (uint32_t r = 0; r < n_ranks; r++) {
    off[r] = (uint32_t)o;
    if (toks[t].rank == r) {
      memcpy(bytes + o, blob + toks[t].off, toks[t].len);
      o += toks[t++].len;
    }
  }
  off[n_ranks] = (uint32_t)o;
  rc = rank_table_build(&v->ranks, bytes, off, n_ranks, err, errlen);
  goto out;
bad:
  snprintf(err, errlen, "bpe_ranks: malformed line near byte %zu", (size_t)(p - s));
out:
  free(blob);
  free(toks);
  return rc;
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return NULL;
  }
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (cap - n < 65536) buf = xrealloc(buf, cap = cap ? cap * 2 : 1 << 20);
    size_t k = fread(buf + n, 1, cap - n, f);
    n += k;
    if (k == 0) break;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    snprintf(err, errlen, "cannot read %s", path);
    free(buf);
    return NULL;
  }
  buf[n] = 0; /* the loop always leaves room */
  *len = n;
  return buf;
}

int tok_vocab_load(const char *path, TokVocab *v, char *err, size_t errlen) {
  memset(v, 0, sizeof *v);
  v->explicit_n_vocab = -1;
  size_t n;
  char *buf = read_file(path, &n, err, errlen);
  if (!buf) return -1;
  JsonCursor j = {buf, buf + n};
  char *ranks = NULL, msg[200] = "not a JSON object";
  size_t ranks_len = 0;
  int rc = -1;
  if (json_expect(&j, '{')) goto bad;
  for (;;) {
    char *key;
    if (json_string(&j, &key, NULL) || json_expect(&j, ':')) goto bad;
    int r;
    if (!strcmp(key, "pat_str")) r = json_string(&j, &v->pat_str, NULL);
    else if (!strcmp(key, "special_tokens")) r = parse_specials(&j, v);
    else if (!strcmp(key, "bpe_ranks")) r = json_string(&j, &ranks, &ranks_len);
    else if (!strcmp(key, "explicit_n_vocab")) r = json_int(&j, &v->explicit_n_vocab);
    else r = json_skip(&j);
    snprintf(msg, sizeof msg, "bad value for \"%s\"", key);
    free(key);
    if (r) goto bad;
    json_ws(&j);
    if (j.p < j.end && *j.p == ',') {
      j.p++;
      continue;
    }
    if (json_expect(&j, '}')) goto bad;
    break;
  }
  if (!v->pat_str || !ranks) {
    snprintf(msg, sizeof msg, "missing \"%s\"", v->pat_str ? "bpe_ranks" : "pat_str");
    goto bad;
  }
  if (parse_ranks(ranks, ranks_len, v, msg, sizeof msg)) goto bad;
  rc = 0;
  goto out;
bad:
  snprintf(err, errlen, "%s: %s (reinstall with `make setup`)", path, msg);
  tok_vocab_free(v);
out:
  free(ranks);
  free(buf);
  return rc;
}

void tok_vocab_free(TokVocab *v) {
  free(v->pat_str);
  for (size_t i = 0; i < v->n_specials; i++) free(v->specials[i].text);
  free(v->specials);
  rank_table_free(&v->ranks);
  memset(v, 0, sizeof *v);
  v->explicit_n_vocab = -1;
}
