/* model_dump.c: one training step's loss and gradients, written as .npy files
 * for the PyTorch oracle (tests/torch_ref/nmoe_ref.py), which rebuilds the
 * model from the same weights and batch and checks our spec independently.
 *
 *   model_dump CONFIG OUTDIR [--device cpu|cuda] [--router-bias=SCALE] [--key=value ...]
 *
 * Loads CONFIG (with --key=value overrides), builds the model on the chosen
 * backend, sets the router biases to a deterministic pattern in [-SCALE, SCALE]
 * (default 0.01, so top-k runs on biased scores as in training), makes a
 * deterministic batch of batch_size x seq_len tokens (a counter hash of the
 * seed, about 1 in 16 tokens eos, targets = inputs shifted by one), runs
 * model_train_step_grads once and writes into OUTDIR:
 *   param.<name>.npy  grad.<name>.npy   float32, the table's shapes (ACT values
 *                                       read through be->get: bf16-exact on CUDA)
 *   bias.<layer>.npy  float32 [E]       router bias of MoE layer <layer>
 *   counts.<layer>.npy int32 [E]        assignments per expert in that layer
 *   route.<layer>.npy int32 [B*T, K]    the experts each token chose (descending
 *                                       biased score), captured from router_fwd
 *   inputs.npy targets.npy  int32 [B, T]
 *   meta.json  loss (mean CE over kept targets), n_valid, aux_loss, idx_loss (DSA indexer), backend,
 *              B, T, router_bias_scale, moe_layers, config (config_to_json)
 * The gradients are those of loss + aux_loss (the aux term is in the grads). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/config.h"
#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "core/rng.h"
#include "data/npy.h"
#include "model/model.h"

enum { STREAM_BATCH = 0xBA7C, STREAM_BIAS = 0xB1A5 };

/* Our routing: be->router_fwd is wrapped so that each MoE layer's chosen
 * experts (I32 [N, K]) are copied to the host as the forward runs, in layer
 * order. The oracle runs bf16 dumps on exactly these choices, so a token near a
 * top-k tie cannot make the comparison of the continuous math fail. */
static struct {
  void (*inner)(Backend *, void *, int32_t *, void *, int32_t *, void *, const void *,
                const void *, const void *, int, int, int, int, float);
  int32_t **idx; /* [cap] host [N, K] */
  int n, cap;
} g_route;

static void router_fwd_capture(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts,
                               void *imp, const void *x, const void *wg, const void *bias, int N,
                               int D, int E, int K, float route_scale) {
  g_route.inner(be, scores, idx, w, counts, imp, x, wg, bias, N, D, E, K, route_scale);
  if (g_route.n == g_route.cap) nmoe_fatal("model_dump: more router calls than MoE layers");
  int32_t *h = xmalloc((size_t)N * K * sizeof *h);
  be->download(be, h, idx, (size_t)N * K * sizeof *h);
  g_route.idx[g_route.n++] = h;
}

static void usage(void) {
  fprintf(stderr,
          "usage: model_dump CONFIG OUTDIR [--device cpu|cuda] [--router-bias=SCALE] "
          "[--key=value ...]\n");
  exit(2);
}

/* Writes one C-order array (descr "<f4" or "<i4", 4-byte elements). */
static void write_npy(const char *dir, const char *name, const char *descr, const int64_t *shape,
                      int ndim, const void *data) {
  char path[2048], err[512];
  snprintf(path, sizeof path, "%s/%s.npy", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) nmoe_fatal("cannot create %s", path);
  if (npy_write_header(f, descr, shape, ndim, err, sizeof err)) nmoe_fatal("%s: %s", path, err);
  size_t n = 1;
  for (int d = 0; d < ndim; d++) n *= (size_t)shape[d];
  if (fwrite(data, 4, n, f) != n || fclose(f)) nmoe_fatal("cannot write %s", path);
}

/* Writes every row of the parameter table read from base (params or grads). */
static void write_table(Model *m, void *base, const char *prefix, const char *dir) {
  size_t max = 0;
  for (int p = 0; p < m->pt.n; p++) max = m->pt.p[p].numel > max ? m->pt.p[p].numel : max;
  float *host = xmalloc(max * sizeof(float));
  for (int p = 0; p < m->pt.n; p++) {
    const ParamInfo *pi = &m->pt.p[p];
    m->be->get(m->be, host, BUF_ACT, model_ptr(m, base, p), pi->numel);
    char name[160];
    snprintf(name, sizeof name, "%s.%s", prefix, pi->name);
    write_npy(dir, name, "<f4", pi->shape, pi->ndim, host);
  }
  free(host);
}

/* Token stream of N+1 ids: uniform over the vocabulary, eos about 1 in 16. */
static void make_batch(const Config *c, int32_t *inputs, int32_t *targets, size_t N) {
  uint64_t seed = (uint64_t)c->seed;
  for (size_t i = 0; i <= N; i++) {
    int32_t t = (int32_t)(rng_u64(seed, STREAM_BATCH, i, 0) % (uint64_t)c->vocab_size);
    if (rng_u64(seed, STREAM_BATCH, i, 1) % 16 == 0) t = (int32_t)c->eos_token_id;
    if (i < N) inputs[i] = t;
    if (i > 0) targets[i - 1] = t;
  }
}

int main(int argc, char **argv) {
  if (argc < 3) usage();
  const char *cfg_path = argv[1], *out = argv[2];
  double bias_scale = 0.01;
  /* Overrides for config_load: everything but our own options. */
  char **over = xcalloc((size_t)argc + 1, sizeof *over);
  int n_over = 0;
  char device_arg[64];
  for (int i = 3; i < argc; i++) {
    if (!strcmp(argv[i], "--device")) {
      if (i + 1 >= argc) usage();
      snprintf(device_arg, sizeof device_arg, "--device=%s", argv[++i]);
      over[n_over++] = device_arg;
    } else if (!strncmp(argv[i], "--router-bias=", 14)) {
      char *end;
      bias_scale = strtod(argv[i] + 14, &end);
      if (*end || bias_scale < 0) nmoe_fatal("--router-bias needs a number >= 0, got '%s'", argv[i] + 14);
    } else {
      over[n_over++] = argv[i];
    }
  }
  Config cfg;
  char err[512];
  if (config_load(&cfg, cfg_path, n_over, over, err, sizeof err)) nmoe_fatal("%s", err);
  if (fs_mkdirs(out, err, sizeof err)) nmoe_fatal("%s", err);

  Backend *be = backend_open(cfg.device, 0);
  Model *m = model_create(&cfg, be, NULL);
  const int B = (int)cfg.batch_size, T = (int)cfg.seq_len, E = m->d.E;
  const size_t N = (size_t)B * T;

  size_t nb = (size_t)m->n_moe * E;
  for (size_t i = 0; i < nb; i++)
    m->router_bias_host[i] = (float)(bias_scale * (2 * rng_uniform((uint64_t)cfg.seed, STREAM_BIAS, i, 0) - 1));
  if (nb) be->put(be, m->router_bias, BUF_F32, m->router_bias_host, nb);

  int32_t *inputs = xmalloc(N * sizeof(int32_t)), *targets = xmalloc(N * sizeof(int32_t));
  make_batch(&cfg, inputs, targets, N);
  g_route.cap = m->n_moe;
  g_route.idx = xcalloc((size_t)(m->n_moe > 0 ? m->n_moe : 1), sizeof *g_route.idx);
  g_route.inner = be->router_fwd;
  be->router_fwd = router_fwd_capture;
  double loss = model_train_step_grads(m, inputs, targets, B, T);
  if (g_route.n != m->n_moe)
    nmoe_fatal("model_dump: %d router calls for %d MoE layers", g_route.n, m->n_moe);
  be->sync(be);

  write_table(m, m->params, "param", out);
  write_table(m, m->grads, "grad", out);
  int64_t bt[2] = {B, T}, e1[1] = {E}, nk[2] = {(int64_t)N, m->d.K};
  write_npy(out, "inputs", "<i4", bt, 2, inputs);
  write_npy(out, "targets", "<i4", bt, 2, targets);
  JsonW w;
  jw_init(&w, 1);
  jw_obj(&w, NULL);
  jw_num(&w, "loss", loss);
  jw_int(&w, "n_valid", m->last_n_valid);
  jw_num(&w, "aux_loss", m->last_aux_loss);
  jw_num(&w, "idx_loss", m->last_idx_loss);
  jw_str(&w, "backend", be->name);
  jw_int(&w, "B", B);
  jw_int(&w, "T", T);
  jw_num(&w, "router_bias_scale", bias_scale);
  jw_arr(&w, "moe_layers");
  for (int l = 0; l < m->d.L; l++) {
    int li = m->lp[l].moe_index;
    if (li < 0) continue;
    jw_int(&w, NULL, l);
    char name[64];
    snprintf(name, sizeof name, "bias.%d", l);
    write_npy(out, name, "<f4", e1, 1, m->router_bias_host + (size_t)li * E);
    snprintf(name, sizeof name, "counts.%d", l);
    write_npy(out, name, "<i4", e1, 1, m->counts_host + (size_t)li * E);
    snprintf(name, sizeof name, "route.%d", l);
    write_npy(out, name, "<i4", nk, 2, g_route.idx[li]);
    free(g_route.idx[li]);
  }
  jw_arr_end(&w);
  char *cj = config_to_json(&cfg);
  jw_raw(&w, "config", cj);
  free(cj);
  jw_obj_end(&w);
  char *doc = jw_finish(&w);
  char path[2048];
  snprintf(path, sizeof path, "%s/meta.json", out);
  if (fs_write_atomic(path, doc, strlen(doc), err, sizeof err)) nmoe_fatal("%s", err);
  free(doc);
  printf("model_dump: %s backend, %d x %d tokens, loss %.6f (n_valid %lld, aux %.6g), %d tensors -> %s\n",
         be->name, B, T, loss, (long long)m->last_n_valid, m->last_aux_loss, m->pt.n, out);

  free(g_route.idx);
  free(inputs);
  free(targets);
  model_free(m);
  be->destroy(be);
  config_free(&cfg);
  free(over);
  return 0;
}
