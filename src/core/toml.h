/* toml.h: a strict TOML 1.0 parser (written for nmoe) producing a value tree.
 *
 * Supported: comments; [tables], [[arrays of tables]], dotted and quoted keys;
 * basic, literal and multi-line strings with all escapes; integers (decimal with
 * _ separators and sign, 0x/0o/0b); floats (incl. inf/nan); booleans; arrays
 * (multi-line, trailing comma, mixed types); inline tables. Dates and times are
 * rejected with a clear error (no nmoe file needs them). Every error is one line:
 * "NAME:LINE:COL: what was expected / found".
 *
 * expand_env=1 expands ${VAR} and ${VAR:-default} inside string values (as the
 * original's load_toml does): only NMOE_* and HYDRA_* variables; any other name,
 * an unset variable without default, or an unterminated ${ is an error. */
#ifndef NMOE_TOML_H
#define NMOE_TOML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { TOML_TABLE, TOML_ARRAY, TOML_STRING, TOML_INT, TOML_FLOAT, TOML_BOOL } TomlType;

typedef struct TomlValue TomlValue;
struct TomlValue {
  TomlType type;
  int line, col; /* where the value (for tables: the header or first key) starts */
  union {
    char *s;
    int64_t i;
    double f;
    bool b;
  } u;
  int n;             /* table: number of keys; array: number of items */
  char **keys;       /* table: n keys in file order; array: NULL */
  TomlValue **items; /* table: the values of keys[]; array: the items */
};

/* Parse a file / a string (name is used in error messages). NULL on error with
 * one line in err. Free the result with toml_free. */
TomlValue *toml_parse_file(const char *path, int expand_env, char *err, size_t errlen);
TomlValue *toml_parse_string(const char *text, const char *name, int expand_env, char *err, size_t errlen);

/* Direct child of a table; NULL if absent or table is not a table. */
const TomlValue *toml_get(const TomlValue *table, const char *key);
/* Nested lookup by "a.b.c" (bare segments only); NULL if any step is absent. */
const TomlValue *toml_get_path(const TomlValue *table, const char *dotted);

/* "table", "array", "string", "integer", "float", "boolean". */
const char *toml_type_name(TomlType t);

void toml_free(TomlValue *v);

#endif
