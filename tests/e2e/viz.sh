#!/usr/bin/env bash
# nmoe viz over a real run: train the tiny e2e model for 4 steps (with
# validation), serve its metrics with `nmoe viz --port 0`, and check the JSON
# API and the page through HTTP; bad options fail with one clear line; the
# server stops cleanly on SIGTERM.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 1 8000 3
write_config "$T/c.toml" "$T/data"
NMOE_RUN=vizrun "$NMOE" train "$T/c.toml" --steps=4 --log_every=1 --checkpoint_every=0 --validation_enabled=true \
  --validation_data_path="$T/data" --validation_every=2 --validation_steps=1 >"$T/train.log" 2>&1 \
  || { cat "$T/train.log"; die "training failed"; }

# Bad options: one line each, non-zero exit, nothing served.
expect_error() { # expect_error PATTERN ARGS...
  local pat=$1; shift
  if "$NMOE" viz "$@" >"$T/err.log" 2>&1; then die "nmoe viz $* succeeded"; fi
  grep -q "$pat" "$T/err.log" || { cat "$T/err.log"; die "nmoe viz $*: no '$pat'"; }
}
expect_error "metrics directory" --metrics-dir "$T/nope" --port 0
expect_error "invalid port" --metrics-dir "$T/metrics" --port 70000
echo "not a database" >"$T/bad.db"
expect_error "not a readable experiments database" --metrics-dir "$T/metrics" --experiments-db "$T/bad.db" --port 0

"$NMOE" viz --metrics-dir "$T/metrics" --experiments-db "$T/experiments.db" --port 0 \
  --once-port-file "$T/port" >"$T/viz.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s "$T/port" ] && break; sleep 0.05; done
[ -s "$T/port" ] || { cat "$T/viz.log"; die "no port file"; }
"$PY" - "$(cat "$T/port")" "$T/page.js" <<'PYEOF' || { kill $pid; cat "$T/viz.log"; die "API checks failed"; }
import json, sys, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1].strip()}"
def get(path, want=200):
    try:
        r = urllib.request.urlopen(base + path, timeout=10)
        status, body, ctype = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read(), e.headers["Content-Type"]
    assert status == want, (path, status, body)
    return json.loads(body) if ctype.startswith("application/json") else body.decode()
assert get("/api/health")["ok"] is True
runs = get("/api/runs")["runs"]
run = [r for r in runs if r["run"] == "vizrun"]
assert len(run) == 1, runs
run = run[0]
assert run["status"] == "completed" and run["experiment_id"] == "e2e" and run["last_step"] == 4, run
assert run["ranks"] == 1 and run["last_ts"] > 0, run
s = get("/api/series?run=vizrun&tag=train/loss&points=10")
assert s["total"] == 4 and [p[0] for p in s["points"]] == [1, 2, 3, 4], s
assert all(2 < p[1] < 15 for p in s["points"]), s
assert [p[0] for p in get("/api/series?run=vizrun&tag=validation/loss")["points"]] == [2, 4]
assert "router/layer_01/cv" in get("/api/tags?run=vizrun")["tags"]
summ = get("/api/summary?run=vizrun")
assert summ["step"] == 4 and summ["loss"] == s["points"][-1][1] and summ["val_step"] == 4, summ
assert summ["tokens_per_s"] > 0 and summ["lr"] > 0 and summ["val_bpb"] > 0, summ
router = get("/api/router?run=vizrun")
assert router["step"] == 4 and [l["layer"] for l in router["layers"]] == [1], router
assert router["layers"][0]["experts_active"] >= 1 and "mean_cv" in router["agg"], router
exp = get("/api/experiments/run?run=vizrun")["run"]
assert exp["config_json"]["dim"] == 32 and "final_loss" in exp["results_json"], exp
assert get("/api/experiments")["experiments"][0]["id"] == "e2e"
assert get("/api/summary?run=nope", 404)["error"]
assert get("/api/series?run=vizrun&tag=train/loss&points=3", 400)["error"]
page = get("/")
assert page.startswith("<!doctype html>") and "<canvas" in page and "visibilityState" in page
assert "http://" not in page and "https://" not in page  # no external assets
open(sys.argv[2], "w").write(page.split("<script>")[1].split("</script>")[0])
PYEOF
# The page's script at least parses (Node is part of the dev set-up; skipped without it).
if command -v node >/dev/null; then node --check "$T/page.js" || die "page script does not parse"; fi
kill -TERM $pid
wait $pid || { cat "$T/viz.log"; die "viz exited non-zero on SIGTERM"; }
grep -q "viz: stopped" "$T/viz.log" || die "no clean stop"
echo "ok: nmoe viz"
