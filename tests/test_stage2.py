"Stage 2 (nbs/04_stage2.ipynb, run by 04a_runner) across runs: the loss falls, batches equal single runs, resumption, shards, papermill."
import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minddiffuser.decoders import write_fake_decoded
from minddiffuser.models import load_models
from minddiffuser.nsd_data import random_scene, render_scene, subject_dir
from PIL import Image

from minddiffuser.runner import SYNTHETIC_RUN, plant_targets, reconstruct, run_images, select_rows
from minddiffuser.stage1 import STAGE1_SMALL, run_stage1
from minddiffuser.stage2 import Stage2Config

NBS = Path(__file__).resolve().parents[1] / "nbs"
SMALL = STAGE1_SMALL  # the authors' proportions on a 10-step schedule


@pytest.fixture(scope="module")
def m():
    return load_models("tiny", "tiny", device="cpu", seed=0)


def make_decoded(out_dir, m, ids, size=16, seed=0):
    "A decoded.h5 whose CLIP targets are the real (masked) features of synthetic stimuli and whose z are others' latents."
    n = len(ids)
    stim = np.stack([render_scene(random_scene(np.random.default_rng(seed + i)), 8 * size) for i in range(2 * n)])
    return plant_targets(write_fake_decoded(subject_dir(out_dir, 1) / "decoded.h5", m, ids, latent_size=size, seed=seed),
                         m, stim[:n], stim[n:])


def record(folder):
    r = json.loads((Path(folder) / "record.json").read_text())
    r.pop("seconds")
    return r


def test_structure_loss_falls_with_fixed_noise(tmp_path, m):
    dec = make_decoded(tmp_path, m, [5])
    cfg = Stage2Config(n_iters=30, fresh_noise=False, lr=0.05)  # the twins' flat landscape: see the notebook
    (f,) = run_images(m, dec, tmp_path / "stage2", cfg=cfg, s1=SMALL, seed=0, progress=False)
    s = np.array(record(f)["history"]["structure"])
    assert np.isfinite(s).all()
    assert s[-5:].mean() < 0.8 * s[:5].mean(), s
    assert (np.diff(s) < 0).mean() > 0.9, s


def test_gradients_reach_c_and_z(tmp_path, m):
    dec = make_decoded(tmp_path, m, [5, 6])
    for optimise, moved in (("cz", {"c", "z"}), ("z", {"z"})):
        out = tmp_path / optimise
        folders = run_images(m, dec, out, cfg=Stage2Config(n_iters=2, optimise=optimise), s1=SMALL, seed=0, batch_size=2, progress=False)
        with h5py.File(dec) as f: start = {"c": f["c"][:], "z": f["z"][:]}
        for j, fo in enumerate(folders):
            st = load_file(fo / "state.safetensors")
            assert all(torch.isfinite(st[k]).all() for k in ("c", "z"))
            changed = {k for k in ("c", "z") if not np.allclose(st[k].numpy(), start[k][j])}
            assert changed == moved, (optimise, changed)
            assert all(st[f"adam.{i}.exp_avg"].abs().sum() > 0 for i in range(len(moved)))


def test_batch_equals_single_runs(tmp_path, m):
    dec = make_decoded(tmp_path, m, [5, 6, 7])
    cfg = Stage2Config(n_iters=4, save_every=2)
    both = run_images(m, dec, tmp_path / "batch", cfg=cfg, s1=SMALL, seed=3, batch_size=3, progress=False)
    alone = run_images(m, dec, tmp_path / "single", cfg=cfg, s1=SMALL, seed=3, batch_size=1, progress=False)
    for a, b in zip(both, alone):
        ra, rb = record(a), record(b)
        for k in ("loss", "structure", "lr"):
            np.testing.assert_allclose(ra["history"][k], rb["history"][k], rtol=1e-4)
        sa, sb = load_file(a / "state.safetensors"), load_file(b / "state.safetensors")
        # batched kernels round differently; Adam turns a gradient of ~0 into a step of ~lr either way, so the
        # variables agree to a tenth of one step (the losses above agree to 1e-4)
        for k in ("c", "z"): torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0.1 * cfg.lr)
    h = [record(a)["history"]["structure"] for a in both]
    assert h[0] != h[1] != h[2]  # different targets, different losses: the batch did not mix them


class Stop(Exception): pass


@pytest.mark.parametrize("state_every,stop_at", [(3, 5), (1, 4)])
def test_resume_equals_uninterrupted(tmp_path, m, state_every, stop_at):
    dec = make_decoded(tmp_path, m, [5, 6])
    cfg = Stage2Config(n_iters=7, save_every=2, state_every=state_every, final="best")
    ref = run_images(m, dec, tmp_path / "ref", cfg=cfg, s1=SMALL, seed=1, batch_size=2, progress=False)

    def stop(run):  # dies after the first image's stop_at-th iteration, before the second image's
        if run.nsd_id == 5 and run.iteration == stop_at: raise Stop
    with pytest.raises(Stop):
        run_images(m, dec, tmp_path / "cut", cfg=cfg, s1=SMALL, seed=1, batch_size=2, callback=stop, progress=False)
    cut = [tmp_path / "cut" / f.name for f in ref]
    assert json.loads((cut[0] / "record.json").read_text())["status"] == "running"
    resumed = run_images(m, dec, tmp_path / "cut", cfg=cfg, s1=SMALL, seed=1, batch_size=2, progress=False)
    for a, b in zip(ref, resumed):
        ra, rb = record(a), record(b)
        ra["settings"].pop("decoded_sha256"); rb["settings"].pop("decoded_sha256")
        np.testing.assert_allclose(ra["history"]["loss"], rb["history"]["loss"], rtol=1e-6)
        for r in (ra, rb): r.pop("history"); r.pop("best_structure")
        assert ra == rb
        sa, sb = load_file(a / "state.safetensors"), load_file(b / "state.safetensors")
        assert sa.keys() == sb.keys()
        for k in sa: torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert (a / "final.png").read_bytes() == (a / "best.png").read_bytes()
    # more iterations continue finished images from their state; other settings are refused
    longer = run_images(m, dec, tmp_path / "cut", cfg=replace(cfg, n_iters=9), s1=SMALL, seed=1, progress=False)
    assert [record(f)["iterations"] for f in longer] == [9, 9]
    with pytest.raises(ValueError, match="seed: 1, now 2"):
        run_images(m, dec, tmp_path / "cut", cfg=replace(cfg, n_iters=9), s1=SMALL, seed=2, progress=False)
    with pytest.raises(ValueError, match="more than|longer run"):
        run_images(m, dec, tmp_path / "cut", cfg=cfg, s1=SMALL, seed=1, progress=False)


def test_shards_cover_the_test_set_once(tmp_path, m):
    for n_img, k in [(982, None), (982, 10), (7, 5), (3, None)]:
        for n in (1, 2, 3, 4, 8):
            parts = [select_rows(n_img, k, f"{i}/{n}") for i in range(n)]
            assert np.array_equal(np.concatenate(parts), np.arange(n_img if k is None else k))
    ids = [5, 6, 7]
    dec = make_decoded(tmp_path, m, ids, size=8)
    cfg = Stage2Config(n_iters=1)
    got = [run_images(m, dec, tmp_path / "stage2", select_rows(3, None, f"{i}/2"), cfg, SMALL, progress=False) for i in range(2)]
    names = [{f.name for f in g} for g in got]
    assert not names[0] & names[1] and names[0] | names[1] == {str(i) for i in ids}
    assert sorted(p.name for p in (tmp_path / "stage2").iterdir()) == sorted(map(str, ids))


def test_reconstruct_on_the_demo_tree(tmp_path, m, synth_root):
    "`reconstruct` resolves the tiny twins, stage 1's recorded settings and the demo size from the shared parameters."
    dec = make_decoded(tmp_path, m, [5, 6], size=8)
    (dec.parent / "stage1").mkdir()
    (dec.parent / "stage1" / "settings.json").write_text(json.dumps(dict(models="tiny", weights_seed=0, **vars(SMALL))))
    folders = reconstruct(1, synth_root, tmp_path, progress=False)
    r = record(folders[0])
    assert (len(folders), r["iterations"], r["status"]) == (min(2, SYNTHETIC_RUN["max_images"]), SYNTHETIC_RUN["n_iters"], "done")
    assert r["settings"]["stage1"]["n_steps"] == 10 and r["settings"]["seed"] == SMALL.seed
    with pytest.raises(ValueError, match="allow_mix"):
        reconstruct(1, tmp_path, tmp_path, models="tiny", clip_model="tiny")  # tmp_path is not a synthetic tree


def test_iteration_0_is_the_stage1_image(tmp_path, m, synth_root):
    "With stage 1's settings and seed, stage 2's first image is chapter 03's image of the same decoded features."
    dec = make_decoded(tmp_path, m, [5, 6, 7], size=8)
    s1_dir = run_stage1(1, synth_root, tmp_path, batch_size=2, cfg=SMALL, progress=False)
    folders = reconstruct(1, synth_root, tmp_path, n_iters=1, max_images=3, batch_size=3, progress=False)
    for f in folders:
        a = np.asarray(Image.open(f / "iter_000.png")).astype(int)
        b = np.asarray(Image.open(s1_dir / f"{f.name}.png")).astype(int)
        assert np.abs(a - b).max() <= 1, (f.name, np.abs(a - b).max())


def test_papermill_runs_the_notebook(tmp_path, m, synth_root):
    pm = pytest.importorskip("papermill")
    dec = make_decoded(tmp_path, m, [5, 6], size=8)
    (dec.parent / "stage1").mkdir()
    (dec.parent / "stage1" / "settings.json").write_text(json.dumps(vars(SMALL)))
    pm.execute_notebook(str(NBS / "04_stage2.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=1, data_root=str(synth_root), out_dir=str(tmp_path), n_iters=3,
                                        max_images=2, batch_size=2))
    recs = [record(tmp_path / "subj01" / "stage2" / str(i)) for i in (5, 6)]
    assert [(r["status"], r["iterations"]) for r in recs] == [("done", 3)] * 2
