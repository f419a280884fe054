#!/usr/bin/env bash
# gpu_runbook.sh: GPU checks and benchmarks in one call on the GPU machine
# (run there after scripts/gpu_bundle.sh here; carry ["build/cuda/bundle.tgz"]).
# Sections (any subset, in order):
#   ops     op-by-op CUDA vs CPU checks (tests/gpu)
#   oracle  whole-model loss/grad dumps (CPU fp32, CUDA bf16) vs the PyTorch oracle
#   curve   tiny.toml on the Brown sample: 200 steps CUDA vs CPU loss curves
#   resume  bit-exact resume on the GPU (tiny.toml, 20 + 20 steps vs 40)
#   bench   expert GEMM benchmark; nmoe bench train for speedrun super/moe and a
#           6-layer moonlet (fits an 80 GB card)
#   torch   PyTorch eager/compile baselines for the same shapes
#   moonlet the whole moonlet at batch 8 (needs an H200: 139 GB)
#   multi   every GPU of the machine: comm test (2 and 4 ranks), RDEP bench,
#           tiny.toml on 1 GPU vs all GPUs (same global batch), weak scaling of
#           speedrun super (bench train on 1, 2, 4 GPUs)
# Logs go to $OUT/<name>.log; a summary is printed last.
set -u
# The archive scripts/gpu_bundle.sh made here (the only carried path).
[ -f build/cuda/bundle.tgz ] && tar xzf build/cuda/bundle.tgz
OUT=${OUT:-/tmp/nmoe_out}
mkdir -p "$OUT"
B=build/cuda
# nmoe links NCCL: on the GPU machine it comes from the PyTorch install (the 200 MB
# library does not travel with the build), so every binary needs this path.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/$B/devlib:${LD_LIBRARY_PATH:-}:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
step() { # name timeout_s command...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s)
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(tail -1 "$OUT/$name.log" | cut -c1-150)" | tee -a "$SUMMARY"
}
sections=${*:-ops oracle curve bench}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$SUMMARY"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$SUMMARY"
for s in $sections; do
  case $s in
  ops)
    step test_ops 120 $B/gpu/test_ops
    step test_norm_moe 120 $B/gpu/test_norm_moe
    step test_attn 120 $B/gpu/test_attn
    step test_quant 120 $B/gpu/test_quant
    ;;
  oracle)
    step oracle 300 bash tests/torch_ref/run_oracle.sh $B/gpu/model_dump /tmp/nmoe_oracle
    ;;
  curve)
    common="--steps=200 --log_every=10 --checkpoint_every=0 --resume=false --metrics_dir=$OUT/m --experiments_db=$OUT/e.db"
    NMOE_RUN=curve_cpu OMP_NUM_THREADS=12 timeout 500 $B/nmoe train configs/tiny.toml --device=cpu $common \
      --checkpoint_dir=/tmp/ck_cpu >"$OUT/curve_cpu.log" 2>&1 &
    cpu_pid=$!
    step curve_cuda 120 env NMOE_RUN=curve_cuda $B/nmoe train configs/tiny.toml --device=cuda $common --checkpoint_dir=/tmp/ck_cuda
    step curve_cuda_rerun 120 env NMOE_RUN=curve_cuda2 $B/nmoe train configs/tiny.toml --device=cuda $common --checkpoint_dir=/tmp/ck_cuda2
    # fp8 / nvfp4 expert numerics on the GPU (emulated through bf16 GEMMs)
    step curve_fp8 120 env NMOE_RUN=curve_fp8 $B/nmoe train configs/tiny.toml --device=cuda --dtype=fp8 $common --checkpoint_dir=/tmp/ck_fp8
    step curve_nvfp4 120 env NMOE_RUN=curve_nvfp4 $B/nmoe train configs/tiny.toml --device=cuda --dtype=nvfp4 $common --checkpoint_dir=/tmp/ck_nvfp4
    wait $cpu_pid
    echo "curve_cpu        rc=$?  $(tail -1 "$OUT/curve_cpu.log" | cut -c1-150)" | tee -a "$SUMMARY"
    step curve_compare 30 python3 - "$OUT/m" <<'PY'
import sqlite3, sys
def losses(run):
    db = sqlite3.connect(f"{sys.argv[1]}/{run}/rank_0.sqlite")
    return dict(db.execute("select step, value from metrics where tag='train/loss'"))
cpu, cuda, cuda2 = losses("curve_cpu"), losses("curve_cuda"), losses("curve_cuda2")
worst = max(abs(cpu[s] - cuda[s]) for s in cpu)
for s in sorted(cpu):
    print(f"step {s:4d} cpu {cpu[s]:.4f} cuda {cuda[s]:.4f} diff {cuda[s]-cpu[s]:+.4f}")
print("cuda rerun bit-identical:", cuda == cuda2)
quant_ok = True
for q in ("fp8", "nvfp4"):
    lq = losses(f"curve_{q}")
    ok = abs(lq[max(lq)] - cuda[max(cuda)]) <= 0.05 * cuda[max(cuda)]
    quant_ok = quant_ok and ok
    print(f"{q}: final {lq[max(lq)]:.4f} vs bf16 {cuda[max(cuda)]:.4f} (bound 5%): {'ok' if ok else 'FAIL'}")
print(f"max |cuda - cpu| = {worst:.4f} over {len(cpu)} logged steps (bound 0.15); "
      f"final cpu {cpu[max(cpu)]:.4f} cuda {cuda[max(cuda)]:.4f}")
sys.exit(0 if worst < 0.15 and cuda == cuda2 and quant_ok else 1)
PY
    ;;
  resume)
    # Bit-exact resume on the GPU: 40 steps straight vs 20 + resume to 40.
    r="--log_every=1 --metrics_dir=$OUT/m --experiments_db=$OUT/e.db --device=cuda"
    step resume_full 120 env NMOE_RUN=full $B/nmoe train configs/tiny.toml --steps=40 --checkpoint_every=0 \
      --checkpoint_dir=/tmp/ck_full $r
    step resume_a 120 env NMOE_RUN=half_a $B/nmoe train configs/tiny.toml --steps=20 --checkpoint_every=20 \
      --checkpoint_dir=/tmp/ck_half $r
    step resume_b 120 env NMOE_RUN=half_b $B/nmoe train configs/tiny.toml --steps=40 --resume \
      --checkpoint_dir=/tmp/ck_half $r
    step resume_compare 30 python3 - "$OUT/m" <<'PY'
import sqlite3, sys
def losses(run):
    db = sqlite3.connect(f"{sys.argv[1]}/{run}/rank_0.sqlite")
    return dict(db.execute("select step, value from metrics where tag='train/loss'"))
full, b = losses("full"), losses("half_b")
tail = {s: v for s, v in full.items() if s > 20}
same = tail == b
print(f"steps 21..40 after resume bit-identical to the straight run: {same} ({len(b)} steps)")
sys.exit(0 if same and len(b) == 20 else 1)
PY
    ;;
  bench)
    step bench_gemm 120 $B/gpu/bench_gemm
    step bench_super 150 $B/nmoe bench train configs/speedrun/super.toml --steps 10 --warmup 3 --device=cuda
    step bench_super_sr 150 $B/nmoe bench train configs/speedrun/super.toml --steps 10 --warmup 3 --device=cuda \
      --master_weights=stochastic
    step bench_moe 150 $B/nmoe bench train configs/speedrun/moe.toml --steps 10 --warmup 3 --device=cuda
    # moonlet shape with 6 of its 12 layers: the whole model does not fit an 80 GB card
    step bench_moonlet6 200 $B/nmoe bench train configs/moonlet.toml --steps 5 --warmup 2 --device=cuda \
      --n_layers=6 --batch_size=2 --master_weights=stochastic
    ;;
  moonlet)
    # the whole moonlet (7.4B params) at batch 8 x 4096 on one H200: no fp32 master, recompute
    step bench_moonlet 400 $B/nmoe bench train configs/moonlet.toml --steps 4 --warmup 2 --device=cuda \
      --batch_size=8 --master_weights=stochastic --recompute_attn=true --recompute_experts=true
    step torch_moonlet 400 python3 tests/torch_ref/bench_torch.py --configs moonlet --modes eager,compile \
      --steps 6 --warmup 2 --time-budget-s 360
    ;;
  multi)
    G=$(nvidia-smi -L | wc -l)
    L="$B/nmoe launch -n"
    step test_comm2 120 $L 2 -- $B/gpu/test_comm
    [ "$G" -ge 4 ] && step test_comm4 120 $L 4 -- $B/gpu/test_comm
    step bench_rdep 240 $L "$G" -- $B/nmoe bench rdep --device cuda
    common="--steps=60 --log_every=1 --checkpoint_every=0 --resume=false --metrics_dir=$OUT/m --experiments_db=$OUT/e.db --device=cuda"
    step eq_1gpu 120 env NMOE_RUN=eq1 $B/nmoe train configs/tiny.toml $common --checkpoint_dir=/tmp/ck_eq1
    step eq_ngpu 120 env NMOE_RUN=eqn $L "$G" -- $B/nmoe train configs/tiny.toml $common --checkpoint_dir=/tmp/ck_eqn
    step eq_compare 30 python3 - "$OUT/m" <<'PY'
import sqlite3, sys
def get(run, r=0):
    db = sqlite3.connect(f"{sys.argv[1]}/{run}/rank_{r}.sqlite")
    return dict(db.execute("select step, value from metrics where tag='train/loss'"))
one, n = get("eq1"), get("eqn")
worst = max(abs(one[s] - n[s]) for s in one)
print(f"tiny.toml, 60 steps, same global batch: max |loss(1 GPU) - loss(all GPUs)| = {worst:.4f} "
      f"(bf16; bound 0.1); final {one[max(one)]:.4f} vs {n[max(n)]:.4f}")
sys.exit(0 if worst < 0.1 and len(one) == len(n) == 60 else 1)
PY
    ws="--steps 10 --warmup 3 --device=cuda --master_weights=stochastic"
    step ws_super_1 200 $B/nmoe bench train configs/speedrun/super.toml $ws
    step ws_super_2 200 $L 2 -- $B/nmoe bench train configs/speedrun/super.toml $ws
    [ "$G" -ge 4 ] && step ws_super_4 200 $L 4 -- $B/nmoe bench train configs/speedrun/super.toml $ws
    ;;
  torch)
    step torch_bench 420 python3 tests/torch_ref/bench_torch.py --configs super,moe,moonlet6 \
      --modes eager,compile --steps 10 --warmup 3 --time-budget-s 380
    ;;
  esac
done
# One archive of every log (the device tool returns at most 8 files).
tar -czf "$OUT/logs.tgz" -C "$OUT" --exclude=logs.tgz --exclude='*.sqlite*' --exclude='e.db*' . 2>/dev/null
echo "=== summary"; cat "$SUMMARY"
