/* json.c: recursive-descent JSON parser and a compact/pretty writer. */
#include "core/json.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

/* ---------------------------------------------------------------- reader */

typedef struct {
  const char *s, *end, *line_start;
  int line;
  char *err;
  size_t errlen;
  int failed;
} Parser;

static void perr(Parser *p, const char *what) {
  if (p->failed) return;
  p->failed = 1;
  snprintf(p->err, p->errlen, "line %d col %d: %s", p->line, (int)(p->s - p->line_start) + 1,
           what);
}

static void skip_ws(Parser *p) {
  while (p->s < p->end) {
    char c = *p->s;
    if (c == '\n') {
      p->line++;
      p->line_start = p->s + 1;
    } else if (c != ' ' && c != '\t' && c != '\r') {
      return;
    }
    p->s++;
  }
}

static Json *new_node(JsonType t) {
  Json *j = xcalloc(1, sizeof *j);
  j->type = t;
  return j;
}

static void push_child(Json *j, char *key, Json *child) {
  if ((j->n & (j->n - 1)) == 0) { /* grow at powers of two */
    int cap = j->n ? j->n * 2 : 4;
    j->items = xrealloc(j->items, (size_t)cap * sizeof *j->items);
    if (j->type == JSON_OBJ) j->keys = xrealloc(j->keys, (size_t)cap * sizeof *j->keys);
  }
  if (j->type == JSON_OBJ) j->keys[j->n] = key;
  j->items[j->n++] = child;
}

static void put_utf8(char **o, unsigned cp) {
  unsigned char *u = (unsigned char *)*o;
  if (cp < 0x80) {
    *u++ = (unsigned char)cp;
  } else if (cp < 0x800) {
    *u++ = (unsigned char)(0xC0 | (cp >> 6));
    *u++ = (unsigned char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *u++ = (unsigned char)(0xE0 | (cp >> 12));
    *u++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    *u++ = (unsigned char)(0x80 | (cp & 0x3F));
  } else {
    *u++ = (unsigned char)(0xF0 | (cp >> 18));
    *u++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    *u++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    *u++ = (unsigned char)(0x80 | (cp & 0x3F));
  }
  *o = (char *)u;
}

static int hex4(Parser *p, unsigned *out) {
  if (p->end - p->s < 4) return perr(p, "truncated \\u escape"), -1;
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p->s[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
    else return perr(p, "bad hex digit in \\u escape"), -1;
  }
  p->s += 4;
  *out = v;
  return 0;
}

/* Parses a string at p->s (after the opening quote). */
static char *parse_string(Parser *p, size_t *len_out) {
  const char *start = p->s;
  /* Output is never longer than the input text. */
  const char *q = start;
  while (q < p->end && *q != '"') q += (*q == '\\' && q + 1 < p->end) ? 2 : 1;
  if (q >= p->end) return perr(p, "unterminated string"), NULL;
  char *out = xmalloc((size_t)(q - start) + 1), *o = out;
  while (p->s < p->end && *p->s != '"') {
    unsigned char c = (unsigned char)*p->s;
    if (c < 0x20) { perr(p, "control character in string"); free(out); return NULL; }
    if (c != '\\') { *o++ = (char)c; p->s++; continue; }
    p->s++;
    char e = *p->s++;
    switch (e) {
      case '"': *o++ = '"'; break;
      case '\\': *o++ = '\\'; break;
      case '/': *o++ = '/'; break;
      case 'b': *o++ = '\b'; break;
      case 'f': *o++ = '\f'; break;
      case 'n': *o++ = '\n'; break;
      case 'r': *o++ = '\r'; break;
      case 't': *o++ = '\t'; break;
      case 'u': {
        unsigned cp;
        if (hex4(p, &cp)) { free(out); return NULL; }
        if (cp >= 0xD800 && cp < 0xDC00 && p->end - p->s >= 6 && p->s[0] == '\\' && p->s[1] == 'u') {
          unsigned lo;
          p->s += 2;
          if (hex4(p, &lo)) { free(out); return NULL; }
          if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          else { put_utf8(&o, 0xFFFD); cp = lo; }
        }
        if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD; /* lone surrogate */
        put_utf8(&o, cp);
        break;
      }
      default: perr(p, "bad escape in string"); free(out); return NULL;
    }
  }
  p->s++; /* closing quote */
  *o = 0;
  *len_out = (size_t)(o - out);
  return out;
}

static Json *parse_value(Parser *p, int depth);

static Json *parse_number(Parser *p) {
  const char *start = p->s;
  int is_int = 1;
  if (p->s < p->end && *p->s == '-') p->s++;
  if (p->s >= p->end || !(*p->s >= '0' && *p->s <= '9')) return perr(p, "expected a value"), NULL;
  while (p->s < p->end) {
    char c = *p->s;
    if (c >= '0' && c <= '9') { p->s++; continue; }
    if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { is_int = 0; p->s++; continue; }
    break;
  }
  char buf[128];
  size_t n = (size_t)(p->s - start);
  if (n >= sizeof buf) return perr(p, "number too long"), NULL;
  memcpy(buf, start, n);
  buf[n] = 0;
  Json *j = new_node(JSON_NUM);
  char *endp;
  j->num = strtod(buf, &endp);
  if (*endp) { free(j); return perr(p, "malformed number"), NULL; }
  if (is_int) {
    errno = 0;
    long long v = strtoll(buf, &endp, 10);
    if (!errno && !*endp) { j->is_int = true; j->i = v; }
  }
  return j;
}

static int match_word(Parser *p, const char *w) {
  size_t n = strlen(w);
  if ((size_t)(p->end - p->s) < n || memcmp(p->s, w, n)) return 0;
  p->s += n;
  return 1;
}

static Json *parse_value(Parser *p, int depth) {
  if (depth > 200) return perr(p, "nesting too deep"), NULL;
  skip_ws(p);
  if (p->s >= p->end) return perr(p, "unexpected end of input"), NULL;
  char c = *p->s;
  if (c == '{' || c == '[') {
    int obj = c == '{';
    Json *j = new_node(obj ? JSON_OBJ : JSON_ARR);
    p->s++;
    skip_ws(p);
    if (p->s < p->end && *p->s == (obj ? '}' : ']')) { p->s++; return j; }
    for (;;) {
      char *key = NULL;
      if (obj) {
        skip_ws(p);
        if (p->s >= p->end || *p->s != '"') { perr(p, "expected a string key"); json_free(j); return NULL; }
        p->s++;
        size_t kl;
        key = parse_string(p, &kl);
        if (!key) { json_free(j); return NULL; }
        skip_ws(p);
        if (p->s >= p->end || *p->s != ':') { perr(p, "expected ':'"); free(key); json_free(j); return NULL; }
        p->s++;
      }
      Json *v = parse_value(p, depth + 1);
      if (!v) { free(key); json_free(j); return NULL; }
      push_child(j, key, v);
      skip_ws(p);
      if (p->s < p->end && *p->s == ',') { p->s++; continue; }
      if (p->s < p->end && *p->s == (obj ? '}' : ']')) { p->s++; return j; }
      perr(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
      json_free(j);
      return NULL;
    }
  }
  if (c == '"') {
    p->s++;
    size_t len;
    char *s = parse_string(p, &len);
    if (!s) return NULL;
    Json *j = new_node(JSON_STR);
    j->str = s;
    j->str_len = len;
    return j;
  }
  if (match_word(p, "true")) { Json *j = new_node(JSON_BOOL); j->b = true; return j; }
  if (match_word(p, "false")) return new_node(JSON_BOOL);
  if (match_word(p, "null")) return new_node(JSON_NULL);
  return parse_number(p);
}

Json *json_parse(const char *text, size_t len, char *err, size_t errlen) {
  Parser p = {text, text + len, text, 1, err, errlen, 0};
  Json *j = parse_value(&p, 0);
  if (!j) return NULL;
  skip_ws(&p);
  if (p.s != p.end) {
    perr(&p, "trailing characters after the document");
    json_free(j);
    return NULL;
  }
  return j;
}

Json *json_parse_file(const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = xmalloc((size_t)(n > 0 ? n : 0) + 1);
  size_t got = fread(buf, 1, (size_t)(n > 0 ? n : 0), f);
  fclose(f);
  char perr_msg[256];
  Json *j = json_parse(buf, got, perr_msg, sizeof perr_msg);
  free(buf);
  if (!j) snprintf(err, errlen, "%s: invalid JSON: %s", path, perr_msg);
  return j;
}

void json_free(Json *j) {
  if (!j) return;
  for (int i = 0; i < j->n; i++) {
    json_free(j->items[i]);
    if (j->keys) free(j->keys[i]);
  }
  free(j->items);
  free(j->keys);
  free(j->str);
  free(j);
}

const Json *json_get(const Json *obj, const char *key) {
  if (!obj || obj->type != JSON_OBJ) return NULL;
  for (int i = 0; i < obj->n; i++)
    if (!strcmp(obj->keys[i], key)) return obj->items[i];
  return NULL;
}

const char *json_get_str(const Json *obj, const char *key, const char *def) {
  const Json *v = json_get(obj, key);
  return v && v->type == JSON_STR ? v->str : def;
}

int64_t json_get_int(const Json *obj, const char *key, int64_t def) {
  const Json *v = json_get(obj, key);
  if (!v || v->type != JSON_NUM) return def;
  return v->is_int ? v->i : (int64_t)v->num;
}

double json_get_num(const Json *obj, const char *key, double def) {
  const Json *v = json_get(obj, key);
  return v && v->type == JSON_NUM ? v->num : def;
}

bool json_get_bool(const Json *obj, const char *key, bool def) {
  const Json *v = json_get(obj, key);
  return v && v->type == JSON_BOOL ? v->b : def;
}

/* ---------------------------------------------------------------- writer */

static void w_reserve(JsonW *w, size_t extra) {
  if (w->len + extra + 1 <= w->cap) return;
  size_t cap = w->cap ? w->cap : 256;
  while (cap < w->len + extra + 1) cap *= 2;
  w->buf = xrealloc(w->buf, cap);
  w->cap = cap;
}

static void w_put(JsonW *w, const char *s, size_t n) {
  w_reserve(w, n);
  memcpy(w->buf + w->len, s, n);
  w->len += n;
  w->buf[w->len] = 0;
}

static void w_puts(JsonW *w, const char *s) { w_put(w, s, strlen(s)); }

static void w_newline(JsonW *w) {
  if (!w->indent) return;
  w_put(w, "\n", 1);
  for (int i = 0; i < w->depth * w->indent; i++) w_put(w, " ", 1);
}

void json_quote(JsonW *w, const char *s, size_t len) {
  w_put(w, "\"", 1);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[8];
    switch (c) {
      case '"': w_put(w, "\\\"", 2); break;
      case '\\': w_put(w, "\\\\", 2); break;
      case '\n': w_put(w, "\\n", 2); break;
      case '\r': w_put(w, "\\r", 2); break;
      case '\t': w_put(w, "\\t", 2); break;
      default:
        if (c < 0x20) {
          snprintf(esc, sizeof esc, "\\u%04x", c);
          w_put(w, esc, 6);
        } else {
          w_put(w, (const char *)&s[i], 1);
        }
    }
  }
  w_put(w, "\"", 1);
}

/* Separator and key before a member or element. */
static void w_member(JsonW *w, const char *key) {
  if (w->depth > 0) {
    if (!w->first[w->depth]) w_put(w, ",", 1);
    w->first[w->depth] = false;
    w_newline(w);
  }
  if (key) {
    json_quote(w, key, strlen(key));
    w_puts(w, w->indent ? ": " : ":");
  }
}

void jw_init(JsonW *w, int indent) {
  memset(w, 0, sizeof *w);
  w->indent = indent;
  w_reserve(w, 64);
}

static void w_open(JsonW *w, const char *key, const char *br) {
  w_member(w, key);
  w_puts(w, br);
  NMOE_ASSERT(w->depth < 255);
  w->first[++w->depth] = true;
}

static void w_close(JsonW *w, const char *br) {
  int empty = w->first[w->depth];
  w->depth--;
  if (!empty) w_newline(w);
  w_puts(w, br);
}

void jw_obj(JsonW *w, const char *key) { w_open(w, key, "{"); }
void jw_obj_end(JsonW *w) { w_close(w, "}"); }
void jw_arr(JsonW *w, const char *key) { w_open(w, key, "["); }
void jw_arr_end(JsonW *w) { w_close(w, "]"); }

void jw_str(JsonW *w, const char *key, const char *s) {
  w_member(w, key);
  if (s) json_quote(w, s, strlen(s));
  else w_puts(w, "null");
}

void jw_int(JsonW *w, const char *key, int64_t v) {
  char b[32];
  snprintf(b, sizeof b, "%lld", (long long)v);
  w_member(w, key);
  w_puts(w, b);
}

void jw_uint(JsonW *w, const char *key, uint64_t v) {
  char b[32];
  snprintf(b, sizeof b, "%llu", (unsigned long long)v);
  w_member(w, key);
  w_puts(w, b);
}

void jw_num(JsonW *w, const char *key, double v) {
  char b[40];
  w_member(w, key);
  if (!isfinite(v)) { w_puts(w, "null"); return; }
  snprintf(b, sizeof b, "%.17g", v);
  w_puts(w, b);
}

void jw_bool(JsonW *w, const char *key, bool v) {
  w_member(w, key);
  w_puts(w, v ? "true" : "false");
}

void jw_null(JsonW *w, const char *key) {
  w_member(w, key);
  w_puts(w, "null");
}

void jw_raw(JsonW *w, const char *key, const char *json) {
  w_member(w, key);
  w_puts(w, json);
}

char *jw_finish(JsonW *w) {
  char *out = w->buf;
  memset(w, 0, sizeof *w);
  return out;
}

static void dump_into(JsonW *w, const char *key, const Json *j) {
  switch (j->type) {
    case JSON_NULL: jw_null(w, key); break;
    case JSON_BOOL: jw_bool(w, key, j->b); break;
    case JSON_NUM:
      if (j->is_int) jw_int(w, key, j->i);
      else jw_num(w, key, j->num);
      break;
    case JSON_STR:
      w_member(w, key);
      json_quote(w, j->str, j->str_len);
      break;
    case JSON_ARR:
    case JSON_OBJ:
      if (j->type == JSON_OBJ) jw_obj(w, key);
      else jw_arr(w, key);
      for (int i = 0; i < j->n; i++) dump_into(w, j->type == JSON_OBJ ? j->keys[i] : NULL, j->items[i]);
      if (j->type == JSON_OBJ) jw_obj_end(w);
      else jw_arr_end(w);
      break;
  }
}

char *json_dump(const Json *j) {
  JsonW w;
  jw_init(&w, 0);
  dump_into(&w, NULL, j);
  return jw_finish(&w);
}
