/* toml.c: strict TOML 1.0 parser (see toml.h).
 *
 * One pass over the text with a cursor that tracks line and column (columns
 * count characters, not bytes). The tree is built as it is read; every node is
 * a Node whose first member is the public TomlValue, so private bookkeeping
 * (how a table was defined, whether it is frozen) stays out of the API. Errors
 * propagate as -1 with the message already written; the caller frees the tree. */
#include "core/toml.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

/* How a table or array came to exist; TOML forbids redefining or extending some. */
enum {
  F_EXPLICIT = 1, /* table defined by a [header] */
  F_IMPLICIT = 2, /* table created as a parent of a [header]: may be defined once later */
  F_DOTTED = 4,   /* table created by a dotted key */
  F_FROZEN = 8,   /* inline table or static array: complete, cannot be extended */
  F_AOT = 16,     /* array created by [[header]] */
};

typedef struct Node {
  TomlValue v; /* first: a TomlValue * is a Node * */
  unsigned flags;
  int cap;
} Node;

typedef struct {
  const char *s;
  size_t n, pos;
  int line, col;
  const char *name;
  char *err;
  size_t errlen;
  int expand_env;
} Parser;

typedef struct {
  char **seg;
  int n, cap;
  int line, col;
} Key;

enum { MAX_DEPTH = 128 }; /* nesting of arrays / inline tables */

static int perr(Parser *p, int line, int col, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int perr(Parser *p, int line, int col, const char *fmt, ...) {
  if (!p->err || !p->errlen) return -1;
  int k = snprintf(p->err, p->errlen, "%s:%d:%d: ", p->name, line, col);
  if (k < 0 || (size_t)k >= p->errlen) return -1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(p->err + k, p->errlen - (size_t)k, fmt, ap);
  va_end(ap);
  return -1;
}

/* ---- tree ---- */

const char *toml_type_name(TomlType t) {
  switch (t) {
  case TOML_TABLE: return "table";
  case TOML_ARRAY: return "array";
  case TOML_STRING: return "string";
  case TOML_INT: return "integer";
  case TOML_FLOAT: return "float";
  case TOML_BOOL: return "boolean";
  }
  return "?";
}

static Node *node_new(TomlType t, int line, int col, unsigned flags) {
  Node *nd = xcalloc(1, sizeof *nd);
  nd->v.type = t;
  nd->v.line = line;
  nd->v.col = col;
  nd->flags = flags;
  return nd;
}

/* Appends child (and key, owned, for tables). */
static void node_push(Node *nd, char *key, Node *child) {
  if (nd->v.n == nd->cap) {
    nd->cap = nd->cap ? 2 * nd->cap : 4;
    nd->v.items = xrealloc(nd->v.items, (size_t)nd->cap * sizeof *nd->v.items);
    if (nd->v.type == TOML_TABLE) nd->v.keys = xrealloc(nd->v.keys, (size_t)nd->cap * sizeof *nd->v.keys);
  }
  if (nd->v.type == TOML_TABLE) nd->v.keys[nd->v.n] = key;
  nd->v.items[nd->v.n++] = &child->v;
}

static Node *table_find(Node *t, const char *key) {
  for (int i = 0; i < t->v.n; i++)
    if (strcmp(t->v.keys[i], key) == 0) return (Node *)t->v.items[i];
  return NULL;
}

void toml_free(TomlValue *v) {
  if (!v) return;
  if (v->type == TOML_STRING) free(v->u.s);
  for (int i = 0; i < v->n && v->items; i++) {
    toml_free(v->items[i]);
    if (v->keys) free(v->keys[i]);
  }
  free(v->items);
  free(v->keys);
  free((Node *)v);
}

const TomlValue *toml_get(const TomlValue *table, const char *key) {
  if (!table || table->type != TOML_TABLE) return NULL;
  for (int i = 0; i < table->n; i++)
    if (strcmp(table->keys[i], key) == 0) return table->items[i];
  return NULL;
}

const TomlValue *toml_get_path(const TomlValue *table, const char *dotted) {
  char seg[256];
  const char *s = dotted;
  const TomlValue *v = table;
  for (;;) {
    const char *dot = strchr(s, '.');
    size_t len = dot ? (size_t)(dot - s) : strlen(s);
    if (len >= sizeof seg) return NULL;
    memcpy(seg, s, len);
    seg[len] = 0;
    v = toml_get(v, seg);
    if (!v || !dot) return v;
    s = dot + 1;
  }
}

static void freeze(Node *nd) {
  nd->flags |= F_FROZEN;
  if (nd->v.type == TOML_TABLE || nd->v.type == TOML_ARRAY)
    for (int i = 0; i < nd->v.n; i++) freeze((Node *)nd->v.items[i]);
}

/* ---- growable byte buffer for string contents ---- */

typedef struct {
  char *b;
  size_t n, cap;
} Buf;

static void buf_put(Buf *b, const char *s, size_t n) {
  if (b->n + n + 1 > b->cap) {
    b->cap = (b->n + n + 1) * 2;
    b->b = xrealloc(b->b, b->cap);
  }
  memcpy(b->b + b->n, s, n);
  b->n += n;
  b->b[b->n] = 0;
}

static void buf_putc(Buf *b, char c) { buf_put(b, &c, 1); }

static void buf_utf8(Buf *b, uint32_t cp) {
  char o[4];
  size_t n;
  if (cp < 0x80) { o[0] = (char)cp; n = 1; }
  else if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
  else if (cp < 0x10000) {
    o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
  } else {
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
  }
  buf_put(b, o, n);
}

/* ---- cursor ---- */

static int peek(const Parser *p, size_t k) { return p->pos + k < p->n ? (unsigned char)p->s[p->pos + k] : -1; }

static void adv(Parser *p) {
  unsigned char c = (unsigned char)p->s[p->pos++];
  if (c == '\n') { p->line++; p->col = 1; }
  else if ((c & 0xC0) != 0x80) p->col++;
}

static void skip_ws(Parser *p) {
  while (peek(p, 0) == ' ' || peek(p, 0) == '\t') adv(p);
}

/* Printable description of the character at the cursor, for messages. */
static const char *found(const Parser *p, char *tmp, size_t n) {
  int c = peek(p, 0);
  if (c < 0) return "end of file";
  if (c == '\r' && peek(p, 1) != '\n') return "a bare carriage return";
  if (c == '\n' || c == '\r') return "end of line";
  if (c < 0x20 || c == 0x7F) { snprintf(tmp, n, "control character 0x%02X", c); return tmp; }
  if (c >= 0x80) return "a non-ASCII character";
  snprintf(tmp, n, "'%c'", c);
  return tmp;
}

#define EXPECTED(p, what)                                                                   \
  do {                                                                                      \
    char tmp_[32];                                                                          \
    return perr((p), (p)->line, (p)->col, "expected %s, found %s", (what), found((p), tmp_, sizeof tmp_)); \
  } while (0)

/* Consumes a newline (\n or \r\n) if one is at the cursor; 1 if consumed. */
static int eat_newline(Parser *p, int *bad) {
  if (peek(p, 0) == '\n') { adv(p); return 1; }
  if (peek(p, 0) == '\r') {
    if (peek(p, 1) == '\n') { adv(p); adv(p); return 1; }
    *bad = 1;
  }
  return 0;
}

static int is_ctrl_disallowed(int c) { return (c >= 0 && c < 0x20 && c != '\t') || c == 0x7F; }

/* '#' to end of line (not consuming the newline). */
static int skip_comment(Parser *p) {
  if (peek(p, 0) != '#') return 0;
  while (p->pos < p->n && peek(p, 0) != '\n') {
    int c = peek(p, 0);
    if (c == '\r' && peek(p, 1) == '\n') break;
    if (is_ctrl_disallowed(c)) return perr(p, p->line, p->col, "control character 0x%02X in comment", c);
    adv(p);
  }
  return 0;
}

/* After a key/value or header: whitespace, optional comment, then newline or EOF. */
static int end_of_line(Parser *p) {
  skip_ws(p);
  if (skip_comment(p)) return -1;
  if (p->pos >= p->n) return 0;
  int bad = 0;
  if (eat_newline(p, &bad)) return 0;
  EXPECTED(p, "end of line");
}

/* Whitespace, newlines and comments (inside arrays). */
static int skip_ws_nl(Parser *p) {
  for (;;) {
    skip_ws(p);
    if (skip_comment(p)) return -1;
    int bad = 0;
    if (!eat_newline(p, &bad)) return bad ? perr(p, p->line, p->col, "bare carriage return (expected \\r\\n)") : 0;
  }
}

/* ---- strings ---- */

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* One escape after the backslash (cursor on the letter). */
static int parse_escape(Parser *p, Buf *b) {
  int line = p->line, col = p->col - 1, c = peek(p, 0);
  const char *simple = "b\bt\tn\nf\fr\r\"\"\\\\";
  for (const char *s = simple; *s; s += 2)
    if (c == *s) { buf_putc(b, s[1]); adv(p); return 0; }
  if (c == 'u' || c == 'U') {
    int nd = c == 'u' ? 4 : 8;
    uint32_t cp = 0;
    adv(p);
    for (int i = 0; i < nd; i++) {
      int h = hexval(peek(p, 0));
      if (h < 0) return perr(p, line, col, "bad escape: \\%c needs %d hex digits", c, nd);
      cp = cp * 16 + (uint32_t)h;
      adv(p);
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return perr(p, line, col, "bad escape: U+%04X is not a Unicode scalar value", cp);
    if (cp == 0) return perr(p, line, col, "bad escape: NUL characters are not supported in strings");
    buf_utf8(b, cp);
    return 0;
  }
  char shown[2] = {c >= 0x20 && c < 0x7F ? (char)c : '?', 0};
  return perr(p, line, col, "bad escape '\\%s' (expected one of \\b \\t \\n \\f \\r \\\" \\\\ \\uXXXX \\UXXXXXXXX)",
              c < 0 ? "" : shown);
}

/* Basic/literal, single- or multi-line; cursor on the opening quote. Result in b. */
static int parse_string_into(Parser *p, Buf *b, int allow_multi) {
  int line = p->line, col = p->col;
  char q = (char)peek(p, 0);
  int literal = q == '\'';
  int multi = peek(p, 1) == q && peek(p, 2) == q;
  if (multi && !allow_multi) return perr(p, line, col, "multi-line strings are not allowed as keys");
  b->n = 0;
  buf_put(b, "", 0);
  for (int i = 0; i < (multi ? 3 : 1); i++) adv(p);
  if (multi) { /* a newline right after the opening delimiter is trimmed */
    int bad = 0;
    eat_newline(p, &bad);
  }
  for (;;) {
    int c = peek(p, 0);
    if (c < 0) return perr(p, line, col, "unterminated string (opened here)");
    if (c == q) {
      if (!multi) { adv(p); return 0; }
      if (peek(p, 1) == q && peek(p, 2) == q) {
        /* up to two extra quotes before the closing delimiter belong to the content */
        int extra = 0;
        while (extra < 2 && peek(p, 3 + extra) == q) extra++;
        for (int i = 0; i < extra; i++) { buf_putc(b, q); adv(p); }
        adv(p); adv(p); adv(p);
        return 0;
      }
      buf_putc(b, q);
      adv(p);
      continue;
    }
    if (c == '\n' || c == '\r') {
      int bad = 0;
      if (!multi) return perr(p, line, col, "unterminated string (newline before the closing quote)");
      if (!eat_newline(p, &bad)) return perr(p, p->line, p->col, "bare carriage return in string");
      buf_putc(b, '\n');
      continue;
    }
    if (is_ctrl_disallowed(c)) return perr(p, p->line, p->col, "control character 0x%02X in string (use an escape)", c);
    if (c == '\\' && !literal) {
      adv(p);
      if (multi) { /* line-ending backslash: trim whitespace and newlines up to the next text */
        size_t save = p->pos;
        int sl = p->line, sc = p->col;
        skip_ws(p);
        int bad = 0;
        if (eat_newline(p, &bad)) {
          for (;;) {
            skip_ws(p);
            if (!eat_newline(p, &bad)) break;
          }
          continue;
        }
        p->pos = save; p->line = sl; p->col = sc;
      }
      if (parse_escape(p, b)) return -1;
      continue;
    }
    buf_putc(b, (char)c);
    adv(p);
  }
}

/* ${VAR} / ${VAR:-default} with VAR = NMOE_* or HYDRA_*. */
static int expand_env(Parser *p, int line, int col, const char *in, Buf *out) {
  out->n = 0;
  buf_put(out, "", 0);
  for (const char *s = in; *s;) {
    if (!(s[0] == '$' && s[1] == '{')) { buf_putc(out, *s++); continue; }
    const char *close = strchr(s + 2, '}');
    if (!close) return perr(p, line, col, "unterminated ${ in string \"%s\"", in);
    const char *name = s + 2, *dash = strstr(name, ":-");
    size_t nlen = dash && dash < close ? (size_t)(dash - name) : (size_t)(close - name);
    char var[256];
    if (nlen == 0 || nlen >= sizeof var) return perr(p, line, col, "bad ${...} in string \"%s\"", in);
    memcpy(var, name, nlen);
    var[nlen] = 0;
    for (size_t i = 0; i < nlen; i++) {
      char c = var[i];
      if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || (i && c >= '0' && c <= '9')))
        return perr(p, line, col, "bad variable name '%s' in ${...}", var);
    }
    if (strncmp(var, "NMOE_", 5) != 0 && strncmp(var, "HYDRA_", 6) != 0)
      return perr(p, line, col, "environment variable '%s' is not allowed in ${...} (only NMOE_* and HYDRA_*)", var);
    const char *val = getenv(var);
    int has_default = dash && dash < close;
    if (has_default && (!val || !*val)) /* shell semantics: unset or empty takes the default */
      buf_put(out, dash + 2, (size_t)(close - dash - 2));
    else if (val)
      buf_put(out, val, strlen(val));
    else
      return perr(p, line, col, "environment variable %s is not set (use ${%s:-default} for a default)", var, var);
    s = close + 1;
  }
  return 0;
}

static int parse_string_value(Parser *p, Node **out) {
  int line = p->line, col = p->col;
  Buf b = {0}, e = {0};
  if (parse_string_into(p, &b, 1)) { free(b.b); return -1; }
  if (p->expand_env) {
    int rc = expand_env(p, line, col, b.b, &e);
    free(b.b);
    if (rc) { free(e.b); return -1; }
    b = e;
  }
  *out = node_new(TOML_STRING, line, col, 0);
  (*out)->v.u.s = b.b;
  return 0;
}

/* ---- keys ---- */

static int is_bare(int c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static void key_free(Key *k) {
  for (int i = 0; i < k->n; i++) free(k->seg[i]);
  free(k->seg);
  memset(k, 0, sizeof *k);
}

/* prefix (the enclosing table's path, may be "") and k[0..upto] joined with
 * '.', for messages. */
static const char *key_str(const char *prefix, const Key *k, int upto, char *tmp, size_t n) {
  size_t o = (size_t)snprintf(tmp, n, "%s", prefix);
  for (int i = 0; i <= upto && i < k->n && o < n; i++)
    o += (size_t)snprintf(tmp + o, n - o, "%s%s", o ? "." : "", k->seg[i]);
  return tmp;
}

static int parse_key(Parser *p, Key *k) {
  memset(k, 0, sizeof *k);
  k->line = p->line;
  k->col = p->col;
  for (;;) {
    Buf b = {0};
    int c = peek(p, 0);
    if (c == '"' || c == '\'') {
      if (parse_string_into(p, &b, 0)) { free(b.b); key_free(k); return -1; }
    } else if (is_bare(c)) {
      while (is_bare(peek(p, 0))) { buf_putc(&b, (char)peek(p, 0)); adv(p); }
    } else {
      key_free(k);
      EXPECTED(p, "a key");
    }
    if (k->n == k->cap) {
      k->cap = k->cap ? 2 * k->cap : 4;
      k->seg = xrealloc(k->seg, (size_t)k->cap * sizeof *k->seg);
    }
    k->seg[k->n++] = b.b;
    skip_ws(p);
    if (peek(p, 0) != '.') return 0;
    adv(p);
    skip_ws(p);
  }
}

/* ---- values ---- */

static int parse_value(Parser *p, Node **out, int depth);

static int is_digit(int c) { return c >= '0' && c <= '9'; }

/* Digits of base (2, 8, 10, 16) with single underscores between digits, from
 * tok[*i]; appends the digits (no underscores) to o. Returns the digit count, or
 * -1 on a misplaced underscore. */
static int scan_digits(const char *tok, size_t len, size_t *i, int base, Buf *o) {
  int nd = 0;
  while (*i < len) {
    int c = (unsigned char)tok[*i];
    int d = hexval(c);
    if (d >= 0 && d < base && (base == 16 || is_digit(c))) { buf_putc(o, (char)c); nd++; (*i)++; continue; }
    if (c == '_') {
      if (!nd || *i + 1 >= len) return -1;
      int n2 = hexval((unsigned char)tok[*i + 1]);
      if (n2 < 0 || n2 >= base || (base != 16 && !is_digit((unsigned char)tok[*i + 1]))) return -1;
      (*i)++;
      continue;
    }
    break;
  }
  return nd;
}

static int parse_number(Parser *p, Node **out) {
  int line = p->line, col = p->col;
  size_t start = p->pos;
  while (p->pos < p->n) {
    int c = peek(p, 0);
    if (!(is_bare(c) || c == '+' || c == '.' || c == ':')) break;
    adv(p);
  }
  const char *tok = p->s + start;
  size_t len = p->pos - start;
  if (len == 0) EXPECTED(p, "a value");
  char shown[64];
  snprintf(shown, sizeof shown, "%.*s", (int)(len < 40 ? len : 40), tok);
  if ((len >= 5 && is_digit(tok[0]) && is_digit(tok[1]) && is_digit(tok[2]) && is_digit(tok[3]) && tok[4] == '-') ||
      (len >= 3 && is_digit(tok[0]) && is_digit(tok[1]) && tok[2] == ':'))
    return perr(p, line, col, "dates and times are not supported (found '%s')", shown);

  size_t i = 0;
  int neg = 0, has_sign = 0;
  if (tok[0] == '+' || tok[0] == '-') { neg = tok[0] == '-'; has_sign = 1; i = 1; }
  const char *rest = tok + i;
  size_t rlen = len - i;
  if (rlen == 3 && (memcmp(rest, "inf", 3) == 0 || memcmp(rest, "nan", 3) == 0)) {
    *out = node_new(TOML_FLOAT, line, col, 0);
    (*out)->v.u.f = (neg ? -1.0 : 1.0) * (rest[0] == 'i' ? INFINITY : NAN);
    return 0;
  }
  Buf d = {0};
  buf_put(&d, "", 0);
  int rc = -1;
  if (rlen >= 2 && rest[0] == '0' && (rest[1] == 'x' || rest[1] == 'o' || rest[1] == 'b')) {
    int base = rest[1] == 'x' ? 16 : rest[1] == 'o' ? 8 : 2;
    size_t j = i + 2;
    int nd = scan_digits(tok, len, &j, base, &d);
    if (has_sign) { perr(p, line, col, "invalid number '%s' (sign not allowed on hex/octal/binary)", shown); goto done; }
    if (nd <= 0 || j != len) { perr(p, line, col, "invalid number '%s'", shown); goto done; }
    errno = 0;
    unsigned long long u = strtoull(d.b, NULL, base);
    if (errno || u > INT64_MAX) { perr(p, line, col, "integer '%s' out of range (64-bit signed)", shown); goto done; }
    *out = node_new(TOML_INT, line, col, 0);
    (*out)->v.u.i = (int64_t)u;
    rc = 0;
    goto done;
  }
  if (neg) buf_putc(&d, '-');
  size_t j = i;
  size_t int_start = d.n;
  int nd = scan_digits(tok, len, &j, 10, &d);
  if (nd <= 0) { perr(p, line, col, "invalid number '%s'", shown); goto done; }
  if (nd > 1 && d.b[int_start] == '0') { perr(p, line, col, "invalid number '%s' (leading zeros are not allowed)", shown); goto done; }
  int is_float = 0;
  if (j < len && tok[j] == '.') {
    buf_putc(&d, '.');
    j++;
    if (scan_digits(tok, len, &j, 10, &d) <= 0) { perr(p, line, col, "invalid number '%s' (digits expected after '.')", shown); goto done; }
    is_float = 1;
  }
  if (j < len && (tok[j] == 'e' || tok[j] == 'E')) {
    buf_putc(&d, 'e');
    j++;
    if (j < len && (tok[j] == '+' || tok[j] == '-')) buf_putc(&d, tok[j++]);
    if (scan_digits(tok, len, &j, 10, &d) <= 0) { perr(p, line, col, "invalid number '%s' (exponent digits expected)", shown); goto done; }
    is_float = 1;
  }
  if (j != len) { perr(p, line, col, "invalid value '%s'", shown); goto done; }
  errno = 0;
  if (is_float) {
    double f = strtod(d.b, NULL);
    if (errno == ERANGE && (f > 1 || f < -1)) { perr(p, line, col, "float '%s' out of range", shown); goto done; }
    *out = node_new(TOML_FLOAT, line, col, 0);
    (*out)->v.u.f = f;
  } else {
    long long v = strtoll(d.b, NULL, 10);
    if (errno == ERANGE) { perr(p, line, col, "integer '%s' out of range (64-bit signed)", shown); goto done; }
    *out = node_new(TOML_INT, line, col, 0);
    (*out)->v.u.i = v;
  }
  rc = 0;
done:
  free(d.b);
  return rc;
}

static int parse_array(Parser *p, Node **out, int depth) {
  Node *a = node_new(TOML_ARRAY, p->line, p->col, F_FROZEN);
  adv(p); /* [ */
  for (;;) {
    if (skip_ws_nl(p)) goto fail;
    if (peek(p, 0) == ']') break;
    Node *item;
    if (parse_value(p, &item, depth + 1)) goto fail;
    node_push(a, NULL, item);
    if (skip_ws_nl(p)) goto fail;
    if (peek(p, 0) == ',') { adv(p); continue; }
    if (peek(p, 0) == ']') break;
    char tmp[32];
    perr(p, p->line, p->col, "expected ',' or ']' in array, found %s", found(p, tmp, sizeof tmp));
    goto fail;
  }
  adv(p); /* ] */
  *out = a;
  return 0;
fail:
  toml_free(&a->v);
  return -1;
}

static int parse_keyval(Parser *p, Node *tbl, const char *prefix, int depth);

static int parse_inline_table(Parser *p, Node **out, int depth) {
  Node *t = node_new(TOML_TABLE, p->line, p->col, 0);
  adv(p); /* { */
  skip_ws(p);
  if (peek(p, 0) == '}') goto close;
  for (;;) {
    skip_ws(p);
    if (parse_keyval(p, t, "", depth + 1)) goto fail;
    skip_ws(p);
    if (peek(p, 0) == ',') {
      adv(p);
      skip_ws(p);
      if (peek(p, 0) == '}') { perr(p, p->line, p->col, "trailing comma is not allowed in an inline table"); goto fail; }
      continue;
    }
    if (peek(p, 0) == '}') break;
    char tmp[32];
    perr(p, p->line, p->col, "expected ',' or '}' in inline table, found %s", found(p, tmp, sizeof tmp));
    goto fail;
  }
close:
  adv(p); /* } */
  freeze(t);
  *out = t;
  return 0;
fail:
  toml_free(&t->v);
  return -1;
}

static int parse_value(Parser *p, Node **out, int depth) {
  if (depth > MAX_DEPTH) return perr(p, p->line, p->col, "values nested too deeply (more than %d levels)", MAX_DEPTH);
  int c = peek(p, 0);
  if (c == '"' || c == '\'') return parse_string_value(p, out);
  if (c == '[') return parse_array(p, out, depth);
  if (c == '{') return parse_inline_table(p, out, depth);
  if (c == 't' || c == 'f') {
    const char *w = c == 't' ? "true" : "false";
    size_t n = strlen(w);
    if (p->pos + n <= p->n && memcmp(p->s + p->pos, w, n) == 0 && !is_bare(peek(p, n))) {
      *out = node_new(TOML_BOOL, p->line, p->col, 0);
      (*out)->v.u.b = c == 't';
      for (size_t i = 0; i < n; i++) adv(p);
      return 0;
    }
  }
  if (c == '+' || c == '-' || is_digit(c) || c == 'i' || c == 'n') return parse_number(p, out);
  EXPECTED(p, "a value (string, number, boolean, array or inline table)");
}

/* key = value into tbl (whose path, for messages, is prefix); dotted keys create
 * (or extend their own) sub-tables. */
static int parse_keyval(Parser *p, Node *tbl, const char *prefix, int depth) {
  Key k;
  char tmp[512];
  if (parse_key(p, &k)) return -1;
  Node *t = tbl;
  int rc = -1;
  for (int i = 0; i < k.n - 1; i++) {
    Node *child = table_find(t, k.seg[i]);
    if (!child) {
      child = node_new(TOML_TABLE, k.line, k.col, F_DOTTED);
      node_push(t, xstrdup(k.seg[i]), child);
    } else if (child->v.type != TOML_TABLE) {
      perr(p, k.line, k.col, "cannot add keys to '%s' (%s defined at line %d): not a table", key_str(prefix, &k, i, tmp, sizeof tmp),
           toml_type_name(child->v.type), child->v.line);
      goto done;
    } else if (!(child->flags & F_DOTTED) || (child->flags & F_FROZEN)) {
      perr(p, k.line, k.col, "cannot add keys to table '%s' defined at line %d", key_str(prefix, &k, i, tmp, sizeof tmp),
           child->v.line);
      goto done;
    }
    t = child;
  }
  Node *prev = table_find(t, k.seg[k.n - 1]);
  if (prev) {
    perr(p, k.line, k.col, "duplicate key '%s' (first defined at line %d)", key_str(prefix, &k, k.n - 1, tmp, sizeof tmp),
         prev->v.line);
    goto done;
  }
  if (peek(p, 0) != '=') {
    char f[32];
    perr(p, p->line, p->col, "expected '=' after key '%s', found %s", key_str(prefix, &k, k.n - 1, tmp, sizeof tmp),
         found(p, f, sizeof f));
    goto done;
  }
  adv(p);
  skip_ws(p);
  Node *val;
  if (parse_value(p, &val, depth)) goto done;
  node_push(t, k.seg[k.n - 1], val);
  k.seg[--k.n] = NULL; /* ownership moved to the table */
  rc = 0;
done:
  key_free(&k);
  return rc;
}

/* [a.b] or [[a.b]]; sets *cur to the table that following keys go into and
 * path (size n) to its dotted name. */
static int parse_header(Parser *p, Node *root, Node **cur, char *path, size_t n) {
  const char *prefix = "";
  int line = p->line, col = p->col;
  int aot = peek(p, 1) == '[';
  adv(p);
  if (aot) adv(p);
  skip_ws(p);
  Key k;
  char tmp[512];
  if (parse_key(p, &k)) return -1;
  int rc = -1;
  if (peek(p, 0) != ']' || (aot && peek(p, 1) != ']')) {
    char f[32];
    perr(p, p->line, p->col, "expected '%s' to close the table header, found %s", aot ? "]]" : "]", found(p, f, sizeof f));
    goto done;
  }
  adv(p);
  if (aot) adv(p);
  Node *t = root;
  for (int i = 0; i < k.n - 1; i++) {
    Node *child = table_find(t, k.seg[i]);
    if (!child) {
      child = node_new(TOML_TABLE, line, col, F_IMPLICIT);
      node_push(t, xstrdup(k.seg[i]), child);
    } else if (child->v.type == TOML_ARRAY && (child->flags & F_AOT)) {
      child = (Node *)child->v.items[child->v.n - 1];
    } else if (child->v.type != TOML_TABLE || (child->flags & F_FROZEN)) {
      perr(p, line, col, "cannot define a table under '%s' (%s defined at line %d)", key_str(prefix, &k, i, tmp, sizeof tmp),
           child->v.type == TOML_TABLE ? "inline table" : toml_type_name(child->v.type), child->v.line);
      goto done;
    }
    t = child;
  }
  const char *last = k.seg[k.n - 1];
  Node *child = table_find(t, last);
  if (aot) {
    if (!child) {
      child = node_new(TOML_ARRAY, line, col, F_AOT);
      node_push(t, xstrdup(last), child);
    } else if (child->v.type != TOML_ARRAY || !(child->flags & F_AOT)) {
      perr(p, line, col, "cannot append to '%s' (%s defined at line %d): not an array of tables",
           key_str(prefix, &k, k.n - 1, tmp, sizeof tmp), toml_type_name(child->v.type), child->v.line);
      goto done;
    }
    Node *elem = node_new(TOML_TABLE, line, col, F_EXPLICIT);
    node_push(child, NULL, elem);
    *cur = elem;
  } else {
    if (!child) {
      child = node_new(TOML_TABLE, line, col, F_EXPLICIT);
      node_push(t, xstrdup(last), child);
    } else if (child->v.type == TOML_TABLE && child->flags == F_IMPLICIT) {
      child->flags = F_EXPLICIT;
      child->v.line = line;
      child->v.col = col;
    } else {
      perr(p, line, col, "table '%s' is already defined (line %d)", key_str(prefix, &k, k.n - 1, tmp, sizeof tmp), child->v.line);
      goto done;
    }
    *cur = child;
  }
  key_str("", &k, k.n - 1, path, n);
  rc = 0;
done:
  key_free(&k);
  return rc;
}

/* Checks the whole text is valid UTF-8 (TOML requires it); reports the first bad byte. */
static int check_utf8(Parser *p) {
  const unsigned char *s = (const unsigned char *)p->s;
  int line = 1, col = 1;
  for (size_t i = 0; i < p->n;) {
    unsigned c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    uint32_t cp = n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    int ok = n > 0 && i + n <= p->n;
    for (size_t j = 1; ok && j < n; j++) {
      ok = (s[i + j] & 0xC0) == 0x80;
      cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if (ok && n > 1)
      ok = !((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
             (cp >= 0xD800 && cp <= 0xDFFF));
    if (!ok) return perr(p, line, col, "invalid UTF-8");
    if (c == '\n') { line++; col = 1; } else col++;
    i += n;
  }
  return 0;
}

TomlValue *toml_parse_string(const char *text, const char *name, int expand_env, char *err, size_t errlen) {
  Parser p = {.s = text, .n = strlen(text), .line = 1, .col = 1, .name = name ? name : "<string>",
              .err = err, .errlen = errlen, .expand_env = expand_env};
  if (err && errlen) err[0] = 0;
  if (p.n >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) p.pos = 3; /* BOM */
  if (check_utf8(&p)) return NULL;
  Node *root = node_new(TOML_TABLE, 1, 1, F_EXPLICIT), *cur = root;
  char cur_path[512] = "";
  for (;;) {
    skip_ws(&p);
    if (p.pos >= p.n) break;
    int c = peek(&p, 0), bad = 0;
    if (c == '#') {
      if (skip_comment(&p)) goto fail;
    } else if (c == '[') {
      if (parse_header(&p, root, &cur, cur_path, sizeof cur_path)) goto fail;
    } else if (c != '\n' && c != '\r') {
      if (parse_keyval(&p, cur, cur_path, 0)) goto fail;
    }
    if (eat_newline(&p, &bad)) continue;
    if (bad) { perr(&p, p.line, p.col, "bare carriage return (expected \\r\\n)"); goto fail; }
    if (end_of_line(&p)) goto fail;
  }
  return &root->v;
fail:
  toml_free(&root->v);
  return NULL;
}

TomlValue *toml_parse_file(const char *path, int expand_env, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  Buf b = {0};
  char chunk[65536];
  size_t got;
  buf_put(&b, "", 0);
  while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) buf_put(&b, chunk, got);
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    snprintf(err, errlen, "%s: read error", path);
    free(b.b);
    return NULL;
  }
  if (strlen(b.b) != b.n) {
    size_t at = strlen(b.b);
    int line = 1;
    for (size_t i = 0; i < at; i++) line += b.b[i] == '\n';
    snprintf(err, errlen, "%s:%d: NUL byte in file", path, line);
    free(b.b);
    return NULL;
  }
  TomlValue *v = toml_parse_string(b.b, path, expand_env, err, errlen);
  free(b.b);
  return v;
}
