/* json.h: a small JSON reader (into a tree) and writer, for manifests,
 * checkpoint metadata, loader cursors and bench output.
 *
 * Numbers keep both a double and, when the text is an integer that fits, an
 * exact int64 (shard offsets and RNG states need all 64 bits; uint64 values
 * are written as strings by convention where they may exceed INT64_MAX). */
#ifndef NMOE_JSON_H
#define NMOE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUM, JSON_STR, JSON_ARR, JSON_OBJ } JsonType;

typedef struct Json {
  JsonType type;
  bool b;
  bool is_int;      /* number written as an integer that fits int64 */
  int64_t i;
  double num;
  char *str;        /* JSON_STR (NUL-terminated; may contain \u0000 as NUL bytes: use str_len) */
  size_t str_len;
  int n;            /* JSON_ARR / JSON_OBJ: children */
  char **keys;      /* JSON_OBJ only, in document order */
  struct Json **items;
} Json;

/* Parses text[0..len). On error returns NULL with "line L col C: what" in err. */
Json *json_parse(const char *text, size_t len, char *err, size_t errlen);
/* Reads and parses a whole file; err names the file. */
Json *json_parse_file(const char *path, char *err, size_t errlen);
void json_free(Json *j);

/* Lookups: NULL/default when missing or of another type. */
const Json *json_get(const Json *obj, const char *key);
const char *json_get_str(const Json *obj, const char *key, const char *def);
int64_t json_get_int(const Json *obj, const char *key, int64_t def);
double json_get_num(const Json *obj, const char *key, double def);
bool json_get_bool(const Json *obj, const char *key, bool def);

/* Writer: builds a compact document into a growing buffer. Keys are passed
 * for object members and NULL for array elements. */
typedef struct JsonW {
  char *buf;
  size_t len, cap;
  int depth;
  bool first[256]; /* no member written yet at this depth (> the reader's 200 levels) */
  int indent;     /* 0 = compact; >0 pretty-prints with this many spaces */
} JsonW;

void jw_init(JsonW *w, int indent);
void jw_obj(JsonW *w, const char *key);  /* begin object */
void jw_obj_end(JsonW *w);
void jw_arr(JsonW *w, const char *key);  /* begin array */
void jw_arr_end(JsonW *w);
void jw_str(JsonW *w, const char *key, const char *s);
void jw_int(JsonW *w, const char *key, int64_t v);
void jw_uint(JsonW *w, const char *key, uint64_t v);
void jw_num(JsonW *w, const char *key, double v); /* %.17g; non-finite written as null */
void jw_bool(JsonW *w, const char *key, bool v);
void jw_null(JsonW *w, const char *key);
void jw_raw(JsonW *w, const char *key, const char *json); /* pre-serialised value */
/* Returns the NUL-terminated document (caller frees) and resets w. */
char *jw_finish(JsonW *w);

/* Serialises a parsed tree back to compact JSON (caller frees). */
char *json_dump(const Json *j);

/* Appends s as a quoted, escaped JSON string to w's buffer (helper for others). */
void json_quote(JsonW *w, const char *s, size_t len);

#endif
