/* test_loader.c: the training data loader and flow plans.
 *
 * Direct mode against a reference computed from the concatenated shards
 * (windows across shard boundaries, wraps), world-size invariance of the global
 * batch, exact resume at random points (also onto another world size), flow
 * plans (largest-remainder quotas, fixed-point weights, SWRR proportions, stage
 * advance, preflight), and every user error (corrupt/truncated shard, empty
 * directory, mismatched cursor). Shards are written with our NPY writer into a
 * fresh /tmp directory per test. Run from the repository root (configs/). */
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

#include "core/config.h"
#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "data/loader.h"
#include "data/mixture.h"
#include "data/npy.h"

/* ------------------------------------------------------------- helpers */

typedef struct Fixture {
  char dir[64]; /* fresh temporary directory */
  Config cfg;
} Fixture;

static int setup(void **state) {
  Fixture *f = xcalloc(1, sizeof *f);
  strcpy(f->dir, "/tmp/nmoe_loader_XXXXXX");
  if (!mkdtemp(f->dir)) return -1;
  config_defaults(&f->cfg);
  f->cfg.steps = 0;
  *state = f;
  return 0;
}

static int teardown(void **state) {
  Fixture *f = *state;
  fs_remove_tree(f->dir);
  config_free(&f->cfg);
  free(f);
  return 0;
}

static void set_str(char **field, const char *v) {
  free(*field);
  *field = xstrdup(v);
}

/* f->dir + "/" + rel (static buffer rotation: up to 4 live results). */
static const char *at(const Fixture *f, const char *rel) {
  static char buf[4][1024];
  static int k;
  k = (k + 1) % 4;
  snprintf(buf[k], sizeof buf[k], "%s/%s", f->dir, rel);
  return buf[k];
}

/* Writes tokens as a 1-D uint32 .npy at path, creating directories. */
static void write_shard(const char *path, const uint32_t *tok, int64_t n) {
  char err[512], dir[1024];
  fs_dirname(path, dir, sizeof dir);
  assert_int_equal(fs_mkdirs(dir, err, sizeof err), 0);
  FILE *fp = fopen(path, "wb");
  assert_non_null(fp);
  assert_int_equal(npy_write_header(fp, "<u4", &n, 1, err, sizeof err), 0);
  if (n) assert_int_equal(fwrite(tok, 4, (size_t)n, fp), (size_t)n);
  assert_int_equal(fclose(fp), 0);
}

/* Shard of n tokens: base + (start + i) % span, so a token names its source
 * (base) and its position in that source's stream. */
static void write_seq_shard(const char *path, uint32_t base, int64_t start, int64_t n, int64_t span) {
  uint32_t *t = xmalloc((size_t)(n ? n : 1) * 4);
  for (int64_t i = 0; i < n; i++) t[i] = base + (uint32_t)((start + i) % span);
  write_shard(path, t, n);
  free(t);
}

static void write_text(const char *path, const char *text) {
  char err[512], dir[1024];
  fs_dirname(path, dir, sizeof dir);
  assert_int_equal(fs_mkdirs(dir, err, sizeof err), 0);
  FILE *fp = fopen(path, "w");
  assert_non_null(fp);
  fputs(text, fp);
  fclose(fp);
}

static Loader *open_ok(const Config *cfg, const char *override, int rank, int world) {
  char err[1024];
  Loader *L = loader_open(cfg, override, rank, world, err, sizeof err);
  if (!L) print_error("loader_open: %s\n", err);
  assert_non_null(L);
  return L;
}

static void expect_open_error(const Config *cfg, const char *override, const char *a,
                              const char *b) {
  char err[1024] = "";
  Loader *L = loader_open(cfg, override, 0, 1, err, sizeof err);
  assert_null(L);
  if (!strstr(err, a) || (b && !strstr(err, b))) print_error("unexpected error: %s\n", err);
  assert_non_null(strstr(err, a));
  if (b) assert_non_null(strstr(err, b));
}

static void next_ok(Loader *L, int32_t *in, int32_t *tg) {
  char err[1024];
  int rc = loader_next(L, in, tg, err, sizeof err);
  if (rc) print_error("loader_next: %s\n", err);
  assert_int_equal(rc, 0);
}

/* Runs `steps` global batches with `world` loaders (ranks 0..world-1), each
 * restored from `state` when non-NULL, gathering the slices into
 * in/tg (steps, batch, seq_len). Returns rank 0's final cursor (caller frees). */
static char *run_global(const Config *cfg, const char *override, int world, const char *state,
                        int steps, int32_t *in, int32_t *tg) {
  int64_t T = cfg->seq_len, B = cfg->batch_size, local = B / world;
  Loader *L[8] = {0};
  assert_true(world <= 8);
  char err[1024];
  for (int r = 0; r < world; r++) {
    L[r] = open_ok(cfg, override, r, world);
    if (state) assert_int_equal(loader_restore_json(L[r], state, err, sizeof err), 0);
  }
  for (int s = 0; s < steps; s++)
    for (int r = 0; r < world; r++)
      next_ok(L[r], in + (s * B + r * local) * T, tg + (s * B + r * local) * T);
  char *out = loader_state_json(L[0]);
  for (int r = 0; r < world; r++) {
    char *o = loader_state_json(L[r]);
    assert_string_equal(o, out); /* the cursor is the same on every rank */
    free(o);
    loader_close(L[r]);
  }
  return out;
}

/* Direct-mode data used by several tests: shards whose sorted order
 * ("a.npy" < "a/x.npy" < "b/c/d.npy", byte order) differs from creation
 * order, an empty shard, and files the scan must ignore. Fills ref with the
 * concatenated stream; returns its length. */
static int64_t make_direct(Fixture *f, uint32_t *ref) {
  struct { const char *rel; int64_t n; } sh[] = {
      {"data/b/c/d.npy", 23}, {"data/a.npy", 41}, {"data/a/x.npy", 0}, {"data/a/y.npy", 17}};
  uint32_t seed = 12345;
  int64_t total = 0;
  /* tokens by sorted position: a.npy, a/x.npy (empty), a/y.npy, b/c/d.npy */
  int order[] = {1, 2, 3, 0};
  for (int k = 0; k < 4; k++) {
    int i = order[k];
    uint32_t *t = xmalloc((size_t)(sh[i].n + 1) * 4);
    for (int64_t j = 0; j < sh[i].n; j++) {
      seed = seed * 1103515245u + 12345u;
      t[j] = (seed >> 8) % 50000;
      ref[total++] = t[j];
    }
    write_shard(at(f, sh[i].rel), t, sh[i].n);
    free(t);
  }
  write_text(at(f, "data/notes.txt"), "not a shard\n");
  write_text(at(f, "data/.hidden.npy"), "ignored: hidden\n");
  set_str(&f->cfg.data_path, at(f, "data"));
  return total;
}

/* ------------------------------------------------------------- direct */

/* Every input/target against windows of seq_len+1 taken back to back from the
 * concatenated stream (wrapping), and wrap_count against floor((used-1)/total). */
static void test_direct_reference(void **state) {
  Fixture *f = *state;
  uint32_t ref[128];
  int64_t total = make_direct(f, ref);
  assert_int_equal(total, 81);
  f->cfg.seq_len = 7;
  f->cfg.batch_size = 4;
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  assert_int_equal(loader_total_tokens(L), 81);
  assert_string_equal(loader_plan_hash(L), "0");
  int32_t in[4 * 7], tg[4 * 7];
  for (int step = 0; step < 20; step++) {
    next_ok(L, in, tg);
    for (int b = 0; b < 4; b++) {
      int64_t w = (int64_t)step * 4 + b;
      for (int j = 0; j < 7; j++) {
        assert_int_equal(in[b * 7 + j], ref[(w * 8 + j) % total]);
        assert_int_equal(tg[b * 7 + j], ref[(w * 8 + j + 1) % total]);
      }
    }
    char *js = loader_state_json(L);
    Json *j = json_parse(js, strlen(js), NULL, 0);
    int64_t used = (int64_t)(step + 1) * 4 * 8;
    assert_int_equal(json_get_int(j, "global_sequence_index", -1), (step + 1) * 4);
    const Json *c = json_get(json_get(j, "cursors"), "data_path");
    assert_non_null(c);
    assert_int_equal(json_get_int(c, "wrap_count", -1), (used - 1) / total);
    assert_int_equal(json_get_int(c, "num_files", -1), 4);
    json_free(j);
    free(js);
  }
  loader_close(L);
}

/* World sizes 1, 2 and 4 see the same global batches. */
static void test_world_sizes(void **state) {
  Fixture *f = *state;
  uint32_t ref[128];
  make_direct(f, ref);
  f->cfg.seq_len = 5;
  f->cfg.batch_size = 8;
  enum { S = 25, N = S * 8 * 5 };
  static int32_t in1[N], tg1[N], in2[N], tg2[N];
  free(run_global(&f->cfg, NULL, 1, NULL, S, in1, tg1));
  for (int world = 2; world <= 4; world *= 2) {
    memset(in2, 0xff, sizeof in2);
    free(run_global(&f->cfg, NULL, world, NULL, S, in2, tg2));
    assert_memory_equal(in1, in2, sizeof in1);
    assert_memory_equal(tg1, tg2, sizeof tg1);
  }
}

/* Save at random points, restore into fresh loaders (same and other world
 * sizes): the following batches are identical to an uninterrupted run. */
static void test_direct_restore(void **state) {
  Fixture *f = *state;
  uint32_t ref[128];
  make_direct(f, ref);
  f->cfg.seq_len = 6;
  f->cfg.batch_size = 4;
  enum { S = 30, N = S * 4 * 6 };
  static int32_t in[N], tg[N], in2[N], tg2[N];
  free(run_global(&f->cfg, NULL, 1, NULL, S, in, tg));
  srand(7);
  for (int trial = 0; trial < 6; trial++) {
    int k = rand() % S, world = 1 << (trial % 3);
    char *st = run_global(&f->cfg, NULL, 1, NULL, k, in2, tg2);
    memset(in2, 0, sizeof in2);
    free(run_global(&f->cfg, NULL, world, st, S - k, in2, tg2));
    assert_memory_equal(in + k * 4 * 6, in2, (size_t)(S - k) * 4 * 6 * sizeof(int32_t));
    assert_memory_equal(tg + k * 4 * 6, tg2, (size_t)(S - k) * 4 * 6 * sizeof(int32_t));
    free(st);
  }
}

/* Cursor checks: another shard count, a bad version, junk, another mode. */
static void test_direct_restore_errors(void **state) {
  Fixture *f = *state;
  uint32_t ref[128];
  make_direct(f, ref);
  f->cfg.seq_len = 4;
  f->cfg.batch_size = 2;
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  int32_t in[8], tg[8];
  next_ok(L, in, tg);
  char *st = loader_state_json(L);
  char err[1024];
  assert_int_equal(loader_restore_json(L, "{nope", err, sizeof err), -1);
  assert_non_null(strstr(err, "not a JSON object"));
  char *bad = xstrdup(st);
  memcpy(strstr(bad, "\"version\":1"), "\"version\":9", 11);
  assert_int_equal(loader_restore_json(L, bad, err, sizeof err), -1);
  assert_non_null(strstr(err, "version 9"));
  free(bad);
  bad = xstrdup(st);
  memcpy(strstr(bad, "\"mode\":\"direct\""), "\"mode\":\"flow!!\"", 15);
  assert_int_equal(loader_restore_json(L, bad, err, sizeof err), -1);
  assert_non_null(strstr(err, "flow!!-mode"));
  free(bad);
  loader_close(L);
  write_seq_shard(at(f, "data/zz.npy"), 0, 0, 10, 100);
  L = open_ok(&f->cfg, NULL, 0, 1);
  assert_int_equal(loader_restore_json(L, st, err, sizeof err), -1);
  assert_non_null(strstr(err, "had 4 shard files"));
  assert_non_null(strstr(err, "now has 5"));
  loader_close(L);
  free(st);
}

static void test_direct_errors(void **state) {
  Fixture *f = *state;
  f->cfg.seq_len = 4;
  f->cfg.batch_size = 2;
  /* empty and missing directories */
  assert_int_equal(fs_mkdirs(at(f, "empty/sub"), NULL, 0), 0);
  set_str(&f->cfg.data_path, at(f, "empty"));
  expect_open_error(&f->cfg, NULL, "no .npy shards under", at(f, "empty"));
  set_str(&f->cfg.data_path, at(f, "missing"));
  expect_open_error(&f->cfg, NULL, "no .npy shards under", at(f, "missing"));
  set_str(&f->cfg.data_path, "");
  expect_open_error(&f->cfg, NULL, "no training data", NULL);
  /* truncated shard: header promises more tokens than the file holds */
  write_seq_shard(at(f, "t/ok.npy"), 0, 0, 50, 100);
  write_seq_shard(at(f, "t/short.npy"), 0, 0, 50, 100);
  assert_int_equal(truncate(at(f, "t/short.npy"), fs_size(at(f, "t/short.npy")) - 6), 0);
  set_str(&f->cfg.data_path, at(f, "t"));
  expect_open_error(&f->cfg, NULL, at(f, "t/short.npy"), "truncated");
  /* not an npy at all */
  write_text(at(f, "c/bad.npy"), "this is not a numpy file at all, just text........\n");
  set_str(&f->cfg.data_path, at(f, "c"));
  expect_open_error(&f->cfg, NULL, at(f, "c/bad.npy"), NULL);
  /* a token outside the vocabulary */
  uint32_t t[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 999, 18, 19, 20};
  write_shard(at(f, "v/x.npy"), t, 20);
  set_str(&f->cfg.data_path, at(f, "v"));
  f->cfg.vocab_size = 500;
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  int32_t in[8], tg[8];
  char err[1024];
  next_ok(L, in, tg); /* token indices 0..9; the next step reaches index 16 */
  assert_int_equal(loader_next(L, in, tg, err, sizeof err), -1);
  assert_non_null(strstr(err, at(f, "v/x.npy")));
  assert_non_null(strstr(err, "token 999 at index 16"));
  loader_close(L);
  /* batch not divisible by world */
  f->cfg.batch_size = 3;
  char e2[512];
  assert_null(loader_open(&f->cfg, NULL, 0, 2, e2, sizeof e2));
  assert_non_null(strstr(e2, "multiple of the world size 2"));
}

/* Shards written by numpy's np.save (as the original's prep does) load and
 * stream in sorted path order. Skipped where /usr/bin/python3 lacks numpy. */
static void test_numpy_shards(void **state) {
  Fixture *f = *state;
  char cmd[2048];
  snprintf(cmd, sizeof cmd,
           "/usr/bin/python3 -c \"import numpy as np, os; d='%s/np'; os.makedirs(d + '/s', exist_ok=True);"
           " np.save(d + '/b.npy', np.arange(100, 130, dtype=np.uint32));"
           " np.save(d + '/s/a.npy', np.arange(200, 211, dtype=np.uint32));"
           " np.save(d + '/a.npy', np.arange(0, 7, dtype=np.uint32))\" 2>/dev/null",
           f->dir);
  if (system(cmd) != 0) skip();
  uint32_t ref[48];
  int n = 0;
  for (int i = 0; i < 7; i++) ref[n++] = (uint32_t)i;
  for (int i = 100; i < 130; i++) ref[n++] = (uint32_t)i;
  for (int i = 200; i < 211; i++) ref[n++] = (uint32_t)i;
  set_str(&f->cfg.data_path, at(f, "np"));
  f->cfg.seq_len = 9;
  f->cfg.batch_size = 2;
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  assert_int_equal(loader_total_tokens(L), 48);
  int32_t in[18], tg[18];
  for (int step = 0; step < 6; step++) {
    next_ok(L, in, tg);
    for (int b = 0; b < 2; b++)
      for (int j = 0; j < 9; j++) {
        int64_t w = step * 2 + b;
        assert_int_equal(in[b * 9 + j], ref[(w * 10 + j) % 48]);
        assert_int_equal(tg[b * 9 + j], ref[(w * 10 + j + 1) % 48]);
      }
  }
  loader_close(L);
}

/* -------------------------------------------------------------- plans */

static void test_quotas_hand(void **state) {
  (void)state;
  struct { int64_t total; int n; int64_t w[4]; int64_t want[4]; } c[] = {
      {10, 3, {1, 1, 1}, {4, 3, 3}},
      {10, 3, {5, 3, 2}, {5, 3, 2}},
      {7, 2, {1, 1}, {4, 3}},
      {1, 3, {1, 1, 1}, {1, 0, 0}},
      {5, 2, {0, 1}, {0, 5}},
      {10, 3, {2, 3, 3}, {2, 4, 4}},       /* 2.5, 3.75, 3.75 */
      {625, 3, {6, 3, 1}, {375, 188, 62}}, /* 375, 187.5, 62.5: tie -> lower index */
      {0, 2, {1, 2}, {0, 0}},
  };
  for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
    int64_t out[4];
    mixture_quotas(c[k].total, c[k].w, c[k].n, out);
    for (int i = 0; i < c[k].n; i++) assert_int_equal(out[i], c[k].want[i]);
  }
  /* full-size numbers: sums are exact, no overflow */
  int64_t w[5] = {4510000000000, 805000000000, 409000000000, 151000000000, 2510000000};
  int64_t out[5], sum = 0;
  mixture_quotas(1489013671, w, 5, out);
  for (int i = 0; i < 5; i++) sum += out[i];
  assert_int_equal(sum, 1489013671);
  struct { int n; int64_t w[3]; int64_t want[3]; } fp[] = {
      {3, {1, 1, 1}, {333333, 333333, 333333}},
      {2, {1, 2}, {333333, 666667}},
      {2, {1, 999999999}, {1, 1000000}},     /* min 1 (0.000001 rounds to 0) */
      {2, {3, 1999997}, {2, 999998}},        /* 1.5 -> 2, 999998.5 -> 999998 (half to even) */
      {2, {5, 1999995}, {2, 999998}},        /* 2.5 -> 2, 999997.5 -> 999998 */
  };
  for (size_t k = 0; k < sizeof fp / sizeof fp[0]; k++) {
    int64_t o[3];
    mixture_weights_fp(fp[k].w, fp[k].n, o);
    for (int i = 0; i < fp[k].n; i++) assert_int_equal(o[i], fp[k].want[i]);
  }
}

/* SWRR: over every prefix each count is within 1 of n w_i / W; exhausted
 * sources drop out and the rest keep their ratio. */
static void test_swrr(void **state) {
  (void)state;
  int64_t ws[][4] = {{600000, 300000, 100000, 0}, {1, 1, 1, 1}, {999997, 1, 1, 1},
                     {123457, 654321, 222222, 5}, {7, 3, 0, 0}};
  int ns[] = {3, 4, 4, 4, 2};
  for (int c = 0; c < 5; c++) {
    int n = ns[c];
    int64_t acc[4] = {0}, cnt[4] = {0}, W = 0;
    bool act[4] = {true, true, true, true};
    for (int i = 0; i < n; i++) W += ws[c][i];
    for (int64_t t = 1; t <= 200000; t++) {
      int k = mixture_swrr_pick(n, ws[c], acc, act);
      assert_true(k >= 0 && k < n);
      cnt[k]++;
      for (int i = 0; i < n; i++) {
        double ideal = (double)t * ws[c][i] / W;
        assert_true(cnt[i] - ideal < 1.0 && ideal - cnt[i] < 1.0);
      }
    }
  }
  /* ties go to the lower index; deactivated sources are never picked */
  int64_t w[3] = {1, 1, 1}, acc[3] = {0};
  bool act[3] = {true, false, true};
  assert_int_equal(mixture_swrr_pick(3, w, acc, act), 0);
  assert_int_equal(mixture_swrr_pick(3, w, acc, act), 2);
  assert_int_equal(mixture_swrr_pick(3, w, acc, act), 0);
  assert_int_equal(acc[1], 0);
  act[0] = act[2] = false;
  assert_int_equal(mixture_swrr_pick(3, w, acc, act), -1);
}

/* The shipped flow profiles resolve against the shipped mixtures. */
static void test_shipped_plans(void **state) {
  (void)state;
  const char *prof = "configs/flow_profiles.toml", *olmo = "configs/mixtures/olmo3_1025.toml";
  char err[1024];
  MixturePlan p;
  assert_int_equal(mixture_resolve(olmo, prof, "dev", 4096, 0, &p, err, sizeof err), 0);
  assert_int_equal(p.n_stages, 1);
  assert_int_equal(p.stages[0].target_tokens, 100000000);
  assert_int_equal(mixture_plan_sequences(&p), 100000000 / 4096);
  assert_string_equal(p.stages[0].sources[0].id, "common_crawl");
  assert_int_equal(strlen(p.hash), 64);
  char h1[65];
  strcpy(h1, p.hash);
  mixture_plan_free(&p);
  assert_int_equal(mixture_resolve(olmo, prof, "dev", 4096, 0, &p, err, sizeof err), 0);
  assert_string_equal(p.hash, h1); /* deterministic */
  mixture_plan_free(&p);
  assert_int_equal(mixture_resolve(olmo, prof, "dev", 2048, 0, &p, err, sizeof err), 0);
  assert_string_not_equal(p.hash, h1); /* seq_len is part of the plan */
  mixture_plan_free(&p);

  assert_int_equal(mixture_resolve(olmo, prof, "proxy", 4096, 0, &p, err, sizeof err), -1);
  assert_non_null(strstr(err, "active_params_b"));
  assert_int_equal(mixture_resolve(olmo, prof, "proxy", 4096, 2.0, &p, err, sizeof err), 0);
  assert_int_equal(p.n_stages, 2);
  assert_string_equal(p.stages[1].id, "mid");
  /* 800B tokens split 5930:100 between the stages */
  assert_true(llabs(p.stages[0].target_tokens + p.stages[1].target_tokens - 800000000000) <= 1);
  assert_true(llabs(p.stages[1].target_tokens - 13266998341) <= 1);
  mixture_plan_free(&p);

  assert_int_equal(mixture_resolve(olmo, prof, "full_train", 4096, 0, &p, err, sizeof err), 0);
  assert_int_equal(p.n_stages, 3);
  assert_int_equal(p.stages[0].target_tokens, 5930000000000);
  assert_int_equal(p.stages[2].target_tokens, 50000000000);
  assert_int_equal(p.stages[2].n_sources, 6);
  mixture_plan_free(&p);

  const char *flows[] = {"research", "ablation", "test"};
  for (int i = 0; i < 3; i++) {
    assert_int_equal(mixture_resolve(olmo, prof, flows[i], 4096, 0, &p, err, sizeof err), 0);
    mixture_plan_free(&p);
  }
  assert_int_equal(mixture_resolve("configs/mixtures/fineweb_edu_proxy.toml", prof,
                                   "proxy_fineweb", 4096, 0, &p, err, sizeof err), 0);
  assert_int_equal(p.stages[0].sources[0].quota_sequences, 100000000000 / 4096);
  mixture_plan_free(&p);
  assert_int_equal(mixture_resolve(olmo, prof, "hydra_fixture", 4096, 0, &p, err, sizeof err), -1);
  assert_non_null(strstr(err, "hydra_fixture_pretrain"));
  assert_int_equal(mixture_resolve(olmo, prof, "nope", 4096, 0, &p, err, sizeof err), -1);
  assert_non_null(strstr(err, "flow 'nope' is not defined"));
  assert_non_null(strstr(err, "full_train"));
}

/* ------------------------------------------------------------- flows */

/* test_tiny sources: base token value per source (tokens name their source). */
static const char *const SRC_STAGE[] = {"pretrain", "pretrain", "pretrain", "mid", "mid"};
static const char *const SRC_ID[] = {"web", "code", "math", "web_hq", "qa"};
enum { NSRC = 5, SPAN = 9973 };

/* Flow "tiny" at seq_len 16: pretrain 625 sequences (375/188/62), mid 125
 * (63/62). Each source gets `extra` tokens beyond quota x (seq_len+1), split
 * over two shards; source s's tokens are s*10000 + position % SPAN. */
static void make_flow(Fixture *f, int64_t extra_math) {
  const int64_t quota[] = {375, 188, 62, 63, 62};
  for (int s = 0; s < NSRC; s++) {
    int64_t n = quota[s] * 17 + (s == 2 ? extra_math : 5);
    char rel[256];
    snprintf(rel, sizeof rel, "root/flows/tiny/%s/%s/train/shard-000.npy", SRC_STAGE[s], SRC_ID[s]);
    write_seq_shard(at(f, rel), (uint32_t)s * 10000, 0, n / 3, SPAN);
    snprintf(rel, sizeof rel, "root/flows/tiny/%s/%s/train/sub/shard-001.npy", SRC_STAGE[s], SRC_ID[s]);
    write_seq_shard(at(f, rel), (uint32_t)s * 10000, n / 3, n - n / 3, SPAN);
  }
  set_str(&f->cfg.data_root, at(f, "root"));
  set_str(&f->cfg.flow_mode, "tiny");
  set_str(&f->cfg.mixture_toml, "configs/mixtures/test_tiny.toml");
  set_str(&f->cfg.flow_profiles_toml, "configs/flow_profiles.toml");
  f->cfg.seq_len = 16;
  f->cfg.batch_size = 8;
}

/* Quotas are exact, stages run in order, each source's windows are its own
 * stream back to back, SWRR proportions hold while all sources are active,
 * and the loader fails cleanly once the plan is spent. */
static void test_flow_quotas_and_stages(void **state) {
  Fixture *f = *state;
  make_flow(f, 5);
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  assert_int_equal(loader_total_tokens(L), 750 * 16);
  assert_string_equal(loader_stage_name(L), "pretrain");
  int64_t cnt[NSRC] = {0};
  int32_t in[8 * 16], tg[8 * 16];
  int64_t seen = 0;
  bool in_mid = false;
  for (int step = 0; step < 93; step++) {
    next_ok(L, in, tg);
    for (int b = 0; b < 8; b++, seen++) {
      int s = in[b * 16] / 10000;
      assert_true(s >= 0 && s < NSRC);
      if (s >= 3) in_mid = true;
      else assert_false(in_mid); /* no pretrain after mid started */
      for (int j = 0; j < 16; j++) {
        int64_t pos = cnt[s] * 17 + j;
        assert_int_equal(in[b * 16 + j], s * 10000 + pos % SPAN);
        assert_int_equal(tg[b * 16 + j], s * 10000 + (pos + 1) % SPAN);
      }
      cnt[s]++;
      if (!in_mid && seen + 1 <= 610) { /* all three still active: within 1 of ideal */
        double n = (double)(seen + 1);
        assert_true(fabs(cnt[0] - n * 0.6) < 1 && fabs(cnt[1] - n * 0.3) < 1 &&
                    fabs(cnt[2] - n * 0.1) < 1);
      }
    }
  }
  assert_int_equal(cnt[0], 375);
  assert_int_equal(cnt[1], 188);
  assert_int_equal(cnt[2], 62);
  assert_int_equal(cnt[3] + cnt[4], 744 - 625);
  assert_true(llabs(cnt[3] - cnt[4]) <= 1);
  assert_string_equal(loader_stage_name(L), "mid");
  char err[1024];
  assert_int_equal(loader_next(L, in, tg, err, sizeof err), -1);
  assert_non_null(strstr(err, "exhausted"));
  loader_close(L);
  /* steps beyond the plan are refused at open */
  f->cfg.steps = 94;
  expect_open_error(&f->cfg, NULL, "plans 750 sequences", "steps=94");
  f->cfg.steps = 93;
  loader_close(open_ok(&f->cfg, NULL, 0, 1));
}

/* Flow world-size invariance and resume at random points (across the stage
 * boundary too), onto other world sizes. */
static void test_flow_restore(void **state) {
  Fixture *f = *state;
  make_flow(f, 5);
  enum { S = 93, N = S * 8 * 16 };
  static int32_t in[N], tg[N], in2[N], tg2[N];
  free(run_global(&f->cfg, NULL, 1, NULL, S, in, tg));
  free(run_global(&f->cfg, NULL, 4, NULL, S, in2, tg2));
  assert_memory_equal(in, in2, sizeof in);
  int ks[] = {0, 1, 37, 78, 79, 80, 92};
  for (int t = 0; t < 7; t++) {
    int k = ks[t], world = 1 << (t % 3);
    char *st = run_global(&f->cfg, NULL, 2, NULL, k, in2, tg2);
    memset(in2, 0, sizeof in2);
    free(run_global(&f->cfg, NULL, world, st, S - k, in2, tg2));
    assert_memory_equal(in + k * 8 * 16, in2, (size_t)(S - k) * 8 * 16 * sizeof(int32_t));
    assert_memory_equal(tg + k * 8 * 16, tg2, (size_t)(S - k) * 8 * 16 * sizeof(int32_t));
    free(st);
  }
}

static void test_flow_errors(void **state) {
  Fixture *f = *state;
  make_flow(f, -20); /* math is 25 tokens short of 62 x 17; preflight needs 62 x 16 */
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  int32_t in[8 * 16], tg[8 * 16];
  next_ok(L, in, tg);
  char *st = loader_state_json(L);
  char err[1024];
  /* a cursor from another plan */
  char *bad = xstrdup(st);
  char *h = strstr(bad, "\"plan_hash\":\"") + 13;
  h[0] = h[0] == 'a' ? 'b' : 'a';
  assert_int_equal(loader_restore_json(L, bad, err, sizeof err), -1);
  assert_non_null(strstr(err, "plan hash"));
  assert_non_null(strstr(err, "does not match"));
  free(bad);
  /* a cursor naming other sources */
  bad = xstrdup(st);
  char *w = strstr(strstr(bad, "\"cursors\""), "\"web\"");
  memcpy(w, "\"wob\"", 5);
  assert_int_equal(loader_restore_json(L, bad, err, sizeof err), -1);
  assert_non_null(strstr(err, "source 'web'"));
  free(bad);
  /* a direct-mode cursor */
  assert_int_equal(loader_restore_json(L, "{\"version\":1,\"mode\":\"direct\",\"plan_hash\":\"0\"}",
                                       err, sizeof err), -1);
  assert_non_null(strstr(err, "direct-mode"));
  /* the loader still works after refused restores */
  assert_int_equal(loader_restore_json(L, st, err, sizeof err), 0);
  next_ok(L, in, tg);
  loader_close(L);
  free(st);

  /* preflight: math has fewer tokens than its quota */
  char rel[256];
  snprintf(rel, sizeof rel, "root/flows/tiny/pretrain/math/train/sub/shard-001.npy");
  write_seq_shard(at(f, rel), 20000, 0, 600, SPAN);
  expect_open_error(&f->cfg, NULL, "source math in stage pretrain needs 992 tokens, has",
                    "/flows/tiny/pretrain/math/train");
  /* a source directory that is missing */
  assert_int_equal(fs_remove_tree(at(f, "root/flows/tiny/mid/qa")), 0);
  write_seq_shard(at(f, rel), 20000, 0, 2000, SPAN);
  expect_open_error(&f->cfg, NULL, "source qa in stage mid needs 992 tokens, has 0", NULL);
  /* validation data: a direct loader even in flow mode */
  make_direct(f, (uint32_t[128]){0});
  L = open_ok(&f->cfg, at(f, "data"), 0, 1);
  assert_string_equal(loader_plan_hash(L), "0");
  char *pj = loader_plan_json(L);
  assert_non_null(strstr(pj, "\"mode\":\"direct\""));
  free(pj);
  loader_close(L);
  /* flow mode without its TOMLs */
  set_str(&f->cfg.mixture_toml, "");
  expect_open_error(&f->cfg, NULL, "needs mixture_toml and flow_profiles_toml", NULL);
}

/* A resolved plan JSON is what the hash covers. */
static void test_plan_json(void **state) {
  Fixture *f = *state;
  make_flow(f, 5);
  Loader *L = open_ok(&f->cfg, NULL, 0, 1);
  char *pj = loader_plan_json(L), hex[65];
  sha256_hex(pj, strlen(pj), hex);
  assert_string_equal(hex, loader_plan_hash(L));
  Json *j = json_parse(pj, strlen(pj), NULL, 0);
  assert_non_null(j);
  assert_string_equal(json_get_str(j, "flow", ""), "tiny");
  assert_string_equal(json_get_str(j, "mixture_id", ""), "test_tiny");
  const Json *st = json_get(j, "stages");
  assert_int_equal(st->n, 2);
  assert_int_equal(json_get_int(st->items[0], "target_tokens", 0), 10000);
  assert_int_equal(json_get_int(st->items[1], "target_tokens", 0), 2000);
  const Json *src = json_get(st->items[0], "sources");
  assert_int_equal(json_get_int(src->items[0], "weight_fp", 0), 600000);
  assert_int_equal(json_get_int(src->items[1], "quota_sequences", 0), 188);
  json_free(j);
  free(pj);
  loader_close(L);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_direct_reference, setup, teardown),
      cmocka_unit_test_setup_teardown(test_world_sizes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_direct_restore, setup, teardown),
      cmocka_unit_test_setup_teardown(test_direct_restore_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_direct_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_numpy_shards, setup, teardown),
      cmocka_unit_test(test_quotas_hand),
      cmocka_unit_test(test_swrr),
      cmocka_unit_test(test_shipped_plans),
      cmocka_unit_test_setup_teardown(test_flow_quotas_and_stages, setup, teardown),
      cmocka_unit_test_setup_teardown(test_flow_restore, setup, teardown),
      cmocka_unit_test_setup_teardown(test_flow_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_plan_json, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
