/* ckpt_dir.h: reading a checkpoint directory (layout names, steps, tracker,
 * manifests, file checks); shared by the saver/loader (ckpt.c) and the
 * `nmoe ckpt` commands (ckpt_cli.c). Layout: see ckpt.h. */
#ifndef NMOE_CKPT_DIR_H
#define NMOE_CKPT_DIR_H

#include <stddef.h>
#include <stdint.h>

#include "core/json.h"

#define CKPT_TRACKER "latest_checkpointed_iteration.txt"
#define CKPT_PATHN 4096
/* Directory names are limited to CKPT_MAXDIR bytes (checked at every entry
 * point), so composed paths fit CKPT_PATHN. */
#define CKPT_MAXDIR 3000

/* 1 when dir is a usable directory name, else 0 with err. */
int ckpt_dir_ok(const char *dir, char *err, size_t errlen);
/* out (CKPT_PATHN bytes) = dir/iter_NNNNNNN. */
void ckpt_iter_path(char *out, const char *dir, int64_t step);
/* Steps of the iter_NNNNNNN directories under dir, ascending (caller frees);
 * -1 when dir cannot be read. */
int ckpt_list_steps(const char *dir, int64_t **out);
/* Step named by the tracker, or -1. */
int64_t ckpt_tracker_read(const char *dir);
/* Reads it/manifest.json for step and checks its shape; with check_files,
 * also that every listed file exists with the listed size (no hashing). */
Json *ckpt_manifest_read(const char *it, int64_t step, int check_files, char *err, size_t errlen);
/* The manifest's files[] entry for name, or NULL. */
const Json *ckpt_manifest_file(const Json *m, const char *name);
/* Checks the SHA-256 of one manifest-listed file against the entry. */
int ckpt_verify_file(const char *it, const Json *entry, char *err, size_t errlen);

#endif
