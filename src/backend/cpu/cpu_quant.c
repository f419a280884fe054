/* cpu_quant.c: block-scaled fake quantization (the quantize_blocks op) and the
 * packed form of the same blocks, both from the one codec in quant.h. The op
 * rounds through the format exactly (encode to the code byte/nibble, decode),
 * so it is the reference the CUDA kernel is compared with bit for bit. */
#include "backend/cpu/cpu.h"
#include "backend/cpu/quant.h"
#include "core/log.h"

/* Block b of the [outer, K/32, inner] block grid of x viewed as [outer, K, inner]:
 * the element offset of its first element (the others follow at stride inner). */
static size_t block_base(size_t b, int K, int inner) {
  const size_t nk = (size_t)K / QUANT_BLOCK, o = b / (nk * inner), r = b % (nk * inner);
  return (o * K + (r / inner) * QUANT_BLOCK) * inner + r % inner;
}

/* Scale byte of the 32 values at x[base + i*inner]. */
#define BLOCK_SCALE(x, base, inner, fmt, sb)                              \
  do {                                                                    \
    double amax_ = 0;                                                     \
    int finite_ = 1;                                                      \
    for (int i_ = 0; i_ < QUANT_BLOCK; i_++) {                            \
      double v_ = (double)(x)[(base) + (size_t)i_ * (inner)];             \
      finite_ &= isfinite(v_) != 0;                                       \
      if (fabs(v_) > amax_) amax_ = fabs(v_);                             \
    }                                                                     \
    (sb) = quant_scale_byte(amax_, finite_, fmt);                         \
  } while (0)

void cpu_quantize_blocks(Backend *be, void *q, const void *x, int outer, int K, int inner, int fmt) {
  NMOE_ASSERT(K % QUANT_BLOCK == 0 && inner > 0 && (fmt == QFMT_FP8_E4M3 || fmt == QFMT_FP4_E2M1));
  const real_t *xs = x;
  real_t *qs = q;
  const size_t nblk = (size_t)outer * (K / QUANT_BLOCK) * inner;
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < nblk; b++) {
    const size_t base = block_base(b, K, inner);
    unsigned sb;
    BLOCK_SCALE(xs, base, inner, fmt, sb);
    for (int i = 0; i < QUANT_BLOCK; i++) { /* each element reads only itself: q may alias x */
      const size_t at = base + (size_t)i * inner;
      qs[at] = (real_t)quant_value(quant_code((double)xs[at], sb, fmt), sb, fmt);
    }
  }
}

void quant_pack(uint8_t *codes, uint8_t *scales, const float *x, int outer, int K, int inner,
                int fmt) {
  NMOE_ASSERT(K % QUANT_BLOCK == 0 && inner > 0 && (fmt == QFMT_FP8_E4M3 || fmt == QFMT_FP4_E2M1));
  const size_t nblk = (size_t)outer * (K / QUANT_BLOCK) * inner;
  const int fp8 = fmt == QFMT_FP8_E4M3, bytes = fp8 ? QUANT_BLOCK : QUANT_BLOCK / 2;
  for (size_t b = 0; b < nblk; b++) {
    const size_t base = block_base(b, K, inner);
    unsigned sb;
    BLOCK_SCALE(x, base, inner, fmt, sb);
    scales[b] = (uint8_t)sb;
    uint8_t *c = codes + b * bytes;
    for (int i = 0; i < QUANT_BLOCK; i++) {
      const unsigned v = quant_code((double)x[base + (size_t)i * inner], sb, fmt);
      if (fp8) c[i] = (uint8_t)v;
      else if (i % 2 == 0) c[i / 2] = (uint8_t)v;
      else c[i / 2] |= (uint8_t)(v << 4);
    }
  }
}

void quant_unpack(float *out, const uint8_t *codes, const uint8_t *scales, int outer, int K,
                  int inner, int fmt) {
  NMOE_ASSERT(K % QUANT_BLOCK == 0 && inner > 0 && (fmt == QFMT_FP8_E4M3 || fmt == QFMT_FP4_E2M1));
  const size_t nblk = (size_t)outer * (K / QUANT_BLOCK) * inner;
  const int fp8 = fmt == QFMT_FP8_E4M3, bytes = fp8 ? QUANT_BLOCK : QUANT_BLOCK / 2;
  for (size_t b = 0; b < nblk; b++) {
    const size_t base = block_base(b, K, inner);
    const uint8_t *c = codes + b * bytes;
    for (int i = 0; i < QUANT_BLOCK; i++) {
      const unsigned v = fp8 ? c[i] : (c[i / 2] >> (4 * (i % 2))) & 0xFu;
      out[base + (size_t)i * inner] = (float)quant_value(v, scales[b], fmt);
    }
  }
}
