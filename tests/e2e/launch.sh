#!/usr/bin/env bash
# `nmoe launch`: every rank gets its torchrun environment; nmoe's own commands
# run this binary; a failing rank stops its siblings (and what they started)
# and its status becomes the launcher's; SIGTERM reaches every rank; bad
# usage is one line and exit 2.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NMOE="$ROOT/build/nmoe"
T=$(mktemp -d /tmp/nmoe_launch.XXXXXX)
trap 'rm -rf "$T"' EXIT
die() { echo "FAIL: $*" >&2; exit 1; }
L() { timeout 60 "$NMOE" launch "$@"; } # a hung launcher fails the test instead of CI

# Environment of each rank.
out=$(L -n 3 -- sh -c 'echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE' | sort)
[ "$out" = "$(printf '0 3 0 3\n1 3 1 3\n2 3 2 3')" ] || die "rank environments: $out"
ports=$(L -n 2 -- sh -c 'echo $MASTER_ADDR:$MASTER_PORT' | sort -u)
[ "$(echo "$ports" | wc -l)" -eq 1 ] && [[ "$ports" =~ ^127\.0\.0\.1:[0-9]+$ ]] || die "master address: $ports"
[ "$(MASTER_ADDR=10.1.2.3 L -n 1 --port 4321 sh -c 'echo $MASTER_ADDR:$MASTER_PORT')" = 10.1.2.3:4321 ] ||
  die "an existing MASTER_ADDR or --port was not kept"

# An nmoe command runs this binary (no `train` on PATH needed).
[ "$(L -n 2 version | grep -c '^nmoe ')" -eq 2 ] || die "launch -n 2 version"

# Rank 1 fails: the launcher exits 3 without waiting for the 30 s sleeps, and
# the sibling's own child (a sleep under sh) is stopped with it.
marker=$((RANDOM + 40000))
start=$SECONDS
set +e
L -n 3 -- sh -c "if [ \$RANK = 1 ]; then sleep 0.3; exit 3; fi; sleep $marker.5; echo late" >"$T/o" 2>"$T/e"
rc=$?
set -e
[ "$rc" -eq 3 ] || die "launcher exit $rc after a rank exited 3"
[ $((SECONDS - start)) -lt 20 ] || die "the sleeping siblings were not stopped"
grep -qx 'nmoe launch: rank 1 exited with status 3' "$T/e" || { cat "$T/e"; die "failure line"; }
! grep -q late "$T/o" || die "a sibling ran on"
sleep 0.2
! pgrep -f "sleep $marker.5" >/dev/null || die "a sibling's child survived"

# A rank killed by a signal: 128 + signal.
set +e
L -n 2 -- sh -c 'if [ $RANK = 0 ]; then kill -9 $$; fi' 2>"$T/e"
rc=$?
set -e
[ "$rc" -eq 137 ] || die "signal exit $rc"
grep -q 'rank 0 exited with status 137' "$T/e" || die "signal failure line"

# SIGTERM to the launcher reaches every rank.
"$NMOE" launch -n 2 -- sh -c "trap 'touch $T/term.\$RANK; exit 0' TERM; sleep 30 & wait" &
lpid=$!
for _ in $(seq 50); do [ "$(pgrep -c -P "$lpid")" -eq 2 ] && break; sleep 0.1; done
sleep 0.3 # the shells install their traps
kill -TERM "$lpid"
set +e
wait "$lpid"
rc=$?
set -e
[ "$rc" -eq 0 ] || die "launcher exit $rc after forwarding SIGTERM"
[ -e "$T/term.0" ] && [ -e "$T/term.1" ] || die "SIGTERM not forwarded to every rank"

# Bad usage: one line, exit 2.
usage() {
  set +e
  "$NMOE" launch "$@" >"$T/o" 2>"$T/e"
  local rc=$?
  set -e
  [ "$rc" -eq 2 ] || die "launch $*: exit $rc"
  [ "$(wc -l <"$T/e")" -eq 1 ] || { cat "$T/e"; die "launch $*: not one line"; }
}
usage
usage -n 2
usage -n 0 true
usage -n abc true
usage --bogus -n 2 true
usage -n 2 --port 70000 true
usage true
echo "ok: nmoe launch"
