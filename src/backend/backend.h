/* backend.h: the op table the model calls. Every backend implements all of it.
 *
 * The CPU backend (backend/cpu) is the ground truth: plain loops in real_t
 * (float, or double when built with NMOE_REAL_DOUBLE for gradient checks).
 * The CUDA backend (backend/cuda) stores ACT buffers in bf16 and computes in
 * fp32; it is checked against the CPU backend op by op.
 *
 * Buffers are opaque device pointers of three kinds:
 *   ACT  activations, weights and their gradients: real_t on CPU, bf16 on CUDA
 *   F32  fp32 side values (norm rstd, attention lse, router scores/weights,
 *        optimizer moments, master weights): real_t on CPU, float on CUDA
 *   I32  int32 (token ids, expert ids, offsets)
 * Sizes in bytes are n * be->size[kind]. Matrices are row-major. Shapes are
 * written [rows, cols]; N is the number of tokens (B sequences of T tokens).
 *
 * Conventions every op follows:
 *  - "dX +=" means the op accumulates into dX; the model zeroes gradients at
 *    the start of each step, so weight-gradient ops always accumulate.
 *  - Ops named *_bwd never modify their forward inputs.
 *  - Results are deterministic: the same inputs give bit-identical outputs
 *    (no atomics whose order changes results; fixed reduction orders).
 *  - Ops are asynchronous on devices; anything returning a host value
 *    (double) synchronises. */
#ifndef NMOE_BACKEND_H
#define NMOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

typedef enum { BUF_ACT = 0, BUF_F32 = 1, BUF_I32 = 2 } BufKind;

/* Attention problem. q/k/v/o rows are tokens; row strides (in elements) let
 * q, k and v live inside one packed projection output. dq/dk/dv use the same
 * strides as q/k/v. o and do are contiguous [N, Hq*dv]. Query head h reads
 * key/value head h / (Hq/Hkv) (GQA). Causal always; window > 0 also hides keys
 * more than window-1 positions back (key j visible to query i iff
 * i - window < j <= i). */
typedef struct AttnShape {
  int B, T;       /* sequences, tokens per sequence (N = B*T) */
  int Hq, Hkv;    /* query heads, key/value heads (Hq % Hkv == 0) */
  int dqk, dv;    /* head sizes of q/k and of v/o */
  int ldq, ldk, ldv; /* row strides of q, k, v (elements) */
  int window;     /* 0 = full causal */
  float scale;    /* softmax scale, usually dqk^-0.5 */
} AttnShape;

/* One AdamW update over a contiguous range (one optimizer group). The gradient
 * is first multiplied by grad_scale (1, or the clip factor). Then, decoupled:
 *   p -= lr*wd*p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;
 *   p -= lr * (m/bc1) / (sqrt(v/bc2) + eps)
 * with bc1 = 1-b1^t, bc2 = 1-b2^t. With a master copy (F32), the update runs on
 * the master and p receives its rounding (stochastic rounding when
 * stochastic_seed != 0 and there is no master). */
typedef struct AdamParams {
  float lr, b1, b2, eps, wd, bc1, bc2, grad_scale;
  uint64_t stochastic_seed;
} AdamParams;

/* grouped_gemm modes (per expert e owning rows [off[e], off[e+1])); operand
 * roles: FWD out=Y, a=X, b=W; DX out=dX, a=dY, b=W; DW out=dW, a=X, b=dY.
 *   GG_FWD: Y[rows, N]   = X[rows, K] @ W[e]          W is [E, K, N]
 *   GG_DX:  dX[rows, K]  = dY[rows, N] @ W[e]^T       (writes, no accumulate)
 *   GG_DW:  dW[e] [K, N] += X[rows, K]^T @ dY[rows, N] (experts with no rows
 *           are left unchanged) */
enum { GG_FWD = 0, GG_DX = 1, GG_DW = 2 };

/* Block-scaled formats of quantize_blocks (the routed-expert dtype; QFMT_BF16
 * means no quantization and is not a valid op argument). Exact definitions
 * (E8M0 scale rule, rounding, saturation, NaN) in backend/cpu/quant.h. */
enum { QFMT_BF16 = 0, QFMT_FP8_E4M3 = 1, QFMT_FP4_E2M1 = 2 };

typedef struct Backend Backend;
struct Backend {
  const char *name;  /* "cpu" or "cuda" */
  size_t size[3];    /* bytes per element of BUF_ACT, BUF_F32, BUF_I32 */
  void *impl;        /* backend-private state */

  /* ---- memory ---- */
  void *(*alloc)(Backend *be, size_t bytes); /* zero-filled; fatal when out of memory */
  void (*free)(Backend *be, void *p);
  void (*zero)(Backend *be, void *p, size_t bytes);
  void (*copy)(Backend *be, void *dst, const void *src, size_t bytes);
  void (*upload)(Backend *be, void *dst, const void *host, size_t bytes);   /* raw bytes */
  void (*download)(Backend *be, void *host, const void *src, size_t bytes); /* raw bytes, syncs */
  /* Host float <-> buffer of kind k (ACT/F32; converts to the storage type). */
  void (*put)(Backend *be, void *dst, BufKind k, const float *host, size_t n);
  void (*get)(Backend *be, float *host, BufKind k, const void *src, size_t n);
  void (*sync)(Backend *be);
  void (*destroy)(Backend *be);

  /* ---- dense math ---- */
  /* C[M,N] = alpha * op(A) @ op(B) + beta * C.
   * op(A) = A stored [M,K], or A^T with A stored [K,M] when transA.
   * op(B) = B stored [K,N], or B^T with B stored [N,K] when transB.
   * A, B are ACT; C is ACT, or F32 when c_f32. Accumulation in fp32.
   * beta == 0 overwrites C without reading it (garbage or NaN in C is ignored). */
  void (*gemm)(Backend *be, void *C, const void *A, const void *B, int M, int N, int K,
               int transA, int transB, float alpha, float beta, int c_f32);
  /* Per-expert GEMMs in one call (see GG_* above). off is I32 [E+1] on the
   * device with off[0] = 0, off[E] = M; off_host is the same on the host. */
  void (*grouped_gemm)(Backend *be, int mode, void *out, const void *a, const void *b,
                       const int32_t *off, const int32_t *off_host, int E, int M, int N, int K);
  /* y = a + b elementwise (y may alias a or b). */
  void (*add)(Backend *be, void *y, const void *a, const void *b, size_t n);
  /* dst (n elements of kind dk) = src (kind sk) converted, or with accumulate
   * dst += src (summed in fp32, rounded once into dk). ACT and F32 kinds; for
   * small per-head vectors (attention sinks) kept in one kind, used in another. */
  void (*convert)(Backend *be, void *dst, BufKind dk, const void *src, BufKind sk, size_t n,
                  int accumulate);
  /* Linear-layer bias: y [N, C] += b [C] on every row (y, b ACT). */
  void (*bias_add)(Backend *be, void *y, const void *b, int N, int C);
  /* Its gradient: db [C] += column sums of dy [N, C] (ACT; fp32 sums over rows
   * in a fixed order, one rounding into db). */
  void (*bias_grad)(Backend *be, void *db, const void *dy, int N, int C);
  /* Sum of squares of an ACT buffer, in double on the host (deterministic). */
  double (*sumsq)(Backend *be, const void *x, size_t n);

  /* ---- embedding ---- */
  /* y[n,:] = scale * table[tok[n], :]. tok I32 [N], table [V,D], y [N,D]. */
  void (*embed_fwd)(Backend *be, void *y, const int32_t *tok, const void *table, int N, int D,
                    float scale);
  /* dtable[tok[n], :] += scale * dy[n, :], summed in token order per row. */
  void (*embed_bwd)(Backend *be, void *dtable, const int32_t *tok, const void *dy, int N, int D,
                    int V, float scale);

  /* ---- RMSNorm ---- */
  /* y[n,:] = x[n,:] * rstd[n] * w, rstd[n] = 1/sqrt(mean(x[n,:]^2) + eps).
   * x rows have stride ldx, y rows stride ldy; rstd F32 [N]. */
  void (*rmsnorm_fwd)(Backend *be, void *y, void *rstd, const void *x, const void *w, int N,
                      int D, int ldx, int ldy, float eps);
  /* dx (stride ldx) = or += (accumulate) d/dx; dw += d/dw. dy has stride ldy. */
  void (*rmsnorm_bwd)(Backend *be, void *dx, void *dw, const void *dy, const void *x,
                      const void *w, const void *rstd, int N, int D, int ldx, int ldy,
                      int accumulate);

  /* ---- RoPE (rotate-half, non-interleaved) ---- */
  /* In place on x[n, h*hs + off + i] for i < rd, h < H, n < N (row stride ldx).
   * Position of row n is n % T. cos/sin are F32 [T_table, rd/2], T <= T_table.
   * y[i] = x[i]*c - x[i+rd/2]*s; y[i+rd/2] = x[i+rd/2]*c + x[i]*s (i < rd/2).
   * inverse applies the transpose (rotation by -angle): the backward. */
  void (*rope)(Backend *be, void *x, const void *cos, const void *sin, int N, int T, int H,
               int ldx, int hs, int off, int rd, int inverse);

  /* ---- attention ---- */
  /* o [N, Hq*dv] = softmax(scale * q k^T + causal/window mask) v, per sequence
   * and head; lse F32 [B, Hq, T] = log-sum-exp of the scaled, masked scores.
   * sinks (F32 [Hq], NULL = none): a learned logit s_h per query head that
   * joins each softmax denominator with a zero value (gpt-oss attention sinks):
   *   p_ij = exp(z_ij) / (exp(s_h) + sum_j' exp(z_ij')),  o_i = sum_j p_ij v_j,
   * z = scale * q k^T; lse then includes the sink: lse_i = log(exp(s_h) + sum_j exp(z_ij)). */
  void (*attn_fwd)(Backend *be, void *o, void *lse, const void *q, const void *k,
                   const void *v, const void *sinks, const AttnShape *s);
  /* dq, dk, dv (same strides as q, k, v) are written (not accumulated);
   * columns outside the q/k/v regions of a packed buffer are left unchanged.
   * sinks as in attn_fwd (lse must come from a forward with the same sinks);
   * with sinks, dsinks (F32 [Hq]) += dL/ds_h = -sum over (b, i) of
   * exp(s_h - lse_i) * D_i, D_i = sum_c dO_ic O_ic, summed in a fixed order.
   * dsinks must be NULL when sinks is. */
  void (*attn_bwd)(Backend *be, void *dq, void *dk, void *dv, void *dsinks, const void *dout,
                   const void *q, const void *k, const void *v, const void *o, const void *lse,
                   const void *sinks, const AttnShape *s);
  /* Attention over an explicit key list (DSA's sparse mode): as attn_fwd
   * without the causal/window rule, query row n = b*T + i seeing exactly the
   * keys sel[n*K + c] (positions j <= i in its sequence, c < K, ascending, -1 =
   * unused slot; every row lists at least one key). window is ignored. With
   * sel listing every causal key, results equal attn_fwd's bit for bit.
   * Optional (NULL on backends without it; the model refuses attn = dsa there). */
  void (*attn_sel_fwd)(Backend *be, void *o, void *lse, const void *q, const void *k,
                       const void *v, const int32_t *sel, int K, const AttnShape *s);
  /* Backward of attn_sel_fwd, as attn_bwd (no sinks). Optional. */
  void (*attn_sel_bwd)(Backend *be, void *dq, void *dk, void *dv, const void *dout, const void *q,
                       const void *k, const void *v, const void *o, const void *lse,
                       const int32_t *sel, int K, const AttnShape *s);
  /* MLA key/value assembly. kv [N, H*(dn+dv)] holds per head [k_nope | v];
   * kr is the shared rope key (row stride ldkr, dr columns).
   *   k [N, H, dn+dr] = [kv_nope_h | kr];  v [N, H, dv] = kv_v_h */
  void (*mla_kv_split)(Backend *be, void *k, void *v, const void *kv, const void *kr, int ldkr,
                       int N, int H, int dn, int dr, int dv);
  /* Backward: dkv written; dkr (row stride ldkr) written (not accumulated) =
   * sum over heads of dk[...dn:]. */
  void (*mla_kv_split_bwd)(Backend *be, void *dkv, void *dkr, int ldkr, const void *dk,
                           const void *dv, int N, int H, int dn, int dr, int dv_dim);

  /* ---- DSA lightning indexer (optional: NULL on backends without it) ---- */
  /* Index scores, per sequence b, query t, key s <= t:
   *   I[b, t, s] = sum_j w[n, j] * relu(q[n, j, :] . k[m, :]),  n = b*T + t, m = b*T + s
   * q ACT [N, Hi*di] (head j at columns j*di), k ACT [N, di] (one key per
   * token, shared by the heads), w ACT [N, Hi]; score F32 [B, T, T] holds I,
   * entries s > t written 0 (never read by the other dsa ops). */
  void (*dsa_index_fwd)(Backend *be, void *score, const void *q, const void *k, const void *w,
                        int B, int T, int Hi, int di);
  /* Its backward from dscore = dI F32 [B, T, T] (entries s > t ignored);
   * relu'(0) = 0:
   *   dw[n, j] = sum_s dI[t, s] relu(q_j . k_s)
   *   dq[n, j] = w[n, j] sum_s dI[t, s] [q_j . k_s > 0] k_s
   *   dk[m]    = sum_{t >= s} sum_j dI[t, s] w[t, j] [q_j . k_s > 0] q_j
   * dq [N, Hi*di], dk [N, di], dw [N, Hi] ACT, written (not accumulated). */
  void (*dsa_index_bwd)(Backend *be, void *dq, void *dk, void *dw, const void *dscore,
                        const void *q, const void *k, const void *w, int B, int T, int Hi, int di);
  /* Top-k keys of each query: sel I32 [N, K] = the K keys s <= t with the
   * largest score I[b, t, s] (ties to the earlier key), listed in ascending s; a
   * query with t + 1 <= K lists all its keys 0..t and pads with -1. */
  void (*dsa_topk)(Backend *be, int32_t *sel, const void *score, int B, int T, int K);
  /* The main attention's distribution over keys, averaged over heads (the
   * indexer's target): p[b, t, s] = (1/Hq) sum_h exp(scale q_h(t).k_g(s) - lse[b,h,t])
   * over the keys the attention saw (sel [N, K] as attn_sel_fwd, or NULL: all
   * s <= t), 0 elsewhere. q, k, lse and s as given to attn_fwd / attn_sel_fwd
   * (no window, no sinks); p F32 [B, T, T]. */
  void (*dsa_attn_dist)(Backend *be, void *p, const void *q, const void *k, const void *lse,
                        const int32_t *sel, int K, const AttnShape *s);
  /* Indexer loss: per query row, over its candidate set C (the keys in sel,
   * or all s <= t when sel is NULL), with r = softmax over C of score I[b, t, :]:
   *   KL_t = sum_{s in C} p_s (log p_s - log r_s)   (0 log 0 = 0; p sums to 1 on C)
   * Returns sum_t KL_t over all B*T rows (double). dscore F32 [B, T, T] =
   * grad_scale * (r - p) on C, 0 elsewhere (dscore may alias score). */
  double (*dsa_kl)(Backend *be, void *dscore, const void *score, const void *p,
                   const int32_t *sel, int K, int B, int T, float grad_scale);

  /* ---- SwiGLU ---- */
  /* gu [M, 2F] holds [gate | up] per row; h [M, F] = silu(gate) * up. */
  void (*swiglu_fwd)(Backend *be, void *h, const void *gu, int M, int F);
  /* dgu [M, 2F] written from dh [M, F]. */
  void (*swiglu_bwd)(Backend *be, void *dgu, const void *dh, const void *gu, int M, int F);

  /* ---- block-scaled quantization (fp8 / nvfp4 expert numerics) ---- */
  /* Fake quantization: q = x rounded through the block-scaled format fmt and
   * decoded back to ACT (q may alias x). x is viewed as [outer, K, inner]; each
   * block is 32 consecutive k of one (outer, inner) column, one E8M0 scale per
   * block. inner = 1: rows of K (activations [rows, K]); inner = N: down the
   * columns of [K, N] matrices (weights [E, K, N], blocks along K). K % 32 == 0.
   * Every decoded value is exact in bf16, so all backends agree bit for bit
   * (finite inputs above ~2.9e38 may decode to infinity: see cpu/quant.h). */
  void (*quantize_blocks)(Backend *be, void *q, const void *x, int outer, int K, int inner,
                          int fmt);

  /* ---- router ---- */
  /* logits = route_scale * (x @ wg^T) in fp32, scores = sigmoid(logits) (F32 [N,E]);
   * idx (I32 [N,K]) = top-k of scores + bias (F32 [E]), in descending order of
   * biased score, ties to the lower expert id; w (F32 [N,K]) = chosen unbiased
   * scores / their sum. counts (I32 [E]) = assignments per expert.
   * imp (F32 [E], may be NULL) = sum over tokens of scores / row sum (for the
   * switch-style aux loss). x [N,D] ACT, wg [E,D] ACT. */
  void (*router_fwd)(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts,
                     void *imp, const void *x, const void *wg, const void *bias, int N, int D,
                     int E, int K, float route_scale);
  /* Backward through the normalisation and sigmoid. With s = sigmoid(route_scale * z),
   * z = x @ wg^T, chosen set C of token t, S = sum_{j in C} s_j, w_i = s_i / S, g = dw[t]:
   *   dL/ds_j = (g_j - sum_{i in C} g_i w_i) / S              (j in C, else 0)
   *           + aux_coef * (f_j - sum_k f_k s_k / R) / R       (when aux_coef != 0;
   *             f = load_frac F32 [E], R = sum over all E experts of s)
   *   dz = route_scale * s (1 - s) * dL/ds
   * then dx [N,D] += dz @ wg and dwg [E,D] += dz^T @ x. */
  void (*router_bwd)(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                     const int32_t *idx, const void *x, const void *wg, int N, int D, int E,
                     int K, float route_scale, float aux_coef, const void *load_frac);

  /* ---- MoE permutation (single device) ---- */
  /* Stable sort of the N*K (token, slot) pairs p = t*K + k by expert idx[p]:
   * off (I32 [E+1]) expert row ranges, row_of (I32 [N*K]) sorted position of
   * pair p, pair_of (I32 [N*K]) pair at each sorted position. Within an expert
   * rows are in increasing pair order. */
  void (*moe_sort)(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of,
                   const int32_t *idx, int N, int K, int E);
  /* xe [M=N*K, D]: xe[m,:] = x[pair_of[m] / K, :]. */
  void (*moe_gather)(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N, int K,
                     int D);
  /* y[t,:] = (or += when accumulate) sum_k w[t,k] * ye[row_of[t*K+k], :],
   * k in increasing order, fp32 accumulation; with accumulate the sum is
   * formed first and then added to y (one rounding). */
  void (*moe_combine)(Backend *be, void *y, const void *ye, const void *w,
                      const int32_t *row_of, int N, int K, int D, int accumulate);
  /* dye[row_of[t*K+k], :] = w[t,k] * dy[t,:]; dw (F32 [N,K]) = <dy[t], ye[row_of[t*K+k]]>. */
  void (*moe_combine_bwd)(Backend *be, void *dye, void *dw, const void *dy, const void *ye,
                          const void *w, const int32_t *row_of, int N, int K, int D);
  /* dx[t,:] = (or +=) sum_k dxe[row_of[t*K+k], :], k in increasing order
   * (with accumulate: the sum first, then added to dx). */
  void (*moe_gather_bwd)(Backend *be, void *dx, const void *dxe, const int32_t *row_of, int N,
                         int K, int D, int accumulate);

  /* ---- loss ---- */
  /* Fused lm_head + cross-entropy; never holds fp32 logits for all N rows.
   * logits[n,:] = scale * h[n,:] @ W^T (W [V,D]); loss_n = logsumexp(logits[n]) -
   * logits[n, targets[n]]; rows with targets[n] == mask_id are skipped
   * (mask_id < 0: none). Returns the sum of loss_n over kept rows (double).
   * When dh != NULL: dlogits = grad_scale * (softmax - onehot) on kept rows,
   * dh [N,D] = scale * dlogits @ W (written; 0 on masked rows), dW += scale *
   * dlogits^T @ h. When dh == NULL, dW is not touched. */
  double (*xent)(Backend *be, void *dh, void *dW, const void *h, const void *W,
                 const int32_t *targets, int N, int D, int V, float scale, int mask_id,
                 float grad_scale);

  /* ---- optimizer ---- */
  /* p, g ACT [n]; m, v, master F32 [n] (master may be NULL). */
  void (*adamw)(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
                const AdamParams *ap);

  /* ---- timing (optional: may be NULL) ---- */
  /* Marks the start of a named phase; phase_report fills ms per phase since the
   * last report (names/ms arrays of capacity cap) and returns the count. The
   * returned name pointers stay valid until destroy. */
  void (*phase)(Backend *be, const char *name);
  int (*phase_report)(Backend *be, const char **names, double *ms, int cap);

  /* ---- memory accounting (optional: may be NULL) ---- */
  /* Peak bytes allocated through alloc since the backend was created. */
  size_t (*mem_peak)(Backend *be);
};

/* Constructors. backend_cpu never fails; backend_cuda returns NULL with a
 * reason in err when no usable GPU is present. */
Backend *backend_cpu(void);
Backend *backend_cuda(int device, char *err, size_t errlen);
/* device: "cpu", "cuda" or "auto" (cuda when usable, else cpu). Fatal on
 * "cuda" without a usable GPU. */
Backend *backend_open(const char *device, int local_rank);

#endif
