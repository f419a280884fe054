#!/usr/bin/env bash
# `nmoe data inspect` on a shard holding garbage ids (2^32-1): the report
# still comes out, without a 64 GB frequency table (which failed as "out of
# memory", or on a large host looped forever: i <= UINT32_MAX never ends).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NMOE="$ROOT/build/nmoe"
T=$(mktemp -d /tmp/nmoe_e2e.XXXXXX)
trap 'rm -rf "$T"' EXIT
die() { echo "FAIL: $*" >&2; exit 1; }
/usr/bin/python3 -c "
import numpy as np, sys
np.save(sys.argv[1], np.array([5, 5, 7, 0xFFFFFFFF, 0x7FFFFFFF], dtype=np.uint32))" "$T/bad.npy"
(ulimit -v 4000000; timeout 60 "$NMOE" data inspect "$T/bad.npy") >"$T/o.log" 2>&1 || { cat "$T/o.log"; die "inspect failed"; }
grep -q "max token id 4294967295" "$T/o.log" || { cat "$T/o.log"; die "no max id line"; }
grep -q "top tokens: 5(40.00%) 7(20.00%) (2 tokens with ids >= 4194304 not ranked" "$T/o.log" || { cat "$T/o.log"; die "top tokens line"; }
echo "ok: inspect of a shard with garbage ids"
