#!/usr/bin/env python3
"""bench_torch.py: PyTorch training-step throughput of nmoe's model, the
baseline our CUDA backend is compared with on the same card (DESIGN.md
section 7).

  python3 tests/torch_ref/bench_torch.py [--configs super,moe,moonlet]
      [--modes eager,compile] [--steps 20] [--warmup 5] [--time-budget-s 240]

The model is nmoe_ref.NmoeModel (the oracle's spec) in bf16: bf16 weights
and activations, fp32 RMSNorm, router and loss, SDPA attention (causal),
routed experts as one sorted batch through torch._grouped_mm (a loop over
experts when it is missing or fails its self-check), fused AdamW over bf16
weights. One step = forward, backward, optimizer step, on a fixed random batch.
Timing: CUDA events around each step, after the warm-up steps; the median.

One JSON line per measurement:
  {"bench":"torch_train","config":..,"mode":"eager|compile","tok_s":..,"ms_step":..,
   "mfu":..,"peak_mem_gib":..,"device":..,...}
MFU uses 989 TFLOP/s (H100/H200 dense bf16) and FLOPs/token = 6 x active matmul
params (incl. lm_head, excl. embedding) + 6 x L x H x (d_qk + d_v)/2 x seq, as
model_flops_per_token(). Out of memory: the batch is halved and the
measurement retried (an "oom" line says so). When the time budget is spent the
remaining measurements are skipped ("skipped" line)."""
import argparse
import gc
import importlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nmoe_ref as ref  # noqa: E402

PEAK_FLOPS = 989e12

# name -> (config file, overrides)
CONFIGS = {
    "super": ("configs/speedrun/super.toml", {}),
    "moe": ("configs/speedrun/moe.toml", {}),
    "dense": ("configs/speedrun/dense.toml", {}),
    "moonlet": ("configs/moonlet.toml", {"seq_len": 4096, "batch_size": 4}),
    # moonlet's shape with 6 of its 12 layers: what fits an 80 GB card for both stacks
    "moonlet6": ("configs/moonlet.toml", {"seq_len": 4096, "batch_size": 2, "n_layers": 6}),
    "tiny": ("configs/tiny.toml", {}),
}


def emit(obj):
    print(json.dumps(obj), flush=True)


def is_oom(e):
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e)


def dynamo_reset():
    """Drops compiled graphs (a new model or batch shape compiles afresh)."""
    importlib.import_module("torch._dynamo").reset()


def grouped_self_check(device):
    """torch._grouped_mm on our layouts (w13 [E, D, 2F], w2 [E, F, D], an empty
    group) against the per-expert loop, forward and backward. (ok, why)."""
    if not ref.grouped_mm_available():
        return False, "torch._grouped_mm not in this PyTorch"
    if device != "cuda":
        return False, "grouped GEMM needs CUDA"
    try:
        torch.manual_seed(0)
        E, D, Fm, M = 4, 64, 32, 96
        ends = torch.tensor([40, 40, 72, 96], device=device)
        xe = torch.randn(M, D, device=device, dtype=torch.bfloat16)
        outs = []
        for impl in ("grouped", "loop"):
            ex = ref.Experts(E, D, Fm, impl).to(device)
            torch.manual_seed(1)
            with torch.no_grad():
                ex.w13.normal_(0, 0.1)
                ex.w2.normal_(0, 0.1)
            ex = ex.to(torch.bfloat16)
            x = xe.clone().requires_grad_(True)
            y = ex(x, ends)
            (y.float() ** 2).sum().backward()
            outs.append([y.float(), x.grad.float(), ex.w13.grad.float(), ex.w2.grad.float()])
        for a, b in zip(*outs):
            rel = ((a - b).norm() / b.norm()).item()
            if not rel <= 2e-2:
                return False, f"grouped vs loop rel {rel:.3g}"
        return True, "ok"
    except Exception as e:  # noqa: BLE001 (any failure means: use the loop)
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def init_params(model, seed):
    """Spec-shaped random init (reference section 2.3; clamped normal for the
    truncated normals): the values only need to be realistic for timing."""
    g = torch.Generator(device=model.embedding.weight.device)
    g.manual_seed(seed)
    D = model.d.D
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            layer = int(name.split(".")[1]) if name.startswith("layers.") else 0
            out_std = 0.02 / (2.0 * (layer + 1)) ** 0.5
            if name == "embedding.weight":
                std = 0.02
            elif name == "lm_head.weight":
                std = D ** -0.5
            elif ".wo." in name or ".w2" in name or ".experts." in name or ".router." in name:
                std = out_std
            else:
                std = 0.02
            p.normal_(0.0, std, generator=g)
            if name != "embedding.weight":
                p.clamp_(-2 * std, 2 * std)


def build(c, device, moe_impl):
    dev = torch.device(device)
    model = ref.NmoeModel(c, c["seq_len"], use_sdpa=hasattr(F, "scaled_dot_product_attention"),
                          moe_impl=moe_impl, exact_topk=False)
    model.keep_routing = False
    model = model.to(dev)
    init_params(model, c["seed"])
    model = model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    opt_kw = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(c["adam_beta1"], c["adam_beta2"]),
                            eps=c["adam_eps"], weight_decay=c["weight_decay"], **opt_kw)
    return model, opt


def timed_steps(step, n, device, deadline):
    """Per-step milliseconds (stops early at the deadline)."""
    ms = []
    for _ in range(n):
        if time.monotonic() > deadline and ms:
            break
        if device == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            step()
            e1.record()
            e1.synchronize()
            ms.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            step()
            ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def measure(name, mode, args, device, moe_impl, deadline):
    path, over = CONFIGS[name]
    c = ref.load_config_toml(os.path.join(ref.REPO, path), over)
    if args.batch:
        c["batch_size"] = args.batch
    B, T, V = c["batch_size"], c["seq_len"], c["vocab_size"]
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    base = {"bench": "torch_train", "config": name, "mode": mode, "device": dev_name,
            "torch": torch.__version__, "moe_impl": moe_impl}
    if mode == "compile" and not hasattr(torch, "compile"):
        emit({**base, "skipped": "torch.compile not in this PyTorch"})
        return
    model = opt = None
    try:
        model, opt = build(c, device, moe_impl)
        if mode == "compile":
            dynamo_reset()
        fwd = torch.compile(model, dynamic=False) if mode == "compile" else model
        while True:
            gen = torch.Generator(device=device)
            gen.manual_seed(c["seed"])
            inputs = torch.randint(0, V, (B, T), device=device, generator=gen)
            targets = torch.randint(0, V, (B, T), device=device, generator=gen)

            def step():
                ce, aux, _ = fwd(inputs, targets)
                (ce if aux is None else ce + aux).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.monotonic()
                for _ in range(args.warmup):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
                warm_s = time.monotonic() - t0
                ms = timed_steps(step, args.steps, device, deadline)
                break
            except Exception as e:  # noqa: BLE001
                if not is_oom(e) or B == 1:
                    raise
            # Out of memory: retry at half the batch, outside the handler so the
            # traceback (and the activations its frames hold) is gone.
            emit({**base, "oom": True, "batch": B, "seq": T, "retry_batch": B // 2})
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            B //= 2
            if mode == "compile":
                dynamo_reset()
        ms.sort()
        med = ms[len(ms) // 2] if len(ms) % 2 else 0.5 * (ms[len(ms) // 2 - 1] + ms[len(ms) // 2])
        tok_s = B * T / (med / 1e3)
        fpt = model.d.flops_per_token(T)
        emit({**base, "batch": B, "seq": T, "tok_s": round(tok_s, 1), "ms_step": round(med, 3),
              "mfu": round(tok_s * fpt / PEAK_FLOPS, 4),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
              "steps": len(ms), "warmup_s": round(warm_s, 1), "flops_per_token": fpt,
              "active_params": model.d.active_matmul_params()})
    except Exception as e:  # noqa: BLE001 (report and go on with the next measurement)
        emit({**base, "batch": B, "seq": T, "error": ("out of memory at batch 1" if is_oom(e) else
                                                      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")})
    finally:
        del model, opt
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="super,moe,moonlet", help=f"comma list of {','.join(CONFIGS)}")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--time-budget-s", type=float, default=240.0)
    ap.add_argument("--batch", type=int, default=0, help="override every config's batch size")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (smoke test)")
    ap.add_argument("--moe-impl", default=None, choices=["grouped", "loop"],
                    help="default: grouped when its self-check passes, else loop")
    a = ap.parse_args()
    names = [s for s in a.configs.split(",") if s]
    modes = [s for s in a.modes.split(",") if s]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"unknown config '{n}' (known: {', '.join(CONFIGS)})")
    for m in modes:
        if m not in ("eager", "compile"):
            ap.error(f"unknown mode '{m}' (eager or compile)")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    moe_impl = a.moe_impl
    if moe_impl is None:
        ok, why = grouped_self_check(device)
        emit({"bench": "torch_grouped_mm_check", "ok": ok, "detail": why})
        moe_impl = "grouped" if ok else "loop"
    start = time.monotonic()
    deadline = start + a.time_budget_s
    todo = [(n, m) for n in names for m in modes]
    for i, (n, m) in enumerate(todo):
        if time.monotonic() > deadline:
            emit({"bench": "torch_train", "skipped": [f"{x}/{y}" for x, y in todo[i:]],
                  "reason": f"time budget {a.time_budget_s:g} s spent"})
            break
        measure(n, m, a, device, moe_impl, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
