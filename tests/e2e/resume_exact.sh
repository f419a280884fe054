#!/usr/bin/env bash
# Bit-exact resume: 2N steps straight versus N steps, stop, resume to 2N: the
# losses of steps N+1..2N are bit-identical. Direct mode, then flow mode with a
# stop in the middle of the first data stage.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 3 6000 2
write_config "$T/c.toml" "$T/data"
check() { # name, extra args...
  local name=$1; shift
  NMOE_RUN=${name}_full "$NMOE" train "$T/c.toml" --steps=24 --checkpoint_dir="$T/${name}_full" "$@" >"$T/full.log" 2>&1 || { cat "$T/full.log"; die "$name: straight run failed"; }
  NMOE_RUN=${name}_a "$NMOE" train "$T/c.toml" --steps=12 --checkpoint_every=12 --checkpoint_dir="$T/${name}_res" "$@" >"$T/a.log" 2>&1 || { cat "$T/a.log"; die "$name: first half failed"; }
  NMOE_RUN=${name}_b "$NMOE" train "$T/c.toml" --steps=24 --checkpoint_dir="$T/${name}_res" --resume "$@" >"$T/b.log" 2>&1 || { cat "$T/b.log"; die "$name: resumed half failed"; }
  grep -q "resumed from" "$T/b.log" || die "$name: second run did not resume"
  losses ${name}_full | awk -F'|' '$1 > 12' >"$T/want"
  losses ${name}_b >"$T/got"
  [ -s "$T/want" ] && cmp -s "$T/want" "$T/got" || { diff "$T/want" "$T/got" | head; die "$name: resumed losses differ"; }
  echo "ok: $name resume bit-exact ($(wc -l <"$T/got") steps)"
}
check direct
# Flow mode over the repo's "tiny" flow (configs/flow_profiles.toml): stage
# pretrain holds 312 sequences of 32 tokens, so the stop at step 12 (48
# sequences) is in the middle of the first stage.
for src in pretrain/web pretrain/code pretrain/math mid/web_hq mid/qa; do
  make_tokens "$T/root/flows/tiny/$src/train" 1 8000 ${#src}
done
check flow --data_path= --flow_mode=tiny --mixture_toml="$ROOT/configs/mixtures/test_tiny.toml" \
  --flow_profiles_toml="$ROOT/configs/flow_profiles.toml" --data_root="$T/root"
