/* ckpt.c: split checkpoints (see ckpt.h for the layout): a background saver
 * with a bounded queue, rank-0 finalisation (manifest, then tracker), purge of
 * old finalised steps, verified loading, and `nmoe ckpt list|info|verify`.
 *
 * Crash safety: every file is written to a temporary name, fsynced and renamed;
 * a step counts as finalised only when manifest.json exists and every file it
 * lists has the listed size (and, on load, SHA-256). The manifest is written
 * after all rank files exist, the tracker after the manifest, and a purge
 * removes the manifest before the rest of a directory, so a kill at any moment
 * leaves the previous finalised step loadable. */
#include "train/ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "train/safetensors.h"

#define TRACKER "latest_checkpointed_iteration.txt"
#define QCAP 2
#define PATHN 4096
/* Directory names are limited to MAXDIR bytes (checked at every entry point),
 * so composed paths fit PATHN; error messages may be cut to errlen. */
#define MAXDIR 3000
#pragma GCC diagnostic ignored "-Wformat-truncation"

struct Ckpt {
  char *dir;
  int rank, world, keep;
  int slow_ms;           /* NMOE_TEST_CKPT_SLOW_MS: sleep between file writes */
  double final_timeout;  /* seconds rank 0 waits for the other ranks' files */
  pthread_t th;
  pthread_mutex_t mu;
  pthread_cond_t cv;     /* broadcast on every change of the fields below */
  CkptSnapshot *q[QCAP];
  int head, count, busy, stop, failed;
  char ferr[1024];
};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) && errno == EINTR) {}
}

static int dir_ok(const char *dir, char *err, size_t errlen) {
  if (dir && *dir && strlen(dir) <= MAXDIR) return 1;
  snprintf(err, errlen, "checkpoint directory name is empty or longer than %d bytes", MAXDIR);
  return 0;
}

/* Test hook: widens the windows between file writes for the crash tests. */
static void pace(const Ckpt *c) {
  if (c->slow_ms > 0) sleep_ms(c->slow_ms);
}

static void iter_path(char *out, const char *dir, int64_t step) {
  snprintf(out, PATHN, "%s/iter_%07lld", dir, (long long)step);
}

void ckpt_snapshot_free(CkptSnapshot *s) {
  if (!s) return;
  for (int i = 0; i < s->n_dense; i++) free(s->dense[i].data);
  for (int i = 0; i < s->n_rank; i++) free(s->rank_t[i].data);
  free(s->dense);
  free(s->rank_t);
  free(s->meta_json);
  free(s);
}

/* ------------------------------------------------------ directory helpers */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Steps of the iter_NNNNNNN directories under dir, ascending (caller frees);
 * -1 when dir cannot be read. */
static int list_steps(const char *dir, int64_t **out) {
  *out = NULL;
  DIR *d = opendir(dir);
  if (!d) return -1;
  int n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    const char *s = e->d_name;
    if (strncmp(s, "iter_", 5) || !s[5] || strspn(s + 5, "0123456789") != strlen(s + 5)) continue;
    char p[PATHN];
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
static int64_t tracker_read(const char *dir) {
  char p[PATHN], err[256];
  snprintf(p, sizeof p, "%s/%s", dir, TRACKER);
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

/* Reads iter_dir/manifest.json for step and checks its shape; with
 * check_files, also that every listed file exists with the listed size (no
 * hashing). A manifest is written only after every file it lists, and is
 * removed first when a step is deleted, so its presence marks a complete
 * step; files missing afterwards are damage to report, not to skip. */
static Json *manifest_read(const char *it, int64_t step, int check_files, char *err, size_t errlen) {
  char p[PATHN], jerr[512];
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
    char fp[PATHN];
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
static const Json *manifest_file(const Json *m, const char *name) {
  const Json *files = json_get(m, "files");
  for (int i = 0; i < files->n; i++)
    if (!strcmp(json_get_str(files->items[i], "path", ""), name)) return files->items[i];
  return NULL;
}

/* Checks the SHA-256 of one manifest-listed file. */
static int verify_file(const char *it, const Json *entry, char *err, size_t errlen) {
  char fp[PATHN], hex[65];
  snprintf(fp, sizeof fp, "%s/%s", it, json_get_str(entry, "path", ""));
  if (sha256_file_hex(fp, hex, err, errlen)) return -1;
  if (strcmp(hex, json_get_str(entry, "sha256", ""))) {
    snprintf(err, errlen, "checksum mismatch in %s: the checkpoint is corrupt", fp);
    return -1;
  }
  return 0;
}

int64_t ckpt_latest(const char *dir) {
  char it[PATHN], err[1024];
  if (!dir_ok(dir, err, sizeof err)) return -1;
  int64_t t = tracker_read(dir);
  if (t >= 0) {
    iter_path(it, dir, t);
    Json *m = manifest_read(it, t, 0, err, sizeof err);
    if (m) {
      json_free(m);
      return t;
    }
  }
  int64_t *steps;
  int n = list_steps(dir, &steps);
  int64_t found = -1;
  for (int i = n - 1; i >= 0 && found < 0; i--) {
    iter_path(it, dir, steps[i]);
    Json *m = manifest_read(it, steps[i], 0, err, sizeof err);
    if (m) found = steps[i];
    json_free(m);
  }
  free(steps);
  return found;
}

/* Unfinalises (manifest first) then deletes a step directory. */
static void remove_step(const char *dir, int64_t step) {
  char it[PATHN], p[PATHN], err[512];
  iter_path(it, dir, step);
  snprintf(p, sizeof p, "%s/manifest.json", it);
  if (fs_exists(p) && (unlink(p) || fs_fsync_dir(it, err, sizeof err))) {
    log_warn("checkpoint purge: cannot remove %s: %s", p, strerror(errno));
    return;
  }
  if (fs_remove_tree(it)) log_warn("checkpoint purge: cannot remove %s: %s", it, strerror(errno));
}

/* After finalising step: keep it and the newest keep-1 finalised steps below
 * it; drop older finalised steps and unfinalised leftovers below it (all of
 * this run's earlier saves were finalised in order, so those are crash
 * debris). Steps above it (another rank's save in flight) are left alone. */
static void purge(const Ckpt *c, int64_t step) {
  if (c->keep <= 0) return;
  int64_t *steps;
  int n = list_steps(c->dir, &steps);
  int kept = 1;
  for (int i = n - 1; i >= 0; i--) {
    if (steps[i] >= step) continue;
    char it[PATHN], p[PATHN];
    iter_path(it, c->dir, steps[i]);
    snprintf(p, sizeof p, "%s/manifest.json", it);
    if (fs_exists(p) && kept < c->keep) {
      kept++;
      continue;
    }
    remove_step(c->dir, steps[i]);
  }
  free(steps);
}

/* ----------------------------------------------------------------- saver */

/* Writes one tensor list as a safetensors file. */
static int write_tensors(const char *path, const CkptTensor *t, int n, int64_t step, char sha[65],
                         char *err, size_t errlen) {
  StTensor *st = xcalloc((size_t)n + 1, sizeof *st);
  for (int i = 0; i < n; i++) {
    if (t[i].ndim < 0 || t[i].ndim > 4) {
      snprintf(err, errlen, "%s: tensor '%s' has %d dimensions (at most 4)", path, t[i].name, t[i].ndim);
      free(st);
      return -1;
    }
    st[i] = (StTensor){t[i].name, t[i].dtype, t[i].ndim, t[i].shape, t[i].data, t[i].nbytes};
  }
  char stepbuf[32];
  snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)step);
  const char *meta[] = {"format", "pt", "nmoe_step", stepbuf};
  int rc = st_write(path, st, n, meta, 2, sha, err, errlen);
  free(st);
  return rc;
}

typedef struct FileSum {
  char name[64];
  char sha[65];  /* empty: hash from disk */
} FileSum;

/* Rank 0: waits for every rank's files, then writes the manifest, moves the
 * tracker and purges. own[] holds the hashes of the files rank 0 wrote;
 * total_bytes gets the size of the step. */
static int finalise(Ckpt *c, int64_t step, const char *it, const char *git_sha, const FileSum *own,
                    int n_own, int64_t *total_bytes, char *err, size_t errlen) {
  int nf = 1 + 2 * c->world;
  FileSum *fs = xcalloc((size_t)nf, sizeof *fs);
  snprintf(fs[0].name, sizeof fs[0].name, "dense.safetensors");
  for (int r = 0; r < c->world; r++) {
    snprintf(fs[1 + 2 * r].name, sizeof fs[0].name, "rank_%03d.safetensors", r);
    snprintf(fs[2 + 2 * r].name, sizeof fs[0].name, "rank_%03d.json", r);
  }
  double deadline = now_s() + c->final_timeout;
  int rc = -1;
  char fp[PATHN];
  for (int i = 0; i < nf; i++) {
    snprintf(fp, sizeof fp, "%s/%s", it, fs[i].name);
    while (!fs_exists(fp)) {
      if (now_s() > deadline) {
        snprintf(err, errlen,
                 "%s did not appear within %.0f s: did that rank fail? (the step stays unfinalised)", fp,
                 c->final_timeout);
        goto done;
      }
      sleep_ms(50);
    }
  }
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  jw_int(&w, "step", step);
  jw_int(&w, "world", c->world);
  jw_int(&w, "dp_count", c->world);
  int64_t total = 0;
  jw_str(&w, "git_sha", git_sha);
  jw_arr(&w, "files");
  for (int i = 0; i < nf; i++) {
    snprintf(fp, sizeof fp, "%s/%s", it, fs[i].name);
    for (int k = 0; k < n_own; k++)
      if (!strcmp(own[k].name, fs[i].name)) memcpy(fs[i].sha, own[k].sha, 65);
    if (!fs[i].sha[0] && sha256_file_hex(fp, fs[i].sha, err, errlen)) {
      free(jw_finish(&w));
      goto done;
    }
    int64_t bytes = fs_size(fp);
    total += bytes;
    jw_obj(&w, NULL);
    jw_str(&w, "path", fs[i].name);
    jw_int(&w, "bytes", bytes);
    jw_str(&w, "sha256", fs[i].sha);
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_int(&w, "bytes_total", total);
  jw_obj_end(&w);
  char *doc = jw_finish(&w);
  snprintf(fp, sizeof fp, "%s/manifest.json", it);
  int wrc = fs_write_atomic(fp, doc, strlen(doc), err, errlen);
  free(doc);
  if (wrc) goto done;
  pace(c);
  char tr[PATHN], num[32];
  snprintf(tr, sizeof tr, "%s/%s", c->dir, TRACKER);
  snprintf(num, sizeof num, "%lld\n", (long long)step);
  if (fs_write_atomic(tr, num, strlen(num), err, errlen)) goto done;
  purge(c, step);
  *total_bytes = total;
  rc = 0;
done:
  free(fs);
  return rc;
}

static int save_one(Ckpt *c, const CkptSnapshot *s, char *err, size_t errlen) {
  char it[PATHN], p[PATHN], jerr[512];
  double t0 = now_s();
  iter_path(it, c->dir, s->step);
  const char *meta_txt = s->meta_json ? s->meta_json : "{}";
  Json *meta = json_parse(meta_txt, strlen(meta_txt), jerr, sizeof jerr);
  if (!meta || meta->type != JSON_OBJ) {
    snprintf(err, errlen, "checkpoint step %lld: the metadata is not a JSON object%s%s", (long long)s->step,
             meta ? "" : ": ", meta ? "" : jerr);
    json_free(meta);
    return -1;
  }
  FileSum own[3];
  int n_own = 0, rc = -1;
  if (fs_mkdirs(it, err, errlen)) goto done;
  /* Re-saving a step that was finalised before (a resume from an older
   * step): unfinalise it first so no reader trusts a half-rewritten step. */
  snprintf(p, sizeof p, "%s/manifest.json", it);
  if (c->rank == 0 && fs_exists(p) && (unlink(p) || fs_fsync_dir(it, err, errlen))) {
    snprintf(err, errlen, "cannot remove the old %s: %s", p, strerror(errno));
    goto done;
  }
  if (c->rank == 0) {
    snprintf(own[n_own].name, sizeof own[0].name, "dense.safetensors");
    snprintf(p, sizeof p, "%s/%s", it, own[n_own].name);
    if (write_tensors(p, s->dense, s->n_dense, s->step, own[n_own++].sha, err, errlen)) goto done;
    pace(c);
  }
  snprintf(own[n_own].name, sizeof own[0].name, "rank_%03d.safetensors", c->rank);
  snprintf(p, sizeof p, "%s/%s", it, own[n_own].name);
  if (write_tensors(p, s->rank_t, s->n_rank, s->step, own[n_own++].sha, err, errlen)) goto done;
  pace(c);
  snprintf(own[n_own].name, sizeof own[0].name, "rank_%03d.json", c->rank);
  snprintf(p, sizeof p, "%s/%s", it, own[n_own].name);
  sha256_hex(meta_txt, strlen(meta_txt), own[n_own++].sha);
  if (fs_write_atomic(p, meta_txt, strlen(meta_txt), err, errlen)) goto done;
  if (c->rank == 0) pace(c);
  int64_t total = 0;
  if (c->rank == 0 && finalise(c, s->step, it, json_get_str(meta, "git_commit", "unknown"), own, n_own,
                               &total, err, errlen))
    goto done;
  if (c->rank == 0)
    log_info("checkpoint: step %lld saved to %s (%.1f MB, %.0f ms)", (long long)s->step, it,
             (double)total / 1e6, 1e3 * (now_s() - t0));
  rc = 0;
done:
  json_free(meta);
  return rc;
}

static void *saver_main(void *arg) {
  Ckpt *c = arg;
  pthread_mutex_lock(&c->mu);
  for (;;) {
    while (!c->count && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
    if (!c->count) break;
    CkptSnapshot *s = c->q[c->head];
    c->head = (c->head + 1) % QCAP;
    c->count--;
    c->busy = 1;
    int skip = c->failed; /* after a failure the run is stopping: drain only */
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    char err[1024];
    int rc = skip ? 0 : save_one(c, s, err, sizeof err);
    ckpt_snapshot_free(s);
    pthread_mutex_lock(&c->mu);
    c->busy = 0;
    if (rc && !c->failed) {
      c->failed = 1;
      snprintf(c->ferr, sizeof c->ferr, "%s", err);
    }
    pthread_cond_broadcast(&c->cv);
  }
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

Ckpt *ckpt_open(const char *dir, int rank, int world, int keep_last_n, char *err, size_t errlen) {
  if (!dir_ok(dir, err, errlen)) return NULL;
  if (world < 1 || rank < 0 || rank >= world) {
    snprintf(err, errlen, "checkpoint: invalid rank %d of world %d", rank, world);
    return NULL;
  }
  if (fs_mkdirs(dir, err, errlen)) return NULL;
  Ckpt *c = xcalloc(1, sizeof *c);
  c->dir = xstrdup(dir);
  c->rank = rank;
  c->world = world;
  c->keep = keep_last_n;
  const char *slow = getenv("NMOE_TEST_CKPT_SLOW_MS");
  c->slow_ms = slow ? atoi(slow) : 0;
  const char *tmo = getenv("NMOE_CKPT_FINALIZE_TIMEOUT_S");
  c->final_timeout = tmo && atof(tmo) > 0 ? atof(tmo) : 1800.0;
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  int prc = pthread_create(&c->th, NULL, saver_main, c);
  if (prc) {
    snprintf(err, errlen, "checkpoint: cannot start the saver thread: %s", strerror(prc));
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c->dir);
    free(c);
    return NULL;
  }
  return c;
}

int ckpt_save_async(Ckpt *c, CkptSnapshot *snap, char *err, size_t errlen) {
  pthread_mutex_lock(&c->mu);
  while (c->count == QCAP && !c->failed) pthread_cond_wait(&c->cv, &c->mu);
  if (c->failed) {
    snprintf(err, errlen, "%s", c->ferr);
    pthread_mutex_unlock(&c->mu);
    ckpt_snapshot_free(snap);
    return -1;
  }
  c->q[(c->head + c->count) % QCAP] = snap;
  c->count++;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  return 0;
}

int ckpt_wait(Ckpt *c, char *err, size_t errlen) {
  pthread_mutex_lock(&c->mu);
  while (c->count || c->busy) pthread_cond_wait(&c->cv, &c->mu);
  int rc = c->failed ? -1 : 0;
  if (rc) snprintf(err, errlen, "%s", c->ferr);
  pthread_mutex_unlock(&c->mu);
  return rc;
}

int ckpt_close(Ckpt *c, char *err, size_t errlen) {
  if (!c) return 0;
  int rc = ckpt_wait(c, err, errlen);
  pthread_mutex_lock(&c->mu);
  c->stop = 1;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  pthread_join(c->th, NULL);
  pthread_mutex_destroy(&c->mu);
  pthread_cond_destroy(&c->cv);
  free(c->dir);
  free(c);
  return rc;
}

/* ---------------------------------------------------------------- loading */

void ckpt_loaded_free(CkptLoaded *l) {
  if (!l) return;
  for (int i = 0; i < l->n; i++) free(l->t[i].data);
  free(l->t);
  json_free(l->meta);
  free(l);
}

const CkptTensor *ckpt_find(const CkptLoaded *l, const char *name) {
  for (int i = 0; i < l->n; i++)
    if (!strcmp(l->t[i].name, name)) return &l->t[i];
  return NULL;
}

/* Verifies it/name against the manifest and appends its tensors to l. */
static int load_tensors(CkptLoaded *l, const char *it, const Json *m, const char *name, char *err,
                        size_t errlen) {
  const Json *e = manifest_file(m, name);
  if (!e) {
    snprintf(err, errlen, "%s/manifest.json does not list %s", it, name);
    return -1;
  }
  if (verify_file(it, e, err, errlen)) return -1;
  char fp[PATHN];
  snprintf(fp, sizeof fp, "%s/%s", it, name);
  StFile *f = st_open(fp, err, errlen);
  if (!f) return -1;
  l->t = xrealloc(l->t, (size_t)(l->n + f->n + 1) * sizeof *l->t);
  for (int i = 0; i < f->n; i++) {
    const StEntry *s = &f->t[i];
    if (strlen(s->name) >= sizeof l->t[0].name || s->ndim > 4) {
      snprintf(err, errlen, "%s: tensor '%s' has a name over 127 bytes or more than 4 dimensions", fp,
               s->name);
      st_close(f);
      return -1;
    }
    CkptTensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", s->name);
    snprintf(t->dtype, sizeof t->dtype, "%s", s->dtype);
    t->ndim = s->ndim;
    memcpy(t->shape, s->shape, (size_t)s->ndim * sizeof(int64_t));
    t->nbytes = s->nbytes;
    t->data = xmalloc(s->nbytes);
    memcpy(t->data, s->data, s->nbytes);
  }
  st_close(f);
  return 0;
}

CkptLoaded *ckpt_load(const char *dir, int64_t step, int rank, int world, char *err, size_t errlen) {
  char it[PATHN], name[64], fp[PATHN], jerr[512];
  if (!dir_ok(dir, err, errlen)) return NULL;
  iter_path(it, dir, step);
  if (!fs_is_dir(it)) {
    snprintf(err, errlen, "checkpoint %s does not exist", it);
    return NULL;
  }
  Json *m = manifest_read(it, step, 1, err, errlen);
  if (!m) return NULL;
  CkptLoaded *l = xcalloc(1, sizeof *l);
  l->step = step;
  int64_t mw = json_get_int(m, "world", 0);
  if (mw != world) {
    snprintf(err, errlen, "checkpoint %s was written by %lld rank%s, this run has %d", it, (long long)mw,
             mw == 1 ? "" : "s", world);
    goto fail;
  }
  snprintf(name, sizeof name, "rank_%03d.safetensors", rank);
  if (load_tensors(l, it, m, "dense.safetensors", err, errlen) || load_tensors(l, it, m, name, err, errlen))
    goto fail;
  snprintf(name, sizeof name, "rank_%03d.json", rank);
  const Json *e = manifest_file(m, name);
  if (!e) {
    snprintf(err, errlen, "%s/manifest.json does not list %s", it, name);
    goto fail;
  }
  if (verify_file(it, e, err, errlen)) goto fail;
  snprintf(fp, sizeof fp, "%s/%s", it, name);
  if (!(l->meta = json_parse_file(fp, jerr, sizeof jerr))) {
    snprintf(err, errlen, "%s", jerr);
    goto fail;
  }
  json_free(m);
  return l;
fail:
  json_free(m);
  ckpt_loaded_free(l);
  return NULL;
}

/* -------------------------------------------------------------------- CLI */

static const char *CKPT_USAGE =
    "usage: nmoe ckpt list DIR                  steps (finalised or not), sizes, tracker\n"
    "       nmoe ckpt info DIR [STEP]           manifest, metadata summary and tensors\n"
    "       nmoe ckpt verify DIR [STEP|--all]   sizes and SHA-256 of every file (exit 1 on a problem)\n";

static int64_t dir_bytes(const char *it, int *nfiles) {
  int64_t total = 0;
  *nfiles = 0;
  DIR *d = opendir(it);
  if (!d) return 0;
  struct dirent *e;
  char p[PATHN];
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
  int n = list_steps(dir, &steps);
  if (n < 0) {
    fprintf(stderr, "nmoe: error: cannot read checkpoint directory %s: %s\n", dir, strerror(errno));
    return 1;
  }
  int64_t t = tracker_read(dir);
  if (t >= 0) printf("tracker: %lld (%s)\n", (long long)t, TRACKER);
  else printf("tracker: none\n");
  printf("%-10s %-12s %6s %14s\n", "step", "state", "files", "bytes");
  char it[PATHN], err[1024];
  for (int i = 0; i < n; i++) {
    iter_path(it, dir, steps[i]);
    Json *m = manifest_read(it, steps[i], 0, err, sizeof err);
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
  char it[PATHN], err[1024], fp[PATHN];
  iter_path(it, dir, step);
  Json *m = manifest_read(it, step, 0, err, sizeof err);
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

/* Full check of one step: manifest, sizes, SHA-256, file structure. */
static int verify_step(const char *dir, int64_t step, char *err, size_t errlen) {
  char it[PATHN], fp[PATHN];
  iter_path(it, dir, step);
  Json *m = manifest_read(it, step, 1, err, errlen);
  if (!m) return -1;
  const Json *files = json_get(m, "files");
  int rc = 0;
  for (int i = 0; i < files->n && !rc; i++) {
    const char *name = json_get_str(files->items[i], "path", "");
    snprintf(fp, sizeof fp, "%s/%s", it, name);
    rc = verify_file(it, files->items[i], err, errlen);
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
  if (!rc) printf("step %lld: ok (%d files, %lld bytes)\n", (long long)step, files->n,
                  (long long)json_get_int(m, "bytes_total", 0));
  json_free(m);
  return rc;
}

static int cli_verify(const char *dir, const char *arg) {
  char err[1024], it[PATHN];
  int bad = 0, checked = 0;
  int64_t t = tracker_read(dir);
  if (arg && !strcmp(arg, "--all")) {
    int64_t *steps;
    int n = list_steps(dir, &steps);
    if (n < 0) {
      fprintf(stderr, "nmoe: error: cannot read checkpoint directory %s: %s\n", dir, strerror(errno));
      return 1;
    }
    for (int i = 0; i < n; i++) {
      char p[PATHN];
      iter_path(it, dir, steps[i]);
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
    iter_path(it, dir, t);
    Json *m = manifest_read(it, t, 0, err, sizeof err);
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

int ckpt_main(int argc, char **argv) {
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
    fputs(CKPT_USAGE, stdout);
    return 0;
  }
  char err[128];
  if (argc >= 3 && !dir_ok(argv[2], err, sizeof err)) {
    fprintf(stderr, "nmoe: error: %s\n", err);
    return 1;
  }
  if (argc >= 3 && argc <= 4) {
    const char *arg = argc == 4 ? argv[3] : NULL;
    if (!strcmp(argv[1], "list") && !arg) return cli_list(argv[2]);
    if (!strcmp(argv[1], "info")) return cli_info(argv[2], arg);
    if (!strcmp(argv[1], "verify")) return cli_verify(argv[2], arg);
  }
  fputs(CKPT_USAGE, stderr);
  return 2;
}
