"""The trained world (chapter 01b): retraining from the seed learns, the command line writes a loadable world, and
the demo chain on the synthetic NSD shows the paper's Table 2 claim in miniature with the shipped weights."""
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from minddiffuser.models import is_world, load_models, resolve_model_ids, world_paths, world_weights
from minddiffuser.nsd_data import COLOURS, SHAPES
from minddiffuser.world import (JUDGE_CFG, WORLD_CFG, boot, generation_check, text_to_image, train_clip, train_denoiser,
                                train_vae, vae_psnr, wilson, world_scenes)


def _fell(record) -> bool:
    "The last logged window's mean loss is below the first's by more than three times the windows' own jitter."
    w = np.array([l for _, l in record["losses"]])
    jitter = np.median(np.abs(np.diff(w)))  # typical change between neighbouring windows
    return w[0] - w[-1] > 3 * jitter


def test_retraining_from_the_seed_learns():
    "A few hundred steps of each network, at small batches: every loss falls, by more than its own noise."
    cfg = replace(WORLD_CFG, vae_steps=300, unet_steps=300, clip_steps=200, vae_batch=8, unet_batch=16, clip_batch=32,
                  warmup=20)
    images, _, captions = world_scenes(256, progress=False)
    vae, r_vae = train_vae(images, cfg, progress=False)
    *_, r_unet = train_denoiser(vae, images, captions, cfg, progress=False)
    _, r_clip = train_clip(images, captions, cfg, progress=False)
    for r in (r_vae, r_unet, r_clip): assert _fell(r), r["losses"]


def test_command_line_writes_a_loadable_world(tmp_path):
    out = tmp_path/"w"
    p = subprocess.run(["minddiffuser", "world", "train", "--steps-scale", "0.002", "--n-scenes", "32", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"models={out/'sd'}" in p.stdout
    record = json.loads((out/"WORLD.json").read_text())
    assert record["settings"]["n_scenes"] == 32 and record["vae"]["steps"] == round(WORLD_CFG.vae_steps * 0.002)
    assert record["device"].startswith("cpu")  # --device auto on a machine without a GPU
    m = load_models(*map(str, world_paths(out)), device="cpu")
    assert (m.vae_factor, m.text_width, m.clip_blocks) == (4, 48, 6)
    assert not (tmp_path/"w.work").exists()  # the work folder is gone once the world is written
    bad = subprocess.run(["minddiffuser", "world", "train", "--steps-scale", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps-scale must be > 0" in bad.stderr


def test_the_world_is_the_synthetic_default_and_ships_small():
    sd, clip = world_weights()
    assert resolve_model_ids(None, None, synthetic=True) == (sd, clip)
    assert is_world(sd) and is_world(clip) and not is_world("tiny")
    root = Path(sd).parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"the shipped world is {total / 2**20:.1f} MB"


def _tool(name:str):
    "A script of tools/ imported as a module."
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1]/"tools"/f"{name}.py")
    tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
    return tool


def _summary(demo_chain) -> dict:
    subj, rec = demo_chain
    return json.loads((subj/"eval"/"summary.json").read_text())


def test_demo_chain_identifies_stage1_images(demo_chain):
    "fMRI -> decoders -> stage 1, scored by 05: the images are identified against their stimuli well above chance."
    s = _summary(demo_chain)
    assert s["sets"]["stage1"]["all"]["clip"]["mean"] >= .75, s["sets"]["stage1"]["all"]["clip"]  # world CLIP two-way; chance 0.5
    assert s["sets"]["stage1"]["all"]["clip"]["lo"] > .5


@pytest.mark.xfail(strict=True, reason="not shown by the v2 world: in the demo chain (8 images, 5 iterations) stage 2 changed "
                   "SSIM by -0.004 [-0.012, 0.004] and PixCorr by -0.09 [-0.30, 0.09]; at 12 images x 40 iterations "
                   "(tools/world_stage2.py) still no gain over stage 1, and towards true CLIP targets stage 2 beats its "
                   "resampling control while towards the decoded ones it does not: see README 'The demo's world'")
def test_demo_chain_stage2_improves_structure(demo_chain):
    "Table 2 in miniature: stage 2 improves SSIM and PixCorr over stage 1 (paired 95% interval above 0), keeping semantics."
    s = _summary(demo_chain)
    d = s["paired"]["stage2 - stage1"]["all"]
    assert d["ssim"]["lo"] > 0 and d["pixcorr"]["lo"] > 0, d
    assert s["sets"]["stage2"]["all"]["clip"]["mean"] >= .75


def test_shipped_vae_reaches_25_db():
    "The issue's bar for the VAE, on held-out scenes (v1 missed it at 24.0 dB; v2's VAE is 4x wider and trained 6x longer)."
    held, _, _ = world_scenes(JUDGE_CFG.n_held_out, start=WORLD_CFG.n_scenes, progress=False)
    mean, lo, hi = boot(vae_psnr(load_models(*world_weights(), device="cpu").vae, held))
    assert lo >= JUDGE_CFG.psnr_min, (mean, lo, hi)


@pytest.mark.xfail(strict=True, reason="v2 world: the named kind in about half the samples (53%, 95% CI 41-65%, of 64 on "
                   "training-time seeds; v1: 38%): squares and triangles come out with round corners; needs far more "
                   "U-Net training (01b, 'How the shipped world was made'): one GPU call of "
                   "tools/world_on_gpu.py --unet-from minddiffuser/world")
def test_shipped_world_draws_the_named_colour_and_kind():
    wanted = [(c, k) for c in COLOURS for k in SHAPES for _ in range(JUDGE_CFG.samples_per_prompt)]
    images = text_to_image(world_weights()[0], [JUDGE_CFG.prompt.format(colour=c, kind=k) for c, k in wanted])
    t = generation_check(images, wanted)
    assert wilson(int(t.colour_ok.sum()), len(t))[1] >= JUDGE_CFG.generation_min  # holds (asserted in 01b too)
    assert t.both_ok.mean() >= JUDGE_CFG.generation_min, t.both_ok.mean()


def test_stage2_experiment_pairs_its_arms(demo_chain, tmp_path):
    """`tools/world_stage2.py`, whose figures the README cites, on the demo chain for two iterations: every arm's
    iteration 0 is the chain's stage-1 image, pixel for pixel (so iteration k minus iteration 0 is stage 2's gain over
    stage 1), the gradient arm moves away from the resampling control by iteration 1, and the oracle arm scores the
    same images against other targets."""
    from PIL import Image
    tool = _tool("world_stage2")
    subj, _ = demo_chain
    rec = tool.main([str(tmp_path), "--runs", str(subj.parent), "--images", "3", "--iters", "2", "--save-every", "1",
                     "--arms", "resample,decoded,oracle"])
    arms = rec["arms"]
    assert {a: r["iterations"] for a, r in arms.items()} == {a: [0, 1] for a in ("resample", "decoded", "oracle")}
    for mt in ("ssim", "pixcorr"):
        start = {a: round(r["mean"][mt][0], 9) for a, r in arms.items()}
        assert len(set(start.values())) == 1, start
        assert all(r["minus_stage1"][mt][0]["mean"] == 0 for r in arms.values())
        assert abs(arms["decoded"]["minus_resample"][mt][1]["mean"]) > 0  # a gradient step changed the images
    assert arms["oracle"]["structure"][0] != arms["decoded"]["structure"][0]  # other targets, same image
    assert (tmp_path/"stage2_over_iterations.png").stat().st_size > 0
    for arm in arms:
        for d in (tmp_path/arm/"stage2").iterdir():
            np.testing.assert_array_equal(np.asarray(Image.open(d/"iter_000.png")),
                                          np.asarray(Image.open(subj/"stage1"/f"{d.name}.png")), err_msg=arm)


def test_gpu_tool_keeps_a_worlds_vae_and_clip(tmp_path):
    """`tools/world_on_gpu.py --unet-from`, the prepared GPU call for more U-Net training, keeps the shipped world's
    VAE and CLIP bit for bit through `save_world`, and its record says where they came from."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from minddiffuser.world import save_world
    tool = _tool("world_on_gpu")
    sd, ck = world_weights()
    vae, r_vae, (clip_model, r_clip) = tool.kept(Path(sd).parent)
    assert vae.dtype == torch.float32 and r_vae["kept_from"] == str(Path(sd).parent) and r_clip["steps"] > 0
    p = StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, requires_safety_checker=False)
    out_sd, out_ck = save_world(tmp_path/"w", vae, p.tokenizer, p.text_encoder, p.unet, clip_model,
                                dict(vae=r_vae, clip=r_clip))
    a, b = torch.load(ck), torch.load(out_ck)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va, vb = (load_file(Path(f)/"vae"/"diffusion_pytorch_model.safetensors") for f in (sd, out_sd))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
    bad = subprocess.run([sys.executable, str(Path(tool.__file__)), str(tmp_path/"x"), "--unet-from", str(tmp_path/"none")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no world there" in bad.stderr
    other = shutil.copytree(Path(sd).parent, tmp_path/"other")  # a world trained with another VAE schedule
    rec = json.loads((other/"WORLD.json").read_text()); rec["settings"]["vae_steps"] += 1
    (other/"WORLD.json").write_text(json.dumps(rec))
    bad = subprocess.run([sys.executable, str(Path(tool.__file__)), str(tmp_path/"y"), "--unet-from", str(other)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "settings differ from this script's in ['vae_steps']" in bad.stderr
