/* metrics.h: run records and per-rank metrics in SQLite (reference section 8).
 *
 * experiments.db (rank 0; WAL): experiments(id, name, project, description,
 * created_at) and runs(id, experiment_id, config_json, git_hash, git_dirty,
 * started_at, ended_at, status, results_json). A run is created at start and
 * ended as completed, failed (with the error) or killed.
 *
 * metrics_dir/RUN_ID/rank_R.sqlite (every rank): metrics(run, tag, step,
 * ts_ms, value), primary key (run, tag, step), INSERT OR REPLACE, batched in
 * one transaction per flush so logging never slows a step measurably. */
#ifndef NMOE_METRICS_H
#define NMOE_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct Metrics Metrics;
Metrics *metrics_open(const char *metrics_dir, const char *run_id, int rank, char *err, size_t errlen);
/* Buffers one value (written at the next flush). NaN is not recorded (SQLite
 * cannot store it); infinities are. */
void metrics_log(Metrics *m, const char *tag, int64_t step, double value);
/* Commits buffered values in one transaction; 0 or -1 with err. */
int metrics_flush(Metrics *m, char *err, size_t errlen);
void metrics_close(Metrics *m);

typedef struct Experiments Experiments;
Experiments *experiments_open(const char *db_path, char *err, size_t errlen);
/* Inserts the experiment row if missing, then the run (status 'running'). */
int experiments_run_start(Experiments *x, const char *run_id, const char *experiment_id,
                          const char *config_json, const char *git_hash, int git_dirty, char *err,
                          size_t errlen);
/* status: "completed" | "failed" | "killed"; results_json may be NULL. */
int experiments_run_end(Experiments *x, const char *run_id, const char *status,
                        const char *results_json, char *err, size_t errlen);
void experiments_close(Experiments *x);

/* NMOE_RUN when set, else run_<unix seconds>_<pid> (caller frees). */
char *run_id_new(void);
/* Git commit of the source tree (or "unknown") and whether it is dirty. */
void git_info(char out_hash[41], int *dirty);

#endif
