/* metrics.c: experiments.db run records and per-rank metric files in SQLite
 * (see metrics.h; schema as reference section 8.1/8.2, DuckDB replaced by
 * SQLite so sqlite3 and DuckDB both read the files).
 *
 * Metric values are buffered in memory by metrics_log and written by
 * metrics_flush through one prepared INSERT OR REPLACE in one transaction, so
 * a step pays only an append. */
#include "train/metrics.h"

#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/log.h"

/* A failed SQLite call: one line naming the file, the action, SQLite's
 * message and a hint; then `goto fail`. */
#define SQL_CHECK(db, label, rc, what)                                  \
  do {                                                                  \
    int rc_ = (rc);                                                     \
    if (rc_ != SQLITE_OK && rc_ != SQLITE_DONE && rc_ != SQLITE_ROW) {  \
      sql_error(db, label, rc_, what, err, errlen);                     \
      goto fail;                                                        \
    }                                                                   \
  } while (0)

static const char *sql_hint(int rc) {
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return " (another writer?)";
    case SQLITE_CANTOPEN: return " (does the directory exist and is it writable?)";
    case SQLITE_READONLY:
    case SQLITE_PERM: return " (read-only file or file system?)";
    case SQLITE_FULL: return " (disk full?)";
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return " (not an SQLite database, or corrupt)";
    case SQLITE_IOERR: return " (I/O error on the file system)";
    default: return "";
  }
}

static void sql_error(sqlite3 *db, const char *label, int rc, const char *what, char *err, size_t errlen) {
  const char *msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  snprintf(err, errlen, "%s: %s: %s%s", label, what, msg, sql_hint(rc));
}

/* Opens path with WAL (DELETE when the file system cannot do WAL) and a
 * 5 s busy timeout. */
static sqlite3 *db_open(const char *path, const char *label, char *err, size_t errlen) {
  sqlite3 *db = NULL;
  char dir[4096];
  fs_dirname(path, dir, sizeof dir);
  if (fs_mkdirs(dir, err, errlen)) return NULL;
  SQL_CHECK(db, label,
            sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, NULL),
            "cannot open");
  SQL_CHECK(db, label, sqlite3_busy_timeout(db, 5000), "cannot set busy_timeout");
  sqlite3_stmt *st = NULL;
  SQL_CHECK(db, label, sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL), "cannot set WAL mode");
  int rc = sqlite3_step(st);
  int wal = rc == SQLITE_ROW && !strcmp((const char *)sqlite3_column_text(st, 0), "wal");
  sqlite3_finalize(st);
  SQL_CHECK(db, label, rc, "cannot set WAL mode");
  if (!wal) SQL_CHECK(db, label, sqlite3_exec(db, "PRAGMA journal_mode=DELETE", NULL, NULL, NULL), "cannot set journal mode");
  SQL_CHECK(db, label, sqlite3_exec(db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL), "cannot set synchronous");
  return db;
fail:
  sqlite3_close(db);
  return NULL;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------- per-rank metrics */

typedef struct Pending {
  char *tag;
  int64_t step, ts_ms;
  double value;
} Pending;

struct Metrics {
  sqlite3 *db;
  sqlite3_stmt *ins;
  char *run, *label;
  Pending *buf;
  int n, cap;
  int warned_nan;
};

Metrics *metrics_open(const char *metrics_dir, const char *run_id, int rank, char *err, size_t errlen) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s/rank_%d.sqlite", metrics_dir, run_id, rank);
  Metrics *m = xcalloc(1, sizeof *m);
  m->run = xstrdup(run_id);
  m->label = xstrdup(path);
  const char *label = m->label;
  if (!(m->db = db_open(path, label, err, errlen))) goto fail;
  SQL_CHECK(m->db, label,
            sqlite3_exec(m->db,
                         "CREATE TABLE IF NOT EXISTS metrics(run TEXT NOT NULL, tag TEXT NOT NULL, "
                         "step INTEGER NOT NULL, ts_ms INTEGER NOT NULL, value REAL NOT NULL, "
                         "PRIMARY KEY(run, tag, step))",
                         NULL, NULL, NULL),
            "cannot create table metrics");
  SQL_CHECK(m->db, label,
            sqlite3_prepare_v2(m->db, "INSERT OR REPLACE INTO metrics(run, tag, step, ts_ms, value) "
                                      "VALUES(?1, ?2, ?3, ?4, ?5)",
                               -1, &m->ins, NULL),
            "cannot prepare insert");
  return m;
fail:
  metrics_close(m);
  return NULL;
}

void metrics_log(Metrics *m, const char *tag, int64_t step, double value) {
  if (!m) return;
  /* SQLite binds NaN as NULL, which the NOT NULL column refuses: one NaN
   * (a diverged validation loss) would fail every later flush. Skip it. */
  if (isnan(value)) {
    if (!m->warned_nan) log_warn("metrics: %s is NaN at step %lld; NaN values are not recorded", tag, (long long)step);
    m->warned_nan = 1;
    return;
  }
  if (m->n == m->cap) m->buf = xrealloc(m->buf, (size_t)(m->cap = m->cap ? 2 * m->cap : 256) * sizeof *m->buf);
  m->buf[m->n++] = (Pending){xstrdup(tag), step, now_ms(), value};
}

int metrics_flush(Metrics *m, char *err, size_t errlen) {
  if (!m || !m->n) return 0;
  const char *label = m->label;
  int in_tx = 0;
  SQL_CHECK(m->db, label, sqlite3_exec(m->db, "BEGIN IMMEDIATE", NULL, NULL, NULL), "cannot begin a transaction");
  in_tx = 1;
  for (int i = 0; i < m->n; i++) {
    const Pending *p = &m->buf[i];
    sqlite3_reset(m->ins);
    SQL_CHECK(m->db, label, sqlite3_bind_text(m->ins, 1, m->run, -1, SQLITE_STATIC), "bind");
    SQL_CHECK(m->db, label, sqlite3_bind_text(m->ins, 2, p->tag, -1, SQLITE_STATIC), "bind");
    SQL_CHECK(m->db, label, sqlite3_bind_int64(m->ins, 3, p->step), "bind");
    SQL_CHECK(m->db, label, sqlite3_bind_int64(m->ins, 4, p->ts_ms), "bind");
    SQL_CHECK(m->db, label, sqlite3_bind_double(m->ins, 5, p->value), "bind");
    SQL_CHECK(m->db, label, sqlite3_step(m->ins), "cannot insert a metric");
  }
  sqlite3_reset(m->ins);
  SQL_CHECK(m->db, label, sqlite3_exec(m->db, "COMMIT", NULL, NULL, NULL), "cannot commit metrics");
  for (int i = 0; i < m->n; i++) free(m->buf[i].tag);
  m->n = 0;
  return 0;
fail:
  /* Values stay buffered, so a later flush can retry them. */
  sqlite3_reset(m->ins);
  if (in_tx) sqlite3_exec(m->db, "ROLLBACK", NULL, NULL, NULL);
  return -1;
}

void metrics_close(Metrics *m) {
  if (!m) return;
  char err[1024];
  if (m->db && m->ins && metrics_flush(m, err, sizeof err)) log_warn("metrics: %s", err);
  for (int i = 0; i < m->n; i++) free(m->buf[i].tag);
  sqlite3_finalize(m->ins);
  sqlite3_close(m->db);
  free(m->buf);
  free(m->run);
  free(m->label);
  free(m);
}

/* ------------------------------------------------------------ experiments */

struct Experiments {
  sqlite3 *db;
  char *label;
};

static const char *EXPERIMENTS_SCHEMA =
    "CREATE TABLE IF NOT EXISTS experiments("
    " id TEXT PRIMARY KEY, name TEXT NOT NULL, project TEXT NOT NULL, description TEXT,"
    " created_at TEXT DEFAULT (datetime('now')));"
    "CREATE TABLE IF NOT EXISTS runs("
    " id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL REFERENCES experiments(id),"
    " config_json TEXT NOT NULL, git_hash TEXT, git_dirty INTEGER DEFAULT 0,"
    " started_at TEXT DEFAULT (datetime('now')), ended_at TEXT, status TEXT DEFAULT 'running',"
    " results_json TEXT);"
    "CREATE INDEX IF NOT EXISTS idx_runs_experiment ON runs(experiment_id);"
    "CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status);";

Experiments *experiments_open(const char *db_path, char *err, size_t errlen) {
  Experiments *x = xcalloc(1, sizeof *x);
  x->label = xstrdup(db_path);
  const char *label = x->label;
  if (!(x->db = db_open(db_path, label, err, errlen))) goto fail;
  SQL_CHECK(x->db, label, sqlite3_exec(x->db, EXPERIMENTS_SCHEMA, NULL, NULL, NULL), "cannot create tables");
  return x;
fail:
  experiments_close(x);
  return NULL;
}

/* Prepares sql, binds the strings args[0..n) (NULL binds NULL) and runs it. */
static int exec_bound(Experiments *x, const char *sql, const char *const *args, int n, const char *what,
                      char *err, size_t errlen) {
  const char *label = x->label;
  sqlite3_stmt *st = NULL;
  SQL_CHECK(x->db, label, sqlite3_prepare_v2(x->db, sql, -1, &st, NULL), what);
  for (int i = 0; i < n; i++)
    SQL_CHECK(x->db, label,
              args[i] ? sqlite3_bind_text(st, i + 1, args[i], -1, SQLITE_STATIC) : sqlite3_bind_null(st, i + 1),
              what);
  SQL_CHECK(x->db, label, sqlite3_step(st), what);
  sqlite3_finalize(st);
  return 0;
fail:
  sqlite3_finalize(st);
  return -1;
}

int experiments_run_start(Experiments *x, const char *run_id, const char *experiment_id,
                          const char *config_json, const char *git_hash, int git_dirty, char *err,
                          size_t errlen) {
  const char *exp_args[] = {experiment_id};
  if (exec_bound(x, "INSERT OR IGNORE INTO experiments(id, name, project) VALUES(?1, ?1, 'nmoe')", exp_args, 1,
                 "cannot insert the experiment", err, errlen))
    return -1;
  /* A resumed run keeps its id (NMOE_RUN): the row is reopened as running. */
  const char *run_args[] = {run_id, experiment_id, config_json ? config_json : "{}", git_hash,
                            git_dirty ? "1" : "0"};
  return exec_bound(x,
                    "INSERT INTO runs(id, experiment_id, config_json, git_hash, git_dirty, started_at, status)"
                    " VALUES(?1, ?2, ?3, ?4, CAST(?5 AS INTEGER), datetime('now'), 'running')"
                    " ON CONFLICT(id) DO UPDATE SET experiment_id = excluded.experiment_id,"
                    " config_json = excluded.config_json, git_hash = excluded.git_hash,"
                    " git_dirty = excluded.git_dirty, status = 'running', ended_at = NULL,"
                    " results_json = NULL",
                    run_args, 5, "cannot insert the run", err, errlen);
}

int experiments_run_end(Experiments *x, const char *run_id, const char *status, const char *results_json,
                        char *err, size_t errlen) {
  if (strcmp(status, "completed") && strcmp(status, "failed") && strcmp(status, "killed")) {
    snprintf(err, errlen, "%s: invalid run status '%s' (completed, failed or killed)", x->label, status);
    return -1;
  }
  const char *args[] = {status, results_json, run_id};
  if (exec_bound(x, "UPDATE runs SET status = ?1, ended_at = datetime('now'), results_json = ?2 WHERE id = ?3",
                 args, 3, "cannot end the run", err, errlen))
    return -1;
  if (sqlite3_changes(x->db) == 0) {
    snprintf(err, errlen, "%s: no run '%s' to mark %s", x->label, run_id, status);
    return -1;
  }
  return 0;
}

void experiments_close(Experiments *x) {
  if (!x) return;
  sqlite3_close(x->db);
  free(x->label);
  free(x);
}

/* ------------------------------------------------------------- run facts */

char *run_id_new(void) {
  const char *env = getenv("NMOE_RUN");
  if (env && *env) return xstrdup(env);
  char buf[64];
  snprintf(buf, sizeof buf, "run_%lld_%d", (long long)time(NULL), (int)getpid());
  return xstrdup(buf);
}

/* Runs cmd, reading up to n-1 bytes of its output; -1 when it fails. */
static int run_cmd(const char *cmd, char *out, size_t n) {
  FILE *p = popen(cmd, "r");
  if (!p) return -1;
  size_t got = fread(out, 1, n - 1, p);
  out[got] = 0;
  char sink[4096];
  while (fread(sink, 1, sizeof sink, p) > 0) {}
  return pclose(p) == 0 ? (int)got : -1;
}

void git_info(char out_hash[41], int *dirty) {
  char buf[128];
  snprintf(out_hash, 41, "unknown");
  *dirty = 0;
  /* Images carry no .git: the build records the commit in NMOE_GIT_COMMIT. */
  const char *env = getenv("NMOE_GIT_COMMIT");
  if (env && *env) {
    snprintf(out_hash, 41, "%s", env);
    return;
  }
  if (run_cmd("git rev-parse HEAD 2>/dev/null", buf, sizeof buf) < 40 ||
      strspn(buf, "0123456789abcdef") != 40)
    return;
  memcpy(out_hash, buf, 40);
  out_hash[40] = 0;
  char st[2];
  int n = run_cmd("git status --porcelain 2>/dev/null", st, sizeof st);
  *dirty = n > 0;
}
