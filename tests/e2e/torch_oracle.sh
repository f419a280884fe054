#!/usr/bin/env bash
# torch_oracle.sh: the PyTorch oracle (tests/torch_ref/nmoe_ref.py, an
# independent float64 implementation of the model spec) against the CPU
# backend, for the three oracle models (MLA + SWA local layers with aux loss;
# MHA/GQA + YaRN + SWA local layers with GQA; DSA sparse layers beside an SWA
# layer): loss, every parameter gradient, routing, the DSA indexer loss.
# On the GPU machine the same script also checks the CUDA backend.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=/usr/bin/python3
"$PY" -c 'import torch' 2>/dev/null ||
  { echo "FAIL: python3-torch is missing (scripts/setup.sh installs it)" >&2; exit 1; }
[ -x build/gpu/model_dump ] || { echo "FAIL: build/gpu/model_dump is missing: make build/gpu/model_dump" >&2; exit 1; }
T=$(mktemp -d /tmp/nmoe_e2e_oracle_XXXXXX)
trap 'rm -rf "$T"' EXIT
OMP_NUM_THREADS=2 PYTHON="$PY" bash tests/torch_ref/run_oracle.sh build/gpu/model_dump "$T" cpu >"$T/oracle.log" 2>&1 ||
  { grep -v '^PASS' "$T/oracle.log" | tail -30; echo "FAIL: the PyTorch oracle disagrees with the CPU backend" >&2; exit 1; }
echo "ok: torch oracle ($(grep -c '^PASS' "$T/oracle.log") checks pass on the CPU backend)"
