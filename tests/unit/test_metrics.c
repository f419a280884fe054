/* test_metrics.c: experiments.db and per-rank metric files.
 *
 * Schema (tables, indexes, WAL), experiment and run rows through their
 * statuses (a resumed run id reopens its row), metrics written only at flush,
 * INSERT OR REPLACE on (run, tag, step), the files read by the sqlite3 CLI,
 * a run killed with SIGKILL mid-flight (its flushed metrics survive; the row
 * can be marked killed), clear errors for bad files and arguments, run ids
 * and git facts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>

#include "core/fsutil.h"
#include "core/log.h"
#include "train/metrics.h"

#include "tmpdir_fixture.h"

/* First column of the first row of sql on path as text ("" when NULL, "<none>"
 * when there is no row); a separate connection, as an outside reader. */
static char *query(const char *path, const char *sql) {
  sqlite3 *db;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) fail_msg("%s: %s", sql, sqlite3_errmsg(db));
  int rc = sqlite3_step(st);
  char *out;
  if (rc == SQLITE_ROW) {
    const unsigned char *t = sqlite3_column_text(st, 0);
    out = xstrdup(t ? (const char *)t : "");
  } else {
    assert_int_equal(rc, SQLITE_DONE);
    out = xstrdup("<none>");
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

static void expect_query(const char *path, const char *sql, const char *want) {
  char *got = query(path, sql);
  if (strcmp(got, want)) fail_msg("%s -> '%s', expected '%s'", sql, got, want);
  free(got);
}

static void test_experiments_rows_and_statuses(void **state) {
  Fixture *f = *state;
  char err[1024];
  const char *db = at(f->dir, "sub/experiments.db");
  Experiments *x = experiments_open(db, err, sizeof err);
  if (!x) fail_msg("%s", err);
  expect_query(db, "PRAGMA journal_mode", "wal");
  expect_query(db,
               "SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_master "
               "WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%' ORDER BY name)",
               "experiments,idx_runs_experiment,idx_runs_status,runs");
  const char *hash = "0123456789abcdef0123456789abcdef01234567";
  assert_int_equal(experiments_run_start(x, "run_a", "moe-small", "{\"dim\": 64}", hash, 1, err, sizeof err), 0);
  assert_int_equal(experiments_run_start(x, "run_b", "moe-small", "{\"dim\": 32}", hash, 0, err, sizeof err), 0);
  expect_query(db, "SELECT count(*) FROM experiments", "1");
  expect_query(db, "SELECT name || '|' || project || '|' || (created_at IS NOT NULL) FROM experiments",
               "moe-small|nmoe|1");
  expect_query(db,
               "SELECT experiment_id || '|' || config_json || '|' || git_hash || '|' || git_dirty || '|' ||"
               " status || '|' || (started_at IS NOT NULL) || '|' || (ended_at IS NULL) FROM runs WHERE id='run_a'",
               "moe-small|{\"dim\": 64}|0123456789abcdef0123456789abcdef01234567|1|running|1|1");

  const char *res = "{\"final_loss\": 2.5, \"tokens_seen\": 1024, \"steps_completed\": 8}";
  assert_int_equal(experiments_run_end(x, "run_a", "completed", res, err, sizeof err), 0);
  expect_query(db, "SELECT status || '|' || (ended_at IS NOT NULL) || '|' || results_json FROM runs WHERE id='run_a'",
               "completed|1|{\"final_loss\": 2.5, \"tokens_seen\": 1024, \"steps_completed\": 8}");
  assert_int_equal(experiments_run_end(x, "run_b", "failed", "{\"error\": \"NaN loss\"}", err, sizeof err), 0);
  expect_query(db, "SELECT status FROM runs WHERE id='run_b'", "failed");
  expect_query(db, "SELECT count(*) FROM runs WHERE status='running'", "0");

  /* A resumed run (same NMOE_RUN) is running again, with no end. */
  assert_int_equal(experiments_run_start(x, "run_b", "moe-small", "{\"dim\": 32}", hash, 0, err, sizeof err), 0);
  expect_query(db, "SELECT status || '|' || (ended_at IS NULL) || '|' || (results_json IS NULL) FROM runs WHERE id='run_b'",
               "running|1|1");
  expect_query(db, "SELECT count(*) FROM runs", "2");

  assert_int_equal(experiments_run_end(x, "run_b", "paused", NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "invalid run status 'paused'"));
  assert_int_equal(experiments_run_end(x, "run_zz", "completed", NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "no run 'run_zz'"));
  experiments_close(x);

  /* Reopening an existing database keeps everything. */
  x = experiments_open(db, err, sizeof err);
  assert_non_null(x);
  expect_query(db, "SELECT count(*) FROM runs", "2");
  experiments_close(x);
}

static void test_metrics_flush_and_replace(void **state) {
  Fixture *f = *state;
  char err[1024];
  Metrics *m = metrics_open(f->dir, "run_x", 3, err, sizeof err);
  if (!m) fail_msg("%s", err);
  const char *path = at(f->dir, "run_x/rank_3.sqlite");
  assert_true(fs_exists(path));
  expect_query(path, "PRAGMA journal_mode", "wal");
  for (int step = 1; step <= 50; step++) {
    metrics_log(m, "train/loss", step, 10.0 / step);
    metrics_log(m, "optimizer/lr", step, 1e-3 * step);
  }
  expect_query(path, "SELECT count(*) FROM metrics", "0"); /* buffered until flush */
  assert_int_equal(metrics_flush(m, err, sizeof err), 0);
  expect_query(path, "SELECT count(*) FROM metrics", "100");
  expect_query(path, "SELECT count(DISTINCT tag) || '|' || min(step) || '|' || max(step) FROM metrics", "2|1|50");
  expect_query(path, "SELECT value FROM metrics WHERE tag='train/loss' AND step=4", "2.5");
  expect_query(path, "SELECT run FROM metrics LIMIT 1", "run_x");
  expect_query(path, "SELECT count(*) FROM metrics WHERE ts_ms < 1600000000000", "0");
  assert_int_equal(metrics_flush(m, err, sizeof err), 0); /* nothing pending */

  /* Same (run, tag, step): replaced, not duplicated. */
  metrics_log(m, "train/loss", 4, 7.25);
  metrics_log(m, "train/loss", 51, 0.5);
  assert_int_equal(metrics_flush(m, err, sizeof err), 0);
  expect_query(path, "SELECT count(*) FROM metrics", "101");
  expect_query(path, "SELECT value FROM metrics WHERE tag='train/loss' AND step=4", "7.25");
  /* close flushes what is pending. */
  metrics_log(m, "throughput/r3/tokens_per_s", 51, 12345.0);
  metrics_close(m);
  expect_query(path, "SELECT value FROM metrics WHERE tag='throughput/r3/tokens_per_s'", "12345.0");
  /* NULL handle (metrics disabled) is a no-op. */
  metrics_log(NULL, "x", 1, 1.0);
  assert_int_equal(metrics_flush(NULL, err, sizeof err), 0);
  metrics_close(NULL);
}

/* Output of a shell command (first line), or NULL when it fails. */
static char *shell(const char *cmd) {
  FILE *p = popen(cmd, "r");
  if (!p) return NULL;
  char buf[256] = "";
  if (!fgets(buf, sizeof buf, p)) buf[0] = 0;
  int rc = pclose(p);
  buf[strcspn(buf, "\n")] = 0;
  return rc == 0 ? xstrdup(buf) : NULL;
}

static void test_sqlite3_cli_reads(void **state) {
  Fixture *f = *state;
  if (access("/usr/bin/sqlite3", X_OK) && system("command -v sqlite3 >/dev/null 2>&1")) skip();
  char err[1024], cmd[1024];
  Metrics *m = metrics_open(f->dir, "run_cli", 0, err, sizeof err);
  assert_non_null(m);
  for (int s = 0; s < 7; s++) metrics_log(m, "train/loss", s, 1.0 + s);
  assert_int_equal(metrics_flush(m, err, sizeof err), 0);
  /* Read while the writer still holds the file open (WAL). */
  snprintf(cmd, sizeof cmd, "sqlite3 %s 'select count(*) from metrics'", at(f->dir, "run_cli/rank_0.sqlite"));
  char *out = shell(cmd);
  assert_non_null(out);
  assert_string_equal(out, "7");
  free(out);
  metrics_close(m);
  snprintf(cmd, sizeof cmd, "sqlite3 %s 'select sum(value) from metrics'", at(f->dir, "run_cli/rank_0.sqlite"));
  out = shell(cmd);
  assert_non_null(out);
  assert_string_equal(out, "28.0");
  free(out);
  Experiments *x = experiments_open(at(f->dir, "experiments.db"), err, sizeof err);
  assert_int_equal(experiments_run_start(x, "run_cli", "e1", "{}", "unknown", 0, err, sizeof err), 0);
  experiments_close(x);
  snprintf(cmd, sizeof cmd, "sqlite3 %s \"select id || ' ' || status from runs\"", at(f->dir, "experiments.db"));
  out = shell(cmd);
  assert_non_null(out);
  assert_string_equal(out, "run_cli running");
  free(out);
}

static void test_killed_run(void **state) {
  Fixture *f = *state;
  char err[1024];
  const char *db = at(f->dir, "experiments.db");
  int pfd[2];
  assert_int_equal(pipe(pfd), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(pfd[0]);
    Experiments *x = experiments_open(db, err, sizeof err);
    Metrics *m = metrics_open(f->dir, "run_k", 0, err, sizeof err);
    if (!x || !m || experiments_run_start(x, "run_k", "exp", "{}", "unknown", 0, err, sizeof err)) _exit(3);
    for (int s = 1; s <= 20; s++) metrics_log(m, "train/loss", s, 1.0 / s);
    if (metrics_flush(m, err, sizeof err)) _exit(4);
    metrics_log(m, "train/loss", 21, 0.01); /* never flushed */
    if (write(pfd[1], "x", 1) != 1) _exit(5);
    for (;;) pause(); /* killed while holding both databases open */
  }
  close(pfd[1]);
  char c;
  assert_int_equal(read(pfd[0], &c, 1), 1);
  close(pfd[0]);
  kill(pid, SIGKILL);
  int status;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFSIGNALED(status));
  expect_query(db, "SELECT status FROM runs WHERE id='run_k'", "running");
  Experiments *x = experiments_open(db, err, sizeof err);
  if (!x) fail_msg("%s", err);
  assert_int_equal(experiments_run_end(x, "run_k", "killed", NULL, err, sizeof err), 0);
  experiments_close(x);
  expect_query(db, "SELECT status || '|' || (ended_at IS NOT NULL) FROM runs WHERE id='run_k'", "killed|1");
  const char *mp = at(f->dir, "run_k/rank_0.sqlite");
  expect_query(mp, "SELECT count(*) FROM metrics", "20");
  /* The file stays writable after the crash. */
  Metrics *m = metrics_open(f->dir, "run_k", 0, err, sizeof err);
  assert_non_null(m);
  metrics_log(m, "train/loss", 21, 0.02);
  assert_int_equal(metrics_flush(m, err, sizeof err), 0);
  metrics_close(m);
  expect_query(mp, "SELECT count(*) FROM metrics", "21");
}

static void test_errors_are_clear(void **state) {
  Fixture *f = *state;
  char err[1024] = "";
  const char *bad = at(f->dir, "experiments.db");
  char junk[4096];
  memset(junk, 'z', sizeof junk);
  assert_int_equal(fs_write_atomic(bad, junk, sizeof junk, err, sizeof err), 0);
  assert_null(experiments_open(bad, err, sizeof err));
  if (!strstr(err, bad) || !strstr(err, "not an SQLite database")) fail_msg("unclear: %s", err);
  /* metrics_dir is a regular file: the directory cannot be made. */
  assert_null(metrics_open(bad, "r", 0, err, sizeof err));
  assert_non_null(strstr(err, bad));
}

static void test_run_id_and_git(void **state) {
  Fixture *f = *state;
  setenv("NMOE_RUN", "my_run", 1);
  char *id = run_id_new();
  assert_string_equal(id, "my_run");
  free(id);
  unsetenv("NMOE_RUN");
  id = run_id_new();
  char want[64];
  long long secs;
  int pid;
  assert_int_equal(sscanf(id, "run_%lld_%d", &secs, &pid), 2);
  assert_int_equal(pid, (int)getpid());
  snprintf(want, sizeof want, "run_%lld_%d", secs, pid);
  assert_string_equal(id, want);
  free(id);

  char hash[41];
  int dirty = -1;
  setenv("NMOE_GIT_COMMIT", "0123abc", 1); /* images record the commit this way */
  git_info(hash, &dirty);
  assert_string_equal(hash, "0123abc");
  unsetenv("NMOE_GIT_COMMIT");
  git_info(hash, &dirty); /* in the repository (or "unknown" without git) */
  char *head = shell("git rev-parse HEAD 2>/dev/null");
  assert_string_equal(hash, head ? head : "unknown");
  free(head);
  assert_true(dirty == 0 || dirty == 1);
  char cwd[4096];
  assert_non_null(getcwd(cwd, sizeof cwd));
  assert_int_equal(chdir(f->dir), 0); /* not a git work tree */
  git_info(hash, &dirty);
  assert_string_equal(hash, "unknown");
  assert_int_equal(dirty, 0);
  assert_int_equal(chdir(cwd), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_experiments_rows_and_statuses, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_metrics_flush_and_replace, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_sqlite3_cli_reads, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_killed_run, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_errors_are_clear, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_run_id_and_git, tmpdir_setup, tmpdir_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
