#!/usr/bin/env bash
# Runs every unit test binary given on the command line, then every
# tests/e2e/*.sh script, and closes with one line: "N passed, M failed".
# A unit binary counts as one test per cmocka case; an e2e script as one test.
set -u
cd "$(dirname "$0")/.."
passed=0; failed=0; failed_names=""
for bin in "$@"; do
  out=$("$bin" 2>&1); rc=$?
  p=$(printf '%s\n' "$out" | sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' | tail -1)
  f=$(printf '%s\n' "$out" | sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' | tail -1)
  p=${p:-0}; f=${f:-0}
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  passed=$((passed + p)); failed=$((failed + f))
  if [ "$f" -ne 0 ]; then
    failed_names="$failed_names $(basename "$bin")"
    printf '%s\n' "$out" | tail -40
  fi
  printf '%-40s %3d passed %3d failed\n' "$(basename "$bin")" "$p" "$f"
done
for t in tests/e2e/*.sh; do
  [ -f "$t" ] || continue
  log=$(mktemp)
  if bash "$t" >"$log" 2>&1; then passed=$((passed + 1)); r=ok
  else failed=$((failed + 1)); r=FAILED; failed_names="$failed_names $(basename "$t")"; tail -40 "$log"; fi
  rm -f "$log"
  printf '%-40s %s\n' "$(basename "$t")" "$r"
done
[ -z "$failed_names" ] || echo "failed:$failed_names"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
