/* ckpt_cli.c: `nmoe ckpt list|info|verify DIR`: what is in a checkpoint
 * directory, and whether its files are intact (exit 1 on any problem); and
 * the argument handling of `nmoe ckpt reshard` (ckpt_reshard.c). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "train/ckpt.h"
#include "train/ckpt_dir.h"
#include "train/safetensors.h"

/* Paths are bounded by ckpt_dir_ok. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

static const char *CKPT_USAGE =
    "usage: nmoe ckpt list DIR                  steps (finalised or not), sizes, tracker\n"
    "       nmoe ckpt info DIR [STEP]           manifest, metadata summary and tensors\n"
    "       nmoe ckpt verify DIR [STEP|--all]   sizes and SHA-256 of every file (exit 1 on a problem)\n"
    "       nmoe ckpt reshard SRC DST --world N [--step S]\n"
    "                                           write step S (default: the latest) of SRC for N ranks\n"
    "                                           into the checkpoint directory DST (elastic resume)\n";

static int64_t dir_bytes(const char *it, int *nfiles) {
  int64_t total = 0;
  *nfiles = 0;
  DIR *d = opendir(it);
  if (!d) return 0;
  struct dirent *e;
  char p[CKPT_PATHN];
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    snprintf(p, sizeof p, "%s/%s", it, e->d_name);
    int64_t s = fs_is_dir(p) ? -1 : fs_size(p);
    if (s >= 0) total += s, (*nfiles)++;
  }
  closedir(d);
  return total;
}

static int cli_list(const char *dir) {
  int64_t *steps;
  int n = ckpt_list_steps(dir, &steps);
  if (n < 0) {
    fprintf(stderr, "nmoe: error: cannot read checkpoint directory %s: %s\n", dir, strerror(errno));
    return 1;
  }
  int64_t t = ckpt_tracker_read(dir);
  if (t >= 0) printf("tracker: %lld (%s)\n", (long long)t, CKPT_TRACKER);
  else printf("tracker: none\n");
  printf("%-10s %-12s %6s %14s\n", "step", "state", "files", "bytes");
  char it[CKPT_PATHN], err[1024];
  for (int i = 0; i < n; i++) {
    ckpt_iter_path(it, dir, steps[i]);
    Json *m = ckpt_manifest_read(it, steps[i], 0, err, sizeof err);
    int nf;
    int64_t b = dir_bytes(it, &nf);
    printf("%-10lld %-12s %6d %14lld%s\n", (long long)steps[i], m ? "finalised" : "unfinalised", nf,
           (long long)b, steps[i] == t ? "  <- tracker" : "");
    json_free(m);
  }
  if (!n) printf("(no checkpoints)\n");
  free(steps);
  return 0;
}

/* STEP argument or the latest finalised step; -1 with a message. */
static int64_t cli_step(const char *dir, const char *arg) {
  if (arg) {
    char *end;
    long long v = strtoll(arg, &end, 10);
    if (*end || v < 0 || end == arg) {
      fprintf(stderr, "nmoe: error: '%s' is not a step number\n", arg);
      return -1;
    }
    return v;
  }
  int64_t s = ckpt_latest(dir);
  if (s < 0) fprintf(stderr, "nmoe: error: no finalised checkpoint in %s\n", dir);
  return s;
}

static void print_tensors(const char *fp) {
  char err[1024];
  StFile *f = st_open(fp, err, sizeof err);
  if (!f) {
    printf("  %s\n", err);
    return;
  }
  printf("%s: %d tensors\n", strrchr(fp, '/') + 1, f->n);
  for (int i = 0; i < f->n; i++) {
    char shape[128] = "";
    size_t o = 0;
    for (int d = 0; d < f->t[i].ndim && o < sizeof shape; d++)
      o += (size_t)snprintf(shape + o, sizeof shape - o, "%s%lld", d ? ", " : "", (long long)f->t[i].shape[d]);
    printf("  %-48s %-5s [%s] %zu bytes\n", f->t[i].name, f->t[i].dtype, shape, f->t[i].nbytes);
  }
  st_close(f);
}

static int cli_info(const char *dir, const char *arg) {
  int64_t step = cli_step(dir, arg);
  if (step < 0) return 1;
  char it[CKPT_PATHN], err[1024], fp[CKPT_PATHN];
  ckpt_iter_path(it, dir, step);
  Json *m = ckpt_manifest_read(it, step, 0, err, sizeof err);
  if (!m) {
    fprintf(stderr, "nmoe: error: %s\n", err);
    return 1;
  }
  printf("checkpoint %s\n  step %lld, world %lld, %lld bytes, git %s\n", it, (long long)step,
         (long long)json_get_int(m, "world", 0), (long long)json_get_int(m, "bytes_total", 0),
         json_get_str(m, "git_sha", "?"));
  const Json *files = json_get(m, "files");
  for (int i = 0; i < files->n; i++)
    printf("  %-28s %14lld  sha256 %.16s...\n", json_get_str(files->items[i], "path", ""),
           (long long)json_get_int(files->items[i], "bytes", 0), json_get_str(files->items[i], "sha256", ""));
  snprintf(fp, sizeof fp, "%s/rank_000.json", it);
  Json *meta = json_parse_file(fp, err, sizeof err);
  printf("metadata (rank_000.json):\n");
  if (!meta) printf("  %s\n", err);
  for (int i = 0; meta && meta->type == JSON_OBJ && i < meta->n; i++) {
    const Json *v = meta->items[i];
    if (v->type == JSON_OBJ || v->type == JSON_ARR) {
      printf("  %-24s %s with %d entries\n", meta->keys[i], v->type == JSON_OBJ ? "object" : "array", v->n);
    } else {
      char *s = json_dump(v);
      printf("  %-24s %.96s%s\n", meta->keys[i], s, strlen(s) > 96 ? "..." : "");
      free(s);
    }
  }
  json_free(meta);
  snprintf(fp, sizeof fp, "%s/dense.safetensors", it);
  print_tensors(fp);
  snprintf(fp, sizeof fp, "%s/rank_000.safetensors", it);
  print_tensors(fp);
  json_free(m);
  return 0;
}

int ckpt_verify_step(const char *dir, int64_t step, char *err, size_t errlen) {
  char it[CKPT_PATHN], fp[CKPT_PATHN];
  ckpt_iter_path(it, dir, step);
  Json *m = ckpt_manifest_read(it, step, 1, err, errlen);
  if (!m) return -1;
  const Json *files = json_get(m, "files");
  int rc = 0;
  for (int i = 0; i < files->n && !rc; i++) {
    const char *name = json_get_str(files->items[i], "path", "");
    snprintf(fp, sizeof fp, "%s/%s", it, name);
    rc = ckpt_verify_file(it, files->items[i], err, errlen);
    size_t len = strlen(name);
    if (!rc && len > 12 && !strcmp(name + len - 12, ".safetensors")) {
      StFile *f = st_open(fp, err, errlen);
      rc = f ? 0 : -1;
      st_close(f);
    } else if (!rc && len > 5 && !strcmp(name + len - 5, ".json")) {
      Json *j = json_parse_file(fp, err, errlen);
      rc = j ? 0 : -1;
      json_free(j);
    }
  }
  json_free(m);
  return rc;
}

/* One step's check with its summary line. */
static int verify_step(const char *dir, int64_t step, char *err, size_t errlen) {
  if (ckpt_verify_step(dir, step, err, errlen)) return -1;
  char it[CKPT_PATHN];
  ckpt_iter_path(it, dir, step);
  Json *m = ckpt_manifest_read(it, step, 0, err, errlen);
  if (!m) return -1;
  printf("step %lld: ok (%d files, %lld bytes)\n", (long long)step, json_get(m, "files")->n,
         (long long)json_get_int(m, "bytes_total", 0));
  json_free(m);
  return 0;
}

static int cli_verify(const char *dir, const char *arg) {
  char err[1024], it[CKPT_PATHN];
  int bad = 0, checked = 0;
  int64_t t = ckpt_tracker_read(dir);
  if (arg && !strcmp(arg, "--all")) {
    int64_t *steps;
    int n = ckpt_list_steps(dir, &steps);
    if (n < 0) {
      fprintf(stderr, "nmoe: error: cannot read checkpoint directory %s: %s\n", dir, strerror(errno));
      return 1;
    }
    for (int i = 0; i < n; i++) {
      char p[CKPT_PATHN];
      ckpt_iter_path(it, dir, steps[i]);
      snprintf(p, sizeof p, "%s/manifest.json", it);
      if (!fs_exists(p)) {
        printf("step %lld: not finalised (no manifest.json), skipped\n", (long long)steps[i]);
        continue;
      }
      checked++;
      if (verify_step(dir, steps[i], err, sizeof err)) {
        printf("step %lld: FAILED: %s\n", (long long)steps[i], err);
        bad++;
      }
    }
    free(steps);
  } else {
    int64_t step = cli_step(dir, arg);
    if (step < 0) return 1;
    checked++;
    if (verify_step(dir, step, err, sizeof err)) {
      printf("step %lld: FAILED: %s\n", (long long)step, err);
      bad++;
    }
  }
  if (t >= 0) {
    ckpt_iter_path(it, dir, t);
    Json *m = ckpt_manifest_read(it, t, 0, err, sizeof err);
    if (!m) {
      printf("tracker names step %lld, which is not a valid checkpoint: %s\n", (long long)t, err);
      bad++;
    }
    json_free(m);
  }
  if (!checked) {
    fprintf(stderr, "nmoe: error: no finalised checkpoint in %s\n", dir);
    return 1;
  }
  if (bad) fprintf(stderr, "nmoe: error: %d problem%s found in %s\n", bad, bad == 1 ? "" : "s", dir);
  return bad ? 1 : 0;
}

/* `nmoe ckpt reshard SRC DST --world N [--step S]` (argv[0] = "reshard"). */
static int cli_reshard(int argc, char **argv) {
  const char *pos[2] = {NULL, NULL}, *wa = NULL, *sa = NULL;
  int np = 0;
  for (int i = 1; i < argc; i++) {
    const char **opt = !strcmp(argv[i], "--world") ? &wa : !strcmp(argv[i], "--step") ? &sa : NULL;
    if (opt && i + 1 < argc) *opt = argv[++i];
    else if (!opt && argv[i][0] != '-' && np < 2) pos[np++] = argv[i];
    else {
      fputs(CKPT_USAGE, stderr);
      return 2;
    }
  }
  if (np != 2 || !wa) {
    fputs(CKPT_USAGE, stderr);
    return 2;
  }
  char *end, err[1024];
  long world = strtol(wa, &end, 10);
  if (*end || end == wa || world < 1 || world > 4096) {
    fprintf(stderr, "nmoe: error: --world '%s' is not a number of ranks (1..4096)\n", wa);
    return 1;
  }
  if (!ckpt_dir_ok(pos[1], err, sizeof err)) {
    fprintf(stderr, "nmoe: error: %s\n", err);
    return 1;
  }
  int64_t step = cli_step(pos[0], sa);
  if (step < 0) return 1;
  if (ckpt_reshard(pos[0], pos[1], (int)world, step, err, sizeof err)) {
    fprintf(stderr, "nmoe: error: %s\n", err);
    return 1;
  }
  printf("step %lld of %s written for %ld rank%s to %s\n", (long long)step, pos[0], world,
         world == 1 ? "" : "s", pos[1]);
  return 0;
}

int ckpt_main(int argc, char **argv) {
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
    fputs(CKPT_USAGE, stdout);
    return 0;
  }
  char err[128];
  if (argc >= 3 && !ckpt_dir_ok(argv[2], err, sizeof err)) {
    fprintf(stderr, "nmoe: error: %s\n", err);
    return 1;
  }
  if (argc >= 2 && !strcmp(argv[1], "reshard")) return cli_reshard(argc - 1, argv + 1);
  if (argc >= 3 && argc <= 4) {
    const char *arg = argc == 4 ? argv[3] : NULL;
    if (!strcmp(argv[1], "list") && !arg) return cli_list(argv[2]);
    if (!strcmp(argv[1], "info")) return cli_info(argv[2], arg);
    if (!strcmp(argv[1], "verify")) return cli_verify(argv[2], arg);
  }
  fputs(CKPT_USAGE, stderr);
  return 2;
}
