"""Train the world (chapter 01b) on one GPU, with a wider-U-Net candidate beside it, and judge both on held-out seeds.

This is how the shipped world of v2 was made (on one H200, in one ten-minute call): the scenes are rendered in
parallel, the VAE trains first, then the two U-Net candidates and CLIP train at once, each in its own process,
through 01b's own `train_vae`, `train_denoiser` and `train_clip` with `device="cuda"`. The U-Net's step count is
set from a timing probe so that everything fits the call, and then written into `WorldConfig` with the rest.
Both candidates are judged on generation seeds the chapter never uses (1000 onwards) and written whole, as
01b's `save_world` writes them, so the choice between them is made on figures the tests do not assert.

    python tools/world_on_gpu.py OUT                      # on a GPU machine
    python tools/world_on_gpu.py OUT --device cpu --tiny  # a dry run of the whole script, in a minute on a laptop

Since v2, `WorldConfig`'s U-Net has the wider widths, so A and B are the same network. What v2 lacks is U-Net
training (the kinds' corners, README's "The demo's world"), and in v2's call the U-Net got under three minutes. So
`--unet-from WORLD` keeps that world's VAE and CLIP (trained from the same seed; the U-Net's latents are the VAE's)
and gives all of the call's training time to one U-Net candidate (v2's U-Net got 161 s of its call):

    python tools/world_on_gpu.py OUT --unet-from minddiffuser/world   # on a GPU machine: OUT/world_A is the world
    python tools/world_on_gpu.py OUT --unet-from minddiffuser/world --device cpu --tiny   # its dry run
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minddiffuser.models import world_paths  # noqa: E402
from minddiffuser.nsd_data import COLOURS, SHAPES  # noqa: E402
from minddiffuser.world import (JUDGE_CFG, WORLD_CFG, _device_name, generation_check, save_world, train_clip,  # noqa: E402
                                train_denoiser, train_vae, vae_psnr, wilson, world_scenes)

T0 = time.time()
V2 = replace(WORLD_CFG, n_scenes=24_000,
             vae=WORLD_CFG.vae | dict(block_out_channels=(32, 64, 128)), vae_steps=4000, vae_batch=32,
             unet_batch=128, clip_steps=1500)
WIDE = (48, 96, 128)  # the candidate U-Net's widths (v1: 32, 64, 128)


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def cfg_of(name, unet_steps):
    cfg = replace(V2, unet_steps=unet_steps)
    return cfg if name == "A" else replace(cfg, unet=cfg.unet | dict(block_out_channels=WIDE))


def _render(args):
    n, start, cfg = args
    return world_scenes(n, start, cfg, progress=False)


def scenes(cfg, n, start=0, chunk=1000):
    with Pool(min(16, os.cpu_count())) as p:
        parts = p.map(_render, [(min(chunk, n - s), start + s, cfg) for s in range(0, n, chunk)])
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]], [c for p in parts for c in p[2]]


def child(work, what, steps, device):
    "One network in its own process, so the GPU runs several small trainings at once."
    d = np.load(work/"scenes.npz", allow_pickle=True)
    images, captions = d["images"], d["captions"].tolist()
    if what == "clip":
        torch.save(train_clip(images, captions, V2, False, device), work/"clip.pt")
        return
    vae = torch.load(work/"vae.pt", weights_only=False)[0]
    torch.save(train_denoiser(vae, images, captions, cfg_of(what, steps), False, device), work/f"denoiser_{what}.pt")


def kept(world):
    "The VAE (float32), its training record, and (CLIP, its record) of a saved world, for `--unet-from`."
    sd, ck = world_paths(world)
    record = json.loads((Path(world)/"WORLD.json").read_text())
    vae = AutoencoderKL.from_pretrained(str(sd/"vae"), torch_dtype=torch.float32).eval().requires_grad_(False)
    clip_model = open_clip.model.CLIP(**json.loads((ck.parent/"open_clip_config.json").read_text())["model_cfg"])
    clip_model.load_state_dict({k: v.float() for k, v in torch.load(ck, map_location="cpu").items()})
    note = dict(kept_from=str(world), kept_finished=record.get("finished"))
    return vae, record["vae"] | note, (clip_model.eval().requires_grad_(False), record["clip"] | note)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out"); ap.add_argument("--device", default="cuda"); ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=540); ap.add_argument("--child", nargs=2)
    ap.add_argument("--candidates", default="AB",
                    help="A: WorldConfig's U-Net, B: the wider (48, 96, 128), the same since v2")
    ap.add_argument("--unet-batch", type=int, default=128); ap.add_argument("--reserve-s", type=float, default=120)
    ap.add_argument("--unet-from", help="a world folder whose VAE and CLIP are kept: only the U-Net trains")
    a = ap.parse_args()
    if a.unet_from and not all(p.exists() for p in (*world_paths(a.unet_from), Path(a.unet_from)/"WORLD.json")):
        raise SystemExit(f"--unet-from {a.unet_from}: no world there (sd/, clip/ and WORLD.json written by save_world)")
    if a.unet_from and a.candidates == "AB": a.candidates = "A"  # one candidate: the whole GPU to it
    out = Path(a.out); work = out/"work"; work.mkdir(parents=True, exist_ok=True)
    global V2
    V2 = replace(V2, unet_batch=a.unet_batch)
    if a.tiny: V2 = replace(V2, n_scenes=256, vae_steps=20, clip_steps=20, warmup=5, vae_batch=8, unet_batch=8, clip_batch=16)
    if a.unet_from and not a.tiny:  # the kept networks must be those V2 would train: same scenes, same VAE and CLIP
        theirs = json.loads((Path(a.unet_from)/"WORLD.json").read_text())["settings"]
        ours = json.loads(json.dumps(asdict(V2)))
        kept_keys = [k for k in ours if k in ("image_size", "seed", "scene_stream", "n_scenes")
                     or k.startswith(("vae", "clip"))]
        if diff := sorted(k for k in kept_keys if theirs.get(k) != ours[k]):
            raise SystemExit(f"--unet-from {a.unet_from}: its settings differ from this script's in {diff}")
    if a.child: return child(work, a.child[0], int(a.child[1]), a.device)

    images, _, captions = scenes(V2, V2.n_scenes)  # before CUDA starts: the pool forks
    log("device", _device_name(a.device), "torch", torch.__version__)
    np.savez(work/"scenes.npz", images=images, captions=np.array(captions, dtype=object))
    log("scenes", images.shape)
    if a.unet_from:
        vae, r_vae, kept_clip = kept(a.unet_from)
        log("kept the VAE and CLIP of", a.unet_from)
    else:
        vae, r_vae = train_vae(images, V2, False, a.device)
        log("vae", r_vae["seconds"], "s; last loss", r_vae["losses"][-1])
    torch.save((vae, r_vae), work/"vae.pt")

    # timing probe: 40 steps of the wider candidate, alone; the two candidates and CLIP then share the GPU
    probe = train_denoiser(vae, images[:2048], captions[:2048], replace(cfg_of("B", 40), warmup=5), False, a.device)[-1]
    per_step = probe["seconds"] / 40
    budget = a.deadline_s - (time.time() - T0) - a.reserve_s  # keep time for saving, judging and packing
    steps = 200 if a.tiny else int(budget / (per_step * (1.6 if len(a.candidates) > 1 else 1.15)) // 500 * 500)
    log(f"probe {per_step * 1000:.1f} ms/step alone; budget {budget:.0f} s -> unet_steps {steps}")
    if steps < 1000 and not a.tiny: raise SystemExit("too little time for the U-Net")
    env = os.environ | dict(OMP_NUM_THREADS="4")
    procs = {w: subprocess.Popen([sys.executable, __file__, str(out), "--device", a.device, "--child", w, str(steps), "--unet-batch", str(a.unet_batch)]
                                 + (["--tiny"] if a.tiny else []), env=env)
             for w in (*a.candidates, *(() if a.unet_from else ("clip",)))}
    for w, p in procs.items():
        if p.wait() != 0: raise SystemExit(f"child {w} failed")
        log("finished", w)

    clip_model, r_clip = kept_clip if a.unet_from else torch.load(work/"clip.pt", weights_only=False)
    held, held_scenes, _ = world_scenes(256, V2.n_scenes, V2, progress=False)
    wanted = [(c, k) for c in COLOURS for k in SHAPES for _ in range(4)]
    results = {}
    for w in a.candidates:
        cfg = cfg_of(w, steps)
        tok, te, unet, r_unet = torch.load(work/f"denoiser_{w}.pt", weights_only=False)
        record = dict(settings=json.loads(json.dumps(asdict(cfg))), vae=r_vae, denoiser=r_unet, clip=r_clip,
                      torch=torch.__version__, threads=torch.get_num_threads(), device=_device_name(a.device),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        sd, _ = save_world(out/f"world_{w}", vae, tok, te, unet, clip_model, record, cfg)
        try:
            from diffusers import DDIMScheduler, StableDiffusionPipeline
            from minddiffuser.models import MODEL_CFG
            pipe = StableDiffusionPipeline.from_pretrained(str(sd), torch_dtype=torch.float32, safety_checker=None,
                                                           requires_safety_checker=False).to(a.device)
            pipe.scheduler = DDIMScheduler(**MODEL_CFG.ddim); pipe.set_progress_bar_config(disable=True)
            gens = [torch.Generator().manual_seed(1000 + k) for k in range(len(wanted))]
            gen = pipe([JUDGE_CFG.prompt.format(colour=c, kind=k) for c, k in wanted], height=64, width=64,
                       generator=gens, guidance_scale=5.0, num_inference_steps=50, output_type="np").images
            chk = generation_check((gen * 255).round().astype(np.uint8), wanted)
            np.save(out/f"gen_{w}.npy", (gen[:16] * 255).round().astype(np.uint8))
            psnr = vae_psnr(pipe.vae, held)
            results[w] = dict(unet=cfg.unet["block_out_channels"], unet_steps=steps, unet_seconds=r_unet["seconds"],
                              unet_last_loss=r_unet["losses"][-1], psnr=float(psnr.mean()),
                              **{k: wilson(int(chk[k].sum()), len(chk)) for k in ("colour_ok", "kind_ok", "both_ok")},
                              kind_by_shape=chk.groupby("kind").kind_ok.mean().to_dict())
        except Exception as e:  # the weights matter more than the judging: keep them whatever happens here
            results[w] = dict(error=repr(e))
        log(w, results[w])
    (out/"results.json").write_text(json.dumps(dict(results=results, vae=r_vae["seconds"], clip=r_clip["seconds"],
                                                    probe_ms=per_step * 1000), indent=1, default=str))
    for w in a.candidates:
        with tarfile.open(out/f"world_{w}.tar", "w") as t: t.add(out/f"world_{w}", arcname="world")
    log("done")


if __name__ == "__main__":
    main()
