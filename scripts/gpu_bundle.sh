#!/usr/bin/env bash
# gpu_bundle.sh: builds the CUDA flavour and packs what the GPU machine needs into
# one archive, build/cuda/bundle.tgz: build/cuda/nmoe, the GPU test programs
# (build/cuda/gpu), the shared libraries the GPU machine may lack (it has CUDA,
# but not every Debian library we link; NCCL comes from its PyTorch install) in
# build/cuda/devlib, and the Brown sample (data/brown). Each GPU program links
# every kernel, so the unpacked set outgrows the 64 MiB a device call carries;
# the archive fits. Carry ["build/cuda/bundle.tgz"]; scripts/gpu_runbook.sh
# unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
make CUDA=1 -j2 all gputests >/dev/null
mkdir -p build/cuda/devlib
for lib in libcrypto.so.3 libsqlite3.so.0 libpcre2-8.so.0 libutf8proc.so.2 libzstd.so.1 libgomp.so.1; do
  src=$(ldd build/cuda/nmoe | awk -v l="$lib" '$1 == l {print $3}')
  [ -n "$src" ] && cp -L "$src" build/cuda/devlib/
done
bash scripts/prepare_sample.sh >/dev/null
tar czf build/cuda/bundle.tgz build/cuda/nmoe build/cuda/gpu build/cuda/devlib data/brown
du -h build/cuda/bundle.tgz
