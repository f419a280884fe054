/* bench_train.c: `nmoe bench train CONFIG [--steps N] [--warmup W] [--key=value ...]`.
 *
 * Times full training steps (forward, backward, grad norm, AdamW, router bias
 * update) on one synthetic batch reused every step (as the PyTorch baselines
 * in tests/torch_ref do), after W warm-up steps. Prints one JSON line:
 * tokens/s, ms/step, model TFLOP/s and MFU, peak memory and the per-phase
 * breakdown (ms per step).
 *
 * FLOPs per token: model_flops_per_token() = 6 x active matmul parameters
 * (attention projections, top-k + shared experts, router, dense MLPs, lm_head;
 * no embedding) + 6 x layers x heads x (d_qk + d_v)/2 x seq_len (causal
 * attention, forward and backward). MFU divides by 989 TFLOP/s, the dense
 * bf16 peak of H100/H200 SXM. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/config.h"
#include "core/json.h"
#include "core/log.h"
#include "core/rng.h"
#include "dist/comm.h"
#include "model/model.h"
#include "train/optim.h"
#include "train/train.h"

#define PEAK_BF16_FLOPS 989e12

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void one_step(Model *m, const int32_t *in, const int32_t *tg, int B, int T, int64_t step) {
  double loss = model_train_step_grads(m, in, tg, B, T);
  if (!isfinite(loss)) nmoe_fatal("bench: non-finite loss at step %lld", (long long)step);
  if (m->be->phase) m->be->phase(m->be, "grad_norm");
  double gn = grad_global_norm(m);
  (void)gn;
  if (m->be->phase) m->be->phase(m->be, "optimizer");
  optim_step(m, step, 1.0, 1.0);
  if (m->n_moe) model_update_router_bias(m, m->counts_host, m->cfg.router_bias_update_rate);
}

int bench_train_main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help")) {
    fprintf(stderr, "usage: nmoe bench train CONFIG [--steps N] [--warmup W] [--key=value ...]\n");
    return 2;
  }
  int steps = 10, warmup = 3, n_over = 0;
  char **over = xcalloc((size_t)argc, sizeof *over);
  for (int i = 2; i < argc; i++) {
    if (!strncmp(argv[i], "--steps=", 8)) steps = atoi(argv[i] + 8);
    else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
    else if (!strncmp(argv[i], "--warmup=", 9)) warmup = atoi(argv[i] + 9);
    else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
    else over[n_over++] = argv[i];
  }
  if (steps < 1 || warmup < 0) nmoe_fatal("bench train: --steps must be >= 1 and --warmup >= 0");
  Config cfg;
  char err[1024];
  if (config_load(&cfg, argv[1], n_over, over, err, sizeof err)) nmoe_fatal("%s", err);
  free(over);
  /* Under a launcher every rank runs batch_size sequences (weak scaling). */
  DistInfo di = dist_from_env();
  log_set_rank(di.rank, di.world);
  Backend *be = backend_open(cfg.device, di.local_rank);
  Comm *comm = comm_open(&di, be);
  Model *m = model_create(&cfg, be, comm);
  const int B = (int)cfg.batch_size, T = (int)cfg.seq_len;
  const size_t N = (size_t)B * T, base = (size_t)di.rank * N;
  int32_t *in = xmalloc(N * sizeof(int32_t)), *tg = xmalloc(N * sizeof(int32_t));
  for (size_t i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64((uint64_t)cfg.seed, 11, base + i, 0) % (uint64_t)cfg.vocab_size);
    tg[i] = (int32_t)(rng_u64((uint64_t)cfg.seed, 12, base + i, 0) % (uint64_t)cfg.vocab_size);
  }
  for (int s = 0; s < warmup; s++) one_step(m, in, tg, B, T, s + 1);
  be->sync(be);
  if (be->phase_report) {
    const char *names[64];
    double ms[64];
    be->phase_report(be, names, ms, 64); /* discard warm-up phases */
  }
  comm_host_barrier(comm, 0); /* all ranks start the clock together */
  double t0 = now_s();
  for (int s = 0; s < steps; s++) one_step(m, in, tg, B, T, warmup + s + 1);
  be->sync(be);
  comm_host_barrier(comm, 0); /* and stop it when the slowest is done */
  double dt = now_s() - t0;

  const double tps = (double)steps * N * di.world / dt;
  const double flops_tok = model_flops_per_token(&m->d, &cfg, T);
  const double tflops = flops_tok * tps / 1e12;
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "bench", "train");
  jw_str(&w, "config", argv[1]);
  jw_str(&w, "backend", be->name);
  jw_int(&w, "world", di.world);
  jw_int(&w, "batch", B);
  jw_int(&w, "seq_len", T);
  jw_int(&w, "steps", steps);
  jw_num(&w, "tok_s", round(tps));
  jw_num(&w, "tok_s_per_gpu", round(tps / di.world));
  jw_num(&w, "ms_step", 1000 * dt / steps);
  jw_num(&w, "tflops", tflops);
  if (!strcmp(be->name, "cuda")) jw_num(&w, "mfu", tflops * 1e12 / (PEAK_BF16_FLOPS * di.world));
  jw_num(&w, "flops_per_token", flops_tok);
  jw_int(&w, "params", model_param_count(m));
  jw_int(&w, "active_matmul_params", model_active_matmul_params(&m->d, &cfg));
  if (be->mem_peak) jw_num(&w, "peak_mem_gib", be->mem_peak(be) / 1073741824.0);
  if (be->phase_report) {
    const char *names[64];
    double ms[64];
    int np = be->phase_report(be, names, ms, 64);
    jw_obj(&w, "phase_ms_per_step");
    for (int i = 0; i < np; i++) jw_num(&w, names[i], ms[i] / steps);
    jw_obj_end(&w);
  }
  jw_obj_end(&w);
  char *line = jw_finish(&w);
  if (di.rank == 0) printf("%s\n", line);
  free(line);
  free(in);
  free(tg);
  model_free(m);
  comm->destroy(comm);
  be->destroy(be);
  return 0;
}
