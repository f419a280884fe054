#!/usr/bin/env bash
# run_demo.sh: the main job of `make run`: prepare the Brown-corpus sample
# shards (once) and train configs/tiny.toml on the CPU. Extra arguments are
# passed to `nmoe train` (e.g. --steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare_sample.sh
mkdir -p runs
exec build/nmoe train configs/tiny.toml "$@"
