#!/usr/bin/env bash
# deploy_manifests.sh: checks docker/ and k8s/ without Docker or kubectl.
# k8s/*.yaml parse, carry apiVersion/kind/metadata.name, name one image repository
# (the tags docker/README.md builds), mount only the PVC pvc.yaml defines, wire
# selectors, Service ports and probes; the train Job asks for one GPU with the nvidia
# runtime and resumes; every container runs a real nmoe command, and the train and
# data-prep command lines are run through build/nmoe (--print-config; prep + verify
# of a tiny corpus) with /data mapped to a temp dir. The Dockerfiles COPY only files
# that exist (and .dockerignore keeps), build `make CUDA=1` / `make` and copy the
# binary that build makes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=/usr/bin/python3
fail() { echo "FAIL: $*" >&2; exit 1; }

"$PY" -c 'import yaml' 2>/dev/null ||
  fail "python3-yaml is missing: apt-get install python3-yaml (scripts/setup.sh installs it)"
[ -x build/nmoe ] || fail "build/nmoe is missing: run make first"
command -v zstd >/dev/null || fail "zstd is missing: apt-get install zstd (scripts/setup.sh installs it)"
T=$(mktemp -d /tmp/nmoe_e2e_deploy_XXXXXX)
trap 'rm -rf "$T"' EXIT

"$PY" - "$T" <<'PYEOF'
import fnmatch, glob, os, re, shlex, subprocess, sys, yaml

T = sys.argv[1]
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond

# ---- nmoe commands (src/main.c's table) and the image tags docker/README.md builds
commands = set(re.findall(r'\{"(\w+)",\s*\w+_main', open("src/main.c").read()))
check("train" in commands and "data" in commands, f"src/main.c: command table not found ({commands})")
readme = open("docker/README.md").read()
tags = dict(re.findall(r"docker build -f (docker/Dockerfile(?:\.cpu)?) [^\n]*?-t (\S+) \.", readme))
check(set(tags) == {"docker/Dockerfile", "docker/Dockerfile.cpu"},
      f"docker/README.md: build commands for both Dockerfiles not found ({tags})")
gpu_image, cpu_image = tags.get("docker/Dockerfile", "?"), tags.get("docker/Dockerfile.cpu", "?")

# ---- k8s: parse, common fields
docs = {}
for path in sorted(glob.glob("k8s/*.yaml")):
    try:
        loaded = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        errors.append(f"{path}: not YAML: {e}")
        continue
    check(loaded, f"{path}: no documents")
    for d in loaded:
        ok = check(isinstance(d, dict) and isinstance(d.get("apiVersion"), str) and
                   isinstance(d.get("kind"), str) and isinstance(d.get("metadata"), dict) and
                   isinstance(d["metadata"].get("name"), str),
                   f"{path}: a document lacks apiVersion, kind or metadata.name")
        if ok:
            docs.setdefault(os.path.basename(path), []).append(d)
for name in ("pvc.yaml", "train.yaml", "train-multi-gpu.yaml", "data-prep.yaml", "nviz.yaml"):
    check(name in docs, f"k8s/{name}: missing")
if errors:
    sys.exit("\n".join("FAIL: " + e for e in errors))

def one(fname, kind):
    found = [d for d in docs[fname] if d["kind"] == kind]
    check(len(found) == 1, f"k8s/{fname}: expected one {kind}, found {len(found)}")
    return found[0] if found else {}

pvcs = {d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "PersistentVolumeClaim"}
check("nmoe-data" in pvcs, "k8s/pvc.yaml: no PersistentVolumeClaim nmoe-data")

def pod_spec(d):
    return d["spec"]["template"]["spec"] if d["kind"] in ("Job", "Deployment") else d["spec"]

def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])

def expand(args, env, where):
    # Kubernetes replaces $(VAR) in args with the container's env; an unknown name stays literal.
    out = []
    for a in args:
        for ref in re.findall(r"\$\((\w+)\)", a):
            if check(ref in env, f"{where}: args use $({ref}) but env does not define it"):
                a = a.replace(f"$({ref})", env[ref])
        out.append(a)
    return out

def env_of(c, job_name):
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "") in (
                "metadata.labels['batch.kubernetes.io/job-name']", "metadata.labels['job-name']"):
            env[e["name"]] = job_name
    return env

images, run_lines = {}, {}
for fname, ds in docs.items():
    for d in ds:
        if d["kind"] not in ("Job", "Deployment", "Pod"):
            continue
        spec, where = pod_spec(d), f"k8s/{fname} {d['kind']} {d['metadata']['name']}"
        check(containers(spec), f"{where}: no containers")
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for v in vols.values():
            if "persistentVolumeClaim" in v:
                check(v["persistentVolumeClaim"].get("claimName") in pvcs,
                      f"{where}: volume {v['name']} claims a PVC pvc.yaml does not define")
        for c in containers(spec):
            cw = f"{where} container {c.get('name')}"
            images[cw] = c.get("image", "")
            for m in c.get("volumeMounts", []):
                check(m.get("name") in vols, f"{cw}: mounts undefined volume {m.get('name')}")
            args = [str(a) for a in c.get("args", [])]
            check(not c.get("command"), f"{cw}: overrides the image's nmoe entrypoint")
            if check(args, f"{cw}: no args (an nmoe command line)"):
                check(args[0] in commands, f"{cw}: '{args[0]}' is not an nmoe command ({sorted(commands)})")
                run_lines[(fname, c.get("name"))] = expand(args, env_of(c, d["metadata"]["name"]), cw)

# one image repository; train on the GPU image, the rest on the CPU image
repos = {re.sub(r":[^:/]*$", "", i) for i in images.values()}
check(len(repos) == 1, f"containers name different image repositories: {images}")
for cw, img in images.items():
    want = gpu_image if cw.startswith("k8s/train") else cpu_image
    check(img == want, f"{cw}: image {img}, expected {want} (docker/README.md)")

# ---- train.yaml: one GPU, nvidia runtime, shm, resume, a real config
job = one("train.yaml", "Job")
spec = pod_spec(job)
c = spec["containers"][0]
check(spec.get("runtimeClassName") == "nvidia", "train.yaml: runtimeClassName is not nvidia")
check(spec.get("restartPolicy") == "OnFailure", "train.yaml: restartPolicy is not OnFailure")
check(isinstance(job["spec"].get("backoffLimit"), int), "train.yaml: no backoffLimit")
res = c.get("resources", {})
check(str(res.get("limits", {}).get("nvidia.com/gpu")) == "1", "train.yaml: limits nvidia.com/gpu is not 1")
shm = [v for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
check(any(m["mountPath"] == "/dev/shm" and m["name"] in {v["name"] for v in shm}
          for m in c.get("volumeMounts", [])), "train.yaml: /dev/shm is not a Memory emptyDir")
check(any(m["mountPath"] == "/data" for m in c.get("volumeMounts", [])), "train.yaml: /data not mounted")
check("NMOE_RUN" in env_of(c, "x"), "train.yaml: NMOE_RUN does not come from the Job name")
targs = run_lines.get(("train.yaml", c.get("name")), [])
check(targs[:1] == ["train"], f"train.yaml: args do not start with train: {targs}")
check("--resume" in targs, "train.yaml: restarts need --resume")
cfg = targs[1] if len(targs) > 1 else ""
check(cfg.startswith("/workspace/configs/") and os.path.isfile(cfg.replace("/workspace/", "", 1)),
      f"train.yaml: config {cfg!r} is not a file of configs/ (/workspace/configs/ in the image)")

# ---- train-multi-gpu.yaml: `nmoe launch -n N -- nmoe train ...` on the N GPUs it asks for
mjob = one("train-multi-gpu.yaml", "Job")
mspec = pod_spec(mjob)
mc = mspec["containers"][0] if mspec.get("containers") else {}
margs = run_lines.get(("train-multi-gpu.yaml", mc.get("name")), [])
check(margs[:2] == ["launch", "-n"] and len(margs) > 4 and margs[3] == "--",
      f"train-multi-gpu.yaml: args are not `launch -n N -- ...`: {margs}")
ngpu = margs[2] if len(margs) > 2 else "?"
mres = mc.get("resources", {})
check(str(mres.get("limits", {}).get("nvidia.com/gpu")) == ngpu,
      f"train-multi-gpu.yaml: launches {ngpu} ranks but limits nvidia.com/gpu is "
      f"{mres.get('limits', {}).get('nvidia.com/gpu')}")
check(mspec.get("runtimeClassName") == "nvidia", "train-multi-gpu.yaml: runtimeClassName is not nvidia")
inner = margs[4:]
check(inner[:1] == ["/usr/local/bin/nmoe"] and inner[1:2] == ["train"] and "--resume" in inner,
      f"train-multi-gpu.yaml: the ranks do not run `/usr/local/bin/nmoe train ... --resume`: {inner}")
mcfg = inner[2] if len(inner) > 2 else ""
check(mcfg.startswith("/workspace/configs/") and os.path.isfile(mcfg.replace("/workspace/", "", 1)),
      f"train-multi-gpu.yaml: config {mcfg!r} is not a file of configs/")
check(any(m["mountPath"] == "/dev/shm" for m in mc.get("volumeMounts", [])), "train-multi-gpu.yaml: no /dev/shm")

# ---- nviz.yaml: selector, Service, probes, read-only data
dep, svc = one("nviz.yaml", "Deployment"), one("nviz.yaml", "Service")
tlabels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
sel = dep.get("spec", {}).get("selector", {}).get("matchLabels", {})
check(sel and all(tlabels.get(k) == v for k, v in sel.items()), "nviz.yaml: Deployment selector misses its pods")
ssel = svc.get("spec", {}).get("selector", {})
check(ssel and all(tlabels.get(k) == v for k, v in ssel.items()), "nviz.yaml: Service selector misses the pods")
vc = pod_spec(dep)["containers"][0] if dep else {}
ports = {p.get("name"): p["containerPort"] for p in vc.get("ports", [])}
vargs = [str(a) for a in vc.get("args", [])]
port_arg = vargs[vargs.index("--port") + 1] if "--port" in vargs[:-1] else None
check(port_arg is not None and int(port_arg) in ports.values(), f"nviz.yaml: --port {port_arg} is not a container port")
for p in svc.get("spec", {}).get("ports", []):
    t = p.get("targetPort")
    check(t in ports or t in ports.values(), f"nviz.yaml: Service targetPort {t} is not a container port")
for probe in ("readinessProbe", "livenessProbe"):
    g = vc.get(probe, {}).get("httpGet", {})
    check(g.get("path") == "/api/health" and (g.get("port") in ports or g.get("port") in ports.values()),
          f"nviz.yaml: {probe} is not httpGet /api/health on a container port")
check(all(m.get("readOnly") for m in vc.get("volumeMounts", []) if m["mountPath"] == "/data"),
      "nviz.yaml: /data is not mounted read-only")

# ---- run the train and data-prep command lines through build/nmoe, /data -> T/data
def local(args):
    return [a.replace("/workspace/configs/", "configs/").replace("/data/", f"{T}/data/") for a in args]

def nmoe(args, what):
    try:
        p = subprocess.run(["build/nmoe"] + args, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        check(False, f"{what}: `nmoe {shlex.join(args)}` did not run: {e}")
        return subprocess.CompletedProcess(args, 1, "", "")
    check(p.returncode == 0, f"{what}: `nmoe {shlex.join(args)}` exited {p.returncode}: {p.stderr.strip()[-400:]}")
    return p

printed = nmoe(local(targs[:2]) + ["--print-config"] + local(targs[2:]), "train.yaml").stdout if targs else ""
if len(inner) > 2:
    mprinted = nmoe(local(inner[1:3]) + ["--print-config"] + local(inner[3:]), "train-multi-gpu.yaml").stdout
    e = re.search(r"^n_routed_experts = (\d+)", mprinted, re.M)
    b = re.search(r"^batch_size = (\d+)", mprinted, re.M)
    check(e and b and ngpu.isdigit() and int(e.group(1)) % int(ngpu) == 0 and int(b.group(1)) % int(ngpu) == 0,
          f"train-multi-gpu.yaml: experts/batch of {mcfg} do not divide over {ngpu} ranks")
os.makedirs(f"{T}/data/raw/fineweb_edu")
with open(f"{T}/data/raw/fineweb_edu/part0.jsonl", "w") as f:
    for i in range(3):
        f.write('{"id": "d%d", "text": "Deployment check number %d: the quick brown fox jumps over the lazy dog, '
                'and the shards it makes must verify cleanly."}\n' % (i, i))
subprocess.run(["zstd", "-q", "--rm", f"{T}/data/raw/fineweb_edu/part0.jsonl"], check=True)
prep = [a for (f, _), a in run_lines.items() if f == "data-prep.yaml"]
check([a[:2] for a in prep] == [["data", "prep"], ["data", "verify"]],
      f"data-prep.yaml: expected `data prep` then `data verify`, found {[a[:2] for a in prep]}")
for args in prep:
    nmoe(local(args), "data-prep.yaml")
m = re.search(r'^data_path = "(/data/[^"]*)"', printed, re.M)
check(m and os.path.isfile(os.path.join(local([m.group(1)])[0], "manifest.json")),
      "data-prep.yaml does not write the train config's data_path (under /data)")

# ---- Dockerfiles
ignore = [l.strip().rstrip("/") for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
def ignored(path):
    return any(path == p or path.startswith(p + "/") or fnmatch.fnmatch(path, p) for p in ignore)

def instructions(path):
    text = re.sub(r"\\\n", " ", open(path).read())
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "")
            for l in (x.strip() for x in text.splitlines()) if l and not l.startswith("#")]

for path, cuda in (("docker/Dockerfile", True), ("docker/Dockerfile.cpu", False)):
    ins = instructions(path)
    froms = [a for k, a in ins if k == "FROM"]
    runs = " ".join(a for k, a in ins if k == "RUN")
    binary = "build/cuda/nmoe" if cuda else "build/nmoe"
    check(len(froms) >= 2, f"{path}: not multi-stage")
    if cuda:
        check(re.match(r"nvidia/cuda:\S+-devel-ubuntu24\.04 AS build", froms[0] if froms else ""),
              f"{path}: build stage is not nvidia/cuda devel")
        check(froms and re.match(r"nvidia/cuda:\S+-runtime-ubuntu24\.04$", froms[-1]),
              f"{path}: final stage is not nvidia/cuda runtime")
    check(re.search(r"\bmake CUDA=1 " if cuda else r"\bmake (?!CUDA=1)", runs),
          f"{path}: does not build with `make{' CUDA=1' if cuda else ''}`")
    check("npm ci" in runs, f"{path}: does not run npm ci for the vocabularies")
    env = " ".join(a for k, a in ins if k == "ENV")
    tokdir = re.search(r"NMOE_TOKENIZER_DIR=(\S+)", env)
    for want in (["NCCL_NVLS_ENABLE=0", "NVSHMEM_DISABLE_NVLS=1"] if cuda else []):
        check(want in env, f"{path}: ENV lacks {want}")
    check(('ENTRYPOINT', '["nmoe"]') in ins, f"{path}: ENTRYPOINT is not [\"nmoe\"]")
    copied = []
    for k, a in ins:
        if k != "COPY":
            continue
        words = shlex.split(a)
        opts = [w for w in words if w.startswith("--")]
        srcs, dest = [w for w in words if not w.startswith("--")][:-1], words[-1]
        if any(o.startswith("--from=") for o in opts):
            for s in srcs:
                rel = s.replace("/src/", "", 1)
                copied.append((rel, dest))
                check(rel == binary or (rel.startswith("tools/node_modules/") and glob.glob(rel)),
                      f"{path}: COPY --from {s} is neither {binary} nor an installed npm file")
        else:
            for s in srcs:
                check(glob.glob(s.rstrip("/")), f"{path}: COPY source {s} does not exist in the repository")
                check(not ignored(s.rstrip("/")), f"{path}: COPY source {s} is excluded by .dockerignore")
    check((binary, "/usr/local/bin/nmoe") in copied, f"{path}: does not install {binary} as /usr/local/bin/nmoe")
    check(tokdir and any(d.rstrip("/") == tokdir.group(1) for s, d in copied if "tiktoken" in s),
          f"{path}: NMOE_TOKENIZER_DIR is not where the tiktoken vocabularies are copied")
    check(any(a.split()[-1].rstrip("/") == "/workspace/configs" for k, a in ins
              if k == "COPY" and a.split()[0] == "configs/"), f"{path}: configs/ not at /workspace/configs")
for s in ("build", "data", "runs", "tools/node_modules"):
    check(ignored(s), f".dockerignore: {s}/ is not excluded")

if errors:
    sys.exit("\n".join("FAIL: " + e for e in errors))
print(f"deploy manifests: {len(docs)} k8s files, {len(images)} containers, 2 Dockerfiles ok")
PYEOF
