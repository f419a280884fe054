#!/usr/bin/env bash
# `nmoe ckpt reshard`: a 2-rank checkpoint rewritten for 1 and 4 ranks resumes
# there and continues the straight 2-rank run (1, 2 and 4 ranks train alike up
# to float summation order: multi_rank.sh); resharding 2 -> 2 reproduces every
# tensor bit for bit; bad requests fail with one line and write nothing.
source "$(dirname "$0")/lib/train_env.sh"
export OMP_NUM_THREADS=1
make_tokens "$T/data" 2 6000 5
write_config "$T/c.toml" "$T/data"
run() { # name, ranks, checkpoint dir, extra args...
  local name=$1 n=$2 ck=$3; shift 3
  NMOE_RUN=$name "$NMOE" launch -n "$n" -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$ck" "$@" \
    >"$T/$name.log" 2>&1 || { cat "$T/$name.log"; die "$name: run on $n ranks failed"; }
}
reshard() { # src dst world [--step S]
  "$NMOE" ckpt reshard "$1" "$2" --world "$3" "${@:4}" >"$T/reshard.log" 2>&1 ||
    { cat "$T/reshard.log"; die "reshard $1 -> $2 (world $3) failed"; }
}

run full 2 "$T/ck_full" --steps=12 --checkpoint_every=0
run half 2 "$T/ck_half" --steps=6 --checkpoint_every=6
for n in 1 4; do
  reshard "$T/ck_half" "$T/ck_w$n" $n
  "$NMOE" ckpt verify "$T/ck_w$n" >/dev/null || die "the $n-rank checkpoint does not verify"
  [ "$(cat "$T/ck_w$n/latest_checkpointed_iteration.txt")" = 6 ] || die "world $n: no tracker at step 6"
  run res$n $n "$T/ck_w$n" --steps=12 --checkpoint_every=0 --resume
  grep -q "resumed from" "$T/res$n.log" || die "the $n-rank run did not resume"
  "$PY" - "$T/metrics/full/rank_0.sqlite" "$T/metrics/res$n/rank_0.sqlite" <<'PYEOF' || die "$n ranks: resumed losses differ"
import sqlite3, sys
def get(p):
    c = sqlite3.connect(p)
    return {s: v for s, v in c.execute("select step, value from metrics where tag='train/loss' and step > 6")}
a, b = get(sys.argv[1]), get(sys.argv[2])
assert sorted(a) == sorted(b) == list(range(7, 13)), (sorted(a), sorted(b))
bad = [(s, a[s], b[s]) for s in a if abs(a[s] - b[s]) > 2e-4 * max(1.0, abs(a[s]))]
assert not bad, bad
PYEOF
done
echo "ok: 2 -> 1 and 2 -> 4 ranks resume and continue the 2-rank run"

# 2 -> 2, 2 -> 4 -> 2 and 2 -> 1 -> 2 (per-tensor dense state back to ZeRO
# shards): every tensor of every file equals the source's.
reshard "$T/ck_half" "$T/ck_w2" 2
reshard "$T/ck_w4" "$T/ck_w42" 2 --step 6 # ck_w4 and ck_w1 went on to step 12
reshard "$T/ck_w1" "$T/ck_w12" 2 --step 6
"$PY" - "$T/ck_half/iter_0000006" "$T/ck_w2/iter_0000006" "$T/ck_w42/iter_0000006" "$T/ck_w12/iter_0000006" \
  <<'PYEOF' || die "2 -> 2 is not bit-identical"
import json, struct, sys
def tensors(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n)); body = f.read()
    h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h.items()}
src = sys.argv[1]
for dst in sys.argv[2:]:
    for f in ("dense", "rank_000", "rank_001"):
        a, b = tensors(f"{src}/{f}.safetensors"), tensors(f"{dst}/{f}.safetensors")
        assert a.keys() == b.keys(), (dst, f, set(a) ^ set(b))
        assert all(a[k] == b[k] for k in a), (dst, f, [k for k in a if a[k] != b[k]])
    for r in (0, 1):
        ja, jb = (json.load(open(f"{d}/rank_{r:03d}.json")) for d in (src, dst))
        for j in (ja, jb): j.pop("rank_file_sha256")
        assert ja == jb, (dst, r)
PYEOF
echo "ok: 2 -> 2, 2 -> 4 -> 2 and 2 -> 1 -> 2 reproduce every tensor"

# Refusals: one line, non-zero exit, nothing written.
expect_fail() { # pattern, args...
  local pat=$1; shift
  set +e
  out=$("$NMOE" ckpt reshard "$@" 2>&1); rc=$?
  set -e
  [ "$rc" -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && printf '%s\n' "$out" | grep -q "$pat" ||
    { printf '%s\n' "$out"; die "expected one line with '$pat'"; }
}
expect_fail "n_routed_experts (4) is not divisible by --world 3" "$T/ck_half" "$T/ck_w3" --world 3
expect_fail "already exists" "$T/ck_half" "$T/ck_w4" --world 4
expect_fail "no finalised checkpoint" "$T/nothing" "$T/ck_x" --world 1
expect_fail "does not verify" "$T/ck_half" "$T/ck_x" --world 1 --step 5
cp -r "$T/ck_half" "$T/ck_bad"
printf 'X' | dd of="$T/ck_bad/iter_0000006/rank_001.safetensors" bs=1 seek=200 conv=notrunc 2>/dev/null
expect_fail "does not verify" "$T/ck_bad" "$T/ck_x" --world 1
[ ! -e "$T/ck_w3" ] && [ ! -e "$T/ck_x/iter_0000006" ] || die "a refused reshard wrote files"
# An unfinished step in DST (no manifest: an interrupted reshard) is debris: replaced.
mkdir -p "$T/ck_y/iter_0000006" && echo junk >"$T/ck_y/iter_0000006/rank_000.json"
"$NMOE" ckpt reshard "$T/ck_half" "$T/ck_y" --world 1 >/dev/null 2>&1 || die "reshard over debris failed"
"$NMOE" ckpt verify "$T/ck_y" >/dev/null || die "reshard over debris does not verify"
echo "ckpt_reshard e2e ok"
