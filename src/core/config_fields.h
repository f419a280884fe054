/* config_fields.h: the one list of config fields (an X-macro table).
 *
 * Each row: X(kind, name, default, flags, doc). kind is INT (int64_t), FLOAT
 * (double), BOOL (bool) or STR (char *, owned). Names and defaults follow the
 * original's Config (reference section 2.2); rows marked CF_OURS are nmoe's own.
 * Flags:
 *   CF_REQ    required: no default, the config must set it
 *   CF_FP     part of the fingerprint (defines the model or the data stream)
 *   CF_UNSUP  known field, not supported yet: setting it is an error
 *   CF_OURS   nmoe addition (documentation only)
 * Include this file after defining X; it is included several times. */

/* ---- meta ---- */
X(STR,   preset,                  "custom",        0,          "preset name (informational)")
X(STR,   experiment_id,           "default",       0,          "experiment id for experiments.db")
/* ---- model ---- */
X(INT,   vocab_size,              201088,          CF_FP,      "vocabulary size (embedding and lm_head rows)")
X(STR,   tokenizer,               "o200k_harmony", CF_FP,      "gpt2 | cl100k_base | o200k_base | o200k_harmony")
X(INT,   eos_token_id,            199999,          CF_FP,      "end-of-document token; masked from the loss when loss_mask_eos")
X(BOOL,  loss_mask_eos,           true,            CF_FP|CF_OURS, "exclude targets equal to eos_token_id from the loss")
X(INT,   dim,                     0,               CF_REQ|CF_FP, "model width")
X(INT,   n_layers,                0,               CF_REQ|CF_FP, "number of blocks")
X(INT,   n_heads,                 0,               CF_REQ|CF_FP, "attention heads")
X(INT,   inter_dim,               0,               CF_REQ|CF_FP, "dense SwiGLU hidden size")
X(INT,   moe_inter_dim,           0,               CF_REQ|CF_FP, "routed/shared expert SwiGLU hidden size")
X(INT,   n_routed_experts,        0,               CF_REQ|CF_FP, "routed experts per MoE layer (E)")
X(INT,   n_activated_experts,     0,               CF_REQ|CF_FP, "experts per token (top-k)")
X(INT,   n_shared_experts,        2,               CF_FP,      "shared experts (one SwiGLU of n_shared*moe_inter_dim)")
X(INT,   n_dense_layers,          1,               CF_FP,      "first layers that use the dense SwiGLU")
X(FLOAT, embed_scale,             1.0,             CF_FP|CF_OURS, "embedding output multiplier")
X(FLOAT, logits_scale,            1.0,             CF_FP|CF_OURS, "lm_head output multiplier")
/* ---- attention ---- */
X(STR,   attn,                    "mla",           CF_FP,      "mla | mha | dsa (mha covers GQA via n_kv_heads; dsa = mla + lightning indexer, CPU only)")
X(STR,   attn_local,              "swa",           CF_FP,      "attention of local layers (used when attn_global_every > 1)")
X(INT,   attn_global_every,       1,               CF_FP,      "every Nth layer (and the last) is global")
X(INT,   attn_local_window,       128,             CF_FP,      "sliding window of local layers")
X(INT,   swa_kv_heads,            0,               CF_FP|CF_OURS, "swa (local layers): key/value heads (0 = n_heads; attn_swa.kv_heads)")
X(INT,   n_kv_heads,              0,               CF_FP|CF_OURS, "mha: key/value heads (0 = n_heads)")
X(INT,   head_dim,                0,               CF_FP|CF_OURS, "mha: head size (0 = dim / n_heads)")
X(INT,   q_lora_rank,             1536,            CF_FP,      "mla: query low-rank size (0 = direct wq)")
X(INT,   kv_lora_rank,            512,             CF_FP,      "mla: key/value low-rank size")
X(INT,   qk_nope_head_dim,        128,             CF_FP,      "mla: non-rotary query/key dims per head")
X(INT,   qk_rope_head_dim,        64,              CF_FP,      "rotary dims per head (mla: shared rope key)")
X(INT,   v_head_dim,              128,             CF_FP,      "mla: value dims per head")
X(INT,   dsa_idx_heads,           4,               CF_FP,      "dsa: lightning indexer heads (attn_dsa.n_idx_heads)")
X(INT,   dsa_idx_dim,             64,              CF_FP,      "dsa: indexer query/key dims per head (attn_dsa.idx_dim)")
X(INT,   dsa_top_k,               2048,            CF_FP,      "dsa: keys each query attends to in sparse mode (attn_dsa.top_k)")
X(STR,   dsa_training_mode,       "sparse",        0,          "dsa: sparse (attention over the top-k keys) | dense_warmup (dense attention, indexer trained on the full causal set)")
/* ---- rope ---- */
X(INT,   max_position_embeddings, 8192,            CF_FP,      "rope table covers 2x this")
X(FLOAT, rope_theta,              50000.0,         CF_FP,      "rope base")
X(FLOAT, rope_scaling_factor,     1.0,             CF_FP,      "YaRN factor (NTK-by-parts when > 1)")
X(FLOAT, rope_ntk_alpha,          1.0,             CF_FP,      "YaRN ramp low")
X(FLOAT, rope_ntk_beta,           32.0,            CF_FP,      "YaRN ramp high")
/* ---- norm ---- */
X(FLOAT, rms_norm_eps,            1e-5,            CF_FP,      "RMSNorm epsilon")
/* ---- routing ---- */
X(FLOAT, router_bias_update_rate, 1e-4,            CF_FP,      "aux-loss-free bias step (gamma)")
X(FLOAT, aux_loss_alpha,          0.0,             CF_FP,      "switch-style load-balance loss weight (0 = off)")
X(BOOL,  norm_topk_prob,          true,            CF_FP,      "normalise top-k weights to sum 1 (false is not supported)")
X(FLOAT, route_scale,             1.0,             CF_FP,      "router logits multiplier before the sigmoid")
/* ---- precision / device ---- */
X(STR,   dtype,                   "bf16",          CF_FP,      "routed-expert GEMM format: bf16 | fp8 (E4M3) | nvfp4 (E2M1), E8M0 scale per 32 along K (emulated)")
X(STR,   device,                  "auto",          CF_OURS,    "auto | cuda | cpu")
X(STR,   master_weights,          "fp32",          CF_OURS,    "cuda: fp32 master copy (fp32) or bf16 with stochastic rounding (stochastic)")
X(BOOL,  recompute_attn,          false,           CF_OURS,    "cuda: recompute attention in backward instead of storing it")
X(BOOL,  recompute_experts,       false,           CF_OURS,    "cuda: recompute the routed-expert path in backward")
/* ---- optimizer ---- */
X(FLOAT, lr_dense,                3.4e-4,          0,          "peak LR of dense parameters")
X(FLOAT, lr_router,               3.4e-4,          0,          "peak LR of router gates")
X(FLOAT, lr_expert,               3.4e-4,          0,          "peak LR of routed experts")
X(FLOAT, weight_decay,            0.1,             0,          "decoupled weight decay (decay and expert groups)")
X(FLOAT, adam_beta1,              0.9,             0,          "Adam beta1")
X(FLOAT, adam_beta2,              0.95,            0,          "Adam beta2 (dense, router)")
X(FLOAT, adam_beta2_expert,       0.99,            0,          "Adam beta2 (routed experts)")
X(FLOAT, adam_eps,                1e-8,            0,          "Adam epsilon")
X(FLOAT, grad_clip,               0.0,             CF_OURS,    "clip the global grad norm to this (0 = off)")
X(FLOAT, muon_momentum,           0.95,            CF_UNSUP,   "Muon momentum (Muon not supported yet)")
/* ---- WSD schedule ---- */
X(INT,   warmup_steps,            500,             0,          "linear warmup, in steps")
X(FLOAT, hold_tokens,             10e9,            0,          "tokens at peak LR")
X(FLOAT, decay_tokens,            40e9,            0,          "tokens of cosine decay to decay_floor")
X(FLOAT, decay_floor,             3e-5,            0,          "absolute LR floor")
/* ---- training ---- */
X(INT,   steps,                   10000,           0,          "total optimizer steps")
X(INT,   batch_size,              8,               CF_FP,      "GLOBAL sequences per step")
X(INT,   seq_len,                 4096,            CF_FP,      "tokens per sequence")
X(INT,   seed,                    42,              CF_FP,      "seed of init and RNG streams")
X(INT,   log_every,               10,              0,          "console/metrics cadence in steps")
/* ---- checkpointing ---- */
X(STR,   checkpoint_dir,          "/data/checkpoints", 0,      "checkpoint root")
X(INT,   checkpoint_every,        1000,            0,          "save every N steps (0 = only the final step)")
X(INT,   checkpoint_keep_last_n,  3,               0,          "finalised checkpoints kept (0 = all)")
X(BOOL,  resume,                  true,            0,          "resume from the latest finalised checkpoint if any")
/* ---- data ---- */
X(STR,   data_root,               "/data",         0,          "root of flow data")
X(STR,   data_path,               "",              0,          "direct mode: directory of .npy shards")
X(STR,   mixture_toml,            "",              0,          "flow mode: mixture TOML")
X(STR,   flow_profiles_toml,      "",              0,          "flow mode: flow profiles TOML")
X(STR,   flow_mode,               "",              CF_FP,      "flow mode: profile name (dev|research|ablation|proxy|full_train|...)")
X(FLOAT, active_params_b,         0.0,             CF_FP,      "active params (billions) for tokens_b_ratio flows")
X(STR,   hf_dataset,              "",              CF_UNSUP,   "HuggingFace source (no network here: prep from jsonl)")
X(STR,   hf_split,                "train",         CF_UNSUP,   "HuggingFace split")
X(STR,   hf_subset,               "",              CF_UNSUP,   "HuggingFace subset")
X(STR,   hf_text_field,           "text",          CF_UNSUP,   "HuggingFace text field")
X(STR,   hf_data_files,           "",              CF_UNSUP,   "HuggingFace data files")
/* ---- validation ---- */
X(BOOL,  validation_enabled,      false,           0,          "run validation during training")
X(STR,   validation_data_path,    "",              0,          "directory of validation .npy shards")
X(INT,   validation_every,        500,             0,          "validate every N steps")
X(INT,   validation_steps,        100,             0,          "batches per validation")
X(FLOAT, target_loss,             0.0,             0,          "stop once the validation loss is <= this (0 = off; speedrun target 3.28)")
/* ---- metrics ---- */
X(STR,   metrics_dir,             "/data/metrics", 0,          "per-rank metrics databases")
X(STR,   experiments_db,          "/data/experiments.db", 0,   "SQLite experiments/runs database")
/* ---- eval (src/eval) ---- */
X(BOOL,  eval_enabled,            false,           0,          "scheduled eval of each finalised checkpoint (eval_mode)")
X(STR,   eval_mode,               "reserved_gpu",  0,          "scheduled eval: inline | reserved_gpu | k8s_job")
X(INT,   eval_every,              0,               0,          "in-loop choice eval every N steps (0 = off; not gated by eval_enabled)")
X(STR,   eval_tasks,              "core",          0,          "all | core (both: every task of eval_tasks_file) | comma list of task names")
X(STR,   eval_tasks_file,         "configs/eval/tasks.toml", 0, "task list TOML ([[task]] name/source/fewshot/scorer)")
X(INT,   eval_budget_max_examples, 500,            0,          "scored examples per task (after the fewshot ones)")
X(FLOAT, eval_budget_max_time_s,  300.0,           0,          "time budget of one eval pass over all tasks (0 = none)")
X(INT,   eval_reserved_gpu_id,    7,               0,          "reserved_gpu mode: CUDA_VISIBLE_DEVICES of the eval process")
/* ---- not supported yet (reference placeholders) ---- */
X(BOOL,  sft_enabled,             false,           CF_UNSUP,   "SFT")
X(BOOL,  rl_enabled,              false,           CF_UNSUP,   "RL")
X(BOOL,  profiling_enabled,       false,           CF_UNSUP,   "profiling")

