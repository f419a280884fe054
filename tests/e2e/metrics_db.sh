#!/usr/bin/env bash
# Metrics and run records: the databases open with the sqlite3 CLI, every
# logged step is present, a completed run is marked completed and a run
# stopped by SIGTERM is marked killed (after saving a checkpoint); target_loss
# ends a run early.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 2 20000 7
write_config "$T/c.toml" "$T/data"
NMOE_RUN=done "$NMOE" train "$T/c.toml" --steps=12 --log_every=3 --validation_enabled=true \
  --validation_data_path="$T/data" --validation_every=6 --validation_steps=2 >"$T/a.log" 2>&1 || { cat "$T/a.log"; die "run failed"; }
steps=$(sqlite3 "$T/metrics/done/rank_0.sqlite" "select group_concat(step) from (select step from metrics where tag='train/loss' order by step)")
[ "$steps" = "1,3,6,9,12" ] || die "logged steps are '$steps'"
for tag in optimizer/lr throughput/tokens_per_s_gpu efficiency/tflops router_agg/mean_cv router/layer_01/cv; do
  n=$(sqlite3 "$T/metrics/done/rank_0.sqlite" "select count(*) from metrics where tag='$tag'")
  [ "$n" -eq 5 ] || die "tag $tag has $n rows"
done
for tag in validation/loss validation/bpb; do
  n=$(sqlite3 "$T/metrics/done/rank_0.sqlite" "select count(*) from metrics where tag='$tag'")
  [ "$n" -eq 2 ] || die "tag $tag has $n rows (validation at steps 6 and 12)"
done
[ "$(sqlite3 "$T/experiments.db" "select status from runs where id='done'")" = completed ] || die "run not completed"
sqlite3 "$T/experiments.db" "select results_json from runs where id='done'" | grep -q final_loss || die "no results_json"
NMOE_RUN=stopped "$NMOE" train "$T/c.toml" --steps=100000 --checkpoint_every=0 >"$T/k.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q "step " "$T/k.log" 2>/dev/null && break; sleep 0.1; done
kill -TERM $pid
wait $pid && die "killed run exited 0" || true
[ "$(sqlite3 "$T/experiments.db" "select status from runs where id='stopped'")" = killed ] || { cat "$T/k.log"; die "run not marked killed"; }
[ -f "$T/ckpt/latest_checkpointed_iteration.txt" ] || die "no checkpoint saved on SIGTERM"
# target_loss: the first validation at or below it saves a checkpoint and ends the run
# (completed); without validation the config is refused with one line.
NMOE_RUN=target "$NMOE" train "$T/c.toml" --steps=100 --validation_enabled=true --target_loss=100 \
  --validation_data_path="$T/data" --validation_every=4 --validation_steps=1 --checkpoint_every=0 \
  --checkpoint_dir="$T/ck_target" >"$T/t.log" 2>&1 || { cat "$T/t.log"; die "target run failed"; }
grep -q "target_loss 100.0000 reached at step 4" "$T/t.log" || { cat "$T/t.log"; die "no stop at the target"; }
[ "$(cat "$T/ck_target/latest_checkpointed_iteration.txt")" = 4 ] || die "no checkpoint at the target step"
[ "$(sqlite3 "$T/experiments.db" "select status from runs where id='target'")" = completed ] || die "target run not completed"
out=$("$NMOE" train "$T/c.toml" --target_loss=3.28 2>&1) && die "target_loss without validation accepted"
[ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && printf '%s' "$out" | grep -q "target_loss needs validation" ||
  die "target_loss without validation: $out"
echo "ok: metrics and run status"
