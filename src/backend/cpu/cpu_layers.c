/* cpu_layers.c: the per-token layer ops of the CPU backend: embedding, RMSNorm,
 * RoPE, SwiGLU and the MLA key/value assembly, forward and backward.
 *
 * Gradients summed over tokens (embedding table, norm weight) are split over
 * output elements, each summed in token order, so any thread count gives the
 * same bits. */
#include <omp.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

/* ---- embedding ---- */

void cpu_embed_fwd(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                   float scale) {
  real_t *Y = y;
  const real_t *Tb = table;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const real_t *row = Tb + (size_t)tok[n] * D;
    for (int d = 0; d < D; d++) Y[(size_t)n * D + d] = (real_t)scale * row[d];
  }
}

void cpu_embed_bwd(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                   int V, float scale) {
  real_t *dT = dtable;
  const real_t *dY = dy;
  for (int n = 0; n < N; n++)
    if (tok[n] < 0 || tok[n] >= V) nmoe_fatal("token id %d outside the vocabulary (%d)", tok[n], V);
  /* Thread t owns the table rows with id % nthreads == t and walks the tokens
   * in order: every row is summed in token order by exactly one thread. */
#pragma omp parallel
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    for (int n = 0; n < N; n++) {
      if (tok[n] % nt != t) continue;
      real_t *row = dT + (size_t)tok[n] * D;
      const real_t *g = dY + (size_t)n * D;
      for (int d = 0; d < D; d++) row[d] += (real_t)scale * g[d];
    }
  }
}

/* ---- RMSNorm ---- */

void cpu_rmsnorm_fwd(Backend *be, void *y, void *rstd, const void *x, const void *w, int N, int D,
                     int ldx, int ldy, float eps) {
  real_t *Y = y, *R = rstd;
  const real_t *X = x, *W = w;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const real_t *xr = X + (size_t)n * ldx;
    real_t r = 1 / sqrt(cpu_dot(xr, xr, D) / D + (real_t)eps);
    R[n] = r;
    for (int d = 0; d < D; d++) Y[(size_t)n * ldy + d] = xr[d] * r * W[d];
  }
}

void cpu_rmsnorm_bwd(Backend *be, void *dx, void *dw, const void *dy, const void *x,
                     const void *w, const void *rstd, int N, int D, int ldx, int ldy,
                     int accumulate) {
  real_t *dX = dx, *dW = dw;
  const real_t *dY = dy, *X = x, *W = w, *R = rstd;
  /* y = x r w with r = (mean(x^2) + eps)^-1/2:
   * dx = r (dy*w) - x r^3 <dy*w, x> / D;  dw += sum_n dy x r. */
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const real_t *xr = X + (size_t)n * ldx, *g = dY + (size_t)n * ldy;
    real_t *o = dX + (size_t)n * ldx;
    real_t r = R[n], s = 0;
    for (int d = 0; d < D; d++) s += g[d] * W[d] * xr[d];
    real_t c = r * r * r * s / D;
    for (int d = 0; d < D; d++) {
      real_t v = r * g[d] * W[d] - c * xr[d];
      o[d] = accumulate ? o[d] + v : v;
    }
  }
  enum { CB = 16 }; /* column blocks: each dw element summed over n in order */
#pragma omp parallel for schedule(static)
  for (int d0 = 0; d0 < D; d0 += CB) {
    int d1 = d0 + CB < D ? d0 + CB : D;
    real_t acc[CB] = {0};
    for (int n = 0; n < N; n++) {
      const real_t *xr = X + (size_t)n * ldx, *g = dY + (size_t)n * ldy;
      for (int d = d0; d < d1; d++) acc[d - d0] += g[d] * xr[d] * R[n];
    }
    for (int d = d0; d < d1; d++) dW[d] += acc[d - d0];
  }
}

/* ---- RoPE ---- */

void cpu_rope(Backend *be, void *x, const void *cos, const void *sin, int N, int T, int H, int ldx,
              int hs, int off, int rd, int inverse) {
  real_t *X = x;
  const real_t *C = cos, *S = sin;
  int half = rd / 2;
  real_t sign = inverse ? -1 : 1; /* the inverse rotates by -angle */
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const real_t *c = C + (size_t)(n % T) * half, *s = S + (size_t)(n % T) * half;
    for (int h = 0; h < H; h++) {
      real_t *p = X + (size_t)n * ldx + (size_t)h * hs + off;
      for (int i = 0; i < half; i++) {
        real_t a = p[i], b = p[i + half], si = sign * s[i];
        p[i] = a * c[i] - b * si;
        p[i + half] = b * c[i] + a * si;
      }
    }
  }
}

/* ---- SwiGLU ---- */

static real_t sigmoid(real_t z) { return 1 / (1 + exp(-z)); }

void cpu_swiglu_fwd(Backend *be, void *h, const void *gu, int M, int F) {
  real_t *Hh = h;
  const real_t *GU = gu;
#pragma omp parallel for schedule(static)
  for (int m = 0; m < M; m++) {
    const real_t *g = GU + (size_t)m * 2 * F, *u = g + F;
    for (int f = 0; f < F; f++) Hh[(size_t)m * F + f] = g[f] * sigmoid(g[f]) * u[f];
  }
}

void cpu_swiglu_bwd(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F) {
  real_t *dGU = dgu;
  const real_t *dH = dh, *GU = gu;
  /* h = g sig(g) u: dg = dh u sig (1 + g (1 - sig)), du = dh g sig. */
#pragma omp parallel for schedule(static)
  for (int m = 0; m < M; m++) {
    const real_t *g = GU + (size_t)m * 2 * F, *u = g + F, *d = dH + (size_t)m * F;
    real_t *dg = dGU + (size_t)m * 2 * F, *du = dg + F;
    for (int f = 0; f < F; f++) {
      real_t sg = sigmoid(g[f]);
      dg[f] = d[f] * u[f] * sg * (1 + g[f] * (1 - sg));
      du[f] = d[f] * g[f] * sg;
    }
  }
}

/* ---- MLA key/value assembly ---- */

void cpu_mla_kv_split(Backend *be, void *k, void *v, const void *kv, const void *kr, int ldkr,
                      int N, int H, int dn, int dr, int dv) {
  real_t *K = k, *V = v;
  const real_t *KV = kv, *KR = kr;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++)
    for (int h = 0; h < H; h++) {
      const real_t *src = KV + ((size_t)n * H + h) * (dn + dv);
      real_t *kd = K + ((size_t)n * H + h) * (dn + dr), *vd = V + ((size_t)n * H + h) * dv;
      for (int d = 0; d < dn; d++) kd[d] = src[d];
      for (int d = 0; d < dr; d++) kd[dn + d] = KR[(size_t)n * ldkr + d];
      for (int d = 0; d < dv; d++) vd[d] = src[dn + d];
    }
}

void cpu_mla_kv_split_bwd(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                          const void *dv, int N, int H, int dn, int dr, int dv_dim) {
  real_t *dKV = dkv, *dKR = dkr;
  const real_t *dK = dk, *dV = dv;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    for (int d = 0; d < dr; d++) dKR[(size_t)n * ldkr + d] = 0;
    for (int h = 0; h < H; h++) {
      real_t *dst = dKV + ((size_t)n * H + h) * (dn + dv_dim);
      const real_t *kd = dK + ((size_t)n * H + h) * (dn + dr);
      const real_t *vd = dV + ((size_t)n * H + h) * dv_dim;
      for (int d = 0; d < dn; d++) dst[d] = kd[d];
      for (int d = 0; d < dv_dim; d++) dst[dn + d] = vd[d];
      for (int d = 0; d < dr; d++) dKR[(size_t)n * ldkr + d] += kd[dn + d]; /* heads in order */
    }
  }
}
