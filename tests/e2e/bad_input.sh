#!/usr/bin/env bash
# Bad input gets one clear error line and a non-zero exit, and nothing already
# written is lost: malformed config, unknown key, missing data, a corrupt
# shard, a wrong world size, a NaN loss.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 2 10000 6
write_config "$T/c.toml" "$T/data"
one_error() { # pattern, command...
  local pat=$1; shift
  if "$@" >"$T/o.log" 2>&1; then cat "$T/o.log"; die "should fail: $*"; fi
  [ "$(grep -c 'nmoe: error:' "$T/o.log")" -eq 1 ] || { cat "$T/o.log"; die "expected exactly one error line: $*"; }
  grep -qi -- "$pat" "$T/o.log" || { cat "$T/o.log"; die "message lacks '$pat': $*"; }
  ! grep -qiE "segmentation|assert|core dumped" "$T/o.log" || die "crashed: $*"
}
printf 'dim = 32\nn_layers = = 2\n' >"$T/bad.toml"
one_error "bad.toml:2" "$NMOE" train "$T/bad.toml"
one_error "did you mean" "$NMOE" train "$T/c.toml" --n_layer=3
one_error "steps" "$NMOE" train "$T/c.toml" --steps=abc
one_error "empty_dir_missing" "$NMOE" train "$T/c.toml" --data_path="$T/empty_dir_missing"
mkdir -p "$T/corrupt" && cp "$T/data"/*.npy "$T/corrupt/" && truncate -s 1000 "$T/corrupt/part_001.npy"
one_error "part_001.npy" "$NMOE" train "$T/c.toml" --data_path="$T/corrupt"
one_error "world" env WORLD_SIZE=3 RANK=0 "$NMOE" train "$T/c.toml"
# NaN: a checkpoint written before the blow-up stays intact.
"$NMOE" train "$T/c.toml" --steps=5 --checkpoint_every=5 >/dev/null 2>&1 || die "baseline run failed"
sum_before=$(cat "$T/ckpt"/iter_0000005/* | md5sum)
one_error "non-finite" "$NMOE" train "$T/c.toml" --steps=40 --resume --lr_dense=1e30 --lr_expert=1e30 --lr_router=1e30 --warmup_steps=0
[ "$(cat "$T/ckpt"/iter_0000005/* | md5sum)" = "$sum_before" ] || die "the checkpoint changed after the failed run"
[ "$(cat "$T/ckpt/latest_checkpointed_iteration.txt")" -eq 5 ] || die "tracker moved"
echo "ok: bad input refused cleanly"
