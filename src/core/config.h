/* config.h: the resolved training configuration.
 *
 * Fields come from config_fields.h (one row each). config_load() reads a TOML
 * file with the strict parser in toml.c, applies overrides (environment
 * NMOE_<KEY>, then CLI --key=value, bare --resume/--no-resume), validates, and
 * fails with one clear line on any error. The fingerprint is SHA-256 of a
 * canonical serialisation of the CF_FP fields only. */
#ifndef NMOE_CONFIG_H
#define NMOE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum { CF_REQ = 1, CF_FP = 2, CF_UNSUP = 4, CF_OURS = 8 };

typedef struct Config {
#define X_INT int64_t
#define X_FLOAT double
#define X_BOOL bool
#define X_STR char *
#define X(kind, name, def, flags, doc) X_##kind name;
#include "core/config_fields.h"
#undef X
#undef X_INT
#undef X_FLOAT
#undef X_BOOL
#undef X_STR
  char source_path[1024]; /* the TOML file it came from */
} Config;

/* Defaults for every field (required ones 0/empty). */
void config_defaults(Config *c);

/* Loads path, then env overrides, then argv[0..argc) CLI overrides
 * ("--key=value", "--resume", "--no-resume"; other args are an error), then
 * validates. On error writes one line to err (file:line:col where it applies)
 * and returns -1. */
int config_load(Config *c, const char *path, int argc, char **argv, char *err, size_t errlen);

/* 1 when an environment entry "NAME=value" is a config override NMOE_<FIELD>. */
int config_env_is_override(const char *entry);

/* Semantic checks (ranges, divisibility, unsupported combinations). */
int config_validate(const Config *c, char *err, size_t errlen);

/* Writes the resolved config as TOML (all fields, sorted as declared). */
void config_print(const Config *c, FILE *f);

/* Canonical JSON of all fields (for experiments.db config_json). Caller frees. */
char *config_to_json(const Config *c);

/* SHA-256 hex (64 chars + NUL) of the CF_FP fields. */
void config_fingerprint(const Config *c, char out_hex[65]);

void config_free(Config *c);
#endif
