/* test_ops.c: every CUDA backend op against the CPU backend, on the GPU
 * machine. `build/gpu/test_ops [seed]`: one line per check,
 *   PASS|FAIL <op>/<output> rel=<||out-ref||/||ref||> bound=<b>
 * plus <op>/determinism (two GPU runs bit-identical), then "N passed, M failed";
 * exit status 1 when any check fails or no Hopper GPU is present.
 *
 * Bounds (inputs are bf16-exact, so only the op's own arithmetic counts):
 *   B_OUT  1e-2  one bf16 rounding of each output (2^-9 relative) plus fp32
 *                accumulation-order differences: METHOD.md's bf16 range
 *   B_MID  2e-2  ops that round an intermediate to bf16 too (attention P and dS,
 *                xent dlogits) before a second product
 *   B_F32  1e-4  fp32 outputs of fp32 math on bf16-exact inputs (order and
 *                __expf-level differences only)
 *   B_COPY 0     pure data movement and integer results: exact */
#include <time.h>

#include "gpu_check.h"

#define B_OUT 1e-2
#define B_MID 2e-2
#define B_F32 1e-4
#define B_COPY 0.0

/* ---- dense math ---- */

typedef struct GemmCase {
  GBuf *A, *B, *C;
  int M, N, K, ta, tb, c_f32;
  float alpha, beta;
} GemmCase;

static void op_gemm(GCtx *g, Backend *be, int side, void *arg) {
  GemmCase *c = arg;
  be->gemm(be, P(c->C), P(c->A), P(c->B), c->M, c->N, c->K, c->ta, c->tb, c->alpha, c->beta,
           c->c_f32);
}

static void test_gemm(GCtx *g, int M, int N, int K, int ta, int tb, int c_f32, float beta) {
  GemmCase c = {gb_randn(g, BUF_ACT, (size_t)M * K, 1), gb_randn(g, BUF_ACT, (size_t)K * N, 1),
                NULL, M, N, K, ta, tb, c_f32, 0.5f, beta};
  BufKind ck = c_f32 ? BUF_F32 : BUF_ACT;
  c.C = beta != 0 ? gb_acc_randn(g, ck, (size_t)M * N, 4) : gb_out(g, ck, (size_t)M * N);
  char name[96];
  snprintf(name, sizeof name, "gemm M%d N%d K%d t%d%d %s beta%g", M, N, K, ta, tb,
           c_f32 ? "f32" : "bf16", beta);
  GOut o = {c.C, "C", c_f32 ? B_F32 : B_OUT, NULL, NULL};
  gc_run(g, name, op_gemm, &c, &o, 1, -1);
  gc_clear(g);
}

typedef struct GroupedCase {
  GBuf *out, *a, *b, *off;
  int32_t *off_host;
  int mode, E, M, N, K;
} GroupedCase;

static void op_grouped(GCtx *g, Backend *be, int side, void *arg) {
  GroupedCase *c = arg;
  be->grouped_gemm(be, c->mode, P(c->out), P(c->a), P(c->b), P(c->off), c->off_host, c->E, c->M,
                   c->N, c->K);
}

/* One grouped_gemm check. rows: E row counts, or NULL for random 1..70 with
 * experts 2 and 5 empty. N, K multiples of 8 run the tensor-core kernels
 * (partial tiles where they are not multiples of 128/256), others cuBLAS. */
static void test_grouped(GCtx *g, int mode, int E, const int *rows, int N, int K) {
  int32_t *off = xcalloc((size_t)E + 1, sizeof(int32_t));
  for (int e = 0; e < E; e++)
    off[e + 1] = off[e] + (rows ? rows[e] : e == 2 || e == 5 ? 0 : 1 + gc_int(g, 70));
  int M = off[E];
  GroupedCase c = {NULL, NULL, NULL, gb_in_i32(g, E + 1, off), off, mode, E, M, N, K};
  const char *mname;
  if (mode == GG_FWD) {
    c.a = gb_randn(g, BUF_ACT, (size_t)M * K, 1);
    c.b = gb_randn(g, BUF_ACT, (size_t)E * K * N, 1);
    c.out = gb_out(g, BUF_ACT, (size_t)M * N);
    mname = "FWD";
  } else if (mode == GG_DX) {
    c.a = gb_randn(g, BUF_ACT, (size_t)M * N, 1);
    c.b = gb_randn(g, BUF_ACT, (size_t)E * K * N, 1);
    c.out = gb_out(g, BUF_ACT, (size_t)M * K);
    mname = "DX";
  } else {
    c.a = gb_randn(g, BUF_ACT, (size_t)M * K, 1);
    c.b = gb_randn(g, BUF_ACT, (size_t)M * N, 1);
    c.out = gb_acc_randn(g, BUF_ACT, (size_t)E * K * N, 4); /* empty experts must stay */
    mname = "DW";
  }
  char name[96];
  snprintf(name, sizeof name, "grouped_gemm %s E%d M%d N%d K%d", mname, E, M, N, K);
  GOut o = {c.out, "out", B_OUT, NULL, NULL};
  gc_run(g, name, op_grouped, &c, &o, 1, -1);
  gc_clear(g);
  free(off);
}

static void test_grouped_all(GCtx *g) {
  /* ragged experts (1, 7, 129, 300, 257 rows) and empty ones */
  static const int r1[8] = {1, 7, 0, 129, 300, 0, 64, 257};
  static const int r2[5] = {300, 0, 129, 7, 1};
  static const int r3[4] = {5, 0, 17, 9};
  for (int mode = 0; mode < 3; mode++) {
    test_grouped(g, mode, 8, NULL, 96, 64);
    test_grouped(g, mode, 8, r1, 256, 136); /* 256-wide N tiles; K slices of 64, 64, 8 */
    test_grouped(g, mode, 5, r2, 136, 256); /* 256-wide DX tiles; partial 128-wide N tiles */
    test_grouped(g, mode, 4, r3, 36, 20);   /* not multiples of 8: cuBLAS path */
  }
}

typedef struct AddCase { GBuf *y, *a, *b; size_t n; } AddCase;

static void op_add(GCtx *g, Backend *be, int side, void *arg) {
  AddCase *c = arg;
  be->add(be, P(c->y), P(c->a), P(c->b), c->n);
}

static void op_sumsq(GCtx *g, Backend *be, int side, void *arg) {
  AddCase *c = arg;
  g->scalar[side] = be->sumsq(be, P(c->a), c->n);
}

static void test_add_sumsq(GCtx *g) {
  size_t n = 100003; /* odd: exercises the scalar tail */
  AddCase c = {gb_out(g, BUF_ACT, n), gb_randn(g, BUF_ACT, n, 1), gb_randn(g, BUF_ACT, n, 1), n};
  GOut o = {c.y, "y", B_OUT, NULL, NULL};
  gc_run(g, "add", op_add, &c, &o, 1, -1);
  /* fp32 per-thread sums of bf16-exact squares vs the CPU's double */
  gc_run(g, "sumsq", op_sumsq, &c, NULL, 0, B_F32);
  gc_clear(g);
}

/* ---- Linear bias ---- */

typedef struct BiasCase { GBuf *y, *b, *db, *dy; int N, C; } BiasCase;

static void op_bias_add(GCtx *g, Backend *be, int side, void *arg) {
  BiasCase *c = arg;
  be->bias_add(be, P(c->y), P(c->b), c->N, c->C);
}

static void op_bias_grad(GCtx *g, Backend *be, int side, void *arg) {
  BiasCase *c = arg;
  be->bias_grad(be, P(c->db), P(c->dy), c->N, c->C);
}

/* y += b on every row; db += column sums of dy (several row chunks; both
 * accumulate onto random values). */
static void test_bias(GCtx *g, int N, int C) {
  BiasCase c = {gb_acc_randn(g, BUF_ACT, (size_t)N * C, 1), gb_randn(g, BUF_ACT, C, 1),
                gb_acc_randn(g, BUF_ACT, C, 4), gb_randn(g, BUF_ACT, (size_t)N * C, 1), N, C};
  char name[64];
  GOut o = {c.y, "y", B_OUT, NULL, NULL}; /* one bf16 rounding of an fp32 sum */
  snprintf(name, sizeof name, "bias_add N%d C%d", N, C);
  gc_run(g, name, op_bias_add, &c, &o, 1, -1);
  GOut od = {c.db, "db", B_OUT, NULL, NULL}; /* fp32 column sums, one bf16 rounding */
  snprintf(name, sizeof name, "bias_grad N%d C%d", N, C);
  gc_run(g, name, op_bias_grad, &c, &od, 1, -1);
  gc_clear(g);
}

/* ---- kind conversion (attention sinks) ---- */

typedef struct ConvCase { GBuf *act, *f32, *acc; int n; } ConvCase;

static void op_convert(GCtx *g, Backend *be, int side, void *arg) {
  ConvCase *c = arg;
  be->convert(be, P(c->f32), BUF_F32, P(c->act), BUF_ACT, c->n, 0); /* bf16 -> float: exact */
  be->convert(be, P(c->acc), BUF_ACT, P(c->f32), BUF_F32, c->n, 1); /* acc += it, one rounding */
}

static void test_convert(GCtx *g, int n) {
  ConvCase c = {gb_randn(g, BUF_ACT, n, 1), gb_out(g, BUF_F32, n), gb_acc_randn(g, BUF_ACT, n, 1), n};
  GOut o[2] = {{c.f32, "f32", B_COPY, NULL, NULL}, /* bf16 -> float is exact */
               {c.acc, "acc", B_OUT, NULL, NULL}}; /* fp32 sum, one bf16 rounding */
  gc_run(g, "convert", op_convert, &c, o, 2, -1);
  gc_clear(g);
}

/* ---- embedding ---- */

typedef struct EmbedCase { GBuf *y, *tok, *table, *dtable, *dy; int N, D, V; float scale; } EmbedCase;

static void op_embed_fwd(GCtx *g, Backend *be, int side, void *arg) {
  EmbedCase *c = arg;
  be->embed_fwd(be, P(c->y), P(c->tok), P(c->table), c->N, c->D, c->scale);
}

static void op_embed_bwd(GCtx *g, Backend *be, int side, void *arg) {
  EmbedCase *c = arg;
  be->embed_bwd(be, P(c->dtable), P(c->tok), P(c->dy), c->N, c->D, c->V, c->scale);
}

static void test_embed(GCtx *g, int D) {
  int N = 512, V = 50; /* few ids: many repeats per id */
  int32_t *tok = xmalloc(N * sizeof(int32_t));
  for (int i = 0; i < N; i++) tok[i] = gc_int(g, V);
  EmbedCase c = {gb_out(g, BUF_ACT, (size_t)N * D), gb_in_i32(g, N, tok),
                 gb_randn(g, BUF_ACT, (size_t)V * D, 1), gb_acc_randn(g, BUF_ACT, (size_t)V * D, 1),
                 gb_randn(g, BUF_ACT, (size_t)N * D, 1), N, D, V, 1.5f};
  free(tok);
  char name[64];
  GOut o = {c.y, "y", B_OUT, NULL, NULL};
  snprintf(name, sizeof name, "embed_fwd D%d", D);
  gc_run(g, name, op_embed_fwd, &c, &o, 1, -1);
  GOut od = {c.dtable, "dtable", B_OUT, NULL, NULL};
  snprintf(name, sizeof name, "embed_bwd D%d", D);
  gc_run(g, name, op_embed_bwd, &c, &od, 1, -1);
  gc_clear(g);
}

/* ---- SwiGLU ---- */

typedef struct SwigluCase { GBuf *h, *gu, *dgu, *dh; int M, F; } SwigluCase;

static void op_swiglu_fwd(GCtx *g, Backend *be, int side, void *arg) {
  SwigluCase *c = arg;
  be->swiglu_fwd(be, P(c->h), P(c->gu), c->M, c->F);
}

static void op_swiglu_bwd(GCtx *g, Backend *be, int side, void *arg) {
  SwigluCase *c = arg;
  be->swiglu_bwd(be, P(c->dgu), P(c->dh), P(c->gu), c->M, c->F);
}

static void test_swiglu(GCtx *g, int F) {
  int M = 77;
  SwigluCase c = {gb_out(g, BUF_ACT, (size_t)M * F), gb_randn(g, BUF_ACT, (size_t)M * 2 * F, 2),
                  gb_out(g, BUF_ACT, (size_t)M * 2 * F), gb_randn(g, BUF_ACT, (size_t)M * F, 1), M, F};
  char name[64];
  GOut o = {c.h, "h", B_OUT, NULL, NULL};
  snprintf(name, sizeof name, "swiglu_fwd F%d", F);
  gc_run(g, name, op_swiglu_fwd, &c, &o, 1, -1);
  GOut od = {c.dgu, "dgu", B_OUT, NULL, NULL};
  snprintf(name, sizeof name, "swiglu_bwd F%d", F);
  gc_run(g, name, op_swiglu_bwd, &c, &od, 1, -1);
  gc_clear(g);
}

/* ---- AdamW ---- */

typedef struct AdamCase { GBuf *p, *master, *grad, *m, *v; size_t n; AdamParams ap; } AdamCase;

static void op_adamw(GCtx *g, Backend *be, int side, void *arg) {
  AdamCase *c = arg;
  be->adamw(be, P(c->p), c->master ? P(c->master) : NULL, P(c->grad), P(c->m), P(c->v), c->n, &c->ap);
}

static void test_adamw(GCtx *g, int with_master, uint64_t seed) {
  size_t n = 10001;
  AdamCase c = {NULL, NULL, gb_randn(g, BUF_ACT, n, 1), gb_acc_randn(g, BUF_F32, n, 0.1f), NULL, n,
                {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 1 - 0.9f * 0.9f * 0.9f,
                 1 - 0.95f * 0.95f * 0.95f, 0.7f, seed}};
  float *v = gc_randu(g, n, 0.001f, 0.1f);
  c.v = gb_acc(g, BUF_F32, n, v);
  free(v);
  float *w = gc_randn(g, n, 1);
  c.p = gb_acc(g, BUF_ACT, n, w);
  if (with_master) c.master = gb_acc(g, BUF_F32, n, w);
  free(w);
  GOut o[4] = {{c.p, "p", B_OUT, NULL, NULL}, {c.m, "m", B_F32, NULL, NULL},
               {c.v, "v", B_F32, NULL, NULL}, {c.master, "master", B_F32, NULL, NULL}};
  char name[64];
  snprintf(name, sizeof name, "adamw %s", with_master ? "master" : seed ? "stochastic" : "nearest");
  gc_run(g, name, op_adamw, &c, o, with_master ? 4 : 3, -1);
  gc_clear(g);
}

/* ---- fused lm_head + cross-entropy ---- */

typedef struct XentCase { GBuf *dh, *dW, *h, *W, *tgt; int N, D, V, mask_id, bwd; float scale, gs; } XentCase;

static void op_xent(GCtx *g, Backend *be, int side, void *arg) {
  XentCase *c = arg;
  g->scalar[side] = be->xent(be, c->bwd ? P(c->dh) : NULL, c->bwd ? P(c->dW) : NULL, P(c->h),
                             P(c->W), P(c->tgt), c->N, c->D, c->V, c->scale, c->mask_id, c->gs);
}

static void test_xent(GCtx *g, int N, int D, int V) {
  int mask_id = 7;
  int32_t *t = xmalloc(N * sizeof(int32_t));
  for (int i = 0; i < N; i++) t[i] = i % 5 == 0 ? mask_id : gc_int(g, V);
  XentCase c = {gb_out(g, BUF_ACT, (size_t)N * D), gb_acc_randn(g, BUF_ACT, (size_t)V * D, 0.01f),
                gb_randn(g, BUF_ACT, (size_t)N * D, 1), gb_randn(g, BUF_ACT, (size_t)V * D, 0.5f),
                gb_in_i32(g, N, t), N, D, V, mask_id, 0, 0.7f, 1.0f / N};
  free(t);
  char name[64];
  snprintf(name, sizeof name, "xent fwd N%d D%d V%d", N, D, V);
  /* loss: fp32 logits of bf16-exact inputs, fp32 logsumexp per row */
  gc_run(g, name, op_xent, &c, NULL, 0, B_F32);
  c.bwd = 1;
  snprintf(name, sizeof name, "xent bwd N%d D%d V%d", N, D, V);
  GOut o[2] = {{c.dh, "dh", B_MID, NULL, NULL}, {c.dW, "dW", B_MID, NULL, NULL}};
  gc_run(g, name, op_xent, &c, o, 2, B_F32);
  gc_clear(g);
}

/* ---- RMSNorm, RoPE, MLA split ---- */

typedef struct NormCase {
  GBuf *y, *rstd, *x, *w, *dx, *dw, *dy;
  int N, D, ldx, ldy, acc;
} NormCase;

static void op_norm_fwd(GCtx *g, Backend *be, int side, void *arg) {
  NormCase *c = arg;
  be->rmsnorm_fwd(be, P(c->y), P(c->rstd), P(c->x), P(c->w), c->N, c->D, c->ldx, c->ldy, 1e-6f);
}

static void op_norm_bwd(GCtx *g, Backend *be, int side, void *arg) {
  NormCase *c = arg;
  be->rmsnorm_bwd(be, P(c->dx), P(c->dw), P(c->dy), P(c->x), P(c->w), P(c->rstd), c->N, c->D,
                  c->ldx, c->ldy, c->acc);
}

static void test_rmsnorm(GCtx *g) {
  int N = 100, D = 256, ldx = D + 64, ldy = D;
  NormCase c = {gb_out(g, BUF_ACT, (size_t)N * ldy), gb_out(g, BUF_F32, N),
                gb_randn(g, BUF_ACT, (size_t)N * ldx, 1), gb_randn(g, BUF_ACT, D, 1),
                NULL, gb_acc_randn(g, BUF_ACT, D, 1), gb_randn(g, BUF_ACT, (size_t)N * ldy, 1),
                N, D, ldx, ldy, 0};
  GOut o[2] = {{c.y, "y", B_OUT, NULL, NULL}, {c.rstd, "rstd", B_F32, NULL, NULL}};
  gc_run(g, "rmsnorm_fwd", op_norm_fwd, &c, o, 2, -1);
  /* rstd is an input of the backward: fix it to the CPU's values */
  float *rstd = gb_fetch(g, c.rstd, SIDE_CPU);
  c.rstd = gb_in(g, BUF_F32, N, rstd);
  free(rstd);
  for (c.acc = 0; c.acc < 2; c.acc++) {
    /* dx has stride ldx: columns past D are outside the op, so start them
     * from values rather than poison (the acc=0 run must still write [0,D)) */
    float *dx0 = gc_randn(g, (size_t)N * ldx, 1);
    if (!c.acc)
      for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) dx0[(size_t)n * ldx + d] = NAN;
    c.dx = gb_acc(g, BUF_ACT, (size_t)N * ldx, dx0);
    free(dx0);
    GOut ob[2] = {{c.dx, "dx", B_OUT, NULL, NULL}, {c.dw, "dw", B_OUT, NULL, NULL}};
    gc_run(g, c.acc ? "rmsnorm_bwd accumulate" : "rmsnorm_bwd", op_norm_bwd, &c, ob, 2, -1);
  }
  gc_clear(g);
}

typedef struct RopeCase { GBuf *x, *cos, *sin; int N, T, H, ldx, hs, off, rd, inv; } RopeCase;

static void op_rope(GCtx *g, Backend *be, int side, void *arg) {
  RopeCase *c = arg;
  be->rope(be, P(c->x), P(c->cos), P(c->sin), c->N, c->T, c->H, c->ldx, c->hs, c->off, c->rd, c->inv);
}

static void test_rope(GCtx *g, int hs, int off, int rd) {
  int B = 2, T = 64, Ttab = 80, H = 4, N = B * T, ldx = H * hs + 32;
  float *cs = xmalloc((size_t)Ttab * rd / 2 * sizeof(float)), *sn = xmalloc((size_t)Ttab * rd / 2 * sizeof(float));
  for (int t = 0; t < Ttab; t++)
    for (int i = 0; i < rd / 2; i++) {
      double a = t * pow(10000.0, -2.0 * i / rd);
      cs[t * rd / 2 + i] = (float)cos(a);
      sn[t * rd / 2 + i] = (float)sin(a);
    }
  RopeCase c = {gb_acc_randn(g, BUF_ACT, (size_t)N * ldx, 1), gb_in(g, BUF_F32, (size_t)Ttab * rd / 2, cs),
                gb_in(g, BUF_F32, (size_t)Ttab * rd / 2, sn), N, T, H, ldx, hs, off, rd, 0};
  free(cs);
  free(sn);
  char name[64];
  for (c.inv = 0; c.inv < 2; c.inv++) {
    snprintf(name, sizeof name, "rope hs%d off%d rd%d%s", hs, off, rd, c.inv ? " inverse" : "");
    GOut o = {c.x, "x", B_OUT, NULL, NULL};
    gc_run(g, name, op_rope, &c, &o, 1, -1);
  }
  gc_clear(g);
}

typedef struct MlaCase { GBuf *k, *v, *kv, *kr, *dkv, *dkr, *dk, *dv; int N, H, dn, dr, dvd, ldkr; } MlaCase;

static void op_mla_split(GCtx *g, Backend *be, int side, void *arg) {
  MlaCase *c = arg;
  be->mla_kv_split(be, P(c->k), P(c->v), P(c->kv), P(c->kr), c->ldkr, c->N, c->H, c->dn, c->dr, c->dvd);
}

static void op_mla_split_bwd(GCtx *g, Backend *be, int side, void *arg) {
  MlaCase *c = arg;
  be->mla_kv_split_bwd(be, P(c->dkv), P(c->dkr), c->dr, P(c->dk), P(c->dv), c->N, c->H, c->dn,
                       c->dr, c->dvd);
}

static void test_mla_split(GCtx *g) {
  int N = 50, H = 4, dn = 128, dr = 64, dv = 128, ldkr = dr + 16;
  MlaCase c = {gb_out(g, BUF_ACT, (size_t)N * H * (dn + dr)), gb_out(g, BUF_ACT, (size_t)N * H * dv),
               gb_randn(g, BUF_ACT, (size_t)N * H * (dn + dv), 1), gb_randn(g, BUF_ACT, (size_t)N * ldkr, 1),
               gb_out(g, BUF_ACT, (size_t)N * H * (dn + dv)), gb_out(g, BUF_ACT, (size_t)N * dr),
               gb_randn(g, BUF_ACT, (size_t)N * H * (dn + dr), 1), gb_randn(g, BUF_ACT, (size_t)N * H * dv, 1),
               N, H, dn, dr, dv, ldkr};
  GOut o[2] = {{c.k, "k", B_COPY, NULL, NULL}, {c.v, "v", B_COPY, NULL, NULL}};
  gc_run(g, "mla_kv_split", op_mla_split, &c, o, 2, -1);
  /* dkr (stride dr here) sums H values in fp32, one bf16 rounding */
  GOut ob[2] = {{c.dkv, "dkv", B_COPY, NULL, NULL}, {c.dkr, "dkr", B_OUT, NULL, NULL}};
  gc_run(g, "mla_kv_split_bwd", op_mla_split_bwd, &c, ob, 2, -1);
  gc_clear(g);
}

/* ---- router ---- */

typedef struct RouterCase {
  GBuf *scores, *idx, *w, *counts, *imp, *x, *wg, *bias;
  GBuf *dx, *dwg, *dw, *load;
  int N, D, E, K;
  float rs, aux;
  float *cpu_scores, *bias_h; /* for the tie-tolerant index comparison */
} RouterCase;

static void op_router_fwd(GCtx *g, Backend *be, int side, void *arg) {
  RouterCase *c = arg;
  be->router_fwd(be, P(c->scores), P(c->idx), P(c->w), P(c->counts), P(c->imp), P(c->x), P(c->wg),
                 P(c->bias), c->N, c->D, c->E, c->K, c->rs);
}

static void op_router_bwd(GCtx *g, Backend *be, int side, void *arg) {
  RouterCase *c = arg;
  be->router_bwd(be, P(c->dx), P(c->dwg), P(c->dw), P(c->scores), P(c->idx), P(c->x), P(c->wg),
                 c->N, c->D, c->E, c->K, c->rs, c->aux, P(c->load));
}

/* Fraction of top-k slots whose expert differs, not counting swaps between
 * experts whose biased scores (CPU) are within 1e-5: near-ties may order
 * either way under different fp32 summation orders. */
static double cmp_topk(const float *gpu, const float *cpu, size_t n, void *arg) {
  RouterCase *c = arg;
  size_t bad = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(gpu[i]) || gpu[i] < 0 || gpu[i] >= c->E) return NAN;
    if (gpu[i] == cpu[i]) continue;
    size_t t = i / c->K;
    int eg = (int)gpu[i], ec = (int)cpu[i];
    double sg = c->cpu_scores[t * c->E + eg] + c->bias_h[eg];
    double sc = c->cpu_scores[t * c->E + ec] + c->bias_h[ec];
    if (fabs(sg - sc) > 1e-5) bad++;
  }
  return (double)bad / n;
}

static void test_router(GCtx *g) {
  int N = 200, D = 64, E = 16, K = 4;
  RouterCase c = {0};
  c.N = N, c.D = D, c.E = E, c.K = K, c.rs = 2.5f, c.aux = 0.01f;
  c.bias_h = gc_randn(g, E, 0.05f);
  c.scores = gb_out(g, BUF_F32, (size_t)N * E);
  c.idx = gb_out(g, BUF_I32, (size_t)N * K);
  c.w = gb_out(g, BUF_F32, (size_t)N * K);
  c.counts = gb_out(g, BUF_I32, E);
  c.imp = gb_out(g, BUF_F32, E);
  c.x = gb_randn(g, BUF_ACT, (size_t)N * D, 1);
  c.wg = gb_randn(g, BUF_ACT, (size_t)E * D, 0.1f);
  c.bias = gb_in(g, BUF_F32, E, c.bias_h);
  /* CPU scores feed the comparison; run the CPU op once up front for them */
  op_router_fwd(g, g->be[SIDE_CPU], SIDE_CPU, &c);
  c.cpu_scores = gb_fetch(g, c.scores, SIDE_CPU);
  /* scores/w/imp: fp32 logits of bf16-exact inputs, sigmoid; counts exact */
  GOut o[5] = {{c.scores, "scores", B_F32, NULL, NULL}, {c.idx, "idx", B_COPY, cmp_topk, &c},
               {c.w, "w", B_F32, NULL, NULL}, {c.counts, "counts", B_COPY, NULL, NULL},
               {c.imp, "imp", B_F32, NULL, NULL}};
  gc_run(g, "router_fwd", op_router_fwd, &c, o, 5, -1);

  /* Backward on the CPU's forward results, so both sides see the same routing. */
  int32_t *idx = xmalloc((size_t)N * K * sizeof(int32_t));
  g->be[SIDE_CPU]->download(g->be[SIDE_CPU], idx, c.idx->p[SIDE_CPU], (size_t)N * K * sizeof(int32_t));
  c.idx = gb_in_i32(g, (size_t)N * K, idx);
  free(idx);
  c.scores = gb_in(g, BUF_F32, (size_t)N * E, c.cpu_scores);
  float *ld = gc_randu(g, E, 0.f, 2.f / E);
  c.load = gb_in(g, BUF_F32, E, ld);
  free(ld);
  c.dw = gb_randn(g, BUF_F32, (size_t)N * K, 1);
  c.dx = gb_acc_randn(g, BUF_ACT, (size_t)N * D, 1);
  c.dwg = gb_acc_randn(g, BUF_ACT, (size_t)E * D, 1);
  GOut ob[2] = {{c.dx, "dx", B_OUT, NULL, NULL}, {c.dwg, "dwg", B_OUT, NULL, NULL}};
  gc_run(g, "router_bwd", op_router_bwd, &c, ob, 2, -1);
  free(c.cpu_scores);
  free(c.bias_h);
  gc_clear(g);
}

/* ---- MoE permutation ---- */

typedef struct MoeCase {
  GBuf *off, *row_of, *pair_of, *idx, *x, *xe, *w, *ye, *y, *dy, *dye, *dw, *dxe, *dx;
  int N, K, E, D, acc;
} MoeCase;

static void op_moe_sort(GCtx *g, Backend *be, int side, void *arg) {
  MoeCase *c = arg;
  be->moe_sort(be, P(c->off), P(c->row_of), P(c->pair_of), P(c->idx), c->N, c->K, c->E);
}
static void op_moe_gather(GCtx *g, Backend *be, int side, void *arg) {
  MoeCase *c = arg;
  be->moe_gather(be, P(c->xe), P(c->x), P(c->pair_of), c->N, c->K, c->D);
}
static void op_moe_combine(GCtx *g, Backend *be, int side, void *arg) {
  MoeCase *c = arg;
  be->moe_combine(be, P(c->y), P(c->ye), P(c->w), P(c->row_of), c->N, c->K, c->D, c->acc);
}
static void op_moe_combine_bwd(GCtx *g, Backend *be, int side, void *arg) {
  MoeCase *c = arg;
  be->moe_combine_bwd(be, P(c->dye), P(c->dw), P(c->dy), P(c->ye), P(c->w), P(c->row_of), c->N,
                      c->K, c->D);
}
static void op_moe_gather_bwd(GCtx *g, Backend *be, int side, void *arg) {
  MoeCase *c = arg;
  be->moe_gather_bwd(be, P(c->dx), P(c->dxe), P(c->row_of), c->N, c->K, c->D, c->acc);
}

static void test_moe(GCtx *g) {
  int N = 300, K = 4, E = 16, D = 96, M = N * K;
  int32_t *idx = xmalloc((size_t)M * sizeof(int32_t));
  for (int t = 0; t < N; t++)   /* K distinct experts per token */
    for (int k = 0; k < K; k++) {
      int e, dup;
      do {
        e = gc_int(g, E);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= idx[t * K + j] == e;
      } while (dup);
      idx[t * K + k] = e;
    }
  /* Host counting sort: the inputs of the later ops, independent of either backend. */
  int32_t *off = xcalloc(E + 1, sizeof(int32_t)), *row = xmalloc(M * sizeof(int32_t)),
          *pair = xmalloc(M * sizeof(int32_t)), *fill = xcalloc(E, sizeof(int32_t));
  for (int p = 0; p < M; p++) off[idx[p] + 1]++;
  for (int e = 0; e < E; e++) off[e + 1] += off[e];
  for (int p = 0; p < M; p++) {
    int r = off[idx[p]] + fill[idx[p]]++;
    row[p] = r;
    pair[r] = p;
  }
  MoeCase c = {0};
  c.N = N, c.K = K, c.E = E, c.D = D;
  c.idx = gb_in_i32(g, M, idx);
  c.off = gb_out(g, BUF_I32, E + 1);
  c.row_of = gb_out(g, BUF_I32, M);
  c.pair_of = gb_out(g, BUF_I32, M);
  GOut os[3] = {{c.off, "off", B_COPY, NULL, NULL}, {c.row_of, "row_of", B_COPY, NULL, NULL},
                {c.pair_of, "pair_of", B_COPY, NULL, NULL}};
  gc_run(g, "moe_sort", op_moe_sort, &c, os, 3, -1);
  c.row_of = gb_in_i32(g, M, row);
  c.pair_of = gb_in_i32(g, M, pair);
  free(idx), free(off), free(row), free(pair), free(fill);

  c.x = gb_randn(g, BUF_ACT, (size_t)N * D, 1);
  c.xe = gb_out(g, BUF_ACT, (size_t)M * D);
  GOut og = {c.xe, "xe", B_COPY, NULL, NULL};
  gc_run(g, "moe_gather", op_moe_gather, &c, &og, 1, -1);

  c.ye = gb_randn(g, BUF_ACT, (size_t)M * D, 1);
  float *w = gc_randu(g, (size_t)N * K, 0.f, 0.5f);
  c.w = gb_in(g, BUF_F32, (size_t)N * K, w);
  free(w);
  c.dy = gb_randn(g, BUF_ACT, (size_t)N * D, 1);
  c.dxe = gb_randn(g, BUF_ACT, (size_t)M * D, 1);
  for (c.acc = 0; c.acc < 2; c.acc++) {
    c.y = c.acc ? gb_acc_randn(g, BUF_ACT, (size_t)N * D, 1) : gb_out(g, BUF_ACT, (size_t)N * D);
    GOut oc = {c.y, "y", B_OUT, NULL, NULL};
    gc_run(g, c.acc ? "moe_combine accumulate" : "moe_combine", op_moe_combine, &c, &oc, 1, -1);
    c.dx = c.acc ? gb_acc_randn(g, BUF_ACT, (size_t)N * D, 1) : gb_out(g, BUF_ACT, (size_t)N * D);
    GOut ox = {c.dx, "dx", B_OUT, NULL, NULL};
    gc_run(g, c.acc ? "moe_gather_bwd accumulate" : "moe_gather_bwd", op_moe_gather_bwd, &c, &ox, 1, -1);
  }
  c.dye = gb_out(g, BUF_ACT, (size_t)M * D);
  c.dw = gb_out(g, BUF_F32, (size_t)N * K);
  /* dw: fp32 dot products of bf16-exact rows */
  GOut ob[2] = {{c.dye, "dye", B_OUT, NULL, NULL}, {c.dw, "dw", B_F32, NULL, NULL}};
  gc_run(g, "moe_combine_bwd", op_moe_combine_bwd, &c, ob, 2, -1);
  gc_clear(g);
}

/* ---- attention ---- */

/* q, k, v live packed in one buffer [N, ld] (q | k | v), as the model's
 * fused projection does; the gradients share that layout, so the packed dqkv
 * buffer also checks that nothing outside q/k/v regions is touched. With
 * sinks (F32 [Hq], the swa block's), dsinks accumulates onto random values. */
typedef struct AttnCase {
  GBuf *qkv, *o, *lse, *dout, *dqkv, *sinks, *dsinks;
  AttnShape s;
  int koff, voff;
} AttnCase;

/* An optional buffer's pointer on one side (NULL when absent). */
static void *opt_ptr(GBuf *b, int side) { return b ? b->p[side] : NULL; }

static void op_attn_fwd(GCtx *g, Backend *be, int side, void *arg) {
  AttnCase *c = arg;
  be->attn_fwd(be, P(c->o), P(c->lse), P(c->qkv), PA(c->qkv, c->koff), PA(c->qkv, c->voff),
               opt_ptr(c->sinks, side), &c->s);
}

static void op_attn_bwd(GCtx *g, Backend *be, int side, void *arg) {
  AttnCase *c = arg;
  be->attn_bwd(be, P(c->dqkv), PA(c->dqkv, c->koff), PA(c->dqkv, c->voff),
               opt_ptr(c->dsinks, side), P(c->dout), P(c->qkv), PA(c->qkv, c->koff),
               PA(c->qkv, c->voff), P(c->o), P(c->lse), opt_ptr(c->sinks, side), &c->s);
}

static void test_attn(GCtx *g, const char *label, int B, int T, int Hq, int Hkv, int dqk, int dv,
                      int window, int sinks) {
  int N = B * T, ld = Hq * dqk + Hkv * dqk + Hkv * dv + 8; /* 8 spare columns */
  AttnCase c = {0};
  c.s = (AttnShape){B, T, Hq, Hkv, dqk, dv, ld, ld, ld, window, 1.0f / sqrtf((float)dqk)};
  c.koff = Hq * dqk;
  c.voff = Hq * dqk + Hkv * dqk;
  c.qkv = gb_randn(g, BUF_ACT, (size_t)N * ld, 1);
  c.o = gb_out(g, BUF_ACT, (size_t)N * Hq * dv);
  c.lse = gb_out(g, BUF_F32, (size_t)B * Hq * T);
  if (sinks) c.sinks = gb_randn(g, BUF_F32, Hq, 2); /* logits of the scores' size */
  char name[96];
  snprintf(name, sizeof name, "attn_fwd %s", label);
  /* o: bf16 P times V after an fp32 softmax; lse: fp32 */
  GOut o[2] = {{c.o, "o", B_MID, NULL, NULL}, {c.lse, "lse", B_F32, NULL, NULL}};
  gc_run(g, name, op_attn_fwd, &c, o, 2, -1);
  /* The backward takes the CPU's o and lse as inputs on both sides. */
  float *oh = gb_fetch(g, c.o, SIDE_CPU), *lh = gb_fetch(g, c.lse, SIDE_CPU);
  for (size_t i = 0; i < c.o->n; i++) oh[i] = bf16_round(oh[i]);
  c.o = gb_in(g, BUF_ACT, c.o->n, oh);
  c.lse = gb_in(g, BUF_F32, c.lse->n, lh);
  free(oh);
  free(lh);
  c.dout = gb_randn(g, BUF_ACT, (size_t)N * Hq * dv, 1);
  c.dqkv = gb_acc_randn(g, BUF_ACT, (size_t)N * ld, 1);
  if (sinks) c.dsinks = gb_acc_randn(g, BUF_F32, Hq, 1);
  snprintf(name, sizeof name, "attn_bwd %s", label);
  /* bf16 P and dS feed the gradient products; dsinks is fp32 math (exp of
   * fp32 lse, fp32 dot products of bf16 dO and O) */
  GOut ob[2] = {{c.dqkv, "dqkv", B_MID, NULL, NULL}, {c.dsinks, "dsinks", B_F32, NULL, NULL}};
  gc_run(g, name, op_attn_bwd, &c, ob, sinks ? 2 : 1, -1);
  gc_clear(g);
}

int main(int argc, char **argv) {
  uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : (uint64_t)time(NULL);
  printf("test_ops seed=%llu\n", (unsigned long long)seed);
  char err[256];
  GCtx g = {0};
  g.rng = seed;
  g.be[SIDE_CPU] = backend_cpu();
  g.be[SIDE_GPU] = backend_cuda(0, err, sizeof err);
  if (!g.be[SIDE_GPU]) {
    printf("FAIL no CUDA backend: %s\n", err);
    return 1;
  }

  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) test_gemm(&g, 96, 136, 200, ta, tb, 0, 0);
  test_gemm(&g, 96, 136, 200, 0, 1, 0, 1);
  test_gemm(&g, 64, 72, 520, 1, 0, 1, 1);
  test_gemm(&g, 37, 24, 40, 0, 0, 1, 0);
  test_grouped_all(&g);
  test_add_sumsq(&g);
  test_bias(&g, 300, 136);
  test_bias(&g, 1000, 37);
  test_bias(&g, 70, 600); /* more columns than one block of threads */
  test_convert(&g, 16);
  test_convert(&g, 100003);
  test_embed(&g, 136);
  test_embed(&g, 100);
  test_swiglu(&g, 96);
  test_swiglu(&g, 36);
  test_adamw(&g, 1, 0);
  test_adamw(&g, 0, 0);
  test_adamw(&g, 0, 12345);
  test_xent(&g, 300, 64, 1000);
  test_xent(&g, 2800, 32, 201088); /* two chunks of the 2 GiB logits buffer (2669 rows each) */
  test_rmsnorm(&g);
  test_rope(&g, 64, 0, 64);
  test_rope(&g, 192, 128, 64);
  test_mla_split(&g);
  test_router(&g);
  test_moe(&g);
  test_attn(&g, "MHA d64", 2, 128, 4, 4, 64, 64, 0, 0);
  test_attn(&g, "GQA d128 T96", 2, 96, 8, 2, 128, 128, 0, 0);
  test_attn(&g, "MLA 192/128", 1, 128, 4, 4, 192, 128, 0, 0);
  test_attn(&g, "window32 d64", 2, 128, 4, 2, 64, 64, 32, 0);
  test_attn(&g, "swa sinks window32 GQA d64", 2, 128, 4, 2, 64, 64, 32, 1);
  test_attn(&g, "swa sinks window16 GQA d16 T96", 2, 96, 8, 2, 16, 16, 16, 1);

  printf("%d passed, %d failed\n", g.passed, g.failed);
  g.be[SIDE_GPU]->destroy(g.be[SIDE_GPU]);
  g.be[SIDE_CPU]->destroy(g.be[SIDE_CPU]);
  return g.failed ? 1 : 0;
}
