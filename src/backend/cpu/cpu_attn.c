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
#include <stdint.h>
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

/* Keys of query row (b, i) into key[] (ascending); returns their count. */
static int keys_of(const AttnShape *s, const int32_t *sel, int K, int b, int i, int *key) {
  int n = 0;
  if (sel) {
    const int32_t *r = sel + ((size_t)b * s->T + i) * K;
    for (int c = 0; c < K; c++)
      if (r[c] >= 0) key[n++] = r[c];
  } else {
    for (int j = key_lo(s, i); j <= i; j++) key[n++] = j;
  }
  return n;
}

/* Whether query i (>= j) of sequence b sees key j. A sel row is ascending
 * with its -1 padding at the end: binary search with -1 as +infinity. */
static int sees(const AttnShape *s, const int32_t *sel, int K, int b, int i, int j) {
  if (!sel) return i <= query_hi(s, j);
  const int32_t *r = sel + ((size_t)b * s->T + i) * K;
  int lo = 0, hi = K;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    int32_t v = r[mid] < 0 ? INT32_MAX : r[mid];
    if (v < j) lo = mid + 1;
    else hi = mid;
  }
  return lo < K && r[lo] == j;
}

/* Last query that may see key j. */
static int query_last(const AttnShape *s, const int32_t *sel, int j) {
  return sel ? s->T - 1 : query_hi(s, j);
}

static void attn_fwd_impl(void *o, void *lse, const void *q, const void *k, const void *v,
                          const void *sinks, const int32_t *sel, int K, const AttnShape *s) {
  real_t *O = o, *L = lse;
  const real_t *Q = q, *K_ = k, *V = v, *S = sinks;
  NMOE_ASSERT(s->Hkv > 0 && s->Hq % s->Hkv == 0);
  int T = s->T, Hq = s->Hq, grp = s->Hq / s->Hkv, dqk = s->dqk, dv = s->dv;
  long rows = (long)s->B * Hq * T;
  real_t scale = s->scale;
#pragma omp parallel
  {
    real_t *p = xmalloc((size_t)T * sizeof(real_t));
    int *key = xmalloc((size_t)T * sizeof(int));
#pragma omp for schedule(dynamic, 8)
    for (long r = 0; r < rows; r++) {
      int i = (int)(r % T), h = (int)(r / T % Hq), b = (int)(r / T / Hq);
      int g = h / grp, nk = keys_of(s, sel, K, b, i, key);
      size_t n = (size_t)b * T + i;
      const real_t *qi = Q + n * s->ldq + (size_t)h * dqk;
      real_t m = S ? S[h] : -INFINITY;
      for (int c = 0; c < nk; c++) {
        p[c] = scale * cpu_dot(qi, K_ + ((size_t)b * T + key[c]) * s->ldk + (size_t)g * dqk, dqk);
        if (p[c] > m) m = p[c];
      }
      real_t l = S ? exp(S[h] - m) : 0;
      for (int c = 0; c < nk; c++) {
        p[c] = exp(p[c] - m);
        l += p[c];
      }
      real_t *oi = O + n * ((size_t)Hq * dv) + (size_t)h * dv;
      for (int d = 0; d < dv; d++) oi[d] = 0;
      for (int c = 0; c < nk; c++) {
        const real_t *vj = V + ((size_t)b * T + key[c]) * s->ldv + (size_t)g * dv;
        for (int d = 0; d < dv; d++) oi[d] += p[c] * vj[d];
      }
      for (int d = 0; d < dv; d++) oi[d] /= l;
      L[r] = m + log(l); /* r = (b*Hq + h)*T + i: lse is [B, Hq, T] */
    }
    free(p);
    free(key);
  }
}

static void attn_bwd_impl(void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                          const void *q, const void *k, const void *v, const void *o,
                          const void *lse, const void *sinks, const int32_t *sel, int K,
                          const AttnShape *s) {
  real_t *dQ = dq, *dK = dk, *dV = dv, *dS = dsinks;
  const real_t *dO = dout, *Q = q, *K_ = k, *V = v, *O = o, *L = lse, *S = sinks;
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
#pragma omp parallel
  {
    int *key = xmalloc((size_t)T * sizeof(int));
#pragma omp for schedule(dynamic, 8)
    for (long r = 0; r < rows; r++) {
      int i = (int)(r % T), h = (int)(r / T % Hq), b = (int)(r / T / Hq), g = h / grp;
      int nk = keys_of(s, sel, K, b, i, key);
      size_t n = (size_t)b * T + i;
      const real_t *qi = Q + n * s->ldq + (size_t)h * dqk, *doi = dO + n * ldo + (size_t)h * dvd;
      real_t *dqi = dQ + n * s->ldq + (size_t)h * dqk;
      for (int d = 0; d < dqk; d++) dqi[d] = 0;
      for (int c = 0; c < nk; c++) {
        size_t m = (size_t)b * T + key[c];
        const real_t *kj = K_ + m * s->ldk + (size_t)g * dqk;
        real_t p = exp(scale * cpu_dot(qi, kj, dqk) - L[r]);
        real_t ds = p * (cpu_dot(doi, V + m * s->ldv + (size_t)g * dvd, dvd) - Dsum[r]);
        for (int d = 0; d < dqk; d++) dqi[d] += ds * kj[d];
      }
      for (int d = 0; d < dqk; d++) dqi[d] *= scale;
    }
    free(key);
  }

  /* dk, dv: one task per (b, kv head g, key j); heads of the group, then queries, in order. */
  long krows = (long)B * Hkv * T;
#pragma omp parallel for schedule(dynamic, 8)
  for (long r = 0; r < krows; r++) {
    int j = (int)(r % T), g = (int)(r / T % Hkv), b = (int)(r / T / Hkv);
    size_t m = (size_t)b * T + j;
    const real_t *kj = K_ + m * s->ldk + (size_t)g * dqk, *vj = V + m * s->ldv + (size_t)g * dvd;
    real_t *dkj = dK + m * s->ldk + (size_t)g * dqk, *dvj = dV + m * s->ldv + (size_t)g * dvd;
    for (int d = 0; d < dqk; d++) dkj[d] = 0;
    for (int d = 0; d < dvd; d++) dvj[d] = 0;
    int hi = query_last(s, sel, j);
    for (int h = g * grp; h < (g + 1) * grp; h++)
      for (int i = j; i <= hi; i++) {
        if (sel && !sees(s, sel, K, b, i, j)) continue;
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

void cpu_attn_fwd(Backend *be, void *o, void *lse, const void *q, const void *k, const void *v,
                  const void *sinks, const AttnShape *s) {
  attn_fwd_impl(o, lse, q, k, v, sinks, NULL, 0, s);
}

void cpu_attn_bwd(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                  const void *q, const void *k, const void *v, const void *o, const void *lse,
                  const void *sinks, const AttnShape *s) {
  attn_bwd_impl(dq, dk, dv, dsinks, dout, q, k, v, o, lse, sinks, NULL, 0, s);
}

void cpu_attn_sel_fwd(Backend *be, void *o, void *lse, const void *q, const void *k,
                      const void *v, const int32_t *sel, int K, const AttnShape *s) {
  attn_fwd_impl(o, lse, q, k, v, NULL, sel, K, s);
}

void cpu_attn_sel_bwd(Backend *be, void *dq, void *dk, void *dv, const void *dout, const void *q,
                      const void *k, const void *v, const void *o, const void *lse,
                      const int32_t *sel, int K, const AttnShape *s) {
  attn_bwd_impl(dq, dk, dv, NULL, dout, q, k, v, o, lse, NULL, sel, K, s);
}
