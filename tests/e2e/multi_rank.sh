#!/usr/bin/env bash
# Multi-process training on CPU ranks (shm transport, `nmoe launch`): dense
# weights replicated with summed gradients, routed experts split over the ranks
# and reached by RDEP puts. The same global batch on 1, 2 and 4 ranks gives the
# same losses (up to float summation order; aux loss on), every rank reports
# the same loss, a 2-rank run resumes bit-exactly, and bad set-ups fail with
# one line.
source "$(dirname "$0")/lib/train_env.sh"
export OMP_NUM_THREADS=1
make_tokens "$T/data" 2 6000 5
write_config "$T/c.toml" "$T/data"
run() { # name, ranks, extra args...
  local name=$1 n=$2; shift 2
  NMOE_RUN=$name "$NMOE" launch -n "$n" -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_$name" \
    "$@" >"$T/$name.log" 2>&1 || { cat "$T/$name.log"; die "$name: run on $n ranks failed"; }
}
rank_losses() { # name rank
  sqlite3 "$T/metrics/$1/rank_$2.sqlite" \
    "select step, printf('%.17g', value) from metrics where tag='train/loss' order by step"
}

# 1, 2 and 4 ranks, 8 steps, aux loss on: losses agree to float rounding.
for n in 1 2 4; do run eq$n $n --steps=8 --checkpoint_every=0 --aux_loss_alpha=0.01; done
# and 2 ranks recomputing attention and experts in backward, with validation on
run eq2r 2 --steps=8 --checkpoint_every=0 --aux_loss_alpha=0.01 --recompute_experts=true \
  --recompute_attn=true --validation_enabled=true --validation_data_path="$T/data" --validation_every=4 \
  --validation_steps=2
for n in 2 4 2r; do
  "$PY" - "$T/metrics/eq1/rank_0.sqlite" "$T/metrics/eq$n/rank_0.sqlite" <<'PYEOF' || die "$n ranks differ from 1"
import sqlite3, sys
def get(p):
    c = sqlite3.connect(p)
    return {(t, s): v for t, s, v in c.execute(
        "select tag, step, value from metrics where tag in ('train/loss','train/grad_norm','train/aux_loss')")}
a, b = get(sys.argv[1]), get(sys.argv[2])
assert a.keys() == b.keys() and len(a) == 24, (len(a), len(b))
bad = [(k, a[k], b[k]) for k in a if abs(a[k] - b[k]) > 2e-4 * max(1.0, abs(a[k]))]
assert not bad, bad[:5]
PYEOF
  for r in $(seq 1 $((${n%r} - 1))); do
    cmp -s <(rank_losses eq$n 0) <(rank_losses eq$n $r) || die "$n ranks: rank $r reports another loss"
  done
done
echo "ok: 1, 2 and 4 ranks train alike (and 2 with recompute + validation)"

# Bit-exact resume on 2 ranks: 12 straight versus 6 + resume to 12.
run full 2 --steps=12 --checkpoint_every=0
run half 2 --steps=6 --checkpoint_every=6
# ZeRO-2: each rank's file holds half of the dense optimizer state (one flat
# shard), its own experts' state per tensor, and no per-tensor dense state.
"$PY" - "$T/ck_half/iter_0000006" <<'PYEOF' || die "the checkpoint does not shard the dense optimizer state"
import json, struct, sys
def header(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))
h0, h1 = (header(f"{sys.argv[1]}/rank_{r:03d}.safetensors") for r in (0, 1))
dense = header(f"{sys.argv[1]}/dense.safetensors")
for h in (h0, h1):
    assert h["optim.exp_avg.dense_shard"]["shape"] == h0["optim.exp_avg_sq.dense_shard"]["shape"]
    assert not any(k.startswith("optim.") and k[k.index(".", 6) + 1:] in dense for k in h), "per-tensor dense state"
    assert any(k.startswith("optim.exp_avg.") and ".experts." in k for k in h), "no expert state"
n = h0["optim.exp_avg.dense_shard"]["shape"][0]
numel = sum(v["shape"][0] * (v["shape"][1] if len(v["shape"]) > 1 else 1)
            for k, v in dense.items() if k != "__metadata__" and not k.endswith("router.bias"))
assert numel <= 2 * n < numel + 64, (numel, n)
e0 = h0["layers.1.ffn.experts.w13"]["shape"]
assert e0[0] == 2, e0  # 4 experts over 2 ranks
PYEOF
NMOE_RUN=rest "$NMOE" launch -n 2 -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_half" --steps=12 \
  --checkpoint_every=0 --resume >"$T/rest.log" 2>&1 || { cat "$T/rest.log"; die "resume on 2 ranks failed"; }
grep -q "resumed from" "$T/rest.log" || die "the second run did not resume"
cmp -s <(rank_losses full 0 | awk -F'|' '$1 > 6') <(rank_losses rest 0) || die "resumed losses differ"
echo "ok: 2-rank resume bit-exact"

# A SIGTERM that reaches only rank 1 stops both ranks after the same step with a
# finalised checkpoint, and the run is marked killed.
NMOE_RUN=sig "$NMOE" launch -n 2 -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_sig" --steps=100000 \
  --checkpoint_every=0 >"$T/sig.log" 2>&1 &
lpid=$!
for _ in $(seq 1 200); do grep -q "step " "$T/sig.log" 2>/dev/null && break; sleep 0.05; done
r1=$(pgrep -P "$lpid" | sort -n | tail -1)
[ -n "$r1" ] || die "no rank processes under the launcher"
kill -TERM "$r1"
wait "$lpid" && die "a stopped run exited 0" || true
step=$(cat "$T/ck_sig/latest_checkpointed_iteration.txt" 2>/dev/null) || { cat "$T/sig.log"; die "no finalised checkpoint after SIGTERM"; }
"$NMOE" ckpt verify "$T/ck_sig" >/dev/null || die "the checkpoint after SIGTERM does not verify"
[ "$(sqlite3 "$T/experiments.db" "select status from runs where id='sig'")" = killed ] || die "run not marked killed"
echo "ok: SIGTERM to one rank stops both at step $step"

# kill -9 of rank 1 while checkpoints are being written (3 times): the newest
# finalised checkpoint verifies and both ranks resume from it.
for trial in 1 2 3; do
  NMOE_TEST_CKPT_SLOW_MS=20 NMOE_RUN=crash$trial "$NMOE" launch -n 2 -- "$NMOE" train "$T/c.toml" \
    --checkpoint_dir="$T/ck_crash" --steps=100000 --checkpoint_every=2 --checkpoint_keep_last_n=2 --resume \
    >"$T/crash.log" 2>&1 &
  lpid=$!
  for _ in $(seq 1 300); do [ -f "$T/ck_crash/latest_checkpointed_iteration.txt" ] && break; sleep 0.05; done
  sleep "0.$(( RANDOM % 10 ))"
  r1=$(pgrep -P "$lpid" | sort -n | tail -1)
  [ -n "$r1" ] && kill -9 "$r1"
  wait "$lpid" && die "crash trial $trial: the run exited 0 after a rank was killed" || true
  "$NMOE" ckpt verify "$T/ck_crash" >/dev/null || die "crash trial $trial: the newest checkpoint does not verify"
done
latest=$(cat "$T/ck_crash/latest_checkpointed_iteration.txt")
NMOE_RUN=crash_end "$NMOE" launch -n 2 -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_crash" \
  --steps=$((latest + 2)) --checkpoint_every=0 --resume >"$T/crash_end.log" 2>&1 ||
  { cat "$T/crash_end.log"; die "resume after the kills failed"; }
grep -q "resumed from" "$T/crash_end.log" || die "no resume after the kills"
echo "ok: 3 kills of rank 1, resumed from step $latest"

# bench train under the launcher: one JSON line (rank 0) counting every rank's tokens.
"$NMOE" launch -n 2 -- "$NMOE" bench train "$T/c.toml" --steps 1 --warmup 0 >"$T/bench.log" 2>&1 ||
  { cat "$T/bench.log"; die "bench train on 2 ranks failed"; }
[ "$(grep -c '"bench":"train"' "$T/bench.log")" -eq 1 ] && grep -q '"world":2' "$T/bench.log" ||
  { cat "$T/bench.log"; die "bench train on 2 ranks: expected one JSON line with world 2"; }

# bench rdep on CPU ranks: a JSON line per token count and the peer-copy line.
"$NMOE" launch -n 2 -- "$NMOE" bench rdep --device cpu --tokens 32,64 --hidden 256 --iters 2 \
  --peer-copy-mib 2 >"$T/rdep.log" 2>&1 || { cat "$T/rdep.log"; die "bench rdep on 2 ranks failed"; }
[ "$(grep -c '"bench":"rdep"' "$T/rdep.log")" -eq 2 ] && grep -q '"bench":"rdep_peer_copy"' "$T/rdep.log" ||
  { cat "$T/rdep.log"; die "bench rdep: expected 2 rdep lines and a peer-copy line"; }

# Bad set-ups: one line, non-zero exit, nothing hangs.
expect_fail() { # pattern, ranks, extra args...
  local pat=$1 n=$2; shift 2
  set +e
  out=$("$NMOE" launch -n "$n" -- "$NMOE" train "$T/c.toml" --checkpoint_every=0 "$@" 2>&1); rc=$?
  set -e
  [ "$rc" -ne 0 ] && printf '%s\n' "$out" | grep -q "$pat" || { printf '%s\n' "$out"; die "expected '$pat'"; }
}
expect_fail "must be divisible by the world size" 3 --steps=2 --batch_size=3 --checkpoint_dir="$T/ck_bad"
expect_fail "use eval_every" 2 --steps=2 --eval_enabled=true --checkpoint_dir="$T/ck_bad"
expect_fail "written by 2 ranks, this run has 1 (.nmoe ckpt reshard SRC DST --world 1" 1 --steps=8 --checkpoint_dir="$T/ck_half" --resume
echo "multi_rank e2e ok"
