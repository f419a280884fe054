/* train_state.h: what a checkpoint holds of a training run, and how it is
 * taken (snapshot to host memory) and put back (restore with checks).
 *
 * dense.safetensors: dense parameters (storage dtype) and router biases;
 * rank_RRR.safetensors: expert parameters, AdamW moments (optim.exp_avg.*,
 * optim.exp_avg_sq.*) and fp32 master weights (master.*) when kept;
 * rank_RRR.json: step, tokens_seen, seed, fingerprint, plan hash, git commit,
 * backend, world, the loader cursor and the full config. */
#ifndef NMOE_TRAIN_STATE_H
#define NMOE_TRAIN_STATE_H

#include <stdint.h>

#include "core/config.h"
#include "data/loader.h"
#include "dist/dist.h"
#include "model/model.h"
#include "train/ckpt.h"

typedef struct TrainProgress {
  int64_t step;       /* steps completed */
  double tokens_seen; /* global tokens consumed */
} TrainProgress;

CkptSnapshot *train_state_snapshot(Model *m, const Loader *loader, const Config *cfg,
                                   const DistInfo *di, const TrainProgress *prog,
                                   const char *git_hash);
/* Restores step of cfg->checkpoint_dir into m, loader and prog; fatal with a
 * clear message on any mismatch (fingerprint fields, plan hash, world size,
 * shapes) or corruption. loader NULL: weights and optimizer only (an eval
 * needs no training data). */
void train_state_restore(Model *m, Loader *loader, const Config *cfg, const DistInfo *di,
                         int64_t step, TrainProgress *prog);

#endif
