/* cpu_attn.c: causal (optionally windowed) softmax attention with GQA, forward
 * and backward, as plain per-(sequence, head, position) loops.
 *
 * Layout: row n = b*T + i; q[n*ldq + h*dqk + d], k[n*ldk + g*dqk + d],
 * v[n*ldv + g*dv + d] with g = h / (Hq/Hkv); o, dout [N, Hq*dv]; lse [B, Hq, T].
 * The backward recomputes probabilities from lse: P_ij = exp(s_ij - lse_i),
 * dS_ij = P_ij (dO_i.v_j - D_i) with D_i = dO_i.O_i; dq_i = scale sum_j dS_ij k_j
 * (one task per query row), dk_j = scale sum_i dS_ij q_i and dv_j = sum_i P_ij dO_i
 * (one task per key row, summing over the group's heads, then queries, in
 * order). Each output row is owned by one task: deterministic.
 *
 * Sinks: the forward starts each row's softmax with the sink logit s_h (max m
 * = s_h, denominator term exp(s_h - m), no value), so lse includes it and the
 * backward's P needs no change. With p0_i = exp(s_h - lse_i) the sink's
 * probability, dp_ij/ds_h = -p_ij p0_i, hence dL/ds_h = -sum_i p0_i sum_j p_ij
 * (dO_i.v_j) = -sum_i p0_i D_i (one task per head, (b, i) in order). */
#include <stdlib.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

/* First key visible to query i (the last is i itself). */
static int key_lo(const AttnShape *s, int i) {
  return s->window > 0 && i - s->window + 1 > 0 ? i - s->window + 1 : 0;
}
/* Last query that sees key j. */
static int query_hi(const AttnShape *s, int j) {
  return s->window > 0 && j + s->window - 1 < s->T - 1 ? j + s->window - 1 : s->T - 1;
}

void cpu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                  const void *sinks, const AttnShape *s) {
  real_t *O = o, *L = lse;
  const real_t *Q = q, *K = k, *V = v, *S = sinks;
  NMOE_ASSERT(s->Hkv > 0 && s->Hq % s->Hkv == 0);
  int T = s->T, Hq = s->Hq, grp = s->Hq / s->Hkv, dqk = s->dqk, dv = s->dv;
  long rows = (long)s->B * Hq * T;
  real_t scale = s->scale;
#pragma omp parallel
  {
    real_t *p = xmalloc((size_t)T * sizeof(real_t));
#pragma omp for schedule(dynamic, 8)
    for (long r = 0; r < rows; r++) {
      int i = (int)(r % T), h = (int)(r / T % Hq), b = (int)(r / T / Hq);
      int g = h / grp, lo = key_lo(s, i);
      size_t n = (size_t)b * T + i;
      const real_t *qi = Q + n * s->ldq + (size_t)h * dqk;
      real_t m = S ? S[h] : -INFINITY;
      for (int j = lo; j <= i; j++) {
        p[j] = scale * cpu_dot(qi, K + ((size_t)b * T + j) * s->ldk + (size_t)g * dqk, dqk);
        if (p[j] > m) m = p[j];
      }
      real_t l = S ? exp(S[h] - m) : 0;
      for (int j = lo; j <= i; j++) {
        p[j] = exp(p[j] - m);
        l += p[j];
      }
      real_t *oi = O + n * ((size_t)Hq * dv) + (size_t)h * dv;
      for (int d = 0; d < dv; d++) oi[d] = 0;
      for (int j = lo; j <= i; j++) {
        const real_t *vj = V + ((size_t)b * T + j) * s->ldv + (size_t)g * dv;
        for (int d = 0; d < dv; d++) oi[d] += p[j] * vj[d];
      }
      for (int d = 0; d < dv; d++) oi[d] /= l;
      L[r] = m + log(l); /* r = (b*Hq + h)*T + i: lse is [B, Hq, T] */
    }
    free(p);
  }
}

void cpu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                  const void *q, const void *k, const void *v, const void *o, const void *lse,
                  const void *sinks, const AttnShape *s) {
  real_t *dQ = dq, *dK = dk, *dV = dv, *dS = dsinks;
  const real_t *dO = dout, *Q = q, *K = k, *V = v, *O = o, *L = lse, *S = sinks;
  NMOE_ASSERT(s->Hkv > 0 && s->Hq % s->Hkv == 0);
  NMOE_ASSERT((S == NULL) == (dS == NULL));
  int B = s->B, T = s->T, Hq = s->Hq, Hkv = s->Hkv, grp = Hq / Hkv, dqk = s->dqk, dvd = s->dv;
  size_t ldo = (size_t)Hq * dvd;
  long rows = (long)B * Hq * T;
  real_t scale = s->scale;
  real_t *Dsum = xmalloc((size_t)(rows > 0 ? rows : 1) * sizeof(real_t)); /* [B, Hq, T] */

#pragma omp parallel for schedule(static)
  for (long r = 0; r < rows; r++) {
    int i = (int)(r % T), h = (int)(r / T % Hq), b = (int)(r / T / Hq);
    size_t n = (size_t)b * T + i;
    Dsum[r] = cpu_dot(dO + n * ldo + (size_t)h * dvd, O + n * ldo + (size_t)h * dvd, dvd);
  }

  if (S) {
#pragma omp parallel for schedule(static)
    for (int h = 0; h < Hq; h++) {
      real_t acc = 0;
      for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) {
          long r = ((long)b * Hq + h) * T + i;
          acc += exp(S[h] - L[r]) * Dsum[r];
        }
      dS[h] -= acc;
    }
  }

  /* dq: one task per (b, h, i). */
#pragma omp parallel for schedule(dynamic, 8)
  for (long r = 0; r < rows; r++) {
    int i = (int)(r % T), h = (int)(r / T % Hq), b = (int)(r / T / Hq), g = h / grp;
    size_t n = (size_t)b * T + i;
    const real_t *qi = Q + n * s->ldq + (size_t)h * dqk, *doi = dO + n * ldo + (size_t)h * dvd;
    real_t *dqi = dQ + n * s->ldq + (size_t)h * dqk;
    for (int d = 0; d < dqk; d++) dqi[d] = 0;
    for (int j = key_lo(s, i); j <= i; j++) {
      size_t m = (size_t)b * T + j;
      const real_t *kj = K + m * s->ldk + (size_t)g * dqk;
      real_t p = exp(scale * cpu_dot(qi, kj, dqk) - L[r]);
      real_t ds = p * (cpu_dot(doi, V + m * s->ldv + (size_t)g * dvd, dvd) - Dsum[r]);
      for (int d = 0; d < dqk; d++) dqi[d] += ds * kj[d];
    }
    for (int d = 0; d < dqk; d++) dqi[d] *= scale;
  }

  /* dk, dv: one task per (b, kv head g, key j); heads of the group, then queries, in order. */
  long krows = (long)B * Hkv * T;
#pragma omp parallel for schedule(dynamic, 8)
  for (long r = 0; r < krows; r++) {
    int j = (int)(r % T), g = (int)(r / T % Hkv), b = (int)(r / T / Hkv);
    size_t m = (size_t)b * T + j;
    const real_t *kj = K + m * s->ldk + (size_t)g * dqk, *vj = V + m * s->ldv + (size_t)g * dvd;
    real_t *dkj = dK + m * s->ldk + (size_t)g * dqk, *dvj = dV + m * s->ldv + (size_t)g * dvd;
    for (int d = 0; d < dqk; d++) dkj[d] = 0;
    for (int d = 0; d < dvd; d++) dvj[d] = 0;
    int hi = query_hi(s, j);
    for (int h = g * grp; h < (g + 1) * grp; h++)
      for (int i = j; i <= hi; i++) {
        size_t n = (size_t)b * T + i;
        long qr = ((long)b * Hq + h) * T + i;
        const real_t *qi = Q + n * s->ldq + (size_t)h * dqk, *doi = dO + n * ldo + (size_t)h * dvd;
        real_t p = exp(scale * cpu_dot(qi, kj, dqk) - L[qr]);
        real_t ds = p * (cpu_dot(doi, vj, dvd) - Dsum[qr]);
        for (int d = 0; d < dvd; d++) dvj[d] += p * doi[d];
        for (int d = 0; d < dqk; d++) dkj[d] += ds * qi[d];
      }
    for (int d = 0; d < dqk; d++) dkj[d] *= scale;
  }
  free(Dsum);
}
