/* eval.h: eval entry points used by main.c and the training loop:
 * `nmoe eval` (score a finalised checkpoint), the in-loop choice eval
 * (eval_every) and the scheduled eval of each checkpoint (eval_enabled). */
#ifndef NMOE_EVAL_H
#define NMOE_EVAL_H

#include <stdint.h>

#include "core/config.h"
#include "eval/eval_score.h"
#include "eval/eval_tasks.h"

/* `nmoe eval CONFIG [--checkpoint-dir DIR] [--step N] [--tasks all|a,b]
 * [--out summary.json] [--key=value ...]` (argv[0] = "eval"). */
int eval_main(int argc, char **argv);

/* Fatal with one line when eval_mode is not inline, reserved_gpu or k8s_job. */
void eval_check_mode(const Config *cfg);

/* Scheduled eval of the finalised checkpoint step (rank 0, eval_enabled):
 * writes the resolved config to {metrics_dir}/eval/{run}/step_{N:07d}/
 * config.toml, then per eval_mode runs `nmoe eval` on it and waits (inline),
 * starts it detached with CUDA_VISIBLE_DEVICES=eval_reserved_gpu_id
 * (reserved_gpu), or writes {metrics_dir}/eval/{run}/queue/ticket_{step}.json
 * (k8s_job). The summary goes to that step directory's summary.json, the
 * child's output to its eval.log. A failed eval is a warning, not fatal. */
void eval_schedule(const Config *cfg, const char *run_id, int64_t step);

#endif
