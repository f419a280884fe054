#!/usr/bin/env bash
# Eval hooks end to end on the tiny model and the shipped sample tasks: the
# in-loop choice eval (eval_every) logs eval_choices/* rows in [0, 1]; 2 CPU
# ranks score like 1; `nmoe eval` writes a summary.json that agrees with the
# in-loop eval of the same step; the scheduled eval runs inline or writes a
# k8s ticket; bad task files and multi-rank checkpoints fail with one line.
source "$(dirname "$0")/lib/train_env.sh"
export OMP_NUM_THREADS=1
make_tokens "$T/data" 2 6000 5
write_config "$T/c.toml" "$T/data"
cat >>"$T/c.toml" <<CFG
eval_tasks_file = "$ROOT/configs/eval/tasks.toml"
eval_tasks = "all"
eval_budget_max_examples = 8
CFG
run() { # name, ranks, extra args...
  local name=$1 n=$2; shift 2
  NMOE_RUN=$name "$NMOE" launch -n "$n" -- "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_$name" \
    "$@" >"$T/$name.log" 2>&1 || { cat "$T/$name.log"; die "$name: run on $n ranks failed"; }
}
evals() { # name rank: "tag step value" of the eval rows
  sqlite3 "$T/metrics/$1/rank_$2.sqlite" \
    "select tag, step, printf('%.17g', value) from metrics where tag like 'eval_choices/%' order by tag, step"
}

# In-loop eval every 2 steps: 3 tasks x {acc, centered_acc, n} at steps 2 and 4.
# A tiny learning rate keeps 1- and 2-rank weights alike, so their scores must match.
slow=(--steps=4 --eval_every=2 --lr_dense=1e-8 --lr_router=1e-8 --lr_expert=1e-8 --decay_floor=1e-9)
run one 1 "${slow[@]}"
"$PY" - "$T/metrics/one/rank_0.sqlite" <<'PYEOF' || die "in-loop eval rows are wrong"
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(
    "select tag, step, value from metrics where tag like 'eval_choices/%'").fetchall()
got = {(t, s): v for t, s, v in rows}
for task in ("arith", "copy", "larger"):
    for s in (2, 4):
        acc, n = got[(f"eval_choices/{task}/acc", s)], got[(f"eval_choices/{task}/n", s)]
        assert 0 <= acc <= 1 and n == 8, (task, s, acc, n)
        assert (f"eval_choices/{task}/centered_acc", s) in got
assert len(got) == 18, len(got)
PYEOF
grep -q "eval        step 4 | CORE" "$T/one.log" || die "no eval info line"
echo "ok: in-loop eval"

run two 2 "${slow[@]}"
[ -n "$(evals one 0)" ] || die "no eval rows"
cmp -s <(evals one 0) <(evals two 0) || { diff <(evals one 0) <(evals two 0); die "2 ranks score unlike 1"; }
cmp -s <(evals two 0) <(evals two 1) || die "the 2 ranks report different scores"
echo "ok: 2 ranks score like 1"

# nmoe eval on the final checkpoint of run one = the in-loop eval of step 4.
"$NMOE" eval "$T/c.toml" --checkpoint-dir "$T/ck_one" --out "$T/summary.json" >"$T/eval.out" 2>&1 \
  || { cat "$T/eval.out"; die "nmoe eval failed"; }
"$PY" - "$T/summary.json" "$T/metrics/one/rank_0.sqlite" <<'PYEOF' || die "summary.json is wrong"
import json, sqlite3, sys
s = json.load(open(sys.argv[1]))
assert s["suite"] == "all" and s["step"] == 4 and s["elapsed_ms"] >= 0, s
assert [t["name"] for t in s["tasks"]] == ["arith", "copy", "larger"], s
assert abs(s["CORE"] - sum(t["centered_acc"] for t in s["tasks"]) / 3) < 1e-12
db = sqlite3.connect(sys.argv[2])
for t in s["tasks"]:
    acc = db.execute("select value from metrics where tag=? and step=4", (f"eval_choices/{t['name']}/acc",)).fetchone()[0]
    assert t["n"] == 8 and abs(t["acc"] - acc) < 1e-12, (t, acc)
PYEOF
# (with the training data gone: an eval needs only the checkpoint)
"$NMOE" eval "$T/c.toml" --checkpoint-dir "$T/ck_one" --step 4 --tasks larger --data_path="$T/gone" \
  >"$T/eval1.out" 2>&1 || { cat "$T/eval1.out"; die "nmoe eval --tasks failed"; }
grep -q '"name": "larger"' "$T/eval1.out" && ! grep -q '"name": "arith"' "$T/eval1.out" || die "--tasks ignored"
echo "ok: nmoe eval"

# Refusals, one line each: a 2-rank checkpoint, no checkpoint.
one_line() { # log, expected text
  [ "$(wc -l <"$1")" -eq 1 ] && grep -q "$2" "$1" || { cat "$1"; die "expected one line with '$2'"; }
}
! "$NMOE" eval "$T/c.toml" --checkpoint-dir "$T/ck_two" >/dev/null 2>"$T/e2.err" || die "2-rank checkpoint accepted"
one_line "$T/e2.err" "written by 2 ranks: nmoe eval loads one-process checkpoints only"
! "$NMOE" eval "$T/c.toml" --checkpoint-dir "$T/none" >/dev/null 2>"$T/e3.err" || die "no checkpoint accepted"
one_line "$T/e3.err" "no finalised checkpoint under"

# Scheduled eval: inline runs nmoe eval on each finalised step; k8s_job queues tickets.
# The run's NMOE_<FIELD> overrides (here one the command line beats) must not reach
# the eval, which loads the resolved config snapshot; the task list may have spaces.
NMOE_DIM=64 run inl 1 --dim=32 --steps=2 --checkpoint_every=2 --eval_enabled=true --eval_mode=inline \
  --eval_tasks="arith , copy,larger"
[ -f "$T/metrics/eval/inl/step_0000002/config.toml" ] || die "no config snapshot"
"$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); assert s["step"] == 2 and len(s["tasks"]) == 3' \
  "$T/metrics/eval/inl/step_0000002/summary.json" || { cat "$T/metrics/eval/inl/step_0000002/eval.log"; die "inline eval"; }
grep -q "eval of step 2: CORE" "$T/inl.log" || die "no inline eval line"
run k8s 1 --steps=4 --checkpoint_every=2 --eval_enabled=true --eval_mode=k8s_job
for s in 2 4; do
  "$PY" - "$T/metrics/eval/k8s/queue/ticket_$s.json" "$s" "$T/ck_k8s" <<'PYEOF' || die "ticket $s"
import json, os, sys
t = json.load(open(sys.argv[1]))
assert t["step"] == int(sys.argv[2]) and t["tasks"] == "all" and os.path.isdir(t["cwd"]), t
assert os.path.samefile(t["checkpoint_dir"], sys.argv[3]) and os.path.isfile(t["config"]), t
assert t["out"].endswith(f"/step_{int(sys.argv[2]):07d}/summary.json"), t
PYEOF
done
# reserved_gpu: a detached nmoe eval (CUDA_VISIBLE_DEVICES set; this config runs it on the CPU).
run rsv 1 --steps=2 --checkpoint_every=2 --eval_enabled=true --eval_mode=reserved_gpu
grep -q "eval of step 2 started on GPU 7" "$T/rsv.log" || die "no reserved_gpu start line"
for _ in $(seq 300); do [ -s "$T/metrics/eval/rsv/step_0000002/summary.json" ] && break; sleep 0.1; done
grep -q '"step": 2' "$T/metrics/eval/rsv/step_0000002/summary.json" \
  || { cat "$T/metrics/eval/rsv/step_0000002/eval.log"; die "reserved_gpu eval wrote no summary"; }
echo "ok: scheduled eval"

# Bad task files fail with one line before training starts.
mkdir -p "$T/bad"
printf '[[task]]\nname = "b"\nsource = "jsonl:b.jsonl"\n' >"$T/bad/tasks.toml"
printf '{"context": "x", "choices": [" a", " b"], "label": 0}\n{"context": "y", "choices": 3}\n' >"$T/bad/b.jsonl"
bad() { # expected text, args...
  local want=$1; shift
  ! NMOE_RUN=bad "$NMOE" train "$T/c.toml" --checkpoint_dir="$T/ck_bad" "$@" >"$T/bad.out" 2>"$T/bad.err" \
    || die "bad eval set-up accepted: $*"
  one_line "$T/bad.err" "$want"
  ! grep -q "^step" "$T/bad.out" || die "trained despite a bad task file"
}
bad "b.jsonl:2: \"choices\" must be an array" --eval_every=2 --eval_tasks_file="$T/bad/tasks.toml"
bad "missing.toml" --eval_every=2 --eval_tasks_file="$T/missing.toml"
bad "eval_tasks names 'nope'" --eval_every=2 --eval_tasks=nope
bad "eval_mode must be inline, reserved_gpu or k8s_job" --eval_enabled=true --eval_mode=cron
echo "ok: bad task files"
