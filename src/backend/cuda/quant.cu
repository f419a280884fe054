/* quant.cu: quantize_blocks on the GPU: block-scaled FP8 E4M3 / FP4 E2M1
 * fake quantization (E8M0 scale per 32 along K), bf16 in and out. The codec
 * is the CPU reference's own (backend/cpu/quant.h, compiled __host__
 * __device__, double arithmetic, all exact), so results equal the CPU op's bit
 * for bit: the block max is order-independent and every decoded value is
 * exact in bf16.
 *
 * Two launch shapes over the [outer, K, inner] view:
 *   inner == 1 (activation rows): one warp per block, lane i owns element i;
 *     amax by warp shuffles, coalesced 64-byte rows.
 *   inner > 1 (weights [E, K, N], blocks down the columns): one thread per
 *     (outer, k-block, column); adjacent threads read adjacent columns. */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cpu/quant.h"

#define QUANT_THREADS 256

/* One warp per block of 32 consecutive elements of a row. */
__global__ void quant_rows_kernel(bf16 *q, const bf16 *x, size_t nblk, int fmt) {
  const int lane = threadIdx.x & 31;
  const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
  for (size_t b = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; b < nblk; b += warps) {
    const size_t at = b * QUANT_BLOCK + lane;
    const float v = __bfloat162float(x[at]);
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const int finite = __all_sync(0xffffffffu, isfinite(v));
    const unsigned sb = quant_scale_byte((double)amax, finite, fmt);
    q[at] = __float2bfloat16_rn((float)quant_value(quant_code((double)v, sb, fmt), sb, fmt));
  }
}

/* One thread per block of 32 elements at stride inner (a column of [K, inner]). */
__global__ void quant_cols_kernel(bf16 *q, const bf16 *x, size_t nblk, int K, int inner, int fmt) {
  const size_t nk = (size_t)K / QUANT_BLOCK;
  for (size_t b = (size_t)blockIdx.x * blockDim.x + threadIdx.x; b < nblk;
       b += (size_t)gridDim.x * blockDim.x) {
    const size_t o = b / (nk * inner), r = b % (nk * inner);
    const size_t base = (o * K + (r / inner) * QUANT_BLOCK) * inner + r % inner;
    float v[QUANT_BLOCK];
    float amax = 0.f;
    int finite = 1;
#pragma unroll
    for (int i = 0; i < QUANT_BLOCK; i++) {
      v[i] = __bfloat162float(x[base + (size_t)i * inner]);
      finite &= isfinite(v[i]) ? 1 : 0;
      amax = fmaxf(amax, fabsf(v[i]));
    }
    const unsigned sb = quant_scale_byte((double)amax, finite, fmt);
#pragma unroll
    for (int i = 0; i < QUANT_BLOCK; i++)
      q[base + (size_t)i * inner] =
          __float2bfloat16_rn((float)quant_value(quant_code((double)v[i], sb, fmt), sb, fmt));
  }
}

extern "C" void cu_quantize_blocks(Backend *be, void *q, const void *x, int outer, int K,
                                   int inner, int fmt) {
  NMOE_ASSERT(K % QUANT_BLOCK == 0 && inner > 0 && (fmt == QFMT_FP8_E4M3 || fmt == QFMT_FP4_E2M1));
  const size_t nblk = (size_t)outer * (K / QUANT_BLOCK) * inner;
  if (nblk == 0) return;
  const long cap = (long)cuda_ctx(be)->num_sms * 32;
  if (inner == 1) {
    const long blocks = (long)((nblk * 32 + QUANT_THREADS - 1) / QUANT_THREADS);
    quant_rows_kernel<<<(int)(blocks < cap ? blocks : cap), QUANT_THREADS, 0, cuda_stream(be)>>>(
        (bf16 *)q, (const bf16 *)x, nblk, fmt);
  } else {
    const long blocks = (long)((nblk + QUANT_THREADS - 1) / QUANT_THREADS);
    quant_cols_kernel<<<(int)(blocks < cap ? blocks : cap), QUANT_THREADS, 0, cuda_stream(be)>>>(
        (bf16 *)q, (const bf16 *)x, nblk, K, inner, fmt);
  }
  CUDA_LAUNCH_CHECK();
}
