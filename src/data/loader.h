/* loader.h: the deterministic training data loader ("global stream, local slice").
 *
 * Every rank walks the same global stream of batch_size sequences per step and
 * materialises only its contiguous slice [rank*local, (rank+1)*local), local =
 * batch_size/world; the cursors skip the rest without reading it. A sequence is
 * a window of seq_len+1 consecutive tokens of one source; windows are taken
 * back to back, cross shard boundaries, and wrap to the source's first shard
 * when it ends (wrap_count counts that). No prefetch: the cursor is exact.
 *
 * Modes:
 *   direct  data_path (or a path_override, e.g. validation_data_path): every
 *           .npy file below it (recursively), sorted by path bytes, as one source "data_path".
 *           Unlimited: the stream wraps.
 *   flow    flow_mode + mixture_toml + flow_profiles_toml (see mixture.h):
 *           sources of a stage live in {data_root}/flows/{flow}/{stage}/{source}/train
 *           (.npy files below it);
 *           each pick is an SWRR choice among sources with quota left; a stage
 *           ends when all its quotas are emitted, and the plan ends after the
 *           last stage (loader_next then fails).
 * The cursor (loader_state_json) is the same on every rank and independent of
 * world size, so a run may resume on another number of GPUs. */
#ifndef NMOE_LOADER_H
#define NMOE_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"

typedef struct Loader Loader;

/* Direct mode when path_override != NULL, or data_path is set and flow_mode
 * empty; flow mode otherwise. Maps every shard and checks it (a truncated or
 * corrupt shard is an error naming the file); flow mode resolves the plan and
 * runs the preflight (every source holds at least quota x seq_len tokens) and,
 * when cfg->steps > 0, checks steps x batch_size fits the plan. For the
 * training stream (no override), rank 0 warns once when direct data is shorter
 * than steps x batch_size x seq_len (it will repeat). NULL with err on error. */
Loader *loader_open(const Config *cfg, const char *path_override, int rank, int world, char *err,
                    size_t errlen);

/* Next step: inputs and targets, each (local_batch, seq_len) int32, row r from
 * window w of global sequence rank*local_batch + r: inputs = w[0..seq_len),
 * targets = w[1..seq_len]. Tokens >= vocab_size are an error naming the shard.
 * 0, or -1 with err (plan exhausted, bad token); after -1 only loader_close. */
int loader_next(Loader *L, int32_t *inputs, int32_t *targets, char *err, size_t errlen);

/* Exact cursor as JSON (caller frees): version, mode, plan_hash, current_stage,
 * stage_index, global_sequence_index, accumulators, emitted_sequences{source},
 * cursors{source: {file_idx, pos_in_file, wrap_count, num_files}}. */
char *loader_state_json(const Loader *L);

/* Restores a cursor saved by loader_state_json after validating it against
 * this loader (version, mode, plan hash, stage, source names, shard counts,
 * positions within the shards). On error the loader is unchanged. */
int loader_restore_json(Loader *L, const char *json, char *err, size_t errlen);

/* SHA-256 hex of the canonical plan JSON; "0" in direct mode. */
const char *loader_plan_hash(const Loader *L);

/* Flow mode: the canonical plan JSON (what plan_hash hashes). Direct mode: a
 * short description {"mode":"direct","data_path":...,"num_files":..,"total_tokens":..}.
 * Caller frees. */
char *loader_plan_json(const Loader *L);

/* Direct: tokens available. Flow: tokens planned (sum of quotas x seq_len), so
 * steps = total / (batch_size x seq_len) never runs past the plan. */
int64_t loader_total_tokens(const Loader *L);

/* Name of the cursor's stage ("pretrain" in direct mode). A stage whose quotas
 * are all spent stays current until the next sequence is taken. */
const char *loader_stage_name(const Loader *L);

void loader_close(Loader *L);

#endif
