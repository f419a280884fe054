/* viz.h: `nmoe viz`, the metrics dashboard (reference section 9, in C).
 *
 * A small HTTP server over the SQLite files a training run writes:
 * experiments.db (experiments, runs) and metrics_dir/RUN/rank_R.sqlite
 * (metrics(run, tag, step, ts_ms, value)). Every request opens the files it
 * needs read-only with a busy timeout, so a live run is never blocked.
 *
 * GET endpoints (JSON; errors are {"error": "..."} with 400/404/405/500):
 *   /                          the dashboard page (self-contained HTML)
 *   /api/health                {"ok", "metrics_dir", "experiments_db", "experiments_db_present"}
 *   /api/runs                  {"runs": [{run, experiment_id, status, started_at, ended_at,
 *                               last_step, last_ts, ranks}]}, most recent first
 *   /api/tags?run              {"run", "tags": [...]} over all rank files
 *   /api/series?run&tag&points {"run", "tag", "rank", "total", "points": [[step, value]...]};
 *                               a per-rank tag (".../rN/...") reads rank N's file, others the
 *                               lowest rank's; LTTB down to points in [10, 5000] (default 1000)
 *   /api/summary?run           {"run", "step", "val_step", loss, grad_norm, lr, tokens_per_s,
 *                               ms_per_step, loader_wait_ms, tflops, mfu, val_loss, val_ppl,
 *                               val_bpb, host_rss_gib, device_peak_gib} (latest; null if absent)
 *   /api/router?run            {"run", "step", "metrics": [...], "layers": [{layer, cv, entropy,
 *                               max_load, bias_range, experts_active}], "agg": {mean_cv, ...}}
 *   /api/experiments           {"experiments": [{id, name, project, description, created_at,
 *                               runs, last_started_at}]}
 *   /api/experiments/run?run   {"run": {id, experiment_id, status, started_at, ended_at, git_hash,
 *                               git_dirty, config_json, results_json}} (JSON values embedded) */
#ifndef NMOE_VIZ_H
#define NMOE_VIZ_H

#include "viz/http.h"

typedef struct VizConfig {
  const char *metrics_dir;
  const char *experiments_db; /* may not exist yet: then only metrics dirs are listed */
} VizConfig;

/* `nmoe viz [--config TOML] [--metrics-dir DIR] [--experiments-db PATH] [--bind ADDR]
 * [--port N] [--once-port-file PATH]`; argv[0] = "viz". */
int viz_main(int argc, char **argv);

/* Answers one request (an HttpHandler; ud is a const VizConfig *). */
void viz_handle(void *ud, const char *method, const char *target, HttpResponse *r);

/* The embedded dashboard page. */
extern const char VIZ_PAGE[];

#endif
