/* optim.h: the optimizer step over the parameter table: WSD learning-rate
 * schedule, global gradient norm (optional clipping), AdamW per group
 * (reference section 3), and the group hyper-parameters. */
#ifndef NMOE_OPTIM_H
#define NMOE_OPTIM_H

#include <stdint.h>

#include "core/config.h"
#include "model/model.h"

/* WSD multiplier in [0,1] for a step (0-based) and tokens seen before it:
 * linear warmup (step+1)/warmup_steps, hold at 1 until hold_tokens, cosine to
 * 0 over decay_tokens, then 0. */
double wsd_scale(const Config *c, int64_t step, double tokens_seen);

/* Per-group learning rate: floor + (peak - floor) * scale, with the router's
 * floor min(decay_floor, lr_router). */
double group_lr(const Config *c, OptGroup g, double scale);

/* Global L2 norm of all gradients (deterministic). */
double grad_global_norm(Model *m);

/* One AdamW update of every group. step is 1-based (bias correction).
 * clip_scale multiplies the gradients first (1 = no clipping). */
void optim_step(Model *m, int64_t step, double lr_scale, double clip_scale);

#endif
