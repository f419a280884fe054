#!/usr/bin/env bash
# run_oracle.sh: the PyTorch oracle over its three models (oracle_mla.toml,
# oracle_mha.toml, oracle_dsa.toml), on the GPU machine: for each, a CPU dump
# and a CUDA dump from model_dump, nmoe_ref.py on each, then CUDA against CPU
# (oracle_dsa: CPU only, DSA has no CUDA kernels yet). Prints every
# check and ends with "oracle: PASS" or "oracle: FAIL" (exit status 0 or 1).
#   tests/torch_ref/run_oracle.sh [MODEL_DUMP] [WORKDIR] [DEVICES]
# MODEL_DUMP defaults to build/gpu/model_dump, WORKDIR to /tmp/nmoe_oracle
# (two dumps of ~100 MB per model), DEVICES to "cpu cuda". PYTHON picks the
# interpreter (default python3).
set -u
dump=${1:-build/gpu/model_dump}
work=${2:-/tmp/nmoe_oracle}
devices=${3:-cpu cuda}
py=${PYTHON:-python3}
here=$(dirname "$0")
fail=0
for cfg in "$here/oracle_mla.toml" "$here/oracle_mha.toml" "$here/oracle_dsa.toml"; do
  name=$(basename "$cfg" .toml)
  for dev in $devices; do
    if [ "$name" = oracle_dsa ] && [ "$dev" != cpu ]; then
      echo "== $name on $dev: skipped (attn = dsa runs on the CPU backend only)"
      continue
    fi
    out="$work/$name-$dev"
    rm -rf "$out"
    echo "== $name on $dev"
    if ! "$dump" "$cfg" "$out" --device "$dev"; then
      echo "FAIL $name/$dev: model_dump failed"
      fail=1
      rm -rf "$out"
      continue
    fi
    "$py" "$here/nmoe_ref.py" "$out" || fail=1
  done
  if [ -d "$work/$name-cuda" ] && [ -d "$work/$name-cpu" ]; then
    echo "== $name: cuda against cpu"
    "$py" "$here/nmoe_ref.py" --compare "$work/$name-cuda" "$work/$name-cpu" || fail=1
  fi
done
if [ "$fail" = 0 ]; then echo "oracle: PASS"; else echo "oracle: FAIL"; fi
exit "$fail"
