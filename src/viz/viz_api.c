/* viz_api.c: the dashboard's request router and JSON endpoints (see viz.h).
 *
 * Reads use the primary key (run, tag, step) of the metric files: the tag
 * list is a loose index scan (one seek per distinct tag), latest values are
 * one seek each, so polling stays cheap however long the run is. */
#include <dirent.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <strings.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "viz/lttb.h"
#include "viz/viz.h"

enum { ERR_LEN = 8192, RUN_NAME_MAX = 200, PARAM_MAX = 512, POINTS_MIN = 10, POINTS_MAX = 5000, POINTS_DEFAULT = 1000 };

/* --------------------------------------------------------------- requests */

static int hexval(int ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* Percent-decoded value of key in the query string q ('+' is a space) into
 * out; 1 found, 0 absent, -1 malformed, too long or containing NUL. */
static int query_get(const char *q, const char *key, char *out, size_t cap) {
  size_t kl = strlen(key);
  for (const char *p = q; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
    if (strncmp(p, key, kl) || (p[kl] != '=' && p[kl] != '&' && p[kl])) continue;
    const char *v = p[kl] == '=' ? p + kl + 1 : p + kl;
    size_t n = 0;
    for (; *v && *v != '&'; v++) {
      int ch = *v;
      if (ch == '+') ch = ' ';
      else if (ch == '%') {
        int hi = hexval(v[1]), lo = hi < 0 ? -1 : hexval(v[2]);
        if (lo < 0 || (ch = hi * 16 + lo) == 0) return -1;
        v += 2;
      }
      if (n + 1 >= cap) return -1;
      out[n++] = (char)ch;
    }
    out[n] = 0;
    return 1;
  }
  return 0;
}

/* A run id names a directory: letters, digits, '.', '_', '-', not starting with '.'. */
static int run_name_ok(const char *s) {
  size_t n = strlen(s);
  return n > 0 && n <= RUN_NAME_MAX && s[0] != '.' &&
         strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

static void respond_json(HttpResponse *r, JsonW *w) {
  r->status = 200;
  r->content_type = "application/json";
  r->body = jw_finish(w);
  r->len = strlen(r->body);
}

/* ----------------------------------------------------------------- SQLite */

/* Read-only open. A WAL reader must create the -shm file beside the database;
 * where the directory is not writable (a read-only volume) the file is opened
 * immutable instead: it then shows what has been checkpointed into the main
 * file, which lags a live writer by at most one WAL auto-checkpoint. */
static sqlite3 *db_open_ro(const char *path, char *err, size_t errlen) {
  sqlite3 *db = NULL;
  char dir[4096], uri[4200];
  fs_dirname(path, dir, sizeof dir);
  int flags = SQLITE_OPEN_READONLY;
  const char *name = path;
  if (access(dir, W_OK) != 0) {
    snprintf(uri, sizeof uri, "file:%s?immutable=1", path);
    name = uri;
    flags |= SQLITE_OPEN_URI;
  }
  if (sqlite3_open_v2(name, &db, flags, NULL) != SQLITE_OK ||
      sqlite3_busy_timeout(db, 2000) != SQLITE_OK) {
    snprintf(err, errlen, "%s: cannot open: %s", path, db ? sqlite3_errmsg(db) : "out of memory");
    sqlite3_close(db);
    return NULL;
  }
  return db;
}

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql, const char *label, char *err, size_t errlen) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
    snprintf(err, errlen, "%s: %s", label, sqlite3_errmsg(db));
    return NULL;
  }
  return st;
}

/* Writes column i of the current row as its SQLite type. */
static void jw_column(JsonW *w, const char *key, sqlite3_stmt *st, int i) {
  switch (sqlite3_column_type(st, i)) {
    case SQLITE_INTEGER: jw_int(w, key, sqlite3_column_int64(st, i)); break;
    case SQLITE_FLOAT: jw_num(w, key, sqlite3_column_double(st, i)); break;
    case SQLITE_NULL: jw_null(w, key); break;
    default: jw_str(w, key, (const char *)sqlite3_column_text(st, i));
  }
}

static const char *column_str(sqlite3_stmt *st, int i) {
  const unsigned char *t = sqlite3_column_text(st, i);
  return t ? (const char *)t : NULL;
}

/* ------------------------------------------------------------ metric files */

static void rank_path(const VizConfig *c, const char *run, int rank, char *out, size_t n) {
  snprintf(out, n, "%s/%s/rank_%d.sqlite", c->metrics_dir, run, rank);
}

static int cmp_int(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

/* Ranks with a metrics file for run, ascending (caller frees); *n = 0 when none. */
static int *run_ranks(const VizConfig *c, const char *run, int *n) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/%s", c->metrics_dir, run);
  *n = 0;
  DIR *d = opendir(dir);
  if (!d) return NULL;
  int *ranks = NULL, cap = 0;
  for (struct dirent *e; (e = readdir(d));) {
    int rank, used = 0;
    if (sscanf(e->d_name, "rank_%d.sqlite%n", &rank, &used) != 1 || e->d_name[used] || rank < 0) continue;
    if (*n == cap) ranks = xrealloc(ranks, (size_t)(cap = cap ? 2 * cap : 8) * sizeof *ranks);
    ranks[(*n)++] = rank;
  }
  closedir(d);
  if (*n) qsort(ranks, (size_t)*n, sizeof *ranks, cmp_int);
  return ranks;
}

/* The rank a per-rank tag belongs to ("throughput/r3/tokens_per_s" -> 3), else -1. */
static int tag_rank(const char *tag) {
  for (const char *p = strstr(tag, "/r"); p; p = strstr(p + 1, "/r")) {
    int rank, used = 0;
    if (p[2] >= '0' && p[2] <= '9' && sscanf(p + 2, "%d%n", &rank, &used) == 1 && p[2 + used] == '/') return rank;
  }
  return -1;
}

/* Latest (step, value) of tag; 1 found, 0 none, -1 error. */
static int metric_latest(sqlite3 *db, sqlite3_stmt *st, const char *run, const char *tag, int64_t *step,
                         double *value, char *err, size_t errlen) {
  sqlite3_reset(st);
  sqlite3_bind_text(st, 1, run, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, tag, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    *step = sqlite3_column_int64(st, 0);
    *value = sqlite3_column_double(st, 1);
    return 1;
  }
  if (rc == SQLITE_DONE) return 0;
  snprintf(err, errlen, "reading metrics: %s", sqlite3_errmsg(db));
  return -1;
}

static const char *SQL_LATEST =
    "SELECT step, value FROM metrics WHERE run = ?1 AND tag = ?2 ORDER BY step DESC LIMIT 1";

/* Distinct tags of run in one file, appended to *tags (deduplicated later). */
static int file_tags(sqlite3 *db, const char *run, char ***tags, int *n, int *cap, char *err, size_t errlen) {
  sqlite3_stmt *st = prepare(db,
                             "WITH RECURSIVE t(tag) AS (SELECT min(tag) FROM metrics WHERE run = ?1"
                             " UNION ALL SELECT (SELECT min(tag) FROM metrics WHERE run = ?1 AND tag > t.tag)"
                             " FROM t WHERE t.tag IS NOT NULL) SELECT tag FROM t WHERE tag IS NOT NULL",
                             "reading tags", err, errlen);
  if (!st) return -1;
  sqlite3_bind_text(st, 1, run, -1, SQLITE_STATIC);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (*n == *cap) *tags = xrealloc(*tags, (size_t)(*cap = *cap ? 2 * *cap : 64) * sizeof **tags);
    (*tags)[(*n)++] = xstrdup(column_str(st, 0));
  }
  if (rc != SQLITE_DONE) snprintf(err, errlen, "reading tags: %s", sqlite3_errmsg(db));
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : -1;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Sorted distinct tags of run over the files of the given ranks; -1 with err. */
static int run_tags(const VizConfig *c, const char *run, const int *ranks, int nranks, char ***out, int *nout,
                    char *err, size_t errlen) {
  char **tags = NULL;
  int n = 0, cap = 0;
  for (int i = 0; i < nranks; i++) {
    char path[4096];
    rank_path(c, run, ranks[i], path, sizeof path);
    sqlite3 *db = db_open_ro(path, err, errlen);
    int rc = db ? file_tags(db, run, &tags, &n, &cap, err, errlen) : -1;
    sqlite3_close(db);
    if (rc) {
      for (int k = 0; k < n; k++) free(tags[k]);
      free(tags);
      return -1;
    }
  }
  if (n) qsort(tags, (size_t)n, sizeof *tags, cmp_str);
  int m = 0;
  for (int i = 0; i < n; i++) {
    if (m && !strcmp(tags[m - 1], tags[i])) free(tags[i]);
    else tags[m++] = tags[i];
  }
  *out = tags;
  *nout = m;
  return 0;
}

/* ------------------------------------------------------------ experiments */

/* Opens experiments.db read-only; NULL without error when it does not exist. */
static sqlite3 *experiments_ro(const VizConfig *c, int *failed, char *err, size_t errlen) {
  *failed = 0;
  if (!c->experiments_db || !fs_exists(c->experiments_db)) return NULL;
  sqlite3 *db = db_open_ro(c->experiments_db, err, errlen);
  *failed = !db;
  return db;
}

/* 1 when run has a row in experiments.db, 0 when not, -1 on error. */
static int run_in_experiments(const VizConfig *c, const char *run, char *err, size_t errlen) {
  int failed;
  sqlite3 *db = experiments_ro(c, &failed, err, errlen);
  if (!db) return failed ? -1 : 0;
  sqlite3_stmt *st = prepare(db, "SELECT 1 FROM runs WHERE id = ?1", c->experiments_db, err, errlen);
  int rc = -1;
  if (st) {
    sqlite3_bind_text(st, 1, run, -1, SQLITE_STATIC);
    int s = sqlite3_step(st);
    rc = s == SQLITE_ROW ? 1 : s == SQLITE_DONE ? 0 : -1;
    if (rc < 0) snprintf(err, errlen, "%s: %s", c->experiments_db, sqlite3_errmsg(db));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rc;
}

/* Reads ?run=, checks it and finds its rank files. Returns 0, or fills r
 * with 400 (bad name), 404 (unknown run) or 500 and returns -1. A run known
 * only from experiments.db has no ranks (*nranks = 0). */
static int resolve_run(const VizConfig *c, const char *query, char *run, int **ranks, int *nranks,
                       HttpResponse *r) {
  char err[ERR_LEN];
  int got = query_get(query, "run", run, RUN_NAME_MAX + 1);
  if (got <= 0 || !run_name_ok(run)) {
    http_error(r, 400, got == 0 ? "missing parameter 'run'" : "invalid run id");
    return -1;
  }
  *ranks = run_ranks(c, run, nranks);
  if (*nranks) return 0;
  int known = run_in_experiments(c, run, err, sizeof err);
  if (known == 1) return 0;
  if (known < 0) http_error(r, 500, err);
  else {
    snprintf(err, sizeof err, "unknown run '%s'", run);
    http_error(r, 404, err);
  }
  return -1;
}

/* ---------------------------------------------------------------- handlers */

typedef void (*ApiFn)(const VizConfig *c, const char *query, HttpResponse *r);

static void api_health(const VizConfig *c, const char *query, HttpResponse *r) {
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_bool(&w, "ok", true);
  jw_str(&w, "metrics_dir", c->metrics_dir);
  if (c->experiments_db) jw_str(&w, "experiments_db", c->experiments_db);
  else jw_null(&w, "experiments_db");
  jw_bool(&w, "experiments_db_present", c->experiments_db && fs_exists(c->experiments_db));
  jw_obj_end(&w);
  respond_json(r, &w);
}

typedef struct RunRow {
  char *id, *experiment_id, *status, *started_at, *ended_at;
  int64_t started_ms, last_step, last_ts; // -1 when unknown
  int ranks;
} RunRow;

typedef struct RunList {
  RunRow *v;
  int n, cap;
} RunList;

static RunRow *runs_find(RunList *l, const char *id) {
  for (int i = 0; i < l->n; i++)
    if (!strcmp(l->v[i].id, id)) return &l->v[i];
  return NULL;
}

static RunRow *runs_add(RunList *l, const char *id) {
  if (l->n == l->cap) l->v = xrealloc(l->v, (size_t)(l->cap = l->cap ? 2 * l->cap : 16) * sizeof *l->v);
  RunRow *row = &l->v[l->n++];
  *row = (RunRow){.id = xstrdup(id), .started_ms = -1, .last_step = -1, .last_ts = -1};
  return row;
}

static void runs_free(RunList *l) {
  for (int i = 0; i < l->n; i++) {
    RunRow *x = &l->v[i];
    free(x->id), free(x->experiment_id), free(x->status), free(x->started_at), free(x->ended_at);
  }
  free(l->v);
}

static char *dup_or_null(const char *s) { return s ? xstrdup(s) : NULL; }

static int runs_from_experiments(const VizConfig *c, RunList *l, char *err, size_t errlen) {
  int failed;
  sqlite3 *db = experiments_ro(c, &failed, err, errlen);
  if (!db) return failed ? -1 : 0;
  sqlite3_stmt *st = prepare(db,
                             "SELECT id, experiment_id, status, started_at, ended_at,"
                             " CAST(strftime('%s', started_at) AS INTEGER) * 1000 FROM runs",
                             c->experiments_db, err, errlen);
  int rc = st ? SQLITE_ROW : SQLITE_ERROR;
  while (st && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    RunRow *x = runs_add(l, column_str(st, 0));
    x->experiment_id = dup_or_null(column_str(st, 1));
    x->status = dup_or_null(column_str(st, 2));
    x->started_at = dup_or_null(column_str(st, 3));
    x->ended_at = dup_or_null(column_str(st, 4));
    if (sqlite3_column_type(st, 5) != SQLITE_NULL) x->started_ms = sqlite3_column_int64(st, 5);
  }
  if (st && rc != SQLITE_DONE) snprintf(err, errlen, "%s: %s", c->experiments_db, sqlite3_errmsg(db));
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rc == SQLITE_DONE ? 0 : -1;
}

/* Last step and time of a run: its train/loss (one index seek), else any tag. */
static int run_progress(const VizConfig *c, RunRow *x, int rank, char *err, size_t errlen) {
  char path[4096];
  rank_path(c, x->id, rank, path, sizeof path);
  sqlite3 *db = db_open_ro(path, err, errlen);
  if (!db) return -1;
  // coalesce evaluates lazily: the full scan runs only for a run without train/loss.
  sqlite3_stmt *st = prepare(db,
                             "SELECT coalesce((SELECT step FROM metrics WHERE run = ?1 AND tag = 'train/loss'"
                             " ORDER BY step DESC LIMIT 1), (SELECT max(step) FROM metrics WHERE run = ?1)),"
                             " coalesce((SELECT ts_ms FROM metrics WHERE run = ?1 AND tag = 'train/loss'"
                             " ORDER BY step DESC LIMIT 1), (SELECT max(ts_ms) FROM metrics WHERE run = ?1))",
                             path, err, errlen);
  int rc = -1;
  if (st) {
    sqlite3_bind_text(st, 1, x->id, -1, SQLITE_STATIC);
    int s = sqlite3_step(st);
    if (s == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
      x->last_step = sqlite3_column_int64(st, 0);
      x->last_ts = sqlite3_column_int64(st, 1);
    }
    rc = s == SQLITE_ROW || s == SQLITE_DONE ? 0 : -1;
    if (rc) snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(db));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rc;
}

static int64_t run_recency(const RunRow *x) { return x->last_ts >= 0 ? x->last_ts : x->started_ms; }

static int cmp_run_recent(const void *a, const void *b) {
  int64_t x = run_recency(a), y = run_recency(b);
  if (x != y) return x < y ? 1 : -1;
  return strcmp(((const RunRow *)a)->id, ((const RunRow *)b)->id);
}

static void api_runs(const VizConfig *c, const char *query, HttpResponse *r) {
  char err[ERR_LEN];
  RunList l = {0};
  if (runs_from_experiments(c, &l, err, sizeof err)) goto fail;
  DIR *d = opendir(c->metrics_dir);
  if (!d) {
    snprintf(err, sizeof err, "%s: cannot read the metrics directory", c->metrics_dir);
    goto fail;
  }
  for (struct dirent *e; (e = readdir(d));)
    if (run_name_ok(e->d_name) && !runs_find(&l, e->d_name)) {
      int n;
      free(run_ranks(c, e->d_name, &n));
      if (n) runs_add(&l, e->d_name);
    }
  closedir(d);
  for (int i = 0; i < l.n; i++) {
    int *ranks = run_ranks(c, l.v[i].id, &l.v[i].ranks);
    int rc = l.v[i].ranks ? run_progress(c, &l.v[i], ranks[0], err, sizeof err) : 0;
    free(ranks);
    if (rc) goto fail;
  }
  if (l.n) qsort(l.v, (size_t)l.n, sizeof *l.v, cmp_run_recent);
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_arr(&w, "runs");
  for (int i = 0; i < l.n; i++) {
    const RunRow *x = &l.v[i];
    jw_obj(&w, NULL);
    jw_str(&w, "run", x->id);
    const char *keys[] = {"experiment_id", "status", "started_at", "ended_at"};
    const char *vals[] = {x->experiment_id, x->status, x->started_at, x->ended_at};
    for (int k = 0; k < 4; k++) {
      if (vals[k]) jw_str(&w, keys[k], vals[k]);
      else jw_null(&w, keys[k]);
    }
    if (x->last_step >= 0) jw_int(&w, "last_step", x->last_step), jw_int(&w, "last_ts", x->last_ts);
    else jw_null(&w, "last_step"), jw_null(&w, "last_ts");
    jw_int(&w, "ranks", x->ranks);
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_obj_end(&w);
  respond_json(r, &w);
  runs_free(&l);
  return;
fail:
  runs_free(&l);
  http_error(r, 500, err);
}

static void api_tags(const VizConfig *c, const char *query, HttpResponse *r) {
  char run[RUN_NAME_MAX + 1], err[ERR_LEN];
  int *ranks, nranks, ntags = 0;
  char **tags = NULL;
  if (resolve_run(c, query, run, &ranks, &nranks, r)) return;
  if (run_tags(c, run, ranks, nranks, &tags, &ntags, err, sizeof err)) {
    free(ranks);
    http_error(r, 500, err);
    return;
  }
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "run", run);
  jw_arr(&w, "tags");
  for (int i = 0; i < ntags; i++) jw_str(&w, NULL, tags[i]), free(tags[i]);
  jw_arr_end(&w);
  jw_obj_end(&w);
  respond_json(r, &w);
  free(tags);
  free(ranks);
}

/* Reads all (step, value) of tag in one file, ascending by step. */
static int read_series(const char *path, const char *run, const char *tag, double **xs, double **ys, int *n,
                       char *err, size_t errlen) {
  *xs = *ys = NULL;
  *n = 0;
  sqlite3 *db = db_open_ro(path, err, errlen);
  if (!db) return -1;
  sqlite3_stmt *st = prepare(db, "SELECT step, value FROM metrics WHERE run = ?1 AND tag = ?2 ORDER BY step",
                             path, err, errlen);
  int rc = st ? SQLITE_ROW : SQLITE_ERROR, cap = 0;
  if (st) {
    sqlite3_bind_text(st, 1, run, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, tag, -1, SQLITE_STATIC);
  }
  while (st && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (*n == cap) {
      cap = cap ? 2 * cap : 1024;
      *xs = xrealloc(*xs, (size_t)cap * sizeof **xs);
      *ys = xrealloc(*ys, (size_t)cap * sizeof **ys);
    }
    (*xs)[*n] = (double)sqlite3_column_int64(st, 0);
    (*ys)[(*n)++] = sqlite3_column_double(st, 1);
  }
  if (st && rc != SQLITE_DONE) snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(db));
  sqlite3_finalize(st);
  sqlite3_close(db);
  if (rc == SQLITE_DONE) return 0;
  free(*xs); /* no partial series on error */
  free(*ys);
  *xs = *ys = NULL;
  *n = 0;
  return -1;
}

static void api_series(const VizConfig *c, const char *query, HttpResponse *r) {
  char run[RUN_NAME_MAX + 1], tag[PARAM_MAX], num[32], err[ERR_LEN];
  int got_tag = query_get(query, "tag", tag, sizeof tag), points = POINTS_DEFAULT;
  if (got_tag <= 0 || !tag[0]) {
    http_error(r, 400, got_tag < 0 ? "invalid parameter 'tag'" : "missing parameter 'tag'");
    return;
  }
  int got_points = query_get(query, "points", num, sizeof num);
  if (got_points) {
    char *end;
    long v = got_points > 0 ? strtol(num, &end, 10) : 0;
    if (got_points < 0 || !num[0] || *end || v < POINTS_MIN || v > POINTS_MAX) {
      snprintf(err, sizeof err, "points must be an integer in [%d, %d]", POINTS_MIN, POINTS_MAX);
      http_error(r, 400, err);
      return;
    }
    points = (int)v;
  }
  int *ranks, nranks;
  if (resolve_run(c, query, run, &ranks, &nranks, r)) return;
  // Per-rank tags live in their rank's file; the rest are read from the lowest rank.
  int rank = tag_rank(tag), have = 0;
  if (rank < 0 && nranks) rank = ranks[0];
  for (int i = 0; i < nranks; i++) have |= ranks[i] == rank;
  free(ranks);
  double *xs = NULL, *ys = NULL;
  int n = 0;
  if (have) {
    char path[4096];
    rank_path(c, run, rank, path, sizeof path);
    if (read_series(path, run, tag, &xs, &ys, &n, err, sizeof err)) {
      http_error(r, 500, err);
      return;
    }
  }
  int *keep = xmalloc((size_t)(n ? n : 1) * sizeof *keep);
  int k = lttb_select(xs, ys, n, points, keep);
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "run", run);
  jw_str(&w, "tag", tag);
  if (have) jw_int(&w, "rank", rank);
  else jw_null(&w, "rank");
  jw_int(&w, "total", n);
  jw_arr(&w, "points");
  for (int i = 0; i < k; i++) {
    jw_arr(&w, NULL);
    jw_int(&w, NULL, (int64_t)xs[keep[i]]);
    jw_num(&w, NULL, ys[keep[i]]);
    jw_arr_end(&w);
  }
  jw_arr_end(&w);
  jw_obj_end(&w);
  respond_json(r, &w);
  free(keep);
  free(xs);
  free(ys);
}

/* Opens the lowest rank's file of run with the latest-value statement; NULL
 * without error when the run has no metric files yet. */
static sqlite3 *open_rank0(const VizConfig *c, const char *run, const int *ranks, int nranks, sqlite3_stmt **latest,
                           int *failed, char *err, size_t errlen) {
  *latest = NULL;
  *failed = 0;
  if (!nranks) return NULL;
  char path[4096];
  rank_path(c, run, ranks[0], path, sizeof path);
  sqlite3 *db = db_open_ro(path, err, errlen);
  if (db && !(*latest = prepare(db, SQL_LATEST, path, err, errlen))) {
    sqlite3_close(db);
    db = NULL;
  }
  *failed = !db;
  return db;
}

static const struct {
  const char *key, *tag;
} SUMMARY[] = {
    {"loss", "train/loss"},
    {"grad_norm", "train/grad_norm"},
    {"lr", "optimizer/lr"},
    {"tokens_per_s", "throughput/tokens_per_s_gpu"},
    {"ms_per_step", "throughput/ms_per_step"},
    {"loader_wait_ms", "throughput/loader_wait_ms"},
    {"tflops", "efficiency/tflops"},
    {"mfu", "efficiency/mfu"},
    {"val_loss", "validation/loss"},
    {"val_ppl", "validation/ppl"},
    {"val_bpb", "validation/bpb"},
    {"host_rss_gib", "memory/host_max_rss_gib"},
    {"device_peak_gib", "memory/device_peak_gib"},
};

static void api_summary(const VizConfig *c, const char *query, HttpResponse *r) {
  char run[RUN_NAME_MAX + 1], err[ERR_LEN];
  int *ranks, nranks, failed;
  if (resolve_run(c, query, run, &ranks, &nranks, r)) return;
  sqlite3_stmt *st;
  sqlite3 *db = open_rank0(c, run, ranks, nranks, &st, &failed, err, sizeof err);
  free(ranks);
  if (failed) {
    http_error(r, 500, err);
    return;
  }
  enum { NS = sizeof SUMMARY / sizeof SUMMARY[0] };
  int64_t steps[NS];
  double vals[NS];
  int found[NS] = {0};
  for (int i = 0; i < NS && db; i++)
    if ((found[i] = metric_latest(db, st, run, SUMMARY[i].tag, &steps[i], &vals[i], err, sizeof err)) < 0) {
      sqlite3_finalize(st);
      sqlite3_close(db);
      http_error(r, 500, err);
      return;
    }
  sqlite3_finalize(st);
  sqlite3_close(db);
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "run", run);
  // The step of the training values (train/loss) and of the validation ones.
  if (found[0]) jw_int(&w, "step", steps[0]);
  else jw_null(&w, "step");
  if (found[8]) jw_int(&w, "val_step", steps[8]);
  else jw_null(&w, "val_step");
  for (int i = 0; i < NS; i++) {
    if (found[i]) jw_num(&w, SUMMARY[i].key, vals[i]);
    else jw_null(&w, SUMMARY[i].key);
  }
  jw_obj_end(&w);
  respond_json(r, &w);
}

static const char *const ROUTER_METRICS[] = {"cv", "entropy", "max_load", "bias_range", "experts_active"};
enum { N_ROUTER = sizeof ROUTER_METRICS / sizeof ROUTER_METRICS[0] };

typedef struct RouterLayer {
  int layer, have[N_ROUTER];
  double v[N_ROUTER];
} RouterLayer;

static int cmp_layer(const void *a, const void *b) {
  return cmp_int(&((const RouterLayer *)a)->layer, &((const RouterLayer *)b)->layer);
}

/* Reads the latest router values of run from db into layers and w's "agg". */
static int router_read(sqlite3 *db, sqlite3_stmt *st, const char *run, char **tags, int ntags, RouterLayer **layers,
                       int *nl, int64_t *step, JsonW *agg, char *err, size_t errlen) {
  int cap = 0;
  for (int i = 0; i < ntags; i++) {
    int layer, used = 0, m;
    int64_t s;
    double v;
    int is_agg = !strncmp(tags[i], "router_agg/", 11);
    if (!is_agg) {
      if (sscanf(tags[i], "router/layer_%d/%n", &layer, &used) != 1 || !used) continue;
      for (m = 0; m < N_ROUTER && strcmp(tags[i] + used, ROUTER_METRICS[m]); m++) {}
      if (m == N_ROUTER) continue;
    }
    int got = metric_latest(db, st, run, tags[i], &s, &v, err, errlen);
    if (got < 0) return -1;
    if (!got) continue;
    if (s > *step) *step = s;
    if (is_agg) {
      jw_num(agg, tags[i] + 11, v);
      continue;
    }
    RouterLayer *L = NULL;
    for (int k = 0; k < *nl && !L; k++)
      if ((*layers)[k].layer == layer) L = &(*layers)[k];
    if (!L) {
      if (*nl == cap) *layers = xrealloc(*layers, (size_t)(cap = cap ? 2 * cap : 16) * sizeof **layers);
      L = &(*layers)[(*nl)++];
      *L = (RouterLayer){.layer = layer};
    }
    L->have[m] = 1;
    L->v[m] = v;
  }
  return 0;
}

static void api_router(const VizConfig *c, const char *query, HttpResponse *r) {
  char run[RUN_NAME_MAX + 1], err[ERR_LEN];
  int *ranks, nranks, failed, ntags = 0, nl = 0;
  char **tags = NULL;
  RouterLayer *layers = NULL;
  int64_t step = -1;
  if (resolve_run(c, query, run, &ranks, &nranks, r)) return;
  sqlite3_stmt *st;
  sqlite3 *db = open_rank0(c, run, ranks, nranks, &st, &failed, err, sizeof err);
  JsonW agg;
  jw_init(&agg, 0);
  jw_obj(&agg, NULL);
  int rc = failed ? -1 : 0;
  if (db) {
    rc = run_tags(c, run, ranks, 1, &tags, &ntags, err, sizeof err);
    if (!rc) rc = router_read(db, st, run, tags, ntags, &layers, &nl, &step, &agg, err, sizeof err);
  }
  jw_obj_end(&agg);
  char *agg_json = jw_finish(&agg);
  for (int i = 0; i < ntags; i++) free(tags[i]);
  free(tags);
  free(ranks);
  sqlite3_finalize(st);
  sqlite3_close(db);
  if (rc) {
    free(agg_json);
    free(layers);
    http_error(r, 500, err);
    return;
  }
  if (nl) qsort(layers, (size_t)nl, sizeof *layers, cmp_layer);
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "run", run);
  if (step >= 0) jw_int(&w, "step", step);
  else jw_null(&w, "step");
  jw_arr(&w, "metrics");
  for (int m = 0; m < N_ROUTER; m++) jw_str(&w, NULL, ROUTER_METRICS[m]);
  jw_arr_end(&w);
  jw_arr(&w, "layers");
  for (int i = 0; i < nl; i++) {
    jw_obj(&w, NULL);
    jw_int(&w, "layer", layers[i].layer);
    for (int m = 0; m < N_ROUTER; m++) {
      if (layers[i].have[m]) jw_num(&w, ROUTER_METRICS[m], layers[i].v[m]);
      else jw_null(&w, ROUTER_METRICS[m]);
    }
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_raw(&w, "agg", agg_json);
  jw_obj_end(&w);
  respond_json(r, &w);
  free(agg_json);
  free(layers);
}

static void api_experiments(const VizConfig *c, const char *query, HttpResponse *r) {
  char err[ERR_LEN];
  int failed;
  sqlite3 *db = experiments_ro(c, &failed, err, sizeof err);
  sqlite3_stmt *st = db ? prepare(db,
                                  "SELECT e.id, e.name, e.project, e.description, e.created_at, count(r.id),"
                                  " max(r.started_at) FROM experiments e LEFT JOIN runs r ON r.experiment_id = e.id"
                                  " GROUP BY e.id ORDER BY max(r.started_at) DESC, e.created_at DESC",
                                  c->experiments_db, err, sizeof err)
                        : NULL;
  if (failed || (db && !st)) {
    sqlite3_close(db);
    http_error(r, 500, err);
    return;
  }
  static const char *const COLS[] = {"id", "name", "project", "description", "created_at", "runs",
                                     "last_started_at"};
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_arr(&w, "experiments");
  int rc = SQLITE_DONE;
  while (st && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    jw_obj(&w, NULL);
    for (int i = 0; i < 7; i++) jw_column(&w, COLS[i], st, i);
    jw_obj_end(&w);
  }
  if (rc != SQLITE_DONE) snprintf(err, sizeof err, "%s: %s", c->experiments_db, sqlite3_errmsg(db));
  sqlite3_finalize(st);
  sqlite3_close(db);
  jw_arr_end(&w);
  jw_obj_end(&w);
  if (rc != SQLITE_DONE) {
    free(jw_finish(&w));
    http_error(r, 500, err);
    return;
  }
  respond_json(r, &w);
}

/* Nesting depth of a parsed document (a scalar is 0). */
static int json_depth(const Json *j) {
  int d = 0;
  for (int i = 0; i < j->n; i++) {
    int c = json_depth(j->items[i]);
    if (c > d) d = c;
  }
  return j->type == JSON_ARR || j->type == JSON_OBJ ? d + 1 : 0;
}

/* A JSON text column embedded as a value when it parses, else as a string.
 * The writer nests at most 63 levels (the parser accepts 200): a deeper
 * document goes in as a string rather than failing its assertion. */
static void jw_json_column(JsonW *w, const char *key, sqlite3_stmt *st, int i) {
  const char *s = column_str(st, i);
  char err[256];
  Json *j = s ? json_parse(s, strlen(s), err, sizeof err) : NULL;
  if (j && w->depth + json_depth(j) >= (int)(sizeof w->first / sizeof w->first[0]) - 1) {
    json_free(j);
    j = NULL;
  }
  if (j) {
    char *canon = json_dump(j);
    jw_raw(w, key, canon);
    free(canon);
    json_free(j);
  } else jw_column(w, key, st, i);
}

static void api_experiment_run(const VizConfig *c, const char *query, HttpResponse *r) {
  char run[RUN_NAME_MAX + 1], err[ERR_LEN];
  int got = query_get(query, "run", run, sizeof run), failed;
  if (got <= 0 || !run_name_ok(run)) {
    http_error(r, 400, got == 0 ? "missing parameter 'run'" : "invalid run id");
    return;
  }
  sqlite3 *db = experiments_ro(c, &failed, err, sizeof err);
  sqlite3_stmt *st = db ? prepare(db,
                                  "SELECT id, experiment_id, status, started_at, ended_at, git_hash, git_dirty,"
                                  " config_json, results_json FROM runs WHERE id = ?1",
                                  c->experiments_db, err, sizeof err)
                        : NULL;
  int rc = st ? (sqlite3_bind_text(st, 1, run, -1, SQLITE_STATIC), sqlite3_step(st)) : SQLITE_ERROR;
  if (rc == SQLITE_ROW) {
    static const char *const COLS[] = {"id", "experiment_id", "status", "started_at", "ended_at", "git_hash",
                                       "git_dirty", "config_json", "results_json"};
    JsonW w;
    jw_init(&w, 0);
    jw_obj(&w, NULL);
    jw_obj(&w, "run");
    for (int i = 0; i < 9; i++) (i >= 7 ? jw_json_column : jw_column)(&w, COLS[i], st, i);
    jw_obj_end(&w);
    jw_obj_end(&w);
    respond_json(r, &w);
  } else if (failed || (db && rc != SQLITE_DONE)) {
    if (st) snprintf(err, sizeof err, "%s: %s", c->experiments_db, sqlite3_errmsg(db));
    http_error(r, 500, err);
  } else {
    snprintf(err, sizeof err, "no run '%s' in the experiments database", run);
    http_error(r, 404, err);
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static const struct {
  const char *path;
  ApiFn fn;
} ROUTES[] = {
    {"/api/health", api_health},
    {"/api/runs", api_runs},
    {"/api/tags", api_tags},
    {"/api/series", api_series},
    {"/api/summary", api_summary},
    {"/api/router", api_router},
    {"/api/experiments", api_experiments},
    {"/api/experiments/run", api_experiment_run},
};

void viz_handle(void *ud, const char *method, const char *target, HttpResponse *r) {
  const VizConfig *c = ud;
  if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
    http_error(r, 405, "only GET and HEAD are allowed");
    return;
  }
  // Only fixed routes exist (no files are served), so a path with ".." or an
  // encoded character is never meaningful: refuse it outright.
  const char *q = strchr(target, '?');
  size_t plen = q ? (size_t)(q - target) : strlen(target);
  char path[256];
  if (plen >= sizeof path || memchr(target, '%', plen) || memmem(target, plen, "..", 2)) {
    http_error(r, 400, "invalid path");
    return;
  }
  memcpy(path, target, plen);
  path[plen] = 0;
  const char *query = q ? q + 1 : "";
  if (!strcmp(path, "/") || !strcmp(path, "/index.html")) {
    r->status = 200;
    r->content_type = "text/html; charset=utf-8";
    r->body = (char *)VIZ_PAGE;
    r->len = strlen(VIZ_PAGE);
    r->body_static = 1;
    return;
  }
  for (size_t i = 0; i < sizeof ROUTES / sizeof ROUTES[0]; i++)
    if (!strcmp(path, ROUTES[i].path)) {
      ROUTES[i].fn(c, query, r);
      return;
    }
  http_error(r, 404, "not found");
}
