# lib.sh: shared set-up for the training end-to-end tests: a temp dir, a small
# structured token stream (vocab 512) written with numpy, and a tiny config.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NMOE="$ROOT/build/nmoe"
PY=/usr/bin/python3
T=$(mktemp -d /tmp/nmoe_e2e.XXXXXX)
trap 'rm -rf "$T"' EXIT
die() { echo "FAIL: $*" >&2; exit 1; }

# make_tokens DIR NFILES TOKENS_PER_FILE SEED: noisy copies of a few fixed
# phrases, so a small model can clearly lower its loss in a few dozen steps.
make_tokens() {
  mkdir -p "$1"
  "$PY" - "$1" "$2" "$3" "$4" <<'PYEOF'
import sys, numpy as np
out, nfiles, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(seed)
phrases = [rng.integers(1, 500, size=rng.integers(5, 12)) for _ in range(20)]
for f in range(nfiles):
    toks = []
    while len(toks) < n:
        toks.extend(phrases[rng.integers(0, len(phrases))].tolist())
        if rng.random() < 0.1:
            toks.append(0)  # eos
    np.save(f"{out}/part_{f:03d}.npy", np.array(toks[:n], dtype=np.uint32))
PYEOF
}

# write_config PATH DATA_DIR: a tiny MLA + MoE model that trains in seconds.
write_config() {
  cat >"$1" <<CFG
preset = "e2e"
experiment_id = "e2e"
tokenizer = "gpt2"
vocab_size = 50304
eos_token_id = 0
dim = 32
n_layers = 2
n_dense_layers = 1
n_heads = 2
inter_dim = 64
moe_inter_dim = 16
n_routed_experts = 4
n_activated_experts = 2
n_shared_experts = 1
router_bias_update_rate = 1e-2
attn = "mla"
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8
max_position_embeddings = 64
seq_len = 32
batch_size = 4
steps = 30
lr_dense = 3e-3
lr_router = 3e-3
lr_expert = 3e-3
warmup_steps = 5
hold_tokens = 1e12
decay_tokens = 1e12
decay_floor = 1e-5
log_every = 1
device = "cpu"
data_path = "$2"
checkpoint_dir = "$T/ckpt"
checkpoint_every = 10
checkpoint_keep_last_n = 0
metrics_dir = "$T/metrics"
experiments_db = "$T/experiments.db"
resume = false
CFG
}

# losses RUN_ID: "step value" lines of train/loss from the run's rank-0 metrics, full precision.
losses() {
  sqlite3 "$T/metrics/$1/rank_0.sqlite" \
    "select step, printf('%.17g', value) from metrics where tag='train/loss' order by step"
}
