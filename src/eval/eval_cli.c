/* eval_cli.c: `nmoe eval`: builds the model of CONFIG on cfg.device, loads
 * the weights of a finalised checkpoint (one process only), scores the tasks
 * and writes/prints summary.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fsutil.h"
#include "core/log.h"
#include "dist/dist.h"
#include "eval/eval.h"
#include "train/ckpt.h"
#include "train/ckpt_dir.h"
#include "train/train_state.h"

static void usage_exit(void) {
  fprintf(stderr,
          "usage: nmoe eval CONFIG [--checkpoint-dir DIR] [--step N] [--tasks all|a,b] "
          "[--out summary.json] [--key=value ...]\n"
          "  Scores the multiple-choice tasks of eval_tasks_file on a finalised checkpoint\n"
          "  (default: the latest under checkpoint_dir) and prints summary.json.\n");
  exit(2);
}

/* "--key=value" override string (caller frees). */
static char *override(const char *key, const char *value) {
  size_t n = strlen(key) + strlen(value) + 4;
  char *s = xmalloc(n);
  snprintf(s, n, "--%s=%s", key, value);
  return s;
}

int eval_main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) usage_exit();
  const char *path = argv[1], *out = NULL;
  int64_t step = -1;
  int n_over = 0;
  char **over = xcalloc((size_t)argc, sizeof *over);
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    int has_val = i + 1 < argc;
    if (!strcmp(a, "--checkpoint-dir") && has_val) over[n_over++] = override("checkpoint_dir", argv[++i]);
    else if (!strcmp(a, "--tasks") && has_val) over[n_over++] = override("eval_tasks", argv[++i]);
    else if (!strcmp(a, "--out") && has_val) out = argv[++i];
    else if (!strcmp(a, "--step") && has_val) {
      char *end;
      step = strtoll(argv[++i], &end, 10);
      if (*end || step < 0) nmoe_fatal("--step wants a non-negative integer, got '%s'", argv[i]);
    } else if (!strncmp(a, "--", 2) && strchr(a, '=')) over[n_over++] = xstrdup(a);
    else usage_exit();
  }
  Config cfg;
  char err[1024];
  if (config_load(&cfg, path, n_over, over, err, sizeof err)) nmoe_fatal("%s", err);
  for (int i = 0; i < n_over; i++) free(over[i]);
  free(over);

  DistInfo di = dist_from_env();
  if (di.world > 1) nmoe_fatal("nmoe eval runs as one process (this one is rank %d of %d)", di.rank, di.world);
  if (step < 0) step = ckpt_latest(cfg.checkpoint_dir);
  if (step < 0) nmoe_fatal("no finalised checkpoint under %s", cfg.checkpoint_dir);
  char it[CKPT_PATHN];
  if (!ckpt_dir_ok(cfg.checkpoint_dir, err, sizeof err)) nmoe_fatal("%s", err);
  ckpt_iter_path(it, cfg.checkpoint_dir, step);
  Json *man = ckpt_manifest_read(it, step, 0, err, sizeof err);
  if (!man) nmoe_fatal("%s", err);
  int64_t world = json_get_int(man, "world", 1);
  json_free(man);
  if (world != 1)
    nmoe_fatal("checkpoint %s was written by %lld ranks: nmoe eval loads one-process checkpoints only",
               it, (long long)world);

  /* Tasks before the model: a bad task file fails at once. */
  EvalSuite *suite = eval_suite_open(&cfg);
  /* Weights only: no loader, so the training data need not be present. */
  Backend *be = backend_open(cfg.device, 0);
  Model *m = model_create(&cfg, be, NULL);
  TrainProgress prog = {0};
  train_state_restore(m, NULL, &cfg, &di, step, &prog);
  const int B = (int)cfg.batch_size, T = (int)cfg.seq_len;
  EvalResult *res = xcalloc((size_t)suite->n, sizeof *res);
  double ms = eval_suite_score(m, suite, B, T, cfg.eval_budget_max_time_s, res);
  eval_report(NULL, step, res, suite->n);
  char *json = eval_summary_json(cfg.eval_tasks, step, res, suite->n, ms);
  if (out && fs_write_atomic(out, json, strlen(json), err, sizeof err)) nmoe_fatal("%s", err);
  printf("%s\n", json);
  free(json);
  free(res);
  eval_suite_free(suite);
  model_free(m);
  be->destroy(be);
  config_free(&cfg);
  return 0;
}
