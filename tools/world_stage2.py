"""Does stage 2 improve structure in the trained world when it is given time? (issue 13's Table 2 claim)

The demo chain affords stage 2 five iterations on eight images, and there it shows no structure gain. This runs the
same code (04a's `run_images`, the paper's Stage2Config) for longer on a demo chain's decoded test images, in three
arms, and scores every saved iteration with chapter 05's own SSIM and PixCorr against the stimuli:

- `decoded`:  the method as in the chain: decoded c and z, decoded CLIP targets (the authors' fresh noise);
- `resample`: the same iterations without a gradient step (06's `resample_only` control): what fresh noise alone does;
- `fixed`:    the method with iteration 0's noise kept throughout (`fresh_noise=False`): the optimisation alone,
              without the resampling that fresh noise adds;
- `oracle`:   decoded c and z, but the stimuli's *true* CLIP features as targets (04a's `plant_targets`): what the
              optimisation can do when the targets are right, so that a missing gain can be put on the decoding
              or on the method.

Each arm's paired difference (iteration k minus iteration 0, the stage-1 image) has a 95% bootstrap interval
(05's `bootstrap`), and so has each arm's difference from `resample` at the same iteration and noise (the gradient's
own share). The record and a figure go to OUT; runs resume where they stopped (04a's per-image state).

    minddiffuser run --subject 1 --only 00 01 02 03            # a demo chain's decoded.h5 and stage-1 settings
    python tools/world_stage2.py runs/world_stage2          # 12 images x 40 iterations: 55 min on 2 CPU cores
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minddiffuser.artifacts import require, save_json  # noqa: E402
from minddiffuser.evaluation import bootstrap, extract  # noqa: E402
from minddiffuser.models import load_models  # noqa: E402
from minddiffuser.nsd_data import input_data_root, read_images  # noqa: E402
from minddiffuser.runner import plant_targets, run_images  # noqa: E402
from minddiffuser.stage1 import stage1_settings, stage_inputs  # noqa: E402
from minddiffuser.stage2 import STAGE2_CFG  # noqa: E402

ARMS = dict(resample=dict(gradient=False), decoded=dict(), fixed=dict(fresh_noise=False), oracle=dict())  # cfg changes


def pixel_scores(stimuli: np.ndarray, images: np.ndarray) -> dict:
    "SSIM and PixCorr of images against their stimuli, through 05's own `extract` (its low-level size and resize)."
    rows = np.arange(len(images))
    return extract(lambda r: images[r], rows, {}, ("ssim", "pixcorr"), stimuli_of=lambda r: stimuli[r],
                   progress=False).pixels


def paired(a: np.ndarray, b: np.ndarray) -> list:
    "Per column (saved iteration): the mean of a - b over images with 05's bootstrap interval."
    return [bootstrap(d) for d in (a - b).T]


def trajectories(folders: list, stimuli: np.ndarray) -> dict:
    "Per saved iteration and the last: SSIM and PixCorr of every image (rows: images), and the structure loss."
    recs = [json.loads((f/"record.json").read_text()) for f in folders]
    for r in recs: r["images"][str(r["final_iteration"])] = "final.png"  # the last iteration, saved or not
    its = sorted(set.intersection(*(set(map(int, r["images"])) for r in recs)))
    out = {"iterations": its, "structure": np.array([r["history"]["structure"] for r in recs])}
    for k in its:
        ims = np.stack([np.asarray(Image.open(f/r["images"][str(k)]).convert("RGB")) for f, r in zip(folders, recs)])
        for m, v in pixel_scores(stimuli, ims).items(): out.setdefault(m, []).append(v)
    return out | {m: np.stack(out[m], 1) for m in ("ssim", "pixcorr")}  # (images, saved iterations)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for the arms' runs, the record and the figure")
    ap.add_argument("--runs", default="runs", help="artifacts folder of the demo chain (reads subjNN/decoded.h5)")
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--images", type=int, default=12, help="first k test images (at least 2)")
    ap.add_argument("--iters", type=int, default=40, help="stage-2 iterations per image (the paper: 300)")
    ap.add_argument("--batch", type=int, default=12, help="images optimised together")
    ap.add_argument("--save-every", type=int, default=STAGE2_CFG.save_every, help="score every k-th iteration")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"which of {list(ARMS)}")
    a = ap.parse_args(argv)
    arms = [s for s in a.arms.split(",") if s]
    if bad := [s for s in arms if s not in ARMS]: ap.error(f"unknown arms {bad}: choose from {list(ARMS)}")
    if a.images < 2 or a.iters < 1: ap.error("--images must be >= 2 (paired intervals) and --iters >= 1")
    t0, out = time.time(), Path(a.out)
    dec, _, models, clip_model, _ = stage_inputs(a.runs, a.subject)
    require(a.runs, a.subject, "stage1_settings")
    s1 = stage1_settings(a.runs, a.subject)
    m = load_models(models, clip_model, device="cpu")
    with h5py.File(dec, "r") as f: all_ids = f["nsd_id"][:]
    ids, root = all_ids[: a.images], input_data_root(None, a.runs, a.subject)
    stimuli = read_images(root, ids)
    rel = lambda x: os.path.relpath(x) if x and os.path.isabs(str(x)) else x  # no machine's paths in the record
    record = dict(command=" ".join(["python tools/world_stage2.py", *(argv or sys.argv[1:])]), images=len(ids),
                  iters=a.iters, models=rel(models), clip_model=rel(clip_model), s1=s1.__dict__,
                  stage2=STAGE2_CFG.__dict__ | dict(n_iters=a.iters, save_every=a.save_every), arms={})
    if (out/"record.json").exists():  # keep the arms an earlier run of the same size measured
        old = json.loads((out/"record.json").read_text())
        if all(old.get(k) == record[k] for k in ("images", "iters", "models", "clip_model")):
            record["arms"] = old["arms"]
    for arm in arms:
        d = out/arm; d.mkdir(parents=True, exist_ok=True)
        path = d/"decoded.h5"
        if not path.exists():
            shutil.copy(dec, d/"decoded.h5.tmp")
            if arm == "oracle": plant_targets(d/"decoded.h5.tmp", m, read_images(root, all_ids))  # every row
            (d/"decoded.h5.tmp").rename(path)
        cfg = replace(STAGE2_CFG, n_iters=a.iters, save_every=a.save_every, **ARMS[arm])
        folders = run_images(m, path, d/"stage2", np.arange(len(ids)), cfg, s1, batch_size=a.batch)
        tr = trajectories(folders, stimuli)
        diff = {mt: paired(tr[mt], tr[mt][:, :1]) for mt in ("ssim", "pixcorr")}
        spent = sum(json.loads((f/"record.json").read_text())["seconds"] for f in folders)  # over resumptions too
        record["arms"][arm] = dict(seconds=round(spent), iterations=tr["iterations"],
                                   mean={mt: tr[mt].mean(0).tolist() for mt in ("ssim", "pixcorr")},
                                   minus_stage1=diff, structure=tr["structure"].mean(0).tolist())
        np.savez(d/"trajectories.npz", **{k: np.asarray(v) for k, v in tr.items()})
        same_noise = ARMS[arm].get("fresh_noise", True)  # `fixed` draws other noise than `resample` after iteration 0
        if arm != "resample" and same_noise and (out/"resample"/"trajectories.npz").exists():
            rs = np.load(out/"resample"/"trajectories.npz")  # same images, iterations and noise ...
            if rs["ssim"].shape == tr["ssim"].shape and list(rs["iterations"]) == tr["iterations"]:  # ... if same run
                record["arms"][arm]["minus_resample"] = {mt: paired(tr[mt], rs[mt]) for mt in ("ssim", "pixcorr")}
        last = {mt: diff[mt][-1] for mt in diff}
        print(f"[{time.time() - t0:5.0f}s] {arm}: iteration {tr['iterations'][-1]} minus stage 1: " + ", ".join(
            f"{mt} {v['mean']:+.4f} ({v['lo']:+.4f} to {v['hi']:+.4f})" for mt, v in last.items()), flush=True)
        save_json(out/"record.json", record)
    figure(record, out/"stage2_over_iterations.png")
    print(f"record: {out/'record.json'}; figure: {out/'stage2_over_iterations.png'}")
    return record


def figure(record: dict, path: Path):
    "Structure loss per iteration; SSIM and PixCorr minus stage 1 (top) and minus the resampling control (bottom)."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(13, 6))
    for arm, r in record["arms"].items():
        col = f"C{list(ARMS).index(arm)}"  # one colour per arm in every panel
        ax[0, 0].plot(r["structure"], color=col, label=arm)
        for row, key in enumerate(("minus_stage1", "minus_resample")):
            if key not in r: continue
            its = r["iterations"]
            for a_, mt in zip(ax[row, 1:], ("ssim", "pixcorr")):
                d = r[key][mt]
                a_.plot(its, [v["mean"] for v in d], marker="o", ms=3, color=col, label=arm)
                a_.fill_between(its, [v["lo"] for v in d], [v["hi"] for v in d], color=col, alpha=.2)
    ax[0, 0].set(xlabel="iteration", ylabel="structure loss (decoded or true targets)", yscale="log")
    for row, what in enumerate(("stage 1 (iteration 0)", "resample, same iteration")):
        for a_, mt in zip(ax[row, 1:], ("SSIM", "PixCorr")):
            a_.axhline(0, color="grey", lw=.8); a_.set(xlabel="iteration", ylabel=f"{mt} minus {what}")
    ax[0, 0].legend(fontsize=8); ax[1, 1].legend(fontsize=8); ax[1, 0].axis("off")
    fig.suptitle(f"Stage 2 in the world: {record['images']} test images, {record['iters']} iterations "
                 "(paired means, 95% bootstrap intervals)", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
