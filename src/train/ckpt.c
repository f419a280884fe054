/* ckpt.c: split checkpoints (see ckpt.h for the layout): a background saver
 * with a bounded queue, rank-0 finalisation (manifest, then tracker), purge of
 * old finalised steps, and verified loading.
 *
 * Crash safety: every file is written to a temporary name, fsynced and renamed;
 * a step counts as finalised only when a well-formed manifest.json exists, and
 * loading checks every file's size and SHA-256. The manifest is written
 * after all rank files exist, the tracker after the manifest, and a purge
 * removes the manifest before the rest of a directory, so a kill at any moment
 * leaves the previous finalised step loadable. */
#include "train/ckpt.h"

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
#include "train/ckpt_dir.h"
#include "train/safetensors.h"

#define QCAP 2
/* Paths are bounded by ckpt_dir_ok; error messages may be cut to errlen. */
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

/* Test hook: widens the windows between file writes for the crash tests. */
static void pace(const Ckpt *c) {
  if (c->slow_ms > 0) sleep_ms(c->slow_ms);
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

/* Unfinalises (manifest first) then deletes a step directory. */
static void remove_step(const char *dir, int64_t step) {
  char it[CKPT_PATHN], p[CKPT_PATHN], err[512];
  ckpt_iter_path(it, dir, step);
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
  int n = ckpt_list_steps(c->dir, &steps);
  int kept = 1;
  for (int i = n - 1; i >= 0; i--) {
    if (steps[i] >= step) continue;
    char it[CKPT_PATHN], p[CKPT_PATHN];
    ckpt_iter_path(it, c->dir, steps[i]);
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

/* The SHA-256 another rank recorded for its safetensors file in its rank json
 * (written after that file): rank 0 need not read the whole file back. 0 when
 * found, -1 when absent (then the file is hashed from disk). */
static int recorded_sha(const char *it, int rank, char sha[65]) {
  char p[CKPT_PATHN], err[256];
  snprintf(p, sizeof p, "%s/rank_%03d.json", it, rank);
  Json *j = json_parse_file(p, err, sizeof err);
  const char *h = j ? json_get_str(j, "rank_file_sha256", "") : "";
  int ok = strlen(h) == 64;
  if (ok) memcpy(sha, h, 65);
  json_free(j);
  return ok ? 0 : -1;
}

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
  char fp[CKPT_PATHN];
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
    int r;
    if (!fs[i].sha[0] && sscanf(fs[i].name, "rank_%d.safetensors", &r) == 1 &&
        strstr(fs[i].name, ".safetensors"))
      recorded_sha(it, r, fs[i].sha);
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
  char tr[CKPT_PATHN], num[32];
  snprintf(tr, sizeof tr, "%s/%s", c->dir, CKPT_TRACKER);
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
  char it[CKPT_PATHN], p[CKPT_PATHN], jerr[512];
  double t0 = now_s();
  ckpt_iter_path(it, c->dir, s->step);
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
  /* The rank json carries the hash of the rank's safetensors file (computed
   * while writing it), so rank 0's finalise does not re-read big files. */
  const char *body = strchr(meta_txt, '{') + 1; /* meta is an object */
  size_t jn = strlen(body) + 128;
  char *jtxt = xmalloc(jn);
  snprintf(jtxt, jn, "{\"rank_file_sha256\": \"%s\"%s%s", own[n_own - 1].sha,
           meta->n > 0 ? ", " : "", body);
  snprintf(own[n_own].name, sizeof own[0].name, "rank_%03d.json", c->rank);
  snprintf(p, sizeof p, "%s/%s", it, own[n_own].name);
  sha256_hex(jtxt, strlen(jtxt), own[n_own++].sha);
  int jrc = fs_write_atomic(p, jtxt, strlen(jtxt), err, errlen);
  free(jtxt);
  if (jrc) goto done;
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

int ckpt_save(const char *dir, int rank, int world, const CkptSnapshot *snap, char *err, size_t errlen) {
  if (!ckpt_dir_ok(dir, err, errlen)) return -1;
  if (world < 1 || rank < 0 || rank >= world) {
    snprintf(err, errlen, "checkpoint: invalid rank %d of world %d", rank, world);
    return -1;
  }
  /* final_timeout 0: the other ranks' files are already written */
  Ckpt c = {.dir = (char *)dir, .rank = rank, .world = world};
  return save_one(&c, snap, err, errlen);
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
  if (!ckpt_dir_ok(dir, err, errlen)) return NULL;
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
  const Json *e = ckpt_manifest_file(m, name);
  if (!e) {
    snprintf(err, errlen, "%s/manifest.json does not list %s", it, name);
    return -1;
  }
  if (ckpt_verify_file(it, e, err, errlen)) return -1;
  char fp[CKPT_PATHN];
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
  char it[CKPT_PATHN], name[64], fp[CKPT_PATHN], jerr[512];
  if (!ckpt_dir_ok(dir, err, errlen)) return NULL;
  ckpt_iter_path(it, dir, step);
  if (!fs_is_dir(it)) {
    snprintf(err, errlen, "checkpoint %s does not exist", it);
    return NULL;
  }
  Json *m = ckpt_manifest_read(it, step, 1, err, errlen);
  if (!m) return NULL;
  CkptLoaded *l = xcalloc(1, sizeof *l);
  l->step = step;
  int64_t mw = json_get_int(m, "world", 0);
  if (mw != world) {
    snprintf(err, errlen,
             "checkpoint %s was written by %lld rank%s, this run has %d (`nmoe ckpt reshard SRC DST "
             "--world %d` rewrites it for %d)",
             it, (long long)mw, mw == 1 ? "" : "s", world, world, world);
    goto fail;
  }
  snprintf(name, sizeof name, "rank_%03d.safetensors", rank);
  if (load_tensors(l, it, m, "dense.safetensors", err, errlen)) goto fail;
  l->n_dense = l->n;
  if (load_tensors(l, it, m, name, err, errlen)) goto fail;
  snprintf(name, sizeof name, "rank_%03d.json", rank);
  const Json *e = ckpt_manifest_file(m, name);
  if (!e) {
    snprintf(err, errlen, "%s/manifest.json does not list %s", it, name);
    goto fail;
  }
  if (ckpt_verify_file(it, e, err, errlen)) goto fail;
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
