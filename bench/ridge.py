"""Benchmark: `fastl2lir` against `minddiffuser.ridge.fit_l2lir` on the same synthetic data, and a whole-subject estimate.

Each (tool, shape) runs in its own process on the same cores, so time and peak memory are its own:

* z shape: N 8859 training images x D 11694 voxels, n_feat 4000, a sample of the 16384 outputs;
* CLIP shape: the same X, n_feat 350, a sample of a layer's 38400 outputs; ours also times the 5-fold CV.

Both fit the same z-scored targets; predictions on 982 test images are compared. `fastl2lir` pins its solve loop
to one BLAS thread (threadpoolctl) and uses all BLAS threads for its correlation and Gram products; ours uses
`--threads` cores: worker threads for the products, and every core inside BLAS for the factorisations (SciPy's
LAPACK wrappers hold the GIL, so threads would queue there). A whole subject (c 10752 outputs @125, z 16384 @4000, six CLIP
layers of 38400 with 5-fold CV @350,350,350,250,250,250 then a refit of the kept 25%, embedding 512 @450) is
extrapolated from the per-output times, with per-output time modelled as a + b·n_feat³ through the measured points.

    python bench/ridge.py --quick        # small shapes, about a minute
    python bench/ridge.py                # the real shapes (many minutes)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUBJECT = dict(c=(10752, 125), z=(16384, 4000), embed=(512, 450))
CLIP_LAYERS = (350, 350, 350, 250, 250, 250)
CLIP_WIDTH, KEEP, FOLDS = 38400, 0.25, 5


def make_data(n, d, n_test, n_out, seed, rank=200):
    "Synthetic fMRI with `rank` latent factors plus noise (z-scored), and targets that depend on the factors."
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n + n_test, rank))
    X = F @ (rng.standard_normal((rank, d))*rng.uniform(0, 0.3, d)) + rng.standard_normal((n + n_test, d))
    X = (X - X[:n].mean(0))/X[:n].std(0)
    Y = F @ rng.standard_normal((rank, n_out))*0.1 + rng.standard_normal((n + n_test, n_out))
    Y = (Y - Y[:n].mean(0))/Y[:n].std(0)
    return X[:n], Y[:n], X[n:]


def peak_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20


def worker(a):
    X, Y, Xt = make_data(a.n, a.d, a.n_test, a.outputs, a.seed)
    base = peak_gb()
    out = dict(tool=a.tool, shape=a.shape, n_feat=a.n_feat, outputs=a.outputs, data_gb=base)
    clock = lambda: (time.perf_counter(), time.process_time())
    if a.tool == "fastl2lir":
        import fastl2lir.fastl2lir as fl
        marks = {}
        def timed(it, **kw):                      # fastl2lir's solve loop is `for ... in tqdm(range(T))`
            marks["loop0"] = clock()
            yield from it
            marks["loop1"] = clock()
        fl.tqdm = timed
        t0 = clock()
        m = fl.FastL2LiR().fit(X, Y, alpha=0.15, n_feat=a.n_feat)
        t1 = clock()
        P = m.predict(Xt)
        (l0, c0), (l1, c1) = marks["loop0"], marks["loop1"]
        out.update(total_s=t1[0] - t0[0], setup_s=l0 - t0[0], per_output_s=(l1 - l0)/a.outputs, cpu_per_output_s=(c1 - c0)/a.outputs)
    else:
        import torch
        torch.set_num_threads(a.threads)
        from minddiffuser.ridge import CVFolds, Design, cv_scores, fit_l2lir
        t0 = clock()
        design = Design(X, "cpu", n_workers=a.threads)
        t1 = clock()
        m = fit_l2lir(design, Y, 0.15, a.n_feat, mode=a.mode, mem_gb=a.mem_gb)
        t2 = clock()
        P = m.predict(Xt).numpy()
        out.update(total_s=t2[0] - t0[0], setup_s=t1[0] - t0[0], per_output_s=(t2[0] - t1[0])/a.outputs,
                   cpu_per_output_s=(t2[1] - t1[1])/a.outputs, threads=a.threads)
        if a.cv:
            t3 = clock(); folds = CVFolds(design, FOLDS); t4 = clock()
            out.update(cv_setup_s=t4[0] - t3[0], cv={})
            for k in sorted({a.n_feat, *CLIP_LAYERS} if a.n_feat == 350 else {a.n_feat}):
                t5 = clock(); cv_scores(folds, Y, 0.15, k, mem_gb=a.mem_gb); t6 = clock()
                out["cv"][k] = ((t6[0] - t5[0])/a.outputs, (t6[1] - t5[1])/a.outputs)
                if k != a.n_feat:                 # the refit cost at this n_feat too
                    t7 = clock(); fit_l2lir(design, Y, 0.15, k, mem_gb=a.mem_gb); out.setdefault("fit", {})[k] = (clock()[0] - t7[0])/a.outputs
    out["peak_gb"] = peak_gb()
    np.save(a.pred, P)
    print(json.dumps(out))


def run(tool, shape, n_feat, outputs, args, tmp, cv=False):
    pred = Path(tmp)/f"{tool}_{shape}.npy"
    cmd = [sys.executable, __file__, "--worker", "--tool", tool, "--shape", shape, "--n-feat", str(n_feat), "--outputs", str(outputs),
           "--n", str(args.n), "--d", str(args.d), "--n-test", str(args.n_test), "--seed", str(args.seed), "--pred", str(pred),
           "--threads", str(args.threads), "--mode", args.mode, "--mem-gb", str(args.mem_gb)] + (["--cv"] if cv else [])
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode: sys.exit(f"{tool} {shape} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1]); res["wall_s"] = time.time() - t
    res["pred"] = np.load(pred)
    return res


def per_output_model(points):
    "(a, b) of t(k) = a + b·k³ through two measured (k, t) points."
    (k1, t1), (k2, t2) = sorted(points)
    b = max((t2 - t1)/(k2**3 - k1**3), 0.0)
    return max(t1 - b*k1**3, 0.0), b


def subject_estimate(res, kz, kc):
    "Whole-subject minutes, fastl2lir (one call per family and CV fold, as the authors would) and ours."
    fz, fc, oz, oc = res["fastl2lir", "z"], res["fastl2lir", "clip"], res["ours", "z"], res["ours", "clip"]
    s1 = max((fc["setup_s"] - fz["setup_s"])/(fc["outputs"] - fz["outputs"]), 0.0)    # fastl2lir: products per output
    s0 = max(fz["setup_s"] - s1*fz["outputs"], 0.0)                                  # fastl2lir: Gram etc. per call
    af, bf = per_output_model([(kz, fz["per_output_s"]), (kc, fc["per_output_s"])])
    ao, bo = per_output_model([(kz, oz["per_output_s"]), (kc, oc["per_output_s"])])
    tf = lambda k: s1 + af + bf*k**3
    to = lambda k: oc.get("fit", {}).get(str(k), ao + bo*k**3)
    f = o = 0.0
    for name, (T, k) in SUBJECT.items(): f += s0 + T*tf(k); o += T*to(k)
    for k in CLIP_LAYERS:
        f += FOLDS*(0.8*s0 + CLIP_WIDTH*tf(k)) + s0 + KEEP*CLIP_WIDTH*tf(k)
        o += CLIP_WIDTH*oc["cv"][str(k)][0] + KEEP*CLIP_WIDTH*to(k)
    o += oz["setup_s"] + oc["cv_setup_s"]
    return f/60, o/60


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (N 2000, D 3000, n_feat scaled), about a minute")
    p.add_argument("--n", type=int, default=8859); p.add_argument("--d", type=int, default=11694)
    p.add_argument("--n-test", type=int, default=982)
    p.add_argument("--z-outputs", type=int, default=32, help="outputs sampled at the z shape (one refinement group at --mem-gb 2)")
    p.add_argument("--clip-outputs", type=int, default=1024, help="outputs sampled at the CLIP shape")
    p.add_argument("--threads", type=int, default=2, help="our worker threads (fastl2lir: its own BLAS threading)")
    p.add_argument("--mode", default="auto", help="our solver precision: auto, mixed or float64")
    p.add_argument("--mem-gb", type=float, default=None, help="working memory of the solves (default: minddiffuser.ridge.SOLVE_MEM_GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-fastl2lir", action="store_true", help="time ours only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("tool", "shape", "pred"): p.add_argument(f"--{k}", help=argparse.SUPPRESS)
    p.add_argument("--n-feat", type=int, help=argparse.SUPPRESS); p.add_argument("--outputs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cv", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mem_gb is None:
        from minddiffuser.ridge import SOLVE_MEM_GB
        a.mem_gb = SOLVE_MEM_GB
    if a.worker: return worker(a)
    kz, kc = 4000, 350
    if a.quick:
        a.n, a.d, a.n_test, a.z_outputs, a.clip_outputs = 2000, 3000, 200, 8, 256
        kz, kc = round(4000*3000/11694), round(350*3000/11694)
    scale = 1.0                                              # setup costs are measured at the benchmark's own N, D
    print(f"N {a.n}, D {a.d}, test {a.n_test}; z: n_feat {kz} x {a.z_outputs} outputs; CLIP: n_feat {kc} x {a.clip_outputs} outputs; "
          f"ours: {a.threads} worker threads, mode {a.mode}; load average {os.getloadavg()[0]:.2f}", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, k, T in (("z", kz, a.z_outputs), ("clip", kc, a.clip_outputs)):
            for tool in (() if a.skip_fastl2lir else ("fastl2lir",)) + ("ours",):
                r = res[tool, shape] = run(tool, shape, k, T, a, tmp, cv=(tool == "ours" and shape == "clip"))
                print(f"  {shape:4s} {tool:9s}: setup {r['setup_s']:6.1f} s, {r['per_output_s']*1e3:8.2f} ms/output "
                      f"(CPU {r['cpu_per_output_s']*1e3:8.2f} ms), peak {r['peak_gb']:.2f} GB (data {r['data_gb']:.2f} GB)", flush=True)
                if "cv" in r:
                    print(f"  {shape:4s} {tool:9s}: 5-fold CV: setup {r['cv_setup_s']:.1f} s, " + ", ".join(
                        f"n_feat {k}: {v[0]*1e3:.2f} ms/output (CPU {v[1]*1e3:.2f})" for k, v in r["cv"].items()), flush=True)
            if not a.skip_fastl2lir:
                f, o = res["fastl2lir", shape], res["ours", shape]
                diff = np.abs(f["pred"] - o["pred"]).max()
                print(f"  {shape:4s} speed-up: {f['per_output_s']/o['per_output_s']:.2f}x per output (CPU time {f['cpu_per_output_s']/o['cpu_per_output_s']:.2f}x; "
                      f"fastl2lir's solve loop vs our whole fit), {f['total_s']/o['total_s']:.2f}x for setup + {T} outputs; "
                      f"max |prediction difference| {diff:.1e} (predictions up to {np.abs(f['pred']).max():.1f})", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if a.skip_fastl2lir or a.quick: return
    f_min, o_min = subject_estimate(res, kz, kc)
    z_f = SUBJECT["z"][0]*res["fastl2lir", "z"]["per_output_s"]/60
    z_o = SUBJECT["z"][0]*res["ours", "z"]["per_output_s"]/60
    d1 = a.d + 1
    mem = (a.n*a.d*(4 + 8 + 4) + d1*d1*(8 + 4 + 5*4) + a.n*CLIP_WIDTH*4 + a.n*4096*8 + 2**30*a.mem_gb)/2**30
    print(f"whole subject (extrapolated): fastl2lir {f_min:.0f} min (z {z_f:.0f} min); ours {o_min:.0f} min (z {z_o:.0f} min), "
          f"{f_min/o_min:.1f}x faster. Ours' memory: fMRI (file, float64, fold float32 copies) + Gram (float64, float32) "
          f"+ 5 fold Grams + one CLIP layer + a block + solver memory = {mem:.1f} GB")


if __name__ == "__main__":
    main()
