/* train.c: `nmoe train CONFIG [--key=value ...]`: the training loop.
 *
 * Step order (reference section 3): lr -> loader (wait timed) -> forward +
 * backward -> non-finite check -> grad norm (optional clip) -> AdamW ->
 * router bias update -> log -> validation -> choice eval (eval_every) ->
 * checkpoint (then the scheduled eval when eval_enabled). Steps are counted
 * from 1: after step s completes, s*batch_size*seq_len tokens have been seen
 * and a checkpoint of step s resumes at step s+1. */
#include "train/train.h"

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "core/config.h"
#include "core/json.h"
#include "core/log.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "core/fsutil.h"
#include "dist/comm.h"
#include "dist/dist.h"
#include "eval/eval.h"
#include "model/model.h"
#include "train/ckpt.h"
#include "train/ckpt_dir.h"
#include "train/metrics.h"
#include "train/optim.h"
#include "train/train_state.h"

static volatile sig_atomic_t g_stop_signal;
static void on_signal(int sig) { g_stop_signal = sig; }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* State shared with the fatal hook so a failure is recorded in experiments.db. */
typedef struct RunRecord {
  Experiments *exp;
  Metrics *metrics;
  char *run_id;
} RunRecord;

static void on_fatal(const char *msg, void *ctx) {
  RunRecord *r = ctx;
  char err[256];
  if (r->metrics) metrics_flush(r->metrics, err, sizeof err);
  if (r->exp) {
    JsonW w;
    jw_init(&w, 0);
    jw_obj(&w, NULL);
    jw_str(&w, "error", msg);
    jw_obj_end(&w);
    char *res = jw_finish(&w);
    experiments_run_end(r->exp, r->run_id, "failed", res, err, sizeof err);
    free(res);
  }
}

/* ---------------------------------------------------------------- router stats */

typedef struct RouterSummary {
  double mean_cv, std_cv, mean_entropy, min_entropy, experts_active_mean, max_load;
  int dead_experts;
  double bias_min, bias_max;
} RouterSummary;

static RouterSummary router_stats(const Model *m, Metrics *mx, int64_t step) {
  RouterSummary s = {0};
  const int E = m->d.E;
  s.min_entropy = 1e30;
  s.bias_min = 1e30;
  s.bias_max = -1e30;
  double sum_cv2 = 0;
  for (int li = 0; li < m->n_moe; li++) {
    const int32_t *c = m->counts_host + (size_t)li * E;
    const float *b = m->router_bias_host + (size_t)li * E;
    double total = 0;
    for (int e = 0; e < E; e++) total += c[e];
    double mean = total / E, var = 0, ent = 0, maxl = 0, bmin = 1e30, bmax = -1e30;
    int active = 0;
    for (int e = 0; e < E; e++) {
      var += (c[e] - mean) * (c[e] - mean);
      double p = total > 0 ? c[e] / total : 0;
      if (p > 0) ent -= p * log(p);
      if (p > maxl) maxl = p;
      active += c[e] > 0;
      if (b[e] < bmin) bmin = b[e];
      if (b[e] > bmax) bmax = b[e];
    }
    double cv = mean > 0 ? 100.0 * sqrt(var / E) / mean : 0;
    double nent = E > 1 ? ent / log(E) : 0;
    s.mean_cv += cv;
    sum_cv2 += cv * cv;
    s.mean_entropy += nent;
    if (nent < s.min_entropy) s.min_entropy = nent;
    s.experts_active_mean += active;
    s.dead_experts += E - active;
    if (100 * maxl > s.max_load) s.max_load = 100 * maxl;
    if (bmin < s.bias_min) s.bias_min = bmin;
    if (bmax > s.bias_max) s.bias_max = bmax;
    if (mx) {
      char tag[96];
      int layer = m->d.n_dense + li;
      snprintf(tag, sizeof tag, "router/layer_%02d/cv", layer);
      metrics_log(mx, tag, step, cv);
      snprintf(tag, sizeof tag, "router/layer_%02d/entropy", layer);
      metrics_log(mx, tag, step, nent);
      snprintf(tag, sizeof tag, "router/layer_%02d/experts_active", layer);
      metrics_log(mx, tag, step, active);
      snprintf(tag, sizeof tag, "router/layer_%02d/bias_range", layer);
      metrics_log(mx, tag, step, bmax - bmin);
      snprintf(tag, sizeof tag, "router/layer_%02d/max_load", layer);
      metrics_log(mx, tag, step, 100 * maxl);
    }
  }
  if (m->n_moe > 0) {
    s.mean_cv /= m->n_moe;
    s.std_cv = sqrt(fmax(0, sum_cv2 / m->n_moe - s.mean_cv * s.mean_cv));
    s.mean_entropy /= m->n_moe;
    s.experts_active_mean /= m->n_moe;
    if (mx) {
      metrics_log(mx, "router_agg/mean_cv", step, s.mean_cv);
      metrics_log(mx, "router_agg/std_cv", step, s.std_cv);
      metrics_log(mx, "router_agg/mean_entropy", step, s.mean_entropy);
      metrics_log(mx, "router_agg/min_entropy", step, s.min_entropy);
      metrics_log(mx, "router_agg/dead_experts_count", step, s.dead_experts);
      metrics_log(mx, "router_agg/experts_active_mean", step, s.experts_active_mean);
    }
  }
  return s;
}

/* ---------------------------------------------------------------- validation */

/* UTF-8 bytes of every token id (for bits per byte); NULL when the tokenizer
 * files are unavailable (then only loss and perplexity are reported). */
static uint16_t *token_byte_lengths(const Config *cfg) {
  char err[512];
  Tokenizer *tok = tok_open(cfg->tokenizer, err, sizeof err);
  if (!tok) {
    log_warn("validation: no bits-per-byte (%s)", err);
    return NULL;
  }
  uint16_t *len = xcalloc((size_t)cfg->vocab_size, sizeof *len);
  int nv = tok_vocab_size(tok);
  for (uint32_t id = 0; id < (uint32_t)cfg->vocab_size && id < (uint32_t)nv; id++) {
    size_t n = 0;
    char *text = tok_decode(tok, &id, 1, &n);
    len[id] = (uint16_t)(text ? n : 0);
    free(text);
  }
  tok_close(tok);
  return len;
}

/* Mean loss over validation_steps batches read from the start of
 * validation_data_path (the same batches every time), plus bits per byte:
 * summed loss in bits over the UTF-8 bytes of the scored target tokens. */
static double validate(Model *m, const Config *cfg, const DistInfo *di, int64_t step, Metrics *mx,
                       const uint16_t *tok_bytes) {
  char err[512];
  Loader *vl = loader_open(cfg, cfg->validation_data_path, di->rank, di->world, err, sizeof err);
  if (!vl) nmoe_fatal("validation data: %s", err);
  const int B = (int)(cfg->batch_size / di->world), T = (int)cfg->seq_len;
  int32_t *in = xmalloc((size_t)B * T * sizeof(int32_t)), *tg = xmalloc((size_t)B * T * sizeof(int32_t));
  double loss_sum = 0, bytes = 0;
  int64_t n = 0;
  for (int64_t i = 0; i < cfg->validation_steps; i++) {
    if (loader_next(vl, in, tg, err, sizeof err)) nmoe_fatal("validation data: %s", err);
    int64_t nv;
    loss_sum += model_eval_loss(m, in, tg, B, T, &nv);
    n += nv;
    for (int j = 0; tok_bytes && j < B * T; j++)
      if (!cfg->loss_mask_eos || tg[j] != (int32_t)cfg->eos_token_id) bytes += tok_bytes[tg[j]];
  }
  loader_close(vl);
  free(in);
  free(tg);
  if (m->comm) bytes = comm_sum_f64(m->comm, bytes); /* loss_sum and n are global already */
  double loss = n > 0 ? loss_sum / n : 0;
  double bpb = bytes > 0 ? loss_sum / (log(2.0) * bytes) : 0;
  log_info("validation  step %lld | loss %.4f | ppl %.2f | bpb %.4f", (long long)step, loss,
           exp(loss), bpb);
  metrics_log(mx, "validation/loss", step, loss);
  metrics_log(mx, "validation/ppl", step, exp(loss));
  if (bytes > 0) metrics_log(mx, "validation/bpb", step, bpb);
  return loss;
}

/* ---------------------------------------------------------------- main loop */

static void usage_exit(void) {
  fprintf(stderr,
          "usage: nmoe train CONFIG [--print-config] [--key=value ...] [--resume|--no-resume]\n"
          "  Trains the model described by CONFIG (TOML). Any config field can be overridden\n"
          "  by NMOE_<FIELD> in the environment or --field=value here (CLI wins).\n");
  exit(2);
}

static double peak_host_gib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / (1024.0 * 1024.0);
}

int train_main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) usage_exit();
  const char *path = argv[1];
  int print_config = 0, n_over = 0;
  char **over = xcalloc((size_t)argc, sizeof *over);
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "--print-config")) print_config = 1;
    else over[n_over++] = argv[i];
  }
  Config cfg;
  char err[1024];
  if (config_load(&cfg, path, n_over, over, err, sizeof err)) nmoe_fatal("%s", err);
  free(over);
  if (print_config) {
    config_print(&cfg, stdout);
    return 0;
  }
  if (!cfg.data_path[0] && !cfg.flow_mode[0])
    nmoe_fatal("no training data: set data_path (a directory of .npy shards) or flow_mode");

  DistInfo di = dist_from_env();
  log_set_rank(di.rank, di.world);
  if (cfg.batch_size % di.world)
    nmoe_fatal("batch_size %lld is not divisible by the world size %d", (long long)cfg.batch_size,
               di.world);
  const int B = (int)(cfg.batch_size / di.world), T = (int)cfg.seq_len;

  /* Data and eval tasks first: a missing or corrupt shard or task file fails
   * before a large model is built. */
  Loader *loader = loader_open(&cfg, NULL, di.rank, di.world, err, sizeof err);
  if (!loader) nmoe_fatal("%s", err);
  if (cfg.eval_enabled) eval_check_mode(&cfg);
  if (cfg.eval_enabled && di.world > 1)
    nmoe_fatal("eval_enabled: scheduled evals load a one-process checkpoint, and this run has %d "
               "ranks; use eval_every (in-loop eval on all ranks) instead", di.world);
  EvalSuite *evals = cfg.eval_every > 0 || cfg.eval_enabled ? eval_suite_open(&cfg) : NULL;
  EvalResult *eval_res = evals ? xcalloc((size_t)evals->n, sizeof *eval_res) : NULL;
  Backend *be = backend_open(cfg.device, di.local_rank);
  Comm *comm = comm_open(&di, be);
  Model *m = model_create(&cfg, be, comm);
  char fp[65];
  config_fingerprint(&cfg, fp);
  const ModelDims *d = &m->d;
  const double flops_tok = model_flops_per_token(d, &cfg, T);
  log_info("nmoe: %s backend | %lld params (%.1fM active matmul) | %d layers (%d dense, %d moe) | "
           "%s attention | fingerprint %.12s",
           be->name, (long long)model_param_count(m), model_active_matmul_params(d, &cfg) / 1e6, d->L,
           d->n_dense, m->n_moe, d->dsa ? "dsa" : d->mla ? "mla" : "mha", fp);


  RunRecord rec = {0};
  rec.run_id = run_id_new();
  if (comm->world > 1) { /* one run id for all ranks: rank 0's */
    char mine[64] = {0}, *all = xcalloc((size_t)comm->world, sizeof mine);
    snprintf(mine, sizeof mine, "%s", rec.run_id);
    comm->all_gather_host(comm, all, mine, sizeof mine);
    free(rec.run_id);
    rec.run_id = xstrdup(all);
    free(all);
  }
  char git_hash[41];
  int git_dirty = 0;
  git_info(git_hash, &git_dirty);
  if (di.rank == 0) {
    rec.exp = experiments_open(cfg.experiments_db, err, sizeof err);
    if (!rec.exp) nmoe_fatal("%s", err);
    char *cj = config_to_json(&cfg);
    if (experiments_run_start(rec.exp, rec.run_id, cfg.experiment_id, cj, git_hash, git_dirty, err,
                              sizeof err))
      nmoe_fatal("%s", err);
    free(cj);
  }
  rec.metrics = metrics_open(cfg.metrics_dir, rec.run_id, di.rank, err, sizeof err);
  if (!rec.metrics) nmoe_fatal("%s", err);
  nmoe_on_fatal(on_fatal, &rec);
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);

  TrainProgress prog = {0};
  if (cfg.resume) {
    int64_t latest = ckpt_latest(cfg.checkpoint_dir);
    if (latest >= 0) {
      train_state_restore(m, loader, &cfg, &di, latest, &prog);
      log_info("resumed from %s/iter_%07lld (tokens seen %.0f)", cfg.checkpoint_dir,
               (long long)latest, prog.tokens_seen);
    }
  }
  Ckpt *ck = ckpt_open(cfg.checkpoint_dir, di.rank, di.world, (int)cfg.checkpoint_keep_last_n, err,
                       sizeof err);
  if (!ck) nmoe_fatal("%s", err);

  const int do_validate = cfg.validation_enabled && cfg.validation_data_path[0] && cfg.validation_every > 0;
  uint16_t *tok_bytes = do_validate ? token_byte_lengths(&cfg) : NULL;
  int32_t *inputs = xmalloc((size_t)B * T * sizeof(int32_t));
  int32_t *targets = xmalloc((size_t)B * T * sizeof(int32_t));
  const double tokens_per_step = (double)cfg.batch_size * cfg.seq_len;
  double t_window = now_s(), wait_window = 0, loss = 0, gnorm = 0, lr = 0;
  int64_t steps_in_window = 0;
  const char *status = "completed";
  int64_t s = prog.step; /* steps completed */
  while (s < cfg.steps) {
    double scale = wsd_scale(&cfg, s, prog.tokens_seen);
    lr = group_lr(&cfg, GROUP_DECAY, scale);
    double t0 = now_s();
    if (loader_next(loader, inputs, targets, err, sizeof err)) nmoe_fatal("%s", err);
    wait_window += now_s() - t0;
    loss = model_train_step_grads(m, inputs, targets, B, T);
    if (!isfinite(loss))
      nmoe_fatal("non-finite loss (%g) at step %lld: lower the learning rate or check the data; "
                 "the last checkpoint is intact", loss, (long long)(s + 1));
    if (be->phase) be->phase(be, "grad_norm");
    gnorm = grad_global_norm(m);
    if (!isfinite(gnorm))
      nmoe_fatal("non-finite gradient norm at step %lld (loss %.4f): lower the learning rate; "
                 "the last checkpoint is intact", (long long)(s + 1), loss);
    double clip = cfg.grad_clip > 0 && gnorm > cfg.grad_clip ? cfg.grad_clip / gnorm : 1.0;
    if (be->phase) be->phase(be, "optimizer");
    optim_step(m, s + 1, scale, clip);
    if (m->n_moe) model_update_router_bias(m, m->counts_host, cfg.router_bias_update_rate);
    if (be->phase) be->phase(be, "idle");
    s++;
    prog.step = s;
    prog.tokens_seen += tokens_per_step;
    steps_in_window++;

    /* A signal stops every rank after the same step (it may reach the ranks
     * on either side of a step boundary): they agree on it. */
    int stop = g_stop_signal != 0;
    if (comm->world > 1) stop = comm_sum_i64(comm, stop) > 0;
    int last = s == cfg.steps || stop;
    if (s == 1 || s % cfg.log_every == 0 || last) {
      be->sync(be);
      double dt = now_s() - t_window;
      double tps = steps_in_window * (double)B * T / dt;
      double ms = 1000 * dt / steps_in_window;
      double tflops = flops_tok * tps / 1e12;
      double mem_gib = be->mem_peak ? be->mem_peak(be) / 1073741824.0 : peak_host_gib();
      log_info("step %6lld/%lld | loss %.4f | lr %.2e | gnorm %.3f | tok/s %.0f | ms/step %.1f | "
               "tflops %.2f | mem %.1f GiB",
               (long long)s, (long long)cfg.steps, loss, lr, gnorm, tps * di.world, ms, tflops, mem_gib);
      Metrics *mx = rec.metrics;
      metrics_log(mx, "train/loss", s, loss);
      metrics_log(mx, "train/grad_norm", s, gnorm);
      if (cfg.aux_loss_alpha > 0) metrics_log(mx, "train/aux_loss", s, m->last_aux_loss);
      if (d->dsa) metrics_log(mx, "train/indexer_loss", s, m->last_idx_loss);
      metrics_log(mx, "optimizer/lr", s, lr);
      metrics_log(mx, "throughput/tokens_per_s_gpu", s, tps);
      metrics_log(mx, "throughput/ms_per_step", s, ms);
      metrics_log(mx, "throughput/loader_wait_ms", s, 1000 * wait_window / steps_in_window);
      metrics_log(mx, "efficiency/tflops", s, tflops);
      metrics_log(mx, "memory/host_max_rss_gib", s, peak_host_gib());
      if (be->mem_peak) metrics_log(mx, "memory/device_peak_gib", s, be->mem_peak(be) / 1073741824.0);
      if (!strcmp(be->name, "cuda")) metrics_log(mx, "efficiency/mfu", s, tflops / 989.0);
      char tag[96];
      snprintf(tag, sizeof tag, "throughput/r%d/tokens_per_s", di.rank);
      metrics_log(mx, tag, s, tps);
      if (be->phase_report) {
        const char *names[16];
        double pms[16];
        int np = be->phase_report(be, names, pms, 16);
        for (int i = 0; i < np; i++) {
          snprintf(tag, sizeof tag, "time_ms/r%d/%s", di.rank, names[i]);
          metrics_log(mx, tag, s, pms[i] / steps_in_window);
        }
      }
      if (m->n_moe) {
        RouterSummary r = router_stats(m, mx, s);
        log_info("router: cv %.0f%%  max %.1f%%  dead %d  bias[%.4f,%.4f]", r.mean_cv, r.max_load,
                 r.dead_experts, r.bias_min, r.bias_max);
      }
      if (metrics_flush(mx, err, sizeof err)) nmoe_fatal("%s", err);
      t_window = now_s();
      wait_window = 0;
      steps_in_window = 0;
    }
    int reached = 0; /* the validation loss met target_loss: a checkpoint, then stop */
    if (do_validate && (s % cfg.validation_every == 0 || s == cfg.steps)) {
      double vloss = validate(m, &cfg, &di, s, rec.metrics, tok_bytes);
      reached = cfg.target_loss > 0 && vloss <= cfg.target_loss; /* global loss: every rank agrees */
      last = last || reached;
    }
    if (cfg.eval_every > 0 && s % cfg.eval_every == 0) {
      double ms = eval_suite_score(m, evals, B, T, cfg.eval_budget_max_time_s, eval_res);
      eval_report(rec.metrics, s, eval_res, evals->n);
      if (metrics_flush(rec.metrics, err, sizeof err)) nmoe_fatal("%s", err);
      t_window += ms / 1000; /* the eval's time is not training throughput */
    }
    if ((cfg.checkpoint_every > 0 && s % cfg.checkpoint_every == 0) || last) {
      if (comm->world > 1) {
        /* A directory of this step left by an unfinished earlier attempt holds
         * stale rank files that rank 0 would take for this save's: remove it
         * before any rank writes. */
        if (di.rank == 0) {
          char it[CKPT_PATHN];
          ckpt_iter_path(it, cfg.checkpoint_dir, s);
          if (fs_exists(it) && fs_remove_tree(it))
            nmoe_fatal("checkpoint: cannot remove the stale %s", it);
        }
        comm_host_barrier(comm, 0);
      }
      CkptSnapshot *snap = train_state_snapshot(m, loader, &cfg, &di, &prog, git_hash);
      if (ckpt_save_async(ck, snap, err, sizeof err)) nmoe_fatal("checkpoint: %s", err);
      if (cfg.eval_enabled) { /* the step must be finalised before an eval can load it */
        if (ckpt_wait(ck, err, sizeof err)) nmoe_fatal("checkpoint: %s", err);
        if (di.rank == 0) eval_schedule(&cfg, rec.run_id, s);
      }
    }
    if (stop) {
      log_warn("stopping on a signal after step %lld (checkpoint saved)", (long long)s);
      status = "killed";
      break;
    }
    if (reached) {
      log_info("target_loss %.4f reached at step %lld (checkpoint saved)", cfg.target_loss,
               (long long)s);
      break;
    }
  }
  if (ckpt_close(ck, err, sizeof err)) nmoe_fatal("checkpoint: %s", err);
  /* Rank 0 returns from ckpt_close only once the last checkpoint is finalised
   * (after every rank's files are written): nobody leaves before that, so a
   * launcher cannot stop rank 0 half way. That may take long for a big model. */
  comm_host_barrier(comm, 24 * 3600);
  if (metrics_flush(rec.metrics, err, sizeof err)) nmoe_fatal("%s", err);
  nmoe_on_fatal_remove(on_fatal, &rec);
  if (rec.exp) {
    JsonW w;
    jw_init(&w, 0);
    jw_obj(&w, NULL);
    jw_num(&w, "final_loss", loss);
    jw_num(&w, "tokens_seen", prog.tokens_seen);
    jw_int(&w, "steps_completed", s);
    jw_obj_end(&w);
    char *res = jw_finish(&w);
    if (experiments_run_end(rec.exp, rec.run_id, status, res, err, sizeof err)) nmoe_fatal("%s", err);
    free(res);
    experiments_close(rec.exp);
  }
  metrics_close(rec.metrics);
  log_info("done: %lld steps, %.0f tokens, final loss %.4f (run %s)", (long long)s, prog.tokens_seen,
           loss, rec.run_id);
  free(rec.run_id);
  free(inputs);
  free(targets);
  free(tok_bytes);
  free(eval_res);
  eval_suite_free(evals);
  loader_close(loader);
  model_free(m);
  comm->destroy(comm);
  be->destroy(be);
  int rc = !strcmp(status, "completed") ? 0 : 130;
  config_free(&cfg);
  return rc;
}
