#!/usr/bin/env bash
# gpu_bundle.sh: builds the CUDA flavour and copies the shared libraries the
# GPU machine may lack (it has CUDA, but not every Debian library we link)
# into build/cuda/devlib, so `carry: ["build/cuda", "data/brown"]` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
make CUDA=1 -j2 all gputests >/dev/null
mkdir -p build/cuda/devlib
for lib in libcrypto.so.3 libsqlite3.so.0 libpcre2-8.so.0 libutf8proc.so.2 libzstd.so.1 libgomp.so.1; do
  src=$(ldd build/cuda/nmoe | awk -v l="$lib" '$1 == l {print $3}')
  [ -n "$src" ] && cp -L "$src" build/cuda/devlib/
done
bash scripts/prepare_sample.sh >/dev/null
du -sh build/cuda data/brown
