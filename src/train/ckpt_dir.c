/* ckpt_dir.c: reading a checkpoint directory: steps, tracker, manifests
 * (a manifest is written only after every file it lists and removed first
 * when a step is deleted, so a well-formed manifest marks a complete step;
 * files missing afterwards are damage to report, not to skip), SHA-256
 * checks, and ckpt_latest. */
#include "train/ckpt_dir.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/log.h"
#include "train/ckpt.h"

/* Paths are bounded by ckpt_dir_ok; error messages may be cut to errlen. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

int ckpt_dir_ok(const char *dir, char *err, size_t errlen) {
  if (dir && *dir && strlen(dir) <= CKPT_MAXDIR) return 1;
  snprintf(err, errlen, "checkpoint directory name is empty or longer than %d bytes", CKPT_MAXDIR);
  return 0;
}

void ckpt_iter_path(char *out, const char *dir, int64_t step) {
  snprintf(out, CKPT_PATHN, "%s/iter_%07lld", dir, (long long)step);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Steps of the iter_NNNNNNN directories under dir, ascending (caller frees);
 * -1 when dir cannot be read. */
int ckpt_list_steps(const char *dir, int64_t **out) {
  *out = NULL;
  DIR *d = opendir(dir);
  if (!d) return -1;
  int n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    const char *s = e->d_name;
    if (strncmp(s, "iter_", 5) || !s[5] || strspn(s + 5, "0123456789") != strlen(s + 5)) continue;
    char p[CKPT_PATHN];
    snprintf(p, sizeof p, "%s/%s", dir, s);
    if (!fs_is_dir(p)) continue;
    if (n == cap) *out = xrealloc(*out, (size_t)(cap = cap ? 2 * cap : 16) * sizeof **out);
    (*out)[n++] = strtoll(s + 5, NULL, 10);
  }
  closedir(d);
  if (n) qsort(*out, (size_t)n, sizeof **out, cmp_i64);
  return n;
}

/* Step named by the tracker, or -1. */
int64_t ckpt_tracker_read(const char *dir) {
  char p[CKPT_PATHN], err[256];
  snprintf(p, sizeof p, "%s/%s", dir, CKPT_TRACKER);
  if (!fs_exists(p)) return -1;
  char *txt = fs_read_all(p, NULL, err, sizeof err);
  if (!txt) return -1;
  char *end;
  errno = 0;
  long long v = strtoll(txt, &end, 10);
  while (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t') end++;
  int ok = !errno && end != txt && !*end && v >= 0;
  free(txt);
  return ok ? v : -1;
}

Json *ckpt_manifest_read(const char *it, int64_t step, int check_files, char *err, size_t errlen) {
  char p[CKPT_PATHN], jerr[512];
  snprintf(p, sizeof p, "%s/manifest.json", it);
  if (!fs_exists(p)) {
    snprintf(err, errlen, "checkpoint %s is not finalised (no manifest.json)", it);
    return NULL;
  }
  Json *m = json_parse_file(p, jerr, sizeof jerr);
  if (!m) {
    snprintf(err, errlen, "%s", jerr);
    return NULL;
  }
  const Json *files = json_get(m, "files");
  if (m->type != JSON_OBJ || json_get_int(m, "step", -1) != step || json_get_int(m, "world", 0) < 1 ||
      !files || files->type != JSON_ARR || files->n < 1) {
    snprintf(err, errlen, "%s: not a valid checkpoint manifest for step %lld", p, (long long)step);
    goto bad;
  }
  for (int i = 0; i < files->n; i++) {
    const Json *f = files->items[i];
    const char *name = json_get_str(f, "path", NULL), *sha = json_get_str(f, "sha256", NULL);
    int64_t bytes = json_get_int(f, "bytes", -1);
    if (!name || !*name || strchr(name, '/') || !sha || strlen(sha) != 64 || bytes < 0) {
      snprintf(err, errlen, "%s: files[%d] needs path, bytes and sha256", p, i);
      goto bad;
    }
    if (!check_files) continue;
    char fp[CKPT_PATHN];
    snprintf(fp, sizeof fp, "%s/%s", it, name);
    int64_t have = fs_size(fp);
    if (have < 0) {
      snprintf(err, errlen, "missing file %s: the checkpoint is incomplete", fp);
      goto bad;
    }
    if (have != bytes) {
      snprintf(err, errlen, "%s has %lld bytes, the manifest says %lld: the checkpoint is corrupt", fp,
               (long long)have, (long long)bytes);
      goto bad;
    }
  }
  return m;
bad:
  json_free(m);
  return NULL;
}

/* The manifest entry for file name, or NULL. */
const Json *ckpt_manifest_file(const Json *m, const char *name) {
  const Json *files = json_get(m, "files");
  for (int i = 0; i < files->n; i++)
    if (!strcmp(json_get_str(files->items[i], "path", ""), name)) return files->items[i];
  return NULL;
}

/* Checks the SHA-256 of one manifest-listed file. */
int ckpt_verify_file(const char *it, const Json *entry, char *err, size_t errlen) {
  char fp[CKPT_PATHN], hex[65];
  snprintf(fp, sizeof fp, "%s/%s", it, json_get_str(entry, "path", ""));
  if (sha256_file_hex(fp, hex, err, errlen)) return -1;
  if (strcmp(hex, json_get_str(entry, "sha256", ""))) {
    snprintf(err, errlen, "checksum mismatch in %s: the checkpoint is corrupt", fp);
    return -1;
  }
  return 0;
}

int64_t ckpt_latest(const char *dir) {
  char it[CKPT_PATHN], err[1024];
  if (!ckpt_dir_ok(dir, err, sizeof err)) return -1;
  int64_t t = ckpt_tracker_read(dir);
  if (t >= 0) {
    ckpt_iter_path(it, dir, t);
    Json *m = ckpt_manifest_read(it, t, 0, err, sizeof err);
    if (m) {
      json_free(m);
      return t;
    }
  }
  int64_t *steps;
  int n = ckpt_list_steps(dir, &steps);
  int64_t found = -1;
  for (int i = n - 1; i >= 0 && found < 0; i--) {
    ckpt_iter_path(it, dir, steps[i]);
    Json *m = ckpt_manifest_read(it, steps[i], 0, err, sizeof err);
    if (m) found = steps[i];
    json_free(m);
  }
  free(steps);
  return found;
}
