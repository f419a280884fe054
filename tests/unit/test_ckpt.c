/* test_ckpt.c: split checkpoints.
 *
 * Async save + verified load round trips (one rank, and two ranks in one
 * process, rank 0 finalising after rank 1's files appear), manifest and
 * tracker contents, a full queue blocking instead of dropping, keep_last_n
 * purge (crash debris removed, a newer in-flight step left alone), every
 * user error on load (flipped byte, truncated or missing file, world
 * mismatch), ckpt_latest's fallbacks (tracker to a missing or unfinalised
 * step, broken manifests), sticky saver errors, the finalise
 * timeout, the CLI, and crash safety: children saving with slow writes are
 * killed with SIGKILL at random moments and the parent must always load a
 * complete checkpoint (or find none), then keep saving in the same place. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <math.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "train/ckpt.h"

#include "tmpdir_fixture.h"

/* Also clears the saver's test knobs a test may have set. */
static int teardown(void **state) {
  unsetenv("NMOE_TEST_CKPT_SLOW_MS");
  unsetenv("NMOE_CKPT_FINALIZE_TIMEOUT_S");
  return tmpdir_teardown(state);
}

static const char *iter_file(const char *dir, int64_t step, const char *name) {
  char rel[128];
  snprintf(rel, sizeof rel, "iter_%07lld/%s", (long long)step, name);
  return at(dir, rel);
}

/* ------------------------------------------------- deterministic snapshots */

static uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

static void fill_tensor(CkptTensor *t, const char *name, const char *dtype, size_t esize, int ndim,
                        const int64_t *shape, uint32_t seed) {
  memset(t, 0, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
  t->ndim = ndim;
  size_t n = 1;
  for (int d = 0; d < ndim; d++) n *= (size_t)(t->shape[d] = shape[d]);
  t->nbytes = n * esize;
  t->data = xmalloc(t->nbytes);
  uint8_t *b = t->data;
  for (size_t i = 0; i < t->nbytes; i++) b[i] = (uint8_t)mix(seed * 2654435761U + (uint32_t)i);
}

/* The snapshot a trainer would take at step on rank (contents depend on both). */
static CkptSnapshot *make_snap(int64_t step, int rank) {
  CkptSnapshot *s = xcalloc(1, sizeof *s);
  s->step = step;
  uint32_t seed = (uint32_t)step * 131u;
  s->n_dense = 2;
  s->dense = xcalloc(2, sizeof *s->dense);
  fill_tensor(&s->dense[0], "embed.weight", "F32", 4, 2, (int64_t[]){16, 8}, seed + 1);
  fill_tensor(&s->dense[1], "norm.weight", "BF16", 2, 1, (int64_t[]){8}, seed + 2);
  s->n_rank = 3;
  s->rank_t = xcalloc(3, sizeof *s->rank_t);
  uint32_t rs = seed + 1000u * (uint32_t)(rank + 1);
  fill_tensor(&s->rank_t[0], "layers.1.experts.w1", "F32", 4, 3, (int64_t[]){2, 8, 4}, rs + 1);
  fill_tensor(&s->rank_t[1], "optim.exp_avg", "F64", 8, 1, (int64_t[]){12}, rs + 2);
  fill_tensor(&s->rank_t[2], "rng.state", "U8", 1, 1, (int64_t[]){16}, rs + 3);
  char meta[256];
  snprintf(meta, sizeof meta,
           "{\"step\": %lld, \"rank\": %d, \"git_commit\": \"0123456789abcdef0123456789abcdef01234567\","
           " \"loader\": {\"pos\": %lld}}",
           (long long)step, rank, (long long)step * 10);
  s->meta_json = xstrdup(meta);
  return s;
}

/* Loaded tensors and metadata equal make_snap(step, rank)'s, bit for bit. */
static void check_loaded(const CkptLoaded *l, int64_t step, int rank) {
  CkptSnapshot *want = make_snap(step, rank);
  assert_int_equal(l->step, step);
  assert_int_equal(l->n, want->n_dense + want->n_rank);
  for (int i = 0; i < want->n_dense + want->n_rank; i++) {
    const CkptTensor *w = i < want->n_dense ? &want->dense[i] : &want->rank_t[i - want->n_dense];
    const CkptTensor *g = ckpt_find(l, w->name);
    if (!g) fail_msg("step %lld rank %d: tensor %s missing", (long long)step, rank, w->name);
    assert_string_equal(g->dtype, w->dtype);
    assert_int_equal(g->ndim, w->ndim);
    for (int d = 0; d < w->ndim; d++) assert_int_equal(g->shape[d], w->shape[d]);
    assert_int_equal(g->nbytes, w->nbytes);
    assert_memory_equal(g->data, w->data, w->nbytes);
  }
  assert_int_equal(json_get_int(l->meta, "step", -1), step);
  assert_int_equal(json_get_int(l->meta, "rank", -1), rank);
  assert_int_equal(json_get_int(json_get(l->meta, "loader"), "pos", -1), step * 10);
  ckpt_snapshot_free(want);
}

static void load_and_check(const char *dir, int64_t step, int rank, int world) {
  char err[1024];
  CkptLoaded *l = ckpt_load(dir, step, rank, world, err, sizeof err);
  if (!l) fail_msg("load step %lld rank %d: %s", (long long)step, rank, err);
  check_loaded(l, step, rank);
  assert_null(ckpt_find(l, "no.such.tensor"));
  ckpt_loaded_free(l);
}

/* Saves steps on a single-rank directory and closes. */
static void save_steps(const char *dir, int keep, const int64_t *steps, int n) {
  char err[1024];
  Ckpt *c = ckpt_open(dir, 0, 1, keep, err, sizeof err);
  if (!c) fail_msg("%s", err);
  for (int i = 0; i < n; i++)
    if (ckpt_save_async(c, make_snap(steps[i], 0), err, sizeof err)) fail_msg("%s", err);
  if (ckpt_close(c, err, sizeof err)) fail_msg("%s", err);
}

static void expect_load_error(const char *dir, int64_t step, int rank, int world, const char *what1,
                              const char *what2) {
  char err[1024] = "";
  CkptLoaded *l = ckpt_load(dir, step, rank, world, err, sizeof err);
  if (l) fail_msg("load of step %lld succeeded; expected '%s'", (long long)step, what1);
  if (!strstr(err, what1) || (what2 && !strstr(err, what2)))
    fail_msg("error '%s' lacks '%s' / '%s'", err, what1, what2 ? what2 : "");
}

static void write_text(const char *path, const char *txt) {
  char err[512];
  assert_int_equal(fs_write_atomic(path, txt, strlen(txt), err, sizeof err), 0);
}

static void flip_byte(const char *path, long from_end) {
  FILE *fp = fopen(path, "r+b");
  assert_non_null(fp);
  assert_int_equal(fseek(fp, -from_end, SEEK_END), 0);
  int c = fgetc(fp);
  assert_int_equal(fseek(fp, -from_end, SEEK_END), 0);
  fputc(c ^ 0x40, fp);
  assert_int_equal(fclose(fp), 0);
}

static int cli(const char *cmd, const char *dir, const char *arg) {
  char *argv[] = {"ckpt", (char *)cmd, (char *)dir, (char *)arg, NULL};
  return ckpt_main(arg ? 4 : 3, argv);
}

/* ----------------------------------------------------------------- tests */

static void test_round_trip_manifest_tracker(void **state) {
  Fixture *f = *state;
  save_steps(f->dir, 0, (int64_t[]){10, 20}, 2);
  char err[1024];
  char *tr = fs_read_all(at(f->dir, "latest_checkpointed_iteration.txt"), NULL, err, sizeof err);
  assert_non_null(tr);
  assert_int_equal(atoll(tr), 20);
  free(tr);
  assert_int_equal(ckpt_latest(f->dir), 20);
  load_and_check(f->dir, 20, 0, 1);
  load_and_check(f->dir, 10, 0, 1);

  Json *m = json_parse_file(iter_file(f->dir, 20, "manifest.json"), err, sizeof err);
  assert_non_null(m);
  assert_int_equal(json_get_int(m, "step", -1), 20);
  assert_int_equal(json_get_int(m, "world", -1), 1);
  assert_int_equal(json_get_int(m, "dp_count", -1), 1);
  assert_string_equal(json_get_str(m, "git_sha", ""), "0123456789abcdef0123456789abcdef01234567");
  const Json *files = json_get(m, "files");
  assert_int_equal(files->n, 3);
  const char *names[] = {"dense.safetensors", "rank_000.safetensors", "rank_000.json"};
  int64_t total = 0;
  for (int i = 0; i < 3; i++) {
    const Json *e = files->items[i];
    assert_string_equal(json_get_str(e, "path", ""), names[i]);
    const char *p = iter_file(f->dir, 20, names[i]);
    char hex[65];
    assert_int_equal(sha256_file_hex(p, hex, err, sizeof err), 0);
    assert_string_equal(json_get_str(e, "sha256", ""), hex);
    assert_int_equal(json_get_int(e, "bytes", -1), fs_size(p));
    total += fs_size(p);
  }
  assert_int_equal(json_get_int(m, "bytes_total", -1), total);
  json_free(m);
  /* No temporary files survive a clean save. */
  char cmd[256];
  snprintf(cmd, sizeof cmd, "find %s -name '*.tmp.*' | grep -q .", f->dir);
  assert_int_not_equal(system(cmd), 0);
}

static void test_two_ranks(void **state) {
  Fixture *f = *state;
  char err[1024];
  Ckpt *r0 = ckpt_open(f->dir, 0, 2, 0, err, sizeof err), *r1 = ckpt_open(f->dir, 1, 2, 0, err, sizeof err);
  assert_non_null(r0);
  assert_non_null(r1);
  /* Rank 0 queues first and must wait for rank 1's files to finalise. */
  assert_int_equal(ckpt_save_async(r0, make_snap(5, 0), err, sizeof err), 0);
  struct timespec ts = {0, 100 * 1000000L};
  nanosleep(&ts, NULL);
  assert_false(fs_exists(iter_file(f->dir, 5, "manifest.json")));
  assert_int_equal(ckpt_save_async(r1, make_snap(5, 1), err, sizeof err), 0);
  assert_int_equal(ckpt_close(r1, err, sizeof err), 0);
  assert_int_equal(ckpt_close(r0, err, sizeof err), 0);
  assert_int_equal(ckpt_latest(f->dir), 5);
  load_and_check(f->dir, 5, 0, 2);
  load_and_check(f->dir, 5, 1, 2); /* rank 1 reads rank 0's dense file too */
  Json *m = json_parse_file(iter_file(f->dir, 5, "manifest.json"), err, sizeof err);
  assert_int_equal(json_get_int(m, "world", -1), 2);
  assert_int_equal(json_get(m, "files")->n, 5);
  json_free(m);
  expect_load_error(f->dir, 5, 0, 1, "was written by 2 ranks, this run has 1", NULL);
  expect_load_error(f->dir, 5, 0, 4, "was written by 2 ranks, this run has 4", NULL);
  /* A rank file lost after finalisation is damage to report, not a reason
   * to fall back silently: the step stays latest and loading names the file. */
  assert_int_equal(unlink(iter_file(f->dir, 5, "rank_001.safetensors")), 0);
  assert_int_equal(ckpt_latest(f->dir), 5);
  expect_load_error(f->dir, 5, 0, 2, "missing file", "rank_001.safetensors");
  expect_load_error(f->dir, 5, 1, 2, "missing file", "rank_001.safetensors");
  assert_int_equal(cli("verify", f->dir, NULL), 1);
}

static void test_full_queue_blocks_never_drops(void **state) {
  Fixture *f = *state;
  setenv("NMOE_TEST_CKPT_SLOW_MS", "5", 1);
  int64_t steps[6] = {1, 2, 3, 4, 5, 6};
  save_steps(f->dir, 0, steps, 6);
  for (int i = 0; i < 6; i++) assert_true(fs_exists(iter_file(f->dir, steps[i], "manifest.json")));
  assert_int_equal(ckpt_latest(f->dir), 6);
  load_and_check(f->dir, 3, 0, 1);
}

static void test_purge_keeps_newest(void **state) {
  Fixture *f = *state;
  save_steps(f->dir, 2, (int64_t[]){1, 2}, 2);
  /* Debris of a crashed save below the next step, and a step above it that
   * another rank might be writing right now. */
  char err[512];
  assert_int_equal(fs_mkdirs(at(f->dir, "iter_0000003"), err, sizeof err), 0);
  write_text(iter_file(f->dir, 3, "rank_000.json"), "{}");
  assert_int_equal(fs_mkdirs(at(f->dir, "iter_0000099"), err, sizeof err), 0);
  write_text(iter_file(f->dir, 99, "rank_001.json"), "{}");
  save_steps(f->dir, 2, (int64_t[]){4, 5, 6}, 3);
  assert_false(fs_exists(at(f->dir, "iter_0000001")));
  assert_false(fs_exists(at(f->dir, "iter_0000002")));
  assert_false(fs_exists(at(f->dir, "iter_0000003")));
  assert_false(fs_exists(at(f->dir, "iter_0000004")));
  assert_true(fs_exists(iter_file(f->dir, 5, "manifest.json")));
  assert_true(fs_exists(iter_file(f->dir, 6, "manifest.json")));
  assert_true(fs_exists(iter_file(f->dir, 99, "rank_001.json")));
  assert_int_equal(ckpt_latest(f->dir), 6);
  load_and_check(f->dir, 5, 0, 1);
}

static void test_corruption_detected(void **state) {
  Fixture *f = *state;
  save_steps(f->dir, 0, (int64_t[]){7}, 1);
  const char *rank_file = iter_file(f->dir, 7, "rank_000.safetensors");
  flip_byte(rank_file, 3);
  expect_load_error(f->dir, 7, 0, 1, "checksum mismatch in", rank_file);
  assert_int_equal(cli("verify", f->dir, "7"), 1);
  flip_byte(rank_file, 3); /* restored */
  load_and_check(f->dir, 7, 0, 1);
  assert_int_equal(cli("verify", f->dir, NULL), 0);

  const char *dense = iter_file(f->dir, 7, "dense.safetensors");
  flip_byte(dense, 1);
  expect_load_error(f->dir, 7, 0, 1, "checksum mismatch in", dense);
  flip_byte(dense, 1);
  const char *meta = iter_file(f->dir, 7, "rank_000.json");
  flip_byte(meta, 2);
  expect_load_error(f->dir, 7, 0, 1, "checksum mismatch in", meta);
  flip_byte(meta, 2);
  /* Truncation: the size check names the file before any hashing. */
  assert_int_equal(truncate(rank_file, fs_size(rank_file) - 4), 0);
  expect_load_error(f->dir, 7, 0, 1, rank_file, "the manifest says");
  expect_load_error(f->dir, 8, 0, 1, "does not exist", NULL);
}

static void test_latest_fallbacks(void **state) {
  Fixture *f = *state;
  assert_int_equal(ckpt_latest(f->dir), -1);
  assert_int_equal(ckpt_latest(at(f->dir, "absent")), -1);
  save_steps(f->dir, 0, (int64_t[]){10, 20, 30}, 3);
  const char *tracker = at(f->dir, "latest_checkpointed_iteration.txt");
  write_text(tracker, "40\n"); /* points to a step that does not exist */
  assert_int_equal(ckpt_latest(f->dir), 30);
  write_text(tracker, "20");
  assert_int_equal(ckpt_latest(f->dir), 20); /* the tracker wins when valid */
  write_text(tracker, "30");
  assert_int_equal(unlink(iter_file(f->dir, 30, "manifest.json")), 0); /* 30 unfinalised */
  assert_int_equal(ckpt_latest(f->dir), 20);
  write_text(tracker, "garbage");
  assert_int_equal(ckpt_latest(f->dir), 20);
  write_text(iter_file(f->dir, 20, "manifest.json"), "{\"step\": 20, \"files\": ["); /* invalid JSON */
  assert_int_equal(ckpt_latest(f->dir), 10);
  write_text(iter_file(f->dir, 10, "manifest.json"), "{\"step\": 11, \"world\": 1, \"files\": []}");
  assert_int_equal(ckpt_latest(f->dir), -1);
  expect_load_error(f->dir, 20, 0, 1, "manifest.json", NULL);
  expect_load_error(f->dir, 30, 0, 1, "not finalised", NULL);
}

static void test_saver_errors_are_sticky(void **state) {
  Fixture *f = *state;
  char err[1024];
  /* A file where step 5's directory should go makes the save fail. */
  write_text(at(f->dir, "iter_0000005"), "in the way");
  Ckpt *c = ckpt_open(f->dir, 0, 1, 0, err, sizeof err);
  assert_non_null(c);
  assert_int_equal(ckpt_save_async(c, make_snap(5, 0), err, sizeof err), 0);
  assert_int_equal(ckpt_wait(c, err, sizeof err), -1);
  assert_non_null(strstr(err, "iter_0000005"));
  err[0] = 0;
  assert_int_equal(ckpt_save_async(c, make_snap(6, 0), err, sizeof err), -1);
  assert_non_null(strstr(err, "iter_0000005"));
  assert_int_equal(ckpt_close(c, err, sizeof err), -1);
  assert_false(fs_exists(at(f->dir, "iter_0000006")));
  /* Invalid metadata is refused rather than written unloadable. */
  c = ckpt_open(f->dir, 0, 1, 0, err, sizeof err);
  CkptSnapshot *s = make_snap(9, 0);
  free(s->meta_json);
  s->meta_json = xstrdup("{\"step\": ");
  assert_int_equal(ckpt_save_async(c, s, err, sizeof err), 0);
  assert_int_equal(ckpt_close(c, err, sizeof err), -1);
  assert_non_null(strstr(err, "metadata is not a JSON object"));
  assert_null(ckpt_open(f->dir, 2, 2, 0, err, sizeof err));
  assert_non_null(strstr(err, "rank 2 of world 2"));
}

static void test_finalise_timeout(void **state) {
  Fixture *f = *state;
  char err[1024];
  setenv("NMOE_CKPT_FINALIZE_TIMEOUT_S", "0.3", 1);
  Ckpt *c = ckpt_open(f->dir, 0, 2, 0, err, sizeof err);
  assert_int_equal(ckpt_save_async(c, make_snap(3, 0), err, sizeof err), 0);
  assert_int_equal(ckpt_close(c, err, sizeof err), -1);
  assert_non_null(strstr(err, "rank_001.safetensors did not appear"));
  assert_false(fs_exists(iter_file(f->dir, 3, "manifest.json")));
  assert_int_equal(ckpt_latest(f->dir), -1);
}

static void test_cli(void **state) {
  Fixture *f = *state;
  assert_int_equal(cli("verify", f->dir, NULL), 1); /* nothing to verify */
  save_steps(f->dir, 0, (int64_t[]){100, 200}, 2);
  assert_int_equal(cli("list", f->dir, NULL), 0);
  assert_int_equal(cli("info", f->dir, NULL), 0);
  assert_int_equal(cli("info", f->dir, "100"), 0);
  assert_int_equal(cli("info", f->dir, "150"), 1);
  assert_int_equal(cli("verify", f->dir, "--all"), 0);
  flip_byte(iter_file(f->dir, 100, "dense.safetensors"), 5);
  assert_int_equal(cli("verify", f->dir, "200"), 0);
  assert_int_equal(cli("verify", f->dir, "--all"), 1);
  assert_int_equal(cli("verify", f->dir, "x"), 1);
  assert_int_equal(cli("list", at(f->dir, "absent"), NULL), 1);
  assert_int_equal(cli("bogus", f->dir, NULL), 2);
  char *argv[] = {"ckpt", NULL};
  assert_int_equal(ckpt_main(1, argv), 2);
}

/* Child: saves steps 1..n with slow writes, keep 2; never returns. */
static void crash_child(const char *dir, int n) {
  char err[1024];
  Ckpt *c = ckpt_open(dir, 0, 1, 2, err, sizeof err);
  if (!c) _exit(3);
  for (int s = 1; s <= n; s++)
    if (ckpt_save_async(c, make_snap(s, 0), err, sizeof err)) _exit(4);
  _exit(ckpt_close(c, err, sizeof err) ? 5 : 0);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static void test_crash_safety(void **state) {
  Fixture *f = *state;
  const int steps = 5, trials = 24;
  setenv("NMOE_TEST_CKPT_SLOW_MS", "2", 1);
  /* One uninterrupted child measures how long a whole run takes here. */
  double t0 = now_ms();
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) crash_child(at(f->dir, "full"), steps);
  int status;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  double full = now_ms() - t0;
  assert_int_equal(ckpt_latest(at(f->dir, "full")), steps);

  srand(12345);
  int none = 0, some = 0;
  for (int t = 0; t < trials; t++) {
    char sub[32];
    snprintf(sub, sizeof sub, "trial%02d", t);
    char dir[256];
    snprintf(dir, sizeof dir, "%s", at(f->dir, sub));
    double kill_at = full * (double)rand() / RAND_MAX;
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) crash_child(dir, steps);
    struct timespec ts = {(time_t)(kill_at / 1e3), (long)(fmod(kill_at, 1e3) * 1e6)};
    nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    int64_t latest = ckpt_latest(dir);
    char err[1024];
    char *tr = fs_exists(at(dir, "latest_checkpointed_iteration.txt"))
                   ? fs_read_all(at(dir, "latest_checkpointed_iteration.txt"), NULL, err, sizeof err)
                   : NULL;
    if (tr) assert_int_equal(latest, atoll(tr)); /* the tracker always names a complete step */
    free(tr);
    if (latest < 0) {
      none++;
    } else {
      some++;
      load_and_check(dir, latest, 0, 1);
      assert_int_equal(cli("verify", dir, NULL), 0);
    }
    /* A restarted run keeps saving in the same directory. */
    unsetenv("NMOE_TEST_CKPT_SLOW_MS");
    save_steps(dir, 2, (int64_t[]){steps + 1}, 1);
    setenv("NMOE_TEST_CKPT_SLOW_MS", "2", 1);
    assert_int_equal(ckpt_latest(dir), steps + 1);
    load_and_check(dir, steps + 1, 0, 1);
  }
  print_message("crash trials: %d with a checkpoint, %d before the first (run %.0f ms)\n", some, none, full);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_round_trip_manifest_tracker, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_two_ranks, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_full_queue_blocks_never_drops, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_purge_keeps_newest, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_corruption_detected, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_latest_fallbacks, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_saver_errors_are_sticky, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_finalise_timeout, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_cli, tmpdir_setup, teardown),
      cmocka_unit_test_setup_teardown(test_crash_safety, tmpdir_setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
