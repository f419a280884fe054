#!/usr/bin/env bash
# Crash safety: kill -9 the trainer at random moments while it writes
# checkpoints (writes slowed by the NMOE_TEST_CKPT_SLOW_MS test hook), 20
# times. After every kill, the latest checkpoint verifies and a restart resumes
# from exactly that step.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 2 20000 4
write_config "$T/c.toml" "$T/data"
CK="$T/ckpt"
start() {
  NMOE_TEST_CKPT_SLOW_MS=20 NMOE_RUN=crash "$NMOE" train "$T/c.toml" --steps=200 --checkpoint_every=2 \
    --checkpoint_keep_last_n=2 --checkpoint_dir="$CK" --resume >"$T/run.log" 2>&1 &
  pid=$!
}
# First let one checkpoint finalise, so every later kill has something to lose.
start
for _ in $(seq 1 300); do [ -f "$CK/latest_checkpointed_iteration.txt" ] && break; sleep 0.05; done
kill -9 $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
for trial in $(seq 1 20); do
  start
  sleep "$(( RANDOM % 2 )).$(( RANDOM % 10 ))$(( RANDOM % 10 ))"
  kill -9 $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  latest=$(cat "$CK/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
  if [ "$latest" != none ]; then
    "$NMOE" ckpt verify "$CK" >"$T/verify.log" 2>&1 || { cat "$T/verify.log"; die "trial $trial: latest checkpoint $latest does not verify"; }
  fi
done
# The final restart resumes from the newest finalised step and completes.
latest=$(cat "$CK/latest_checkpointed_iteration.txt")
NMOE_RUN=final "$NMOE" train "$T/c.toml" --steps=$((10#$latest + 2)) --checkpoint_every=2 --checkpoint_dir="$CK" --resume >"$T/final.log" 2>&1 ||
  { cat "$T/final.log"; die "restart after kills failed"; }
grep -q "resumed from .*iter_$(printf %07d $((10#$latest)))" "$T/final.log" || { cat "$T/final.log"; die "did not resume from step $latest"; }
echo "ok: 20 kills, resumed from step $latest"
