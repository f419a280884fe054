#!/usr/bin/env python3
"""nmoe_ref.py: the PyTorch oracle of nmoe's model (DESIGN.md section 4).

An independent implementation of the spec in plain PyTorch: it loads the
weights and batch that build/gpu/model_dump wrote, runs forward + backward in
float64 with autograd, and compares loss, aux loss and every gradient with
ours (tensor by tensor, rel = ||ours - ref|| / ||ref||).

  python3 tests/torch_ref/nmoe_ref.py DUMP [--device cuda|cpu] [--routing auto|own|ours]
  python3 tests/torch_ref/nmoe_ref.py --compare DUMP_A DUMP_B

The second form compares two dumps (e.g. CUDA against CPU) tensor by tensor.
One line per check (PASS|FAIL name rel=.. bound=..), then "N passed, M failed";
exit status 1 on any failure, 2 on unusable input.

Routing is discrete. A CPU dump must choose exactly the experts the
reference's own float64 top-k chooses. In bf16 a token whose k-th and
(k+1)-th biased scores lie within rounding noise may choose the other expert,
and one such token moves a whole row of its experts' gradients (two flipped
tokens per layer give 6-7% on the expert tensors of a 512-token batch, 2.5% on
the router gate). So a CUDA dump is checked on its own routing (route.<layer>.npy,
--routing ours): every expert it chose must be within 1e-2 (biased score) of
the reference's top-k, and the math is then compared on the same choices.
--compare checks expert tensors and router gate rows over the experts no rerouted token touched.

Bounds. A CPU dump is fp32 throughout: rounding 2^-24 per operation, so 1e-4
leaves two orders of magnitude for accumulation over a few layers. A CUDA dump
stores activations, weights and gradients in bf16 (8 significant bits:
relative rounding 2^-9 ~ 2e-3 per stored value) with fp32 accumulation; a
step rounds each activation a few times per layer and the errors add up over
depth and through the backward, so loss rel 2e-2 and gradient rel 5e-2.
Router gates get 1e-1 in bf16: their gradient is a difference of per-expert
terms (g_j - sum_i g_i w_i) that cancels part of the signal.

The module is also the model of bench_torch.py (bf16, SDPA, grouped GEMM). """
import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# ---------------------------------------------------------------- config


def config_defaults():
    """Defaults of every field, read from src/core/config_fields.h (the one list)."""
    path = os.path.join(REPO, "src", "core", "config_fields.h")
    out = {}
    pat = re.compile(r'^X\((INT|FLOAT|BOOL|STR),\s*(\w+),\s*("[^"]*"|[^,]+),')
    with open(path) as f:
        for line in f:
            m = pat.match(line.strip())
            if not m:
                continue
            kind, name, val = m.group(1), m.group(2), m.group(3).strip()
            if kind == "STR":
                out[name] = val.strip('"')
            elif kind == "BOOL":
                out[name] = val == "true"
            elif kind == "INT":
                out[name] = int(float(val))
            else:
                out[name] = float(val)
    return out


def load_config_toml(path, overrides=None):
    """Config dict: defaults, then the TOML file (top-level keys), then overrides."""
    import tomllib
    cfg = config_defaults()
    with open(path, "rb") as f:
        cfg.update(tomllib.load(f))
    cfg.update(overrides or {})
    return cfg


class Dims:
    """Derived dimensions, as model_dims() in src/model/model.c."""

    def __init__(self, c):
        self.V, self.D, self.L = c["vocab_size"], c["dim"], c["n_layers"]
        self.n_dense, self.H = c["n_dense_layers"], c["n_heads"]
        self.dsa = c["attn"] == "dsa"  # MLA whose attention the lightning indexer restricts
        self.mla = self.dsa or c["attn"] == "mla"
        self.Hi, self.di = c.get("dsa_idx_heads", 0), c.get("dsa_idx_dim", 0)
        self.top_k = c.get("dsa_top_k", 0)
        self.dsa_sparse = c.get("dsa_training_mode", "sparse") != "dense_warmup"
        if self.mla:
            self.Hkv = self.H
            self.qr, self.kvr = c["q_lora_rank"], c["kv_lora_rank"]
            self.dn, self.dr, self.dvh = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            self.dqk, self.dv, self.rope_dim = self.dn + self.dr, self.dvh, self.dr
            self.hd = 0
        else:
            self.Hkv = c["n_kv_heads"] if c["n_kv_heads"] > 0 else self.H
            self.hd = c["head_dim"] if c["head_dim"] > 0 else self.D // self.H
            self.dqk = self.dv = self.hd
            self.rope_dim = min(c["qk_rope_head_dim"], self.hd)
            self.qr = self.kvr = self.dn = self.dr = self.dvh = 0
        self.F = c["inter_dim"]
        self.E, self.K, self.Fm = c["n_routed_experts"], c["n_activated_experts"], c["moe_inter_dim"]
        self.Fs = c["n_shared_experts"] * self.Fm
        # local (SWA) layers: GQA over swa_kv_heads (0 = n_heads), head size v_head_dim
        self.swa_Hkv = c["swa_kv_heads"] if c["swa_kv_heads"] > 0 else self.H
        self.swa_hd = c["v_head_dim"]
        every = c["attn_global_every"]
        self.glob = [every <= 1 or (l + 1) % every == 0 or l == self.L - 1 for l in range(self.L)]
        self.window = c["attn_local_window"]

    def attn_params(self, l):
        """Matmul weights of layer l's attention (as attn_matmul_params())."""
        if not self.glob[l]:
            return (self.H + 2 * self.swa_Hkv) * self.swa_hd * self.D + self.D * self.H * self.swa_hd
        if self.mla:
            q = (self.qr * self.D + self.H * self.dqk * self.qr) if self.qr > 0 else self.H * self.dqk * self.D
            attn = q + (self.kvr + self.dr) * self.D + self.H * (self.dn + self.dvh) * self.kvr
            if self.dsa:
                attn += self.Hi * self.di * self.qr + (self.di + self.Hi) * self.D
        else:
            attn = (self.H + 2 * self.Hkv) * self.hd * self.D
        return attn + self.D * self.H * self.dv

    def active_matmul_params(self):
        """As model_active_matmul_params(): incl. lm_head, excl. embedding."""
        moe = self.E * self.D + 3 * self.D * self.Fm * self.K + 3 * self.D * self.Fs
        return (sum(self.attn_params(l) for l in range(self.L)) + self.n_dense * 3 * self.D * self.F
                + (self.L - self.n_dense) * moe + self.V * self.D)

    def flops_per_token(self, T):
        """As model_flops_per_token(): 6 x active + attention fwd+bwd over the keys
        each query sees (T/2 causal; a window w sees w - w^2/2T on average)."""
        def keys(w):  # mean keys a causal query sees when it sees at most w
            return w - w * w / (2.0 * T) if w < T else T / 2.0
        attn = 0.0
        for l in range(self.L):
            if self.glob[l] and self.dsa:
                attn += 6.0 * self.Hi * self.di * (T / 2.0)
                attn += 6.0 * self.H * (self.dqk + self.dv) * (keys(float(self.top_k)) if self.dsa_sparse else T / 2.0)
            elif self.glob[l]:
                attn += 6.0 * self.H * (self.dqk + self.dv) * (T / 2.0)
            else:
                attn += 6.0 * self.H * 2 * self.swa_hd * keys(float(self.window))
        return 6.0 * self.active_matmul_params() + attn


def rope_tables(c, rope_dim, T):
    """cos, sin float64 [T, rope_dim/2], as build_rope() in model_step.c
    (YaRN NTK-by-parts with concentration when rope_scaling_factor > 1)."""
    half = rope_dim // 2
    factor, conc = c["rope_scaling_factor"], 1.0
    if factor > 1.0:
        conc = 0.1 * math.log(factor) + 1.0
        ctx, base = float(c["max_position_embeddings"]), c["rope_theta"]
        low = half * math.log(ctx / (c["rope_ntk_beta"] * 2 * math.pi)) / math.log(base)
        high = half * math.log(ctx / (c["rope_ntk_alpha"] * 2 * math.pi)) / math.log(base)
    inv = np.zeros(half)
    for i in range(half):
        freq = math.pow(c["rope_theta"], (2.0 * i) / rope_dim)
        v = 1.0 / freq
        if factor > 1.0:
            ramp = (i - low) / (high - low)
            mask = 1.0 - min(max(ramp, 0.0), 1.0)
            v = (1.0 / (factor * freq)) * (1 - mask) + (1.0 / freq) * mask
        inv[i] = v
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang) * conc, np.sin(ang) * conc


# ---------------------------------------------------------------- layers


def wide(x):
    """Compute dtype for norms, router and loss: fp32 for 16-bit tensors."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Lin(nn.Module):
    """Bias-free linear with a PyTorch-layout weight [out, in]."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))

    def forward(self, x):
        return F.linear(x, self.weight)


class LinB(nn.Module):
    """Linear with bias (SWA's qkv and output projections)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Norm(nn.Module):
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * w."""

    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = wide(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class Table(nn.Module):
    def __init__(self, rows, cols):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols))


def rope(x, cos, sin):
    """Rotate-half RoPE on x [B, T, h, rd] with tables [T, rd/2]."""
    half = x.shape[-1] // 2
    T = x.shape[1]
    c = cos[:T].view(1, T, 1, half).to(x.dtype)
    s = sin[:T].view(1, T, 1, half).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def attention(q, k, v, window, scale, use_sdpa, sinks=None):
    """Causal (and, with window > 0, sliding-window: key j visible to query i
    iff i - window < j <= i) softmax attention. q, k [B, T, H, dqk], v [B, T, H, dv].
    sinks [H]: a per-head logit in every row's softmax with a zero value."""
    B, T, H, dv = v.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sinks is not None:
        use_sdpa = False
    keep = None
    if window > 0 or not use_sdpa:
        i = torch.arange(T, device=q.device)
        keep = i[None, :] <= i[:, None]
        if window > 0:
            keep = keep & (i[None, :] > i[:, None] - window)
    if use_sdpa:
        if keep is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    else:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        if sinks is None:
            p = torch.softmax(wide(s), -1)
        else:
            sk = sinks.to(wide(s).dtype).view(1, H, 1, 1).expand(B, H, T, 1)
            p = torch.softmax(torch.cat([wide(s), sk], -1), -1)[..., :T]
        o = torch.matmul(p.to(v.dtype), v)
    return o.transpose(1, 2).reshape(B, T, H * dv)


class Indexer(nn.Module):
    """DSA's lightning indexer (DeepSeek-V3.2 names): q_I = rope(wq_b(q latent))
    [B, T, Hi, di], k_I = rope(k_norm(wk(x))) [B, T, di], w = weights_proj(x) /
    sqrt(Hi di); I[b, t, s] = sum_j w[t, j] relu(q_I[t, j] . k_I[s]) (rope on the
    last qk_rope_head_dim dims of each head)."""

    def __init__(self, d, eps):
        super().__init__()
        self.d = d
        self.wq_b = Lin(d.qr, d.Hi * d.di)
        self.wk = Lin(d.D, d.di)
        self.k_norm = Norm(d.di, eps)
        self.weights_proj = Lin(d.D, d.Hi)

    def forward(self, x, qa, cos, sin):
        d = self.d
        B, T, _ = x.shape
        rd, di = d.dr, d.di
        q = self.wq_b(qa).view(B, T, d.Hi, di)
        q = torch.cat([q[..., :di - rd], rope(q[..., di - rd:], cos, sin)], -1)
        k = self.k_norm(self.wk(x)).view(B, T, 1, di)
        k = torch.cat([k[..., :di - rd], rope(k[..., di - rd:], cos, sin)], -1).view(B, T, di)
        w = self.weights_proj(x) / math.sqrt(d.Hi * di)
        dots = torch.einsum("bthc,bsc->btsh", q, k).relu()
        return (dots * w.unsqueeze(2)).sum(-1)  # [B, T, T]


def dsa_select(score, top_k):
    """Keys each query attends to in sparse mode: the top_k causal keys by
    score (ties to the earlier key; all of them when t + 1 <= top_k), as a bool
    mask [B, T, T]. Also the smallest nonzero gap between a chosen and an
    unchosen causal key's score (how close the selection is to a near-tie that
    float32 could resolve differently; exact ties go to the earlier key in both)."""
    B, T, _ = score.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=score.device).tril()
    s = score.masked_fill(~causal, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(causal).expand(B, T, T).clone()
    keep.scatter_(-1, order[..., :min(top_k, T)], True)
    keep &= causal
    gap = float("inf")
    if top_k < T:
        chosen = s.masked_fill(~keep, float("inf")).min(-1).values
        left = s.masked_fill(keep | ~causal, float("-inf")).max(-1).values
        rows = torch.arange(T, device=score.device) + 1 > top_k
        g = (chosen - left)[:, rows]
        gap = g[g > 0].min().item() if bool((g > 0).any()) else gap
    return keep, gap


class Attention(nn.Module):
    """MLA (q/kv low rank, shared rope key), MHA/GQA, or DSA (MLA plus the
    lightning indexer); parameter names as ours."""

    def __init__(self, d, eps, window, use_sdpa):
        super().__init__()
        self.d, self.window, self.use_sdpa = d, window, use_sdpa
        self.scale = 1.0 / math.sqrt(d.dqk)
        if d.mla:
            if d.qr > 0:
                self.wq_a = Lin(d.D, d.qr)
                self.q_norm = Norm(d.qr, eps)
                self.wq_b = Lin(d.qr, d.H * d.dqk)
            else:
                self.wq = Lin(d.D, d.H * d.dqk)
            self.wkv_a = Lin(d.D, d.kvr + d.dr)
            self.kv_norm = Norm(d.kvr, eps)
            self.wkv_b = Lin(d.kvr, d.H * (d.dn + d.dvh))
            if d.dsa:
                self.indexer = Indexer(d, eps)
        else:
            self.wq = Lin(d.D, d.H * d.hd)
            self.wk = Lin(d.D, d.Hkv * d.hd)
            self.wv = Lin(d.D, d.Hkv * d.hd)
        self.wo = Lin(d.H * d.dv, d.D)

    def forward(self, x, cos, sin):
        d = self.d
        B, T, _ = x.shape
        if d.mla:
            qa = self.q_norm(self.wq_a(x)) if d.qr > 0 else None
            q = self.wq_b(qa) if d.qr > 0 else self.wq(x)
            q = q.view(B, T, d.H, d.dqk)
            q = torch.cat([q[..., :d.dn], rope(q[..., d.dn:], cos, sin)], -1)
            kv_a = self.wkv_a(x)
            kvn = self.kv_norm(kv_a[..., :d.kvr])
            kr = rope(kv_a[..., d.kvr:].unsqueeze(2), cos, sin)  # [B, T, 1, dr]
            kv = self.wkv_b(kvn).view(B, T, d.H, d.dn + d.dvh)
            k = torch.cat([kv[..., :d.dn], kr.expand(B, T, d.H, d.dr)], -1)
            v = kv[..., d.dn:]
            if d.dsa:
                return self.wo(self.dsa_attention(x, qa, q, k, v, cos, sin))
        else:
            q = self.wq(x).view(B, T, d.H, d.hd)
            k = self.wk(x).view(B, T, d.Hkv, d.hd)
            v = self.wv(x).view(B, T, d.Hkv, d.hd)
            rd = d.rope_dim
            if rd > 0:  # rotary over the last rope_dim dims of each head
                q = torch.cat([q[..., :d.hd - rd], rope(q[..., d.hd - rd:], cos, sin)], -1)
                k = torch.cat([k[..., :d.hd - rd], rope(k[..., d.hd - rd:], cos, sin)], -1)
            if d.Hkv != d.H:  # query head h reads kv head h / (H / Hkv)
                k = k.repeat_interleave(d.H // d.Hkv, dim=2)
                v = v.repeat_interleave(d.H // d.Hkv, dim=2)
        return self.wo(attention(q, k, v, self.window, self.scale, self.use_sdpa))


    def dsa_attention(self, x, qa, q, k, v, cos, sin):
        """Attention over the indexer's selection (sparse) or the causal set
        (dense_warmup), and the indexer loss into self.idx_loss: per token
        KL(p || softmax(I)) over that set, p = the attention probabilities
        averaged over heads (detached), mean over tokens. The indexer reads x
        and the q latent detached: its loss reaches only its own weights."""
        d = self.d
        B, T = x.shape[:2]
        score = self.indexer(x.detach(), qa.detach(), cos, sin)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, T, T)
        if d.dsa_sparse:
            keep, self.gap = dsa_select(score.detach(), d.top_k)
        else:
            keep, self.gap = causal, float("inf")
        s = torch.einsum("bthc,bshc->bhts", q, k) * self.scale
        p = torch.softmax(s.masked_fill(~keep.unsqueeze(1), float("-inf")), -1)  # [B, H, T, T]
        o = torch.einsum("bhts,bshc->bthc", p, v).reshape(B, T, d.H * d.dv)
        target = p.detach().mean(1)
        logr = torch.log_softmax(score.masked_fill(~keep, float("-inf")), -1)
        use = keep & (target > 0)
        kl = torch.where(use, target * (torch.log(torch.where(use, target, torch.ones_like(target)))
                                        - torch.where(use, logr, torch.zeros_like(logr))),
                         torch.zeros_like(target))
        self.idx_loss = kl.sum() / (B * T)
        return o


class SwaAttention(nn.Module):
    """Local layers: fused qkv with bias, rope on the last qk_rope_head_dim dims
    of each head, GQA over swa_kv_heads, sliding window with per-head sinks,
    output projection with bias (parameter names as ours)."""

    def __init__(self, d, window, use_sdpa):
        super().__init__()
        self.d, self.window, self.use_sdpa = d, window, use_sdpa
        self.scale = 1.0 / math.sqrt(d.swa_hd)
        self.wqkv = LinB(d.D, (d.H + 2 * d.swa_Hkv) * d.swa_hd)
        self.sinks = nn.Parameter(torch.zeros(d.H))
        self.wo = LinB(d.H * d.swa_hd, d.D)

    def forward(self, x, cos, sin):
        d = self.d
        B, T, _ = x.shape
        hd, Hkv, rd = d.swa_hd, d.swa_Hkv, d.rope_dim
        qkv = self.wqkv(x)
        q = qkv[..., :d.H * hd].reshape(B, T, d.H, hd)
        k = qkv[..., d.H * hd:(d.H + Hkv) * hd].reshape(B, T, Hkv, hd)
        v = qkv[..., (d.H + Hkv) * hd:].reshape(B, T, Hkv, hd)
        if rd > 0:
            q = torch.cat([q[..., :hd - rd], rope(q[..., hd - rd:], cos, sin)], -1)
            k = torch.cat([k[..., :hd - rd], rope(k[..., hd - rd:], cos, sin)], -1)
        if Hkv != d.H:
            k = k.repeat_interleave(d.H // Hkv, dim=2)
            v = v.repeat_interleave(d.H // Hkv, dim=2)
        return self.wo(attention(q, k, v, self.window, self.scale, self.use_sdpa, self.sinks))


class Dense(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, D, Fh):
        super().__init__()
        self.w1, self.w3, self.w2 = Lin(D, Fh), Lin(D, Fh), Lin(Fh, D)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    def __init__(self, D, E):
        super().__init__()
        self.gate = Lin(D, E)


def grouped_mm_available():
    return hasattr(torch, "_grouped_mm")


class Experts(nn.Module):
    """Routed SwiGLU experts: w13 [E, D, 2F] (columns [gate | up]), w2 [E, F, D].
    Rows xe [M, D] are sorted by expert; ends [E] are the exclusive row ends.
    impl 'loop': one matmul per expert (host offsets); 'grouped': torch._grouped_mm."""

    def __init__(self, E, D, Fm, impl):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(E, D, 2 * Fm))
        self.w2 = nn.Parameter(torch.empty(E, Fm, D))
        self.impl = impl

    def forward(self, xe, ends):
        Fm = self.w2.shape[1]
        if self.impl == "grouped":
            offs = ends.to(torch.int32)
            gu = torch._grouped_mm(xe, self.w13, offs=offs)
            h = F.silu(gu[:, :Fm]) * gu[:, Fm:]
            return torch._grouped_mm(h, self.w2, offs=offs)
        outs, start = [], 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                gu = xe[start:end] @ self.w13[e]
                outs.append((F.silu(gu[:, :Fm]) * gu[:, Fm:]) @ self.w2[e])
            start = end
        return torch.cat(outs) if outs else xe.new_zeros(0, xe.shape[1])


class MoE(nn.Module):
    """Sigmoid router (fp32 or wider), top-k on score + bias, normalised
    weights, routed experts + shared experts; optional switch-style aux loss
    alpha * E * sum_e (mean_t s_te / sum_j s_tj) * counts_e / (N K).
    force_idx (I32/I64 [N, K], or None) replaces the reference's own top-k
    choice: the oracle runs a bf16 dump on our routing."""

    def __init__(self, d, c, impl, exact_topk):
        super().__init__()
        self.E, self.K = d.E, d.K
        self.route_scale, self.alpha = c["route_scale"], c["aux_loss_alpha"]
        self.exact_topk = exact_topk
        self.router = Router(d.D, d.E)
        self.experts = Experts(d.E, d.D, d.Fm, impl)
        self.shared = Dense(d.D, d.Fs) if d.Fs > 0 else None
        self.register_buffer("bias", torch.zeros(d.E), persistent=False)
        self.force_idx = None

    def forward(self, x):
        N, D = x.shape
        E, K = self.E, self.K
        xf = wide(x)
        s = torch.sigmoid(F.linear(xf, self.router.gate.weight.to(xf.dtype)) * self.route_scale)
        with torch.no_grad():
            biased = s + self.bias.to(s.dtype)
            if self.exact_topk:  # descending, ties to the lower expert id
                own = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, :K]
            else:
                own = torch.topk(biased, K, dim=-1).indices
            idx = own if self.force_idx is None else self.force_idx.to(own)
            flat = idx.reshape(-1)
            order = torch.sort(flat, stable=True).indices  # (token, slot) pairs by expert
            ends = torch.searchsorted(flat[order].contiguous(), torch.arange(E, device=x.device),
                                      right=True)
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=x.device)
            tok = torch.div(order, K, rounding_mode="floor")
        sel = s.gather(1, idx)
        w = sel / sel.sum(-1, keepdim=True)  # [N, K]
        ye = self.experts(x[tok], ends)  # [M, D], sorted rows
        routed = (ye[inv].view(N, K, D) * w.unsqueeze(-1).to(ye.dtype)).sum(1)
        out = routed + self.shared(x) if self.shared is not None else routed
        aux = None
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        if self.alpha > 0:
            p = s / s.sum(-1, keepdim=True)
            f = counts.to(s.dtype) / (N * K)
            aux = self.alpha * E * (p.mean(0) * f).sum()
        return out, {"aux": aux, "counts": counts, "biased": biased, "idx": idx, "own_idx": own}


class Block(nn.Module):
    def __init__(self, d, c, layer, use_sdpa, moe_impl, exact_topk):
        super().__init__()
        eps = c["rms_norm_eps"]
        self.attn_norm = Norm(d.D, eps)
        if d.glob[layer]:
            self.attn = Attention(d, eps, 0, use_sdpa)
        else:
            self.attn = SwaAttention(d, c["attn_local_window"], use_sdpa)
        self.ffn_norm = Norm(d.D, eps)
        self.is_moe = layer >= d.n_dense
        self.ffn = MoE(d, c, moe_impl, exact_topk) if self.is_moe else Dense(d.D, d.F)

    def forward(self, x, cos, sin):
        h = x + self.attn(self.attn_norm(x), cos, sin)
        xn = self.ffn_norm(h)
        if not self.is_moe:
            return h + self.ffn(xn), None
        B, T, D = xn.shape
        out, info = self.ffn(xn.reshape(B * T, D))
        return h + out.view(B, T, D), info


class NmoeModel(nn.Module):
    """The whole model. named_parameters() gives exactly our table's names and
    shapes. forward(inputs, targets) [B, T] -> (mean CE over kept targets,
    summed aux loss or None, per-MoE-layer routing info {layer: MoE info dict})."""

    def __init__(self, c, seq_len, use_sdpa=False, moe_impl="loop", exact_topk=True):
        super().__init__()
        self.c, self.d = c, Dims(c)
        d = self.d
        self.embedding = Table(d.V, d.D)
        self.layers = nn.ModuleList(Block(d, c, l, use_sdpa, moe_impl, exact_topk) for l in range(d.L))
        self.norm = Norm(d.D, c["rms_norm_eps"])
        self.lm_head = Table(d.V, d.D)
        cos, sin = rope_tables(c, max(d.rope_dim, 2), seq_len)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)
        self.ignore = c["eos_token_id"] if c["loss_mask_eos"] else -100
        self.keep_routing = True  # False: forward returns no routing tensors (benchmarks)

    def moe_layers(self):
        return [l for l, b in enumerate(self.layers) if b.is_moe]

    def forward(self, inputs, targets):
        c = self.c
        x = F.embedding(inputs, self.embedding.weight) * c["embed_scale"]
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        aux_total, routing = None, {}
        self.idx_loss, self.idx_gap = None, float("inf")
        for l, blk in enumerate(self.layers):
            x, info = blk(x, cos, sin)
            il = getattr(blk.attn, "idx_loss", None)
            if il is not None:
                self.idx_loss = il if self.idx_loss is None else self.idx_loss + il
                self.idx_gap = min(self.idx_gap, blk.attn.gap)
            if info is not None:
                if self.keep_routing:
                    routing[l] = info
                if info["aux"] is not None:
                    aux_total = info["aux"] if aux_total is None else aux_total + info["aux"]
        logits = F.linear(self.norm(x), self.lm_head.weight) * c["logits_scale"]
        ce = F.cross_entropy(wide(logits).view(-1, self.d.V), targets.reshape(-1).long(),
                             ignore_index=self.ignore)
        return ce, aux_total, routing


# ---------------------------------------------------------------- dumps


class DumpError(Exception):
    pass


def load_dump(path):
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise DumpError(f"{path}: no meta.json (not a model_dump output directory)")
    with open(meta_path) as f:
        meta = json.load(f)
    return meta


def npy(path, name):
    p = os.path.join(path, name + ".npy")
    if not os.path.isfile(p):
        raise DumpError(f"{path}: missing {name}.npy")
    return np.load(p)


class Checker:
    """Collects PASS/FAIL lines."""

    def __init__(self):
        self.passed = self.failed = 0

    def rel(self, name, ours, ref, bound):
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        if ours.shape != ref.shape:
            self.report(False, name, f"shape {list(ours.shape)} != {list(ref.shape)}")
            return
        nr = float(np.linalg.norm(ref))
        nd = float(np.linalg.norm(ours - ref))
        if not np.all(np.isfinite(ours)):
            self.report(False, name, "non-finite values")
        elif nr == 0.0:  # e.g. an expert no token chose: both must be exactly zero
            self.report(nd == 0.0, name, f"ref=0 |ours|={nd:.3e}")
        else:
            r = nd / nr
            self.report(r <= bound, name, f"rel={r:.3e} bound={bound:.0e}")

    def report(self, ok, name, what):
        print(f"{'PASS' if ok else 'FAIL'} {name} {what}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1

    def finish(self):
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def bounds_for(*metas):
    """(loss, grad, router-gate grad, routing) bounds: bf16 when any dump came
    from CUDA. The routing bound is the largest amount by which an expert we
    left out may outscore (biased, in the reference's float64 scores) one we
    chose: 0 for fp32 (the choices must be identical), bf16 score noise else."""
    if any(m["backend"] != "cpu" for m in metas):
        return 2e-2, 5e-2, 1e-1, 1e-2
    return 1e-4, 1e-4, 1e-4, 0.0


def grad_bound(name, b):
    return b[2] if ".ffn.router.gate." in name else b[1]


def rerouted(a, b):
    """Tokens whose chosen expert sets differ between two [N, K] id arrays."""
    return np.nonzero((np.sort(a, 1) != np.sort(b, 1)).any(1))[0]


def route_violation(biased, idx):
    """Per token: max biased score over the experts idx left out minus the
    min over those it chose (<= 0 when idx is a true top-k)."""
    chosen = torch.zeros_like(biased, dtype=torch.bool).scatter_(1, idx, True)
    lo = biased.masked_fill(~chosen, float("inf")).min(1).values
    hi = biased.masked_fill(chosen, float("-inf")).max(1).values
    return hi - lo


def moe_layer_ids(meta):
    return list(meta.get("moe_layers", []))


def load_routes(path, meta):
    """{layer: int64 [N, K]} when the dump has route.<layer>.npy for every MoE layer."""
    layers = moe_layer_ids(meta)
    if not all(os.path.isfile(os.path.join(path, f"route.{l}.npy")) for l in layers):
        return None
    return {l: npy(path, f"route.{l}").astype(np.int64) for l in layers}


def run_oracle(path, device, routing):
    meta = load_dump(path)
    c, B, T = meta["config"], meta["B"], meta["T"]
    b = bounds_for(meta)
    dt = torch.float64
    model = NmoeModel(c, T).to(device=device, dtype=dt)
    # Spec check of the table: the same names and shapes as ours.
    names = {n for n, _ in model.named_parameters()}
    on_disk = {f[len("param."):-len(".npy")] for f in os.listdir(path)
               if f.startswith("param.") and f.endswith(".npy")}
    chk = Checker()
    chk.report(names == on_disk, "table/names",
               f"{len(names)} tensors" + ("" if names == on_disk else
                                          f" missing={sorted(on_disk - names)[:4]} extra={sorted(names - on_disk)[:4]}"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in on_disk:
                continue
            a = npy(path, "param." + n)
            if tuple(a.shape) != tuple(p.shape):
                raise DumpError(f"{n}: dump shape {list(a.shape)} != spec shape {list(p.shape)}")
            p.copy_(torch.from_numpy(a.astype(np.float64)))
        for l in model.moe_layers():
            model.layers[l].ffn.bias.copy_(torch.from_numpy(npy(path, f"bias.{l}").astype(np.float64)))
    # Routing: a CPU dump must make the reference's own choices; a bf16 dump is
    # run on ours (near-ties may go either way in bf16) after checking that ours
    # is a top-k of the reference's scores up to bf16 noise.
    routes = load_routes(path, meta)
    if routing == "auto":
        routing = "own" if meta["backend"] == "cpu" or routes is None else "ours"
    if routing == "ours":
        if routes is None:
            raise DumpError(f"{path}: no route.<layer>.npy (older model_dump): use --routing own")
        for l in model.moe_layers():
            model.layers[l].ffn.force_idx = torch.from_numpy(routes[l]).to(device)
    print(f"     routing: {'ours (route.<layer>.npy)' if routing == 'ours' else 'the reference top-k'}")
    inputs = torch.from_numpy(npy(path, "inputs").astype(np.int64)).to(device).view(B, T)
    targets = torch.from_numpy(npy(path, "targets").astype(np.int64)).to(device).view(B, T)
    ce, aux, info = model(inputs, targets)
    total = ce + aux if aux is not None else ce
    if model.idx_loss is not None:  # DSA: the indexer loss is in our gradients too
        total = total + model.idx_loss
    total.backward()

    n_valid = int((targets != model.ignore).sum())
    chk.report(n_valid == meta["n_valid"], "n_valid", f"ours={meta['n_valid']} ref={n_valid}")
    chk.rel("loss", meta["loss"], ce.item(), b[0])
    print(f"     loss ours={meta['loss']:.8f} ref={ce.item():.8f}")
    if aux is not None:
        chk.rel("aux_loss", meta["aux_loss"], aux.item(), b[0])
    if model.idx_loss is not None:
        print(f"     dsa indexer loss ref={model.idx_loss.item():.8f}; "
              f"smallest nonzero score gap at a top-k boundary {model.idx_gap:.2e}")
        if "idx_loss" in meta:
            chk.rel("idx_loss", meta["idx_loss"], model.idx_loss.item(), b[0])
    for l, r in info.items():
        biased, own, K = r["biased"], r["own_idx"], r["own_idx"].shape[1]
        top = torch.sort(biased, dim=-1, descending=True).values
        margin = top[:, K - 1] - top[:, K] if top.shape[1] > K else torch.full_like(top[:, 0], float("inf"))
        near = int((margin < 1e-3).sum())
        print(f"     routing layer {l}: min top-k margin {margin.min().item():.2e}, {near} tokens within 1e-3")
        if routes is None:  # older dump: per-expert counts only
            moved = int(np.abs(npy(path, f"counts.{l}").astype(np.int64) - r["counts"].cpu().numpy()).sum()) // 2
            chk.report(moved == 0 or meta["backend"] != "cpu", f"routing.{l}",
                       "counts agree" if moved == 0 else f"counts: {moved} assignments moved")
            continue
        ours = torch.from_numpy(routes[l]).to(device)
        diff = rerouted(routes[l], own.cpu().numpy())
        worst = max(route_violation(biased, ours).max().item(), 0.0)
        chk.report(worst <= b[3], f"routing.{l}",
                   f"{len(diff)} of {ours.shape[0]} tokens chose other experts than the reference; "
                   f"worst score excess {worst:.2e} bound={b[3]:.0e}")
    for n, p in model.named_parameters():
        if n not in on_disk:
            continue
        g = p.grad.cpu().numpy() if p.grad is not None else np.zeros(p.shape)
        chk.rel("grad." + n, npy(path, "grad." + n), g, grad_bound(n, b))
    return chk.finish()


def run_compare(pa, pb):
    """Two dumps of ours (e.g. CUDA against CPU). Tokens routed differently
    (near-ties) change the gradient of the experts they touch by a whole row,
    so expert tensors and router gate rows are checked over the experts no
    rerouted token touched (the full-tensor figure is printed too). Each dump
    is also checked against the float64 reference on its own routing, which is
    the strict check."""
    ma, mb = load_dump(pa), load_dump(pb)
    b = bounds_for(ma, mb)
    chk = Checker()
    if (ma["B"], ma["T"]) != (mb["B"], mb["T"]) or ma["config"] != mb["config"]:
        diff = sorted(k for k in set(ma["config"]) | set(mb["config"])
                      if ma["config"].get(k) != mb["config"].get(k))
        print(f"note: configs differ in {diff}")
    print(f"     {ma['backend']} loss={ma['loss']:.8f}  {mb['backend']} loss={mb['loss']:.8f}")
    chk.rel("loss", ma["loss"], mb["loss"], b[0])
    if ma.get("aux_loss") or mb.get("aux_loss"):
        chk.rel("aux_loss", ma["aux_loss"], mb["aux_loss"], b[0])
    chk.rel("inputs", npy(pa, "inputs"), npy(pb, "inputs"), 0.0)
    chk.rel("targets", npy(pa, "targets"), npy(pb, "targets"), 0.0)
    ra, rb = load_routes(pa, ma), load_routes(pb, mb)
    touched = {}
    for l in moe_layer_ids(ma):
        if ra is not None and rb is not None:
            d = rerouted(ra[l], rb[l])
            touched[l] = sorted(set(ra[l][d].ravel().tolist()) | set(rb[l][d].ravel().tolist()))
            print(f"     routing layer {l}: {len(d)} tokens chose other experts; experts touched {touched[l]}")
        else:
            moved = int(np.abs(npy(pa, f"counts.{l}").astype(np.int64) -
                               npy(pb, f"counts.{l}").astype(np.int64)).sum()) // 2
            print(f"     routing layer {l}: counts: {moved} assignments moved")
    files = {f[:-4] for f in os.listdir(pb) if f.endswith(".npy")}
    for f in sorted(f[:-4] for f in os.listdir(pa) if f.endswith(".npy")):
        if not f.startswith(("param.", "grad.", "bias.")):
            continue
        if f not in files:
            chk.report(False, f, f"missing in {pb}")
            continue
        bound = grad_bound(f, b) if f.startswith("grad.") else b[1]
        a, r = npy(pa, f), npy(pb, f)
        # Expert tensors and the router gate both have one row per expert.
        m = re.match(r"grad\.layers\.(\d+)\.ffn\.(experts\.|router\.gate\.)", f)
        hit = touched.get(int(m.group(1)), []) if m else []
        if hit:
            keep = np.ones(a.shape[0], bool)
            keep[hit] = False
            full = np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-300)
            print(f"     {f}: rel {full:.3e} over all experts; checked over the {int(keep.sum())} untouched")
            a, r = a[keep], r[keep]
        chk.rel(f, a, r, bound)
    return chk.finish()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", nargs="?", help="model_dump output directory")
    ap.add_argument("--compare", nargs=2, metavar=("DUMP_A", "DUMP_B"))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--routing", default="auto", choices=["auto", "own", "ours"],
                    help="own: the reference's top-k; ours: the dump's route.<layer>.npy "
                         "(auto: own for CPU dumps, ours for CUDA dumps)")
    a = ap.parse_args()
    try:
        if a.compare:
            return run_compare(*a.compare)
        if not a.dump:
            ap.error("give a dump directory or --compare DUMP_A DUMP_B")
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return run_oracle(a.dump, device, a.routing)
    except DumpError as e:
        print(f"nmoe_ref: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
