/* mixture.h: flow plans. A mixture TOML plus a flow profiles TOML resolve into
 * a MixturePlan: per stage (pretrain -> mid -> long), a token target and, per
 * source, a sequence quota and a fixed-point weight for smooth weighted
 * round-robin (SWRR) mixing. The plan is pure arithmetic on the two files and
 * seq_len (no data is read), so every rank resolves the same plan and its
 * SHA-256 (plan_hash) pins a run's data stream in checkpoints.
 *
 * Schema (as the original nmoe's configs):
 *   flow profiles:  [flow.<name>]  mode = "dev", stages = ["pretrain", "mid"],
 *                   one of tokens_b = 1.0 | tokens_b_ratio = 400 | scale = 0.001,
 *                   sample_temperature = 1.0 (recorded only),
 *                   optional tokens_b_override = { mid = 5.0 } (billions, per stage)
 *                   [flow.<name>.mixture]  <stage> = "<mixture id>"
 *   mixture:        [mixtures.<id>]  total_tokens_b = 5930.0 (default: sum of sources)
 *                   [[mixtures.<id>.sources]]  id = "common_crawl", tokens_b = 4510.0,
 *                   percent = 76.07 (the weight when tokens_b is absent), hf_* (ignored here)
 * Stage targets: tokens_b_override[stage], else total_tokens_b(stage mixture) x scale,
 * where scale = tokens_b / (sum of the flow's mixture totals) when tokens_b (or
 * tokens_b_ratio x active_params_b) is given, and 1 when nothing is. */
#ifndef NMOE_MIXTURE_H
#define NMOE_MIXTURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MIXTURE_FP_SCALE 1000000 /* fixed-point scale of SWRR weights */

typedef struct PlanSource {
  char *id;
  double tokens_b;         /* nominal size in the mixture (billions; the weight) */
  int64_t weight_fp;       /* SWRR weight, share x 1e6 rounded half-even, at least 1 */
  int64_t quota_sequences; /* sequences this source contributes to its stage */
} PlanSource;

typedef struct PlanStage {
  char *id;              /* pretrain | mid | long | ... as listed in the flow */
  char *mixture;         /* mixture id used by this stage */
  double tokens_b;       /* stage target, billions */
  int64_t target_tokens; /* floor(tokens_b x 1e9) */
  int n_sources;
  PlanSource *sources;   /* (n_sources,) in mixture file order */
} PlanStage;

typedef struct MixturePlan {
  char *flow;         /* profile name (flow_mode in the config) */
  char *mode;         /* the profile's mode field */
  char *mixture_id;   /* mixture file name without directory and .toml */
  double sample_temperature;
  int64_t seq_len;
  int n_stages;
  PlanStage *stages;  /* (n_stages,) in training order */
  char hash[65];      /* SHA-256 hex of mixture_plan_json() */
} MixturePlan;

/* Resolves flow `flow` of profiles_path against mixture_path (both parsed with
 * ${NMOE_*} expansion). active_params_b is needed only by tokens_b_ratio
 * flows. 0, or -1 with one line naming the file and what is wrong. */
int mixture_resolve(const char *mixture_path, const char *profiles_path, const char *flow,
                    int64_t seq_len, double active_params_b, MixturePlan *plan, char *err,
                    size_t errlen);

/* Canonical plan JSON (sorted keys, compact): what plan_hash hashes and what
 * checkpoints store. Caller frees. */
char *mixture_plan_json(const MixturePlan *plan);

/* Total sequences over all stages. */
int64_t mixture_plan_sequences(const MixturePlan *plan);

void mixture_plan_free(MixturePlan *plan);

/* Largest-remainder split of total sequences by integer weights w (n,):
 * out[i] = floor(total w_i / W) plus one for the (total - sum floors) largest
 * remainders, ties to the lower index. Exact integer arithmetic; W > 0. */
void mixture_quotas(int64_t total, const int64_t *w, int n, int64_t *out);

/* Fixed-point SWRR weights: max(1, round_half_even(w_i / W x 1e6)). W > 0. */
void mixture_weights_fp(const int64_t *w, int n, int64_t *out);

/* One SWRR pick among the active sources: acc[i] += w[i] for each active i,
 * choose the largest acc (ties to the lower index), acc[chosen] -= sum of
 * active weights. Inactive sources (quota spent) neither gain nor get picked,
 * so the remaining sources keep their relative proportions. Returns the index,
 * or -1 when none is active. */
int mixture_swrr_pick(int n, const int64_t *w, int64_t *acc, const bool *active);

#endif
