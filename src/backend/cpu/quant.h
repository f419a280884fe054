/* quant.h: block-scaled FP8 (E4M3) and FP4 (E2M1) numerics with E8M0 scales,
 * one scale per 32 consecutive elements along the reduction dimension K (MX
 * style; the original's fp8 and nvfp4 dtypes). The codec below is the one
 * definition: the CPU backend (the reference) compiles it as C, the CUDA
 * kernel (backend/cuda/quant.cu) as __host__ __device__, so both give
 * bit-identical results by construction. All arithmetic is in double and
 * exact (scaling by powers of two, rint in round-to-nearest-even).
 *
 * Definitions (fmt = QFMT_FP8_E4M3 or QFMT_FP4_E2M1; Q = 448 or 6):
 *  scale    2^e with e the smallest integer such that amax <= Q * 2^e (amax/Q
 *           rounded UP to a power of two, so no element of the block
 *           saturates), clamped to [QUANT_EMIN, 127]; amax = 0 gives
 *           QUANT_EMIN. QUANT_EMIN = -124, not E8M0's -127: the finest decoded
 *           step is then 2^-9 * 2^-124 = 2^-133, bf16's smallest subnormal, so
 *           every decoded value is exact in bf16 (and float, double).
 *           E8M0 byte = e + 127. A block holding a NaN or an infinity gets the
 *           byte 0xFF (E8M0 NaN) and every element decodes to NaN.
 *           Range: rounding up may decode a block's largest element to the
 *           next power of two, so finite inputs above ~2.9e38 (within 13% of
 *           the bf16/float maximum) can decode to infinity; below that every
 *           finite input decodes finite (tested).
 *  element  v = x / 2^e rounded to nearest, ties to even, into the format;
 *           |v| > Q saturates to +-Q (infinities too). Negative zero keeps
 *           its sign. Codes:
 *           E4M3 s.eeee.mmm, bias 7, subnormals m/8 * 2^-6, max 0x7E = 448,
 *                0x7F NaN (the element encoder maps NaN there);
 *           E2M1 s.ee.m, bias 1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (no NaN code: the
 *                element encoder maps NaN to +0; blocks carry NaN in the scale).
 *
 * Packed form (quant_pack): for x viewed as [outer, K, inner] with blocks of
 * 32 along K (the fake-quant op's view, backend.h quantize_blocks), block
 * (o, kb, n) in row-major [outer, K/32, inner] order owns scales[block] and 32
 * codes at codes + block * (32 or 16) bytes: FP8 one byte per element, FP4 two
 * per byte (element 2j in the low nibble of byte j). With inner = 1 this is the
 * plain K-major layout: codes [outer, K] (FP8) or [outer, K/2] (FP4), scales
 * [outer, K/32]. */
#ifndef NMOE_QUANT_H
#define NMOE_QUANT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#ifdef __CUDACC__
#define QUANT_HD __host__ __device__
#else
#define QUANT_HD
#endif

#define QUANT_BLOCK 32
#define QUANT_EMIN (-124)
#define QUANT_EMAX 127
#define QUANT_SCALE_NAN 0xFFu

/* Largest finite magnitude of the element format. */
QUANT_HD static inline double quant_max(int fmt) { return fmt == QFMT_FP8_E4M3 ? 448.0 : 6.0; }

/* Element code of v (already divided by the block scale). */
QUANT_HD static inline unsigned quant_encode(double v, int fmt) {
  const int fp8 = fmt == QFMT_FP8_E4M3;
  const int mb = fp8 ? 3 : 1;     /* mantissa bits */
  const int emin = fp8 ? -6 : 0;  /* exponent of the smallest normal */
  const unsigned sign = signbit(v) ? (fp8 ? 0x80u : 0x8u) : 0u;
  if (isnan(v)) return fp8 ? 0x7Fu : 0u;
  double a = fabs(v);
  if (a > quant_max(fmt)) a = quant_max(fmt);
  int E = emin;
  if (a > 0) {
    int fe;
    frexp(a, &fe); /* a in [2^(fe-1), 2^fe) */
    if (fe - 1 > emin) E = fe - 1;
  }
  /* a in units of the binade's step 2^(E-mb): an integer after rounding */
  unsigned k = (unsigned)rint(ldexp(a, mb - E));
  if (k < (1u << mb)) return sign | k;       /* subnormal or zero (E == emin) */
  if (k == (2u << mb)) { k = 1u << mb; E++; } /* rounded up into the next binade */
  return sign | ((unsigned)(E - emin + 1) << mb) | (k - (1u << mb));
}

/* Value of an element code (before the block scale). */
QUANT_HD static inline double quant_decode(unsigned c, int fmt) {
  const int fp8 = fmt == QFMT_FP8_E4M3;
  const int mb = fp8 ? 3 : 1, emin = fp8 ? -6 : 0;
  const unsigned sbit = fp8 ? 0x80u : 0x8u, mag = c & (sbit - 1);
  if (fp8 && mag == 0x7Fu) return NAN;
  const unsigned ef = mag >> mb, m = mag & ((1u << mb) - 1);
  const double a = ef == 0 ? ldexp((double)m, emin - mb)
                           : ldexp((double)((1u << mb) | m), (int)ef - 1 + emin - mb);
  return (c & sbit) ? -a : a;
}

/* E8M0 scale byte of a block: its amax over |x| and whether all elements are
 * finite. */
QUANT_HD static inline unsigned quant_scale_byte(double amax, int finite, int fmt) {
  if (!finite) return QUANT_SCALE_NAN;
  if (!(amax > 0)) return (unsigned)(QUANT_EMIN + 127);
  const double q = quant_max(fmt);
  int ea, eq;
  frexp(amax, &ea); /* amax < 2^ea */
  frexp(q, &eq);    /* q >= 2^(eq-1) */
  int e = ea - eq + 1; /* q * 2^e >= 2^ea > amax: large enough; now the smallest */
  while (e > QUANT_EMIN && amax <= ldexp(q, e - 1)) e--;
  if (e < QUANT_EMIN) e = QUANT_EMIN;
  if (e > QUANT_EMAX) e = QUANT_EMAX;
  return (unsigned)(e + 127);
}

/* Code of element x in a block with scale byte sb (0 in NaN blocks). */
QUANT_HD static inline unsigned quant_code(double x, unsigned sb, int fmt) {
  return sb == QUANT_SCALE_NAN ? 0u : quant_encode(ldexp(x, 127 - (int)sb), fmt);
}

/* Decoded (scaled) value of a code in a block with scale byte sb. */
QUANT_HD static inline double quant_value(unsigned c, unsigned sb, int fmt) {
  return sb == QUANT_SCALE_NAN ? (double)NAN : ldexp(quant_decode(c, fmt), (int)sb - 127);
}

#ifdef __cplusplus
extern "C" {
#endif
/* Packed form of host x viewed as [outer, K, inner] (K % 32 == 0; layout in
 * the header comment): codes (outer*K bytes for FP8, outer*K/2 for FP4) and
 * scales (outer*K/32*inner bytes). */
void quant_pack(uint8_t *codes, uint8_t *scales, const float *x, int outer, int K, int inner,
                int fmt);
/* Decodes a packed form back to floats: out [outer, K, inner]. */
void quant_unpack(float *out, const uint8_t *codes, const uint8_t *scales, int outer, int K,
                  int inner, int fmt);
#ifdef __cplusplus
}
#endif

#endif
